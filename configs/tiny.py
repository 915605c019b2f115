r"""Tiny video DiT on the built-in synthetic shapes: trains on a 2-core CPU in minutes.

python -m vdit_jax.main --config=configs/tiny.py --workdir=/tmp/vdit_tiny

8 frames of 32x32 RGB, each one shape 40-55% of the frame side moving and bouncing;
tubelets of 2x4x4 (256 tokens per clip, 96 values per tubelet, so the width 128 can carry
the whole noise), depth 4, 4 heads, and a 3x3x3 depthwise convolution over the token grid
at every MLP input (model.mlp_conv): about 1.3 M parameters. Without that convolution a
model this small, trained this briefly, samples scattered one-tubelet fragments rather
than one object: each tubelet decides on its own (BUILD_NOTES.md, "Local mixing").
v-prediction on the cosine schedule with its SNR divided by 4 (diffusion.shift=2): more
of the training draws and sampler steps fall where a clip's layout is still undecided.
With eps-prediction the first DDIM steps from t=999 amplify the model's eps error by
~200x and a model this small samples noise (measured; see BUILD_NOTES.md), while
v-prediction gives a well-conditioned x0 at every t.

`previous_recipe` sets the recipe this file had before (16 frames of smaller shapes, no
convolution, no shift, 600 steps): the extension, keyframe, interpolation, bucket and
latent configs build on it, since their figures in BUILD_NOTES.md were measured with it.
"""

from vdit_jax.defaults import base_config


def get_config(arg=None):
  del arg
  config = base_config()
  config.model.variant = 'Mu/2x4x4'
  config.model.mlp_conv = (3, 3, 3)
  config.data.num_frames = 8
  config.data.height = 32
  config.data.width = 32
  config.data.shape_size = (0.4, 0.55)
  config.diffusion.objective = 'v'
  config.diffusion.schedule = 'cosine'
  config.diffusion.shift = 2.0
  config.train.num_steps = 2400
  config.train.batch_size = 8
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 100
  config.train.log_every = 25
  config.checkpoint.every_steps = 800
  config.checkpoint.keep = 2
  config.sample.every_steps = 0
  config.sample.num_samples = 8
  return config


def previous_recipe(config):
  """configs/tiny.py as it was until 2026-12-02, in place: 16 frames of shapes 20-35% of
  the frame side that bounce, no token convolution, the unshifted schedule, the unscaled
  noisy input, 600 steps."""
  config.model.mlp_conv = ()
  config.data.bounce = True
  config.data.num_frames = 16
  config.data.shape_size = (0.2, 0.35)
  config.diffusion.shift = 1.0
  config.train.num_steps = 600
  config.checkpoint.every_steps = 200
  config.diffusion.input_scale = 'none'
  config.diffusion.prediction = 'target'
  config.diffusion.loss_weighting = 'none'
  config.model.class_tokens = 0
  return config
