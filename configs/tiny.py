r"""Tiny video DiT on the built-in synthetic shapes: trains on a 2-core CPU in minutes.

python -m vdit_jax.main --config=configs/tiny.py --workdir=/tmp/vdit_tiny

16 frames of 32x32 RGB, tubelets of 2x4x4 (512 tokens per clip, 96 values
per tubelet, so the width 128 can carry the whole noise), depth 4, 4 heads:
about 1.3 M parameters. v-prediction on the cosine schedule: with eps-prediction
the first DDIM steps from t=999 (abar ~ 2e-9) amplify the model's eps error by
~200x and a model this small and this briefly trained samples noise (measured;
see BUILD_NOTES.md), while v-prediction gives a well-conditioned x0 at every t.
"""

from vdit_jax.defaults import base_config


def get_config(arg=None):
  del arg
  config = base_config()
  config.model.variant = 'Mu/2x4x4'
  config.data.num_frames = 16
  config.data.height = 32
  config.data.width = 32
  config.diffusion.objective = 'v'
  config.diffusion.schedule = 'cosine'
  config.train.num_steps = 600
  config.train.batch_size = 8
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 100
  config.train.log_every = 25
  config.checkpoint.every_steps = 200
  config.checkpoint.keep = 2
  config.sample.every_steps = 0
  config.sample.num_samples = 8
  return config
