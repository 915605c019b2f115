r"""Tiny video DiT that continues given frames: video extension and image-to-video.

python -m vdit_jax.main --config=configs/tiny_extend.py --workdir=/tmp/vdit_tiny_extend
python -m vdit_jax.main --config=configs/tiny_extend.py --workdir=/tmp/vdit_tiny_extend \
    --mode=extend --input=clip.mp4 --num_frames=16      # or --input=frame.png (k = 1)

configs/tiny.py's recipe (8 frames, straight paths, x0 output, the scaled noisy input, the
class as tokens) with the first k frames of each training clip
given clean, k uniform in [1, 4] (0 for 10% of the clips, so it still samples from
nothing), and the class label dropped to the null label in 90% of the clips: --mode=extend
samples with the null label, so the motion must come from the given frames (0.52 px/frame
velocity error against 0.83 with tiny's 10%), and Muon on the blocks' matrices
(train.optimizer='muon', 2000 steps so that its dearer CPU step keeps the 15 minutes:
0.35 px/frame). The model input has
C + 1 channels (the clip with the given frames clean, and a given-frame mask) and the loss
covers the other frames only (diffusion/conditioning.py). --mode=extend grows the input
8-frame window by window, each window given the last 4 frames of the clip so far. The
training clips never meet a border (data.bounce=False), so an extension carried past the
border is outside what the model learnt. Figures: BUILD_NOTES.md, "Recipe: what buys
quality per unit of compute".
"""

from configs import tiny


def get_config(arg=None):
  config = tiny.get_config(arg)
  config.model.context_frames_max = 4     # of data.num_frames = 8
  config.model.label_dropout = 0.9        # --mode=extend samples with the null label: most
                                          # clips learn the motion from the given frames
  config.model.context_none_prob = 0.1
  config.sample.overlap = 4               # frames shared by consecutive windows
  # Muon: velocity error 0.35 +- 0.03 at 2000 steps (0.31 at 2400; AdamW's 2400: 0.52);
  # its step costs 1.11x AdamW's CPU time here, so 2000 steps take less than AdamW's 2400.
  config.train.optimizer = 'muon'
  config.train.num_steps = 2000
  # Measured (BUILD_NOTES.md, "Extension on c1") with v loss on the shifted cosine schedule
  # and DDIM, tiny's objective before rectified flow: it keeps them.
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
