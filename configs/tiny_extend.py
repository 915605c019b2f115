r"""Tiny video DiT that continues given frames: video extension and image-to-video.

python -m vdit_jax.main --config=configs/tiny_extend.py --workdir=/tmp/vdit_tiny_extend
python -m vdit_jax.main --config=configs/tiny_extend.py --workdir=/tmp/vdit_tiny_extend \
    --mode=extend --input=clip.mp4 --num_frames=40      # or --input=frame.png (k = 1)

configs/tiny.py's previous recipe (tiny.previous_recipe: 16 frames) with the first k
frames of each training clip given clean, k uniform in [1, 4] (0 for 10% of the clips, so
it still samples from nothing): the model input has C + 1 channels (the clip with the given
frames clean, and a given-frame mask) and the loss covers the other frames only
(diffusion/conditioning.py). --mode=extend grows the input 16-frame window by window, each
window given the last 4 frames of the clip so far. At this budget the generated frames
do not continue the given motion; the new tiny recipe without bounces and with
diffusion.input_scale='signal', trained four times as long, does (BUILD_NOTES.md, "Finding:
motion that depends on the words or the given frames").
"""

from configs import tiny


def get_config(arg=None):
  config = tiny.get_config(arg)
  tiny.previous_recipe(config)  # the recipe its BUILD_NOTES figures were measured with
  config.model.context_frames_max = 4     # of data.num_frames = 16
  config.model.context_none_prob = 0.1
  config.sample.overlap = 4               # frames shared by consecutive windows
  return config
