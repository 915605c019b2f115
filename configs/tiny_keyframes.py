r"""Stage 1 of multi-stage generation: a tiny text-to-video DiT at a quarter of the frame rate.

python -m vdit_jax.main --config=configs/tiny_keyframes.py --workdir=/tmp/vdit_tiny_keyframes
python -m vdit_jax.tools.generate_video --keyframe_workdir=/tmp/vdit_tiny_keyframes \
    --interp_workdir=/tmp/vdit_tiny_interpolate --prompt='a red square moving left' \
    --duration_s=4 --fps=8 --out=/tmp/red_square.mp4

configs/tiny_text.py on tiny's previous recipe (tiny.previous_recipe: 16 frames, no token
convolution, 600 steps) with every clip the same synthetic motion sampled every 4th frame
(data.time_stride=4: frame k of a clip is base frame 4k): 16 keyframes at 2 fps span
what configs/tiny_interpolate.py renders at 8 fps in 61 frames. sample.fps is the rate
the clips stand for; the pipeline (train/multistage.py) checks that it times
tiny_interpolate's keyframe spacing gives that model's rate.
"""

from configs import tiny
from configs import tiny_text

RATE_RATIO = 4   # full-rate frames per keyframe interval (tiny_interpolate's spacing)


def get_config(arg=None):
  config = tiny_text.get_config(arg)
  tiny.previous_recipe(config)  # the recipe its BUILD_NOTES figures were measured with
  config.model.width = None     # the variant's 128, like those figures (tiny_text takes 256)
  config.model.context_frames_max = 0          # text to video only (tiny_text also trains
                                               # image-to-video)
  config.data.time_stride = float(RATE_RATIO)  # base-motion frames between keyframes
  config.sample.fps = 2                        # = tiny_interpolate's 8 fps / 4
  config.sample.cfg_scale = 3.0                # its figures' guidance (tiny_text now takes 10)
  return config
