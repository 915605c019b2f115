"""Captions -> model text inputs, per example, inside the input pipeline.

    captions = CaptionInputs('builtin', max_length=16)
    captions({'caption': 'a red square moving left', ...})
    # {'tokens': int32 [16], 'text_mask': bool [16]}
    CaptionInputs('precomputed', max_length=77, embed_dim=4096)(
        {'caption_embedding': float16 [L, 4096], ...})
    # {'text_embed': float32 [77, 4096], 'text_mask': bool [77]} (rows past L masked)

'builtin' tokenises the example's 'caption' (the synthetic source's, with
captions=True, or a shard record's) with model/text.py's word-level Tokenizer;
'precomputed' pads the example's 'caption_embedding' [L, E] (a shard record's, e.g. T5
or UMT5 encoder outputs written by your own preprocessing, see data/shards.py) to
max_length rows. An empty caption is the null caption (all-False mask). A missing field,
an unknown word, or more than max_length words / rows raise ValueError.
"""

from __future__ import annotations

import numpy as np

from vdit_jax.model import text as text_lib

MODES = ('builtin', 'precomputed')


class CaptionInputs:
  """Per-example transform: caption -> {'tokens' | 'text_embed', 'text_mask'} (picklable,
  so grain worker processes can run it)."""

  def __init__(self, mode: str, max_length: int, embed_dim: int = 0):
    if mode not in MODES:
      raise ValueError(f'caption mode {mode!r} is not one of {MODES}.')
    self.mode = mode
    self.max_length = int(max_length)
    self.embed_dim = int(embed_dim)
    self.tokenizer = text_lib.Tokenizer(self.max_length) if mode == 'builtin' else None

  def __repr__(self) -> str:
    return f'CaptionInputs({self.mode!r}, max_length={self.max_length})'

  def __call__(self, example: dict) -> dict:
    if self.mode == 'builtin':
      if 'caption' not in example:
        raise ValueError("model.text.encoder='builtin' needs a 'caption' per clip; this "
                         f'source gives {sorted(example)}.')
      ids, mask = self.tokenizer.encode(str(example['caption']), allow_empty=True)
      return {'tokens': ids, 'text_mask': mask}
    if 'caption_embedding' not in example:
      raise ValueError("model.text.encoder='precomputed' needs a 'caption_embedding' [L, E] "
                       f'per clip (data/shards.py records); this source gives {sorted(example)}.')
    embedding = np.asarray(example['caption_embedding'], np.float32)  # [L, E]
    if embedding.ndim != 2 or embedding.shape[1] != self.embed_dim:
      raise ValueError(f'caption_embedding has shape {embedding.shape}; it must be [L, E] with '
                       f'E = model.text.embed_dim = {self.embed_dim}.')
    length = embedding.shape[0]
    if length > self.max_length:
      raise ValueError(f'caption_embedding has {length} rows, more than '
                       f'model.text.max_length={self.max_length}.')
    out = np.zeros((self.max_length, self.embed_dim), np.float32)  # [L_max, E]
    out[:length] = embedding
    return {'text_embed': out, 'text_mask': np.arange(self.max_length) < length}


def from_config(config) -> CaptionInputs | None:
  """The transform model.conditioning='text' needs, else None."""
  m = config.model
  if m.conditioning != 'text':
    return None
  return CaptionInputs(m.text.encoder, m.text.max_length, m.text.embed_dim or 0)
