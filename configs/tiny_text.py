r"""Tiny text-to-video DiT on the built-in synthetic shapes, captioned 'a red square moving left'.

python -m vdit_jax.main --config=configs/tiny_text.py --workdir=/tmp/vdit_tiny_text
python -m vdit_jax.main --config=configs/tiny_text.py --workdir=/tmp/vdit_tiny_text \
    --mode=sample --prompt='a blue circle moving up'

configs/tiny.py's previous recipe (tiny.previous_recipe: 16 frames, no token
convolution) with captions instead of class labels: the built-in
word tokeniser (model/text.py) and a 2-layer text encoder of width 64 trained with the
model; every block cross-attends to the caption tokens. 10% of the captions are dropped
to the learned null caption, for classifier-free guidance at sampling time.
"""

from configs import tiny


def get_config(arg=None):
  config = tiny.get_config(arg)
  tiny.previous_recipe(config)  # the recipe its BUILD_NOTES figures were measured with
  config.model.conditioning = 'text'
  config.model.caption_dropout = 0.1
  config.model.text.encoder = 'builtin'
  config.model.text.max_length = 8        # the synthetic captions have 5 words
  config.model.text.width = 64
  config.model.text.depth = 2
  config.model.text.num_heads = 4
  config.sample.cfg_scale = 3.0
  return config
