r"""Tiny latent video DiT: trains on the latents of configs/vae_tiny.py; samples decode to mp4.

python -m vdit_jax.main --config=configs/tiny_latent.py:runs/tiny_latents \
    --workdir=runs/tiny_latent_dit [--mode=sample]

The whole chain on a CPU (bench/latent_e2e.py runs it and prints the numbers):
  python -m vdit_jax.train.vae --config=configs/vae_tiny.py --workdir=runs/vae_tiny
  python -m vdit_jax.tools.encode_latents --videos=synthetic --num_examples=512 \
      --num_frames=9 --height=32 --width=32 --vae=runs/vae_tiny/vae --out=runs/tiny_latents
  python -m vdit_jax.main --config=configs/tiny_latent.py:runs/tiny_latents \
      --workdir=runs/tiny_latent_dit
  python -m vdit_jax.main --config=configs/tiny_latent.py:runs/tiny_latents \
      --workdir=runs/tiny_latent_dit --mode=sample   # samples/*.mp4 (9 frames of 32x32)

The argument is the encode_latents folder (default runs/tiny_latents). Clips of 9x32x32 RGB
are latents [T', H', W', z] = [3, 4, 4, 16] (normalised per channel); tubelets of 1x1x1
give 48 tokens per clip of 16 values each, at configs/tiny.py's width 128, depth 4, with
v-prediction on the cosine schedule. data.latents=True: samples are un-normalised with the
statistics in the folder's index.json and decoded by the VAE it records (data.vae
overrides it) before the mp4/gif is written; the latents are kept as *_latents.npy.
Figures: docs/results.md, "Video VAE and latents" (the whole chain, bench/latent_e2e.py).
"""

from vdit_jax.config.defaults import base_config

LATENTS = 'runs/tiny_latents'


def get_config(arg=None):
  config = base_config()
  # Latent clips from encode_latents shards (the folder is the argument).
  config.data.source = 'shards'
  config.data.path = arg or LATENTS
  config.data.latents = True
  config.data.num_frames = 3      # latent frames: 1 + (9 - 1) / 4
  config.data.height = 4          # 32 / 8
  config.data.width = 4
  config.data.channels = 16       # the VAE's z_dim
  # configs/tiny.py's synthetic-clip fields; the shards source does not read them.
  config.data.shape_size = (0.4, 0.55)
  config.data.bounce = False
  config.data.shape_weights = (2.0, 1.0, 1.0)
  # The recipe its figures were measured with (bench/latent_e2e.py): tiny's width and depth
  # on 1x1x1 tubelets, no token convolution, the class in adaLN only; v output on the
  # unshifted cosine schedule (DDIM), the unscaled noisy input, the EMA sampled at guidance 2.
  config.model.variant = 'Mu/1x1x1'
  config.model.mlp_conv = ()
  config.model.class_tokens = 0
  config.model.loss_uncertainty = False
  config.diffusion.objective = 'v'
  config.diffusion.schedule = 'cosine'
  config.diffusion.t_sampling = 'uniform'
  config.diffusion.shift = 1.0
  config.diffusion.prediction = 'target'
  config.diffusion.input_scale = 'none'
  config.diffusion.loss_weighting = 'none'
  config.train.num_steps = 1000
  config.train.batch_size = 16
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 50
  config.train.lr_schedule = 'cosine'
  config.train.log_every = 25
  config.checkpoint.every_steps = 250
  config.checkpoint.keep = 2
  config.sample.every_steps = 0
  config.sample.num_samples = 8
  config.sample.sampler = 'ddim'
  config.sample.cfg_scale = 2.0
  config.sample.use_ema = True
  return config
