r"""Tiny video DiT trained on two clip shapes at once (data.buckets, data/buckets.py).

python -m vdit_jax.main --config=configs/tiny_buckets.py --workdir=/tmp/vdit_tiny_buckets

configs/tiny.py's recipe with bucket-pure batches of 16 frames at 32x32 (8 clips, 512
tokens each with 2x4x4 tubelets) and 8 frames at 32x64 (8 clips, also 512 tokens each),
half the synthetic clips each; the train step compiles once per shape. Each batch holds
twice the main job's tokens, so it trains half its steps (1200). Samples take the first
bucket's shape, 16x32x32.
"""

from configs import tiny


def get_config(arg=None):
  config = tiny.get_config(arg)
  config.train.num_steps = 1200   # batches of 4096 tokens, twice configs/tiny.py's
  config.checkpoint.every_steps = 400
  config.data.buckets = ((16, 32, 32, 8), (8, 32, 64, 8))  # (T, H, W, global batch)
  config.data.bucket_weights = (1.0, 1.0)
  # Measured with v loss and DDIM, tiny's objective before rectified flow: it keeps them.
  config.diffusion.objective = 'v'
  config.diffusion.schedule = 'cosine'
  config.diffusion.t_sampling = 'uniform'
  config.sample.sampler = 'ddim'
  config.sample.use_ema = True   # measured with the EMA; tiny samples its raw params
  config.train.lr_schedule = 'cosine'  # measured with cosine decay (tiny: wsd)
  config.sample.cfg_scale = 2.0          # measured with this guidance (tiny: 1.5)
  config.train.learning_rate = 1e-3     # measured at this peak (tiny: 2e-3)
  config.data.shape_weights = ()         # measured with equal shares (tiny: squares 2x)
  config.model.loss_uncertainty = False  # measured without it (tiny: EDM2's weighting)
  config.diffusion.shift = 2.0             # measured with shift 2 (tiny: 3)
  return config
