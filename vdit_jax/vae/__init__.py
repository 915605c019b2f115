"""Causal video VAE (Wan 2.1's architecture) for latent diffusion: model, chunked and tiled
encoding/decoding, checkpoints, training of a small one on the synthetic clips."""
