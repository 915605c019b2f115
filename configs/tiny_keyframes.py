r"""Stage 1 of multi-stage generation: a tiny text-to-video DiT at a quarter of the frame rate.

python -m vdit_jax.main --config=configs/tiny_keyframes.py --workdir=/tmp/vdit_tiny_keyframes
python -m vdit_jax.tools.generate_video --keyframe_workdir=/tmp/vdit_tiny_keyframes \
    --interp_workdir=/tmp/vdit_tiny_interpolate --prompt='a red square moving left' \
    --duration_s=3 --fps=8 --out=/tmp/red_square.mp4

configs/tiny_text.py as it is (tiny's flow recipe at width 256, captions, image-to-video in
75% of the clips, 4800 steps at peak 1e-3, guidance 3), with every clip the same synthetic
motion sampled every 4th frame (data.time_stride=4: frame k of a clip is base frame 4k):
8 keyframes at 2 fps span what configs/tiny_interpolate.py renders at 8 fps in 29 frames
(3.625 s at most). About 52 minutes on 2 CPU cores. Its 84 prompted keyframe clips take
the prompted colour and direction in every clip and the shape in 0.93 (squares 25 of 28;
docs/results.md, "Interpolation and keyframes"). sample.fps
is the rate the clips stand for; the pipeline (generate/multistage.py) checks that it times
tiny_interpolate's keyframe spacing gives that model's rate.
"""

from configs import tiny_text

RATE_RATIO = 4   # full-rate frames per keyframe interval (tiny_interpolate's spacing)


def get_config(arg=None):
  del arg
  config = tiny_text.get_config()
  config.data.time_stride = float(RATE_RATIO)  # base-motion frames between keyframes
  config.sample.fps = 2                        # = tiny_interpolate's 8 fps / 4
  return config
