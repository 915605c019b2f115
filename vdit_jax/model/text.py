"""Text conditioning: a word-level tokeniser, a small built-in text encoder, the learned
null caption, and the cross-attention sub-layer of the DiT blocks.

Text reaches the model (`VideoDiT(..., text=...)`) as one of
  {'tokens': int32 [B, L], 'mask': bool [B, L]}    ids from `Tokenizer` (model.text.encoder
                                                   = 'builtin': embedded and encoded here)
  {'embed': float [B, L, E], 'mask': bool [B, L]}  precomputed embeddings, e.g. T5 / UMT5
                                                   outputs (model.text.encoder='precomputed')
and `TextConditioner` turns it into a context [B, L, D] at the model width plus its mask.
A caption whose mask is all False is "no caption": its whole sequence is replaced by the
learned null caption (one row `null` [1, D], mask [True, False, ...]). Caption dropout in
training and the unconditional half of classifier-free guidance both clear the mask.
Masked tokens have no effect anywhere: every attention here gives them weight exactly 0.

The vocabulary is fixed and append-only (a word's id is its position in VOCABULARY, so
reordering it would scramble every trained checkpoint's token table).
"""

import dataclasses
import re
from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdit_jax.parallel import axes
from vdit_jax.model.attention import qk_norm_layer

ENCODERS = ('builtin', 'precomputed')
# model.text.projection: how precomputed embeddings [B, L, E] reach the model width D.
#   layernorm_linear  LayerNorm, then one Dense (the project's default)
#   gelu_mlp          Dense, GELU (tanh), Dense: Wan 2.1's text_embedder (PixArt-alpha's)
PROJECTIONS = ('layernorm_linear', 'gelu_mlp')
PAD = '<pad>'  # id 0: padding, never produced from text
# Words of the synthetic captions ('a red square moving left') and a few more to phrase them.
VOCABULARY = (
    PAD, 'a', 'an', 'the', 'one', 'shape', 'moving', 'going', 'to', 'towards', 'and',
    'red', 'green', 'blue', 'yellow', 'magenta', 'cyan', 'white',
    'square', 'circle', 'triangle',
    'right', 'left', 'down', 'up',
)
# Rows of lookup tables (token ids, text positions, the null caption): replicated, like
# the label-embedding rows.
TABLE_ROWS = axes.CLASSES
_SPLIT = re.compile(r"[\s,.;:!?\"']+")


class Tokenizer:
  """Word-level tokeniser over a fixed vocabulary: lower-cased words split on spaces and
  punctuation, one id per word, padded with id 0 to `max_length`.

    ids, mask = Tokenizer(16).encode('a blue circle moving up')  # int32 [16], bool [16]
  """

  def __init__(self, max_length: int, vocabulary: Sequence[str] = VOCABULARY):
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
      raise ValueError(f'max_length={max_length!r} must be a positive integer.')
    if not vocabulary or vocabulary[0] != PAD or len(set(vocabulary)) != len(vocabulary):
      raise ValueError(f'the vocabulary must start with {PAD!r} and hold distinct words.')
    self.max_length = max_length
    self.vocabulary = tuple(vocabulary)
    self._ids = {w: i for i, w in enumerate(self.vocabulary)}

  @property
  def vocab_size(self) -> int:
    return len(self.vocabulary)

  def __repr__(self) -> str:
    return f'Tokenizer(max_length={self.max_length}, vocab_size={self.vocab_size})'

  @staticmethod
  def words(text: str):
    return [w for w in _SPLIT.split(text.lower()) if w]

  def encode(self, text: str, *, allow_empty: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """text -> (ids int32 [max_length], mask bool [max_length]); raises ValueError naming
    an unknown word (with the vocabulary), an empty text (unless `allow_empty`: then the
    mask is all False, the null caption) or one longer than max_length words."""
    if not isinstance(text, str):
      raise ValueError(f'a caption must be a string, got {text!r}.')
    words = self.words(text)
    if not words and not allow_empty:
      raise ValueError(f'prompt {text!r} has no words; give a caption such as '
                       "'a red square moving left'.")
    unknown = [w for w in words if w not in self._ids or w == PAD]
    if unknown:
      known = ' '.join(self.vocabulary[1:])
      raise ValueError(f'prompt {text!r}: the word {unknown[0]!r} is not in the built-in '
                       f'text encoder\'s vocabulary; known words: {known}.')
    if len(words) > self.max_length:
      raise ValueError(f'prompt {text!r} has {len(words)} words, more than '
                       f'model.text.max_length={self.max_length}.')
    ids = np.zeros((self.max_length,), np.int32)
    ids[:len(words)] = [self._ids[w] for w in words]
    mask = np.arange(self.max_length) < len(words)
    return ids, mask

  def encode_batch(self, texts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """[B] texts -> (ids int32 [B, max_length], mask bool [B, max_length])."""
    pairs = [self.encode(t) for t in texts]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

  def decode(self, ids, mask) -> str:
    return ' '.join(self.vocabulary[int(i)] for i, m in zip(ids, mask) if m)


@dataclasses.dataclass(frozen=True)
class TextSpec:
  """Resolved model.text config: the encoder and the caption length L."""
  encoder: str = 'builtin'
  max_length: int = 16
  width: int = 128        # builtin: encoder width
  depth: int = 2          # builtin: transformer layers
  num_heads: int = 4      # builtin: attention heads
  mlp_dim: int = 512      # builtin: MLP hidden width
  embed_dim: int = 0      # precomputed: E of the embeddings [B, L, E]
  pooled: bool = False    # also drive adaLN with the caption's masked mean (PooledText)
  vocab_size: int = len(VOCABULARY)
  projection: str = 'layernorm_linear'  # precomputed: see PROJECTIONS
  # True (Wan 2.1): every one of the L rows is attended, padding included (the encoder's
  # rows past a caption's end are zeros, which the projection maps to non-zero context),
  # and "no caption" is all-zero embeddings instead of the learned null row.
  attend_padding: bool = False


def spec_from_config(text_cfg) -> TextSpec:
  """A complete model.text section -> TextSpec (mlp_dim None: 4 x width)."""
  width = int(text_cfg.width)
  mlp = text_cfg.mlp_dim
  return TextSpec(encoder=text_cfg.encoder, max_length=int(text_cfg.max_length), width=width,
                  depth=int(text_cfg.depth), num_heads=int(text_cfg.num_heads),
                  mlp_dim=int(4 * width if mlp is None else mlp),
                  embed_dim=int(text_cfg.embed_dim or 0), pooled=text_cfg.pooled,
                  projection=text_cfg.projection, attend_padding=text_cfg.attend_padding)


def check_spec(spec: TextSpec) -> None:
  """Raises ValueError naming the model.text field that breaks a rule."""
  if spec.encoder not in ENCODERS:
    raise ValueError(f'model.text.encoder={spec.encoder!r} is not one of {ENCODERS}.')
  if spec.max_length < 1:
    raise ValueError(f'model.text.max_length={spec.max_length} must be positive.')
  if not isinstance(spec.pooled, (bool, np.bool_)):
    raise ValueError(f'model.text.pooled={spec.pooled!r} must be True or False.')
  if spec.projection not in PROJECTIONS:
    raise ValueError(f'model.text.projection={spec.projection!r} is not one of {PROJECTIONS}.')
  if not isinstance(spec.attend_padding, (bool, np.bool_)):
    raise ValueError(f'model.text.attend_padding={spec.attend_padding!r} must be True or False.')
  if spec.encoder != 'precomputed' and (spec.projection != 'layernorm_linear'
                                        or spec.attend_padding):
    raise ValueError(f'model.text.projection={spec.projection!r} and attend_padding='
                     f'{spec.attend_padding} are read only with encoder=\'precomputed\' '
                     f'(not {spec.encoder!r}); leave them at layernorm_linear / False.')
  if spec.attend_padding and spec.pooled:
    raise ValueError('model.text.pooled=True needs the caption mask, which '
                     'model.text.attend_padding=True ignores: set one of them off.')
  if spec.encoder == 'precomputed':
    if spec.embed_dim < 1:
      raise ValueError(f'model.text.embed_dim={spec.embed_dim} must be the positive width E '
                       "of the precomputed embeddings [L, E] (e.g. 4096 for T5-XXL).")
    return
  for key in ('width', 'depth', 'num_heads', 'mlp_dim'):
    if getattr(spec, key) < 1:
      raise ValueError(f'model.text.{key}={getattr(spec, key)} must be positive.')
  if spec.width % spec.num_heads:
    raise ValueError(f'model.text.width={spec.width} is not divisible by '
                     f'model.text.num_heads={spec.num_heads}.')


def null_text(spec: TextSpec, batch: int, dtype=jnp.float32) -> dict:
  """Inputs meaning "no caption" for `batch` clips (all masked: the learned null)."""
  mask = jnp.zeros((batch, spec.max_length), bool)
  if spec.encoder == 'builtin':
    return {'tokens': jnp.zeros((batch, spec.max_length), jnp.int32), 'mask': mask}
  return {'embed': jnp.zeros((batch, spec.max_length, spec.embed_dim), dtype), 'mask': mask}


def drop_text(text: dict, drop) -> dict:
  """Clears the mask of rows where `drop` [B] is True: those become the null caption."""
  return {**text, 'mask': jnp.logical_and(text['mask'], jnp.logical_not(drop)[:, None])}


def masked_attention(q, k, v, mask):
  """q [B, N, K, Dh], k/v [B, L, K, Dh], mask bool [B, L] -> [B, N, K, Dh].

  softmax(q k^T / sqrt(Dh)) v over the unmasked keys: masked keys get weight exactly 0
  (so their values never matter); a row with no key left gives 0.
  """
  logits = jnp.einsum('bnkh,blkh->bknl', q, k,
                      preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5  # [B, K, N, L]
  keep = mask[:, None, None, :]  # [B, 1, 1, L]
  logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
  weights = jnp.where(keep, jax.nn.softmax(logits, axis=-1), 0.0)  # [B, K, N, L]
  return jnp.einsum('bknl,blkh->bnkh', weights.astype(v.dtype), v)  # [B, N, K, Dh]


def _dense(features, in_axis, out_axis, dtype, param_dtype, name, zero=False):
  kernel = nn.initializers.zeros if zero else nn.initializers.xavier_uniform()
  return nn.Dense(
      features, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(kernel, (in_axis, out_axis)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (out_axis,)), name=name)


def _layer_norm(dtype, param_dtype, name=None):
  return nn.LayerNorm(
      epsilon=1e-6, dtype=dtype, param_dtype=param_dtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axes.EMBED,)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes.EMBED,)), name=name)


class MaskedAttention(nn.Module):
  """Multi-head attention of queries x [B, N, D] over keys/values from ctx [B, L, E] with
  mask [B, L], QK-normalised on both sides; output [B, N, D].

  `zero_init`: the output projection starts at zero, so the sub-layer adds nothing
  until trained (a fresh DiT block with cross-attention stays the identity).
  """
  num_heads: int
  qk_norm: bool = True
  zero_init: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  qk_norm_across_heads: bool = False

  @nn.compact
  def __call__(self, x, ctx, mask, image=None):
    """image [B, Li, D] (Wan I2V's image tokens, optional): the queries also attend to
    them through their own key / value projections (`added_*`, keys normalised by
    `added_k_norm`), unmasked, and that attention's output is added before the output
    projection."""
    width = x.shape[-1]
    head_dim = width // self.num_heads
    kernel_in = nn.initializers.xavier_uniform(in_axis=-3, out_axis=(-2, -1))

    def proj(name, inputs):
      kernel = self.param(name + '_kernel', nn.with_logical_partitioning(
          kernel_in, (axes.EMBED, axes.HEADS, axes.HEAD_DIM)),
          (inputs.shape[-1], self.num_heads, head_dim), self.param_dtype)
      bias = self.param(name + '_bias', nn.with_logical_partitioning(
          nn.initializers.zeros, (axes.HEADS, axes.HEAD_DIM)),
          (self.num_heads, head_dim), self.param_dtype)
      return (jnp.einsum('bnd,dkh->bnkh', inputs.astype(self.dtype), kernel.astype(self.dtype))
              + bias.astype(self.dtype))  # [B, N or L, K, Dh]

    q, k, v = proj('query', x), proj('key', ctx), proj('value', ctx)
    if self.qk_norm:
      q = qk_norm_layer(self.qk_norm_across_heads, self.param_dtype, 'q_norm')(q)
      k = qk_norm_layer(self.qk_norm_across_heads, self.param_dtype, 'k_norm')(k)
    q = nn.with_logical_constraint(q, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_HEADS,
                                       axes.ACT_KV))
    out = masked_attention(q, k, v, mask)  # [B, N, K, Dh]
    if image is not None:
      k_img, v_img = proj('added_key', image), proj('added_value', image)  # [B, Li, K, Dh]
      if self.qk_norm:
        k_img = qk_norm_layer(self.qk_norm_across_heads, self.param_dtype, 'added_k_norm')(k_img)
      out = out + masked_attention(q, k_img, v_img, jnp.ones(image.shape[:2], bool))
    init = nn.initializers.zeros if self.zero_init else nn.initializers.xavier_uniform(
        in_axis=(-3, -2), out_axis=-1)
    kernel = self.param('out_kernel', nn.with_logical_partitioning(
        init, (axes.HEADS, axes.HEAD_DIM, axes.EMBED)),
        (self.num_heads, head_dim, width), self.param_dtype)
    bias = self.param('out_bias', nn.with_logical_partitioning(
        nn.initializers.zeros, (axes.EMBED,)), (width,), self.param_dtype)
    return (jnp.einsum('bnkh,khd->bnd', out, kernel.astype(self.dtype))
            + bias.astype(self.dtype))  # [B, N, D]


class CrossAttention(nn.Module):
  """The DiT block's text sub-layer: x [B, N, D] += attn(LN(x), context [B, L, D]).

  Pre-norm without modulation (adaLN stays for the timestep), QK-norm on the video
  queries and the text keys, zero-initialised output projection (adaLN-Zero's
  identity-at-init). Returns the residual branch [B, N, D], not x + branch.
  """
  num_heads: int
  qk_norm: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  qk_norm_across_heads: bool = False
  norm_affine: bool = False  # the LayerNorm with scale and bias ('norm'; Wan's norm2)

  @nn.compact
  def __call__(self, x, context, mask, image=None):  # [B, N, D], [B, L, D], [B, L]
    if self.norm_affine:
      h = _layer_norm(self.dtype, self.param_dtype, 'norm')(x)
    else:
      h = nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=self.dtype)(x)
    return MaskedAttention(self.num_heads, self.qk_norm, zero_init=True, dtype=self.dtype,
                           param_dtype=self.param_dtype,
                           qk_norm_across_heads=self.qk_norm_across_heads,
                           name='attn')(h, context, mask, image)


class TextEncoder(nn.Module):
  """Token ids [B, L] + mask -> [B, L, Dt]: token and position tables, then `depth`
  pre-norm layers of masked self-attention and a GELU MLP, then a LayerNorm."""
  spec: TextSpec
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, mask):  # [B, L] int32, [B, L] bool
    spec = self.spec
    if tokens.shape[1] > spec.max_length:
      raise ValueError(f'{tokens.shape[1]} text tokens exceed model.text.max_length='
                       f'{spec.max_length}.')
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (TABLE_ROWS, axes.EMBED))
    x = nn.Embed(spec.vocab_size, spec.width, dtype=self.dtype, param_dtype=self.param_dtype,
                 embedding_init=init, name='tokens')(tokens)  # [B, L, Dt]
    pos = self.param('positions', init, (spec.max_length, spec.width), self.param_dtype)
    x = x + pos[:tokens.shape[1]].astype(self.dtype)[None]  # [B, L, Dt]
    for i in range(spec.depth):
      h = _layer_norm(self.dtype, self.param_dtype, f'ln_attn_{i}')(x)
      x = x + MaskedAttention(spec.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                              name=f'attn_{i}')(h, h, mask)  # [B, L, Dt]
      h = _layer_norm(self.dtype, self.param_dtype, f'ln_mlp_{i}')(x)
      h = _dense(spec.mlp_dim, axes.EMBED, axes.MLP, self.dtype, self.param_dtype,
                 f'fc1_{i}')(h)  # [B, L, F]
      h = _dense(spec.width, axes.MLP, axes.EMBED, self.dtype, self.param_dtype,
                 f'fc2_{i}')(nn.gelu(h, approximate=True))  # [B, L, Dt]
      x = x + h
    return _layer_norm(self.dtype, self.param_dtype, 'ln_out')(x)  # [B, L, Dt]


class TextConditioner(nn.Module):
  """Text inputs (see the module docstring; None = no caption) -> (context [B, L, D],
  mask bool [B, L]) at the model width D, rows without a caption replaced by the null."""
  spec: TextSpec
  width: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, text: Optional[dict], batch: int):
    spec = self.spec
    if text is None:
      text = null_text(spec, batch, self.dtype)
    key = 'tokens' if spec.encoder == 'builtin' else 'embed'
    if key not in text or 'mask' not in text:
      raise ValueError(f"model.text.encoder={spec.encoder!r} takes text {{'{key}', 'mask'}}, "
                       f'got keys {sorted(text)}.')
    mask = text['mask'].astype(bool)  # [B, L]
    if mask.shape != text[key].shape[:2] or mask.shape[0] != batch:
      raise ValueError(f"text mask {mask.shape} must be [B, L] matching text['{key}'] "
                       f'{text[key].shape} and the batch of {batch} clips.')
    if spec.encoder == 'builtin':
      h = TextEncoder(spec, self.dtype, self.param_dtype, name='encoder')(
          text['tokens'].astype(jnp.int32), mask)  # [B, L, Dt]
      context = _dense(self.width, axes.MLP, axes.EMBED, self.dtype, self.param_dtype,
                       'proj')(h)  # [B, L, D]
    else:
      if text['embed'].shape[-1] != spec.embed_dim:
        raise ValueError(f"text['embed'] has width {text['embed'].shape[-1]}, but "
                         f'model.text.embed_dim={spec.embed_dim}.')
      embed = text['embed'].astype(self.dtype)  # [B, L, E]
      if spec.attend_padding:  # no caption: all-zero embeddings
        embed = jnp.where(jnp.any(mask, axis=1)[:, None, None], embed, 0)
      if spec.projection == 'gelu_mlp':
        h = _dense(self.width, axes.MLP, axes.EMBED, self.dtype, self.param_dtype,
                   'fc1')(embed)  # [B, L, D]
        context = _dense(self.width, axes.MLP, axes.EMBED, self.dtype, self.param_dtype,
                         'fc2')(nn.gelu(h, approximate=True))  # [B, L, D]
      else:
        h = _layer_norm(self.dtype, self.param_dtype, 'ln_in')(embed)  # [B, L, E]
        context = _dense(self.width, axes.MLP, axes.EMBED, self.dtype, self.param_dtype,
                         'proj')(h)  # [B, L, D]
      if spec.attend_padding:  # every row attended, padding included; no learned null
        context = nn.with_logical_constraint(context, (axes.ACT_BATCH, None, axes.ACT_EMBED))
        return context, jnp.ones_like(mask)
    # The null caption: one learned row at position 0, the other rows masked.
    null = self.param('null', nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (TABLE_ROWS, axes.EMBED)), (1, self.width),
        self.param_dtype)
    length = mask.shape[1]
    null_context = jnp.zeros((length, self.width), self.dtype).at[0].set(
        null[0].astype(self.dtype))  # [L, D]
    null_mask = jnp.arange(length) == 0  # [L]
    empty = jnp.logical_not(jnp.any(mask, axis=1))  # [B]
    context = jnp.where(empty[:, None, None], null_context[None], context)  # [B, L, D]
    mask = jnp.where(empty[:, None], null_mask[None], mask)  # [B, L]
    context = nn.with_logical_constraint(context, (axes.ACT_BATCH, None, axes.ACT_EMBED))
    return context, mask


class ImageEmbedder(nn.Module):
  """Wan 2.1 I2V's image tokens: CLIP features [B, Li, E] -> LayerNorm, Dense (E -> E),
  exact GELU, Dense (E -> D), LayerNorm -> [B, Li, D] (both norms affine, eps 1e-5)."""
  width: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, image):  # [B, Li, E]
    def norm(name):
      return nn.LayerNorm(
          epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype,
          scale_init=nn.with_logical_partitioning(nn.initializers.ones, (None,)),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)), name=name)
    h = norm('ln_in')(image.astype(self.dtype))  # [B, Li, E]
    h = _dense(image.shape[-1], None, axes.MLP, self.dtype, self.param_dtype, 'fc1')(h)
    h = _dense(self.width, axes.MLP, axes.EMBED, self.dtype, self.param_dtype,
               'fc2')(nn.gelu(h, approximate=False))  # [B, Li, D]
    return norm('ln_out')(h)  # [B, Li, D]


class PooledText(nn.Module):
  """The caption as one vector for adaLN: the masked mean of the context [B, L, D] over
  its unmasked rows, through a SiLU MLP, -> [B, D], added to the timestep embedding (as
  SD3 and Flux add a pooled text vector). Masked rows get weight exactly 0; the null
  caption pools to its learned row. The last layer starts at zero, so turning this on
  leaves a fresh model's output as it was."""
  width: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, context, mask):  # [B, L, D], [B, L] bool
    weights = mask.astype(jnp.float32)
    weights = weights / jnp.maximum(weights.sum(axis=1, keepdims=True), 1.0)  # [B, L]
    pooled = jnp.einsum('bl,bld->bd', weights.astype(self.dtype), context)  # [B, D]
    h = nn.silu(_dense(self.width, axes.EMBED, axes.MLP, self.dtype, self.param_dtype,
                       'fc1')(pooled))  # [B, D]
    return _dense(self.width, axes.MLP, axes.EMBED, self.dtype, self.param_dtype, 'fc2',
                  zero=True)(h)  # [B, D]
