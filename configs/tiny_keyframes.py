r"""Stage 1 of multi-stage generation: a tiny text-to-video DiT at a quarter of the frame rate.

python -m vdit_jax.main --config=configs/tiny_keyframes.py --workdir=/tmp/vdit_tiny_keyframes
python -m vdit_jax.tools.generate_video --keyframe_workdir=/tmp/vdit_tiny_keyframes \
    --interp_workdir=/tmp/vdit_tiny_interpolate --prompt='a red square moving left' \
    --duration_s=3 --fps=8 --out=/tmp/red_square.mp4

configs/tiny_text.py's captions and text encoder on configs/tiny.py's recipe (8 frames of
straight paths, the token convolution, x0 output, the scaled noisy input, width 128, 2400
steps), text to video only, with every clip the same synthetic motion sampled every 4th
frame (data.time_stride=4: frame k of a clip is base frame 4k): 8 keyframes at 2 fps span
what configs/tiny_interpolate.py renders at 8 fps in 29 frames (3.625 s at most). sample.fps
is the rate the clips stand for; the pipeline (train/multistage.py) checks that it times
tiny_interpolate's keyframe spacing gives that model's rate. Figures: BUILD_NOTES.md,
"Recipe: what buys quality per unit of compute".
"""

from configs import tiny
from configs import tiny_text

RATE_RATIO = 4   # full-rate frames per keyframe interval (tiny_interpolate's spacing)


def get_config(arg=None):
  config = tiny_text.get_config(arg)
  recipe = tiny.get_config()
  config.model.width = recipe.model.width       # None: the variant's 128 (tiny_text: 256)
  config.diffusion.prediction = recipe.diffusion.prediction   # x0
  config.train.num_steps = recipe.train.num_steps             # 2400 (tiny_text: 4800)
  config.model.context_frames_max = 0          # text to video only (tiny_text also trains
                                               # image-to-video)
  config.data.time_stride = float(RATE_RATIO)  # base-motion frames between keyframes
  config.sample.fps = 2                        # = tiny_interpolate's 8 fps / 4
  config.sample.cfg_scale = 3.0
  # Measured (BUILD_NOTES.md, "Keyframes and interpolation on c1") with v loss on the shifted
  # cosine schedule and DDIM, configs/tiny_text.py's recipe then: it keeps them (tiny_text
  # trains rectified flow since the Recipe's seventh round).
  config.diffusion.objective = 'v'
  config.diffusion.schedule = 'cosine'
  config.diffusion.t_sampling = 'uniform'
  config.diffusion.shift = 2.0
  config.sample.sampler = 'ddim'
  config.sample.use_ema = True
  config.train.lr_schedule = 'cosine'
  return config
