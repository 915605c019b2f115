r"""Small video DiT (DiT-S width) on the synthetic shapes; a single GPU/TPU host.

python -m vdit_jax.main --config=configs/small.py --workdir=/tmp/vdit_small

16 frames of 64x64, tubelets 2x4x4 (512 tokens), S width 384, depth 12, 6 heads
(~ 33 M parameters), bf16 compute with f32 params.
"""

from vdit_jax.config.defaults import base_config


def get_config(arg=None):
  del arg
  config = base_config()
  config.model.variant = 'S/2x4x4'
  config.model.dtype = 'bfloat16'
  config.model.remat_policy = 'dots_with_no_batch_dims_saveable'
  config.data.num_frames = 16
  config.data.height = 64
  config.data.width = 64
  config.train.num_steps = 50_000
  config.train.batch_size = 64
  config.train.learning_rate = 3e-4
  config.train.warmup_steps = 1000
  config.train.weight_decay = 0.01
  config.train.ema_decay = 0.9999
  config.train.log_every = 100
  config.checkpoint.every_steps = 2000
  config.checkpoint.keep = 3
  config.sample.every_steps = 5000
  config.sample.num_samples = 16
  return config
