r"""Tiny causal video VAE (Wan 2.1's layout) on the synthetic shapes: trains on a 2-core CPU.

python -m vdit_jax.train.vae --config=configs/vae_tiny.py --workdir=runs/vae_tiny

9 frames of 32x32 RGB -> latents [3, 4, 4, 16]: Wan 2.1's 8x spatial and 4x temporal
compression (first frame alone, then groups of 4) and 16 latent channels, at width 16
with one residual block per level. Writes runs/vae_tiny/vae, which
`vdit_jax.vae.checkpoint.load` and `python -m vdit_jax.tools.encode_latents --vae=...` read.
"""

from vdit_jax.config import defaults


def get_config(arg=None):
  del arg
  config = defaults.vae_base_config()
  config.vae.base_dim = 8
  config.vae.num_res_blocks = 1
  config.vae.z_dim = 16
  config.data.num_frames = 9
  config.data.height = 32
  config.data.width = 32
  config.train.num_steps = 300
  config.train.batch_size = 4
  config.train.learning_rate = 2e-3
  config.train.warmup_steps = 30
  config.train.log_every = 10
  return config
