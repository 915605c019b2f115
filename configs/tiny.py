r"""Tiny video DiT on the built-in synthetic shapes: trains on a 2-core CPU in minutes.

python -m vdit_jax.main --config=configs/tiny.py --workdir=/tmp/vdit_tiny

16 frames of 32x32 RGB, tubelets of 2x4x4 (512 tokens per clip), width 128,
depth 4, 4 heads: about 1.3 M parameters.
"""

from vdit_jax.defaults import base_config


def get_config(arg=None):
  del arg
  config = base_config()
  config.model.variant = 'Mu/2x4x4'
  config.data.num_frames = 16
  config.data.height = 32
  config.data.width = 32
  config.train.num_steps = 1000
  config.train.batch_size = 16
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 100
  config.train.log_every = 25
  config.checkpoint.every_steps = 250
  config.checkpoint.keep = 2
  config.sample.every_steps = 0
  config.sample.num_samples = 8
  return config
