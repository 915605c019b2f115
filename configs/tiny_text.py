r"""Tiny text-to-video DiT on the built-in synthetic shapes, captioned 'a red square moving left'.

python -m vdit_jax.main --config=configs/tiny_text.py --workdir=/tmp/vdit_tiny_text
python -m vdit_jax.main --config=configs/tiny_text.py --workdir=/tmp/vdit_tiny_text \
    --mode=sample --prompt='a blue circle moving up'

configs/tiny.py (8 frames, the token convolution, diffusion.shift 2, 2400 steps) with
captions instead of class labels: the built-in word tokeniser (model/text.py) and a
2-layer text encoder of width 64 trained with the model; every block cross-attends to the
caption tokens. 10% of the captions are dropped to the learned null caption, for
classifier-free guidance at sampling time (scale 10). The clips do not bounce
(data.bounce=False), so 'moving left' is true of every frame. About 15 minutes on 2 CPU
cores; the samples take the prompted colour, and the prompted shape more often than
chance, but not yet the prompted direction (BUILD_NOTES.md, "Finding: the tiny models do
not learn motion that depends on the words or the given frames").
"""

from configs import tiny


def get_config(arg=None):
  config = tiny.get_config(arg)
  config.data.bounce = False              # the caption's direction holds in every frame
  config.model.conditioning = 'text'
  config.model.caption_dropout = 0.1
  config.model.text.encoder = 'builtin'
  config.model.text.max_length = 8        # the synthetic captions have 5 words
  config.model.text.width = 64
  config.model.text.depth = 2
  config.model.text.num_heads = 4
  config.sample.cfg_scale = 10.0          # shape 0.60 against 0.43 at 3 (BUILD_NOTES.md)
  return config
