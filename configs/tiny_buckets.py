r"""Tiny video DiT trained on two clip shapes at once (data.buckets, data/buckets.py).

python -m vdit_jax.main --config=configs/tiny_buckets.py --workdir=/tmp/vdit_tiny_buckets

configs/tiny.py:c1 (tiny's model and clips, trained with v loss on the shifted cosine
schedule and sampled with DDIM, the recipe this config was measured with) with
bucket-pure batches of 16 frames at 32x32 (8 clips, 512 tokens each with 2x4x4 tubelets)
and 8 frames at 32x64 (8 clips, also 512 tokens each), half the synthetic clips each; the
train step compiles once per shape. Each batch holds twice the main job's tokens, so it
trains half its steps (1200). Samples take the first bucket's shape, 16x32x32.
"""

from configs import tiny


def get_config(arg=None):
  del arg
  config = tiny.get_config('c1')
  config.train.num_steps = 1200   # batches of 4096 tokens, twice configs/tiny.py's
  config.checkpoint.every_steps = 400
  config.data.buckets = ((16, 32, 32, 8), (8, 32, 64, 8))  # (T, H, W, global batch)
  config.data.bucket_weights = (1.0, 1.0)
  return config
