r"""Stage 2 of multi-stage generation: a tiny DiT that fills the frames between two keyframes.

python -m vdit_jax.main --config=configs/tiny_interpolate.py --workdir=/tmp/vdit_tiny_interpolate

Windows of 5 full-rate synthetic frames (8 fps) whose first and last frames are given clean
(model.given_frames='keyframes', the model's given-frame mask channel on them) and whose 3
middle frames are generated; the loss covers those 3 only (diffusion/conditioning.py).
configs/tiny_keyframes.py makes keyframes 4 frames apart at 2 fps; the pipeline
(train/multistage.py, tools/generate_video.py) runs this model once per consecutive pair.
Text-conditioned, on configs/tiny_text.py's recipe (tiny's: straight paths, the token
convolution, rectified flow with x0 output, the scaled noisy input, warmup-stable-decay,
Euler sampling of the raw params) at width 128, 1200 steps, without guidance at sampling
time: the keyframes carry the colour and shape. Given the true keyframes of 24 held-out
clips, the frames between have their centroids 0.31 px from the true ones (linear
interpolation 0.17; the v recipe before it 0.40; BUILD_NOTES.md, "Recipe", seventh round). Tubelets of
1x4x4, since 5 frames do not split into pairs (320 tokens per clip). --mode=sample
interpolates the keyframes of held-out synthetic clips.
"""

from configs import tiny
from configs import tiny_text


def get_config(arg=None):
  config = tiny_text.get_config(arg)
  recipe = tiny.get_config()
  config.model.width = recipe.model.width       # None: the variant's 128 (tiny_text: 256)
  config.train.num_steps = 1200
  config.checkpoint.every_steps = 400
  config.model.variant = 'Mu/1x4x4'
  config.model.given_frames = 'keyframes'
  config.model.keyframe_stride = 0      # 0: the first and last frame of each window
  config.model.context_frames_max = 2   # the two keyframes
  config.data.num_frames = 5            # keyframe spacing 4 (tiny_keyframes' time_stride)
  config.data.time_stride = 1.0
  config.sample.fps = 8
  config.sample.cfg_scale = 1.0
  return config
