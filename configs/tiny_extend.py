r"""Tiny video DiT that continues given frames: video extension and image-to-video.

python -m vdit_jax.main --config=configs/tiny_extend.py --workdir=/tmp/vdit_tiny_extend
python -m vdit_jax.main --config=configs/tiny_extend.py --workdir=/tmp/vdit_tiny_extend \
    --mode=extend --input=clip.mp4 --num_frames=16      # or --input=frame.png (k = 1)

configs/tiny.py:c1 (tiny's 8 frames of straight paths, x0 output, the scaled noisy input,
the class as tokens, trained with v loss on the shifted cosine schedule and sampled with
DDIM: the recipe its figures were measured with) with the first k frames of each training
clip given clean, k uniform in [1, 4] (0 for 10% of the clips, so it still samples from
nothing), and the class label dropped to the null label in 90% of the clips: --mode=extend
samples with the null label, so the motion must come from the given frames (0.52 px/frame
velocity error against 0.83 with tiny's 10%), and Muon on the blocks' matrices
(train.optimizer='muon', 2000 steps so that its dearer CPU step keeps the 15 minutes:
0.35 px/frame). The model input has
C + 1 channels (the clip with the given frames clean, and a given-frame mask) and the loss
covers the other frames only (diffusion/conditioning.py). --mode=extend grows the input
8-frame window by window, each window given the last 4 frames of the clip so far. The
training clips never meet a border (data.bounce=False), so an extension carried past the
border is outside what the model learnt. Figures: docs/results.md, "Extension", and
docs/history/recipe-rounds.md, "Extension on c1".
"""

from configs import tiny


def get_config(arg=None):
  del arg
  config = tiny.get_config('c1')
  config.model.context_frames_max = 4     # of data.num_frames = 8
  config.model.label_dropout = 0.9        # --mode=extend samples with the null label: most
                                          # clips learn the motion from the given frames
  config.model.context_none_prob = 0.1
  config.sample.overlap = 4               # frames shared by consecutive windows
  # Muon: velocity error 0.35 +- 0.03 at 2000 steps (0.31 at 2400; AdamW's 2400: 0.52);
  # its step costs 1.11x AdamW's CPU time here, so 2000 steps take less than AdamW's 2400.
  config.train.optimizer = 'muon'
  config.train.num_steps = 2000
  return config
