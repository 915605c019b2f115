r"""Tiny text-to-video DiT on the built-in synthetic shapes, captioned 'a red square moving left'.

python -m vdit_jax.main --config=configs/tiny_text.py --workdir=/tmp/vdit_tiny_text
python -m vdit_jax.main --config=configs/tiny_text.py --workdir=/tmp/vdit_tiny_text \
    --mode=sample --prompt='a blue circle moving up'
python -m vdit_jax.main --config=configs/tiny_text.py --workdir=/tmp/vdit_tiny_text \
    --mode=extend --input=frame.png --num_frames=8 --prompt='a blue circle moving up'

configs/tiny.py's recipe (8 frames of straight paths, the token convolution, rectified flow
with x0 output and logit-normal times at shift 3, the scaled noisy input, warmup-stable-decay,
Euler sampling of the raw params) at twice its width (256, MLP 512: 5.2 M parameters) with
captions instead of class labels: the built-in word tokeniser (model/text.py) and a 2-layer
text encoder of width 64 trained with the model; every block cross-attends to the caption
tokens. 10% of the captions are dropped to the learned null caption, for classifier-free
guidance at sampling time (scale 3). In 75% of the training clips the first frame is given
clean (model.context_frames_max=1): then the caption's direction is what the rest of the
clip depends on, which is what teaches the model the direction word; the same model samples
from text alone (--mode=sample) or animates a given image (--mode=extend). 4800 steps,
about 60 minutes on 2 CPU cores. Over two training seeds its samples take the prompted colour
and direction in every clip and the prompted shape in about three of four (BUILD_NOTES.md,
"Recipe: what buys quality per unit of compute", seventh round).
"""

from configs import tiny


def get_config(arg=None):
  config = tiny.get_config(arg)
  config.model.width = 256                # shape 0.62 against 0.48 at the variant's 128
                                          # (v recipe); mlp_dim stays the variant's 512
  config.model.conditioning = 'text'
  config.model.class_tokens = 0           # captions, not class labels
  config.model.caption_dropout = 0.1
  config.model.text.encoder = 'builtin'
  config.model.text.max_length = 8        # the synthetic captions have 5 words
  config.model.text.width = 64
  config.model.text.depth = 2
  config.model.text.num_heads = 4
  # Guidance 3 on tiny's flow recipe: shape 0.75 against guidance 10's 0.42 (BUILD_NOTES).
  config.sample.cfg_scale = 3.0
  # Image-to-video training: the first frame is given clean in 75% of the clips, where
  # the caption's direction is the one thing the rest of the clip depends on that the
  # frame does not show; the other 25% learn text-to-video.
  config.model.context_frames_max = 1
  config.model.context_none_prob = 0.25   # 0.5 never learned the direction word (BUILD_NOTES)
  config.train.num_steps = 4800
  config.train.learning_rate = 1e-3     # measured at this peak (tiny: 2e-3)
  config.data.shape_weights = ()         # measured with equal shares (tiny: squares 2x)
  config.model.loss_uncertainty = False  # measured without it (tiny: EDM2's weighting)
  return config
