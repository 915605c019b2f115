"""DiT blocks with adaLN-Zero modulation, and the zero-initialised final layer."""

from typing import Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from vdit_jax.model import attention
from vdit_jax.model import attention_patterns
from vdit_jax.model import embeddings
from vdit_jax.model import text as text_lib
from vdit_jax.parallel import axes

TOKENS = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED)

# Activations tagged with `checkpoint_name` in each block, for model.remat_policy='save_named'
# (model.remat_names picks which ones the backward pass keeps instead of recomputing):
#   attn_in    [B, N, D]  modulated LN(x), the input of the q/k/v projections
#   attn_out   [B, N, D]  attention after the output projection, before the gate
#   mlp_in     [B, N, D]  modulated LN(x), the input of fc1
#   mlp_hidden [B, N, F]  fc1 output before the GELU (the largest activation of a block)
#   mlp_out    [B, N, D]  fc2 output, before the gate
CHECKPOINT_NAMES = ('attn_in', 'attn_out', 'mlp_in', 'mlp_hidden', 'mlp_out')


class Attention(nn.Module):
  """Multi-head self-attention over tokens [B, N, D] with optional QK-norm and RoPE.

  `grouping` (attention_patterns.Grouping; None = full) says which tokens each
  query attends to: within frames, positions or windows of the token grid
  `grid` (T', H', W'), which every pattern but full needs. The parameters are
  the same for every pattern.
  """
  num_heads: int
  qk_norm: bool = True
  attention_impl: str = 'xla'
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  sequence_parallel: str = 'none'
  grouping: Optional['attention_patterns.Grouping'] = None
  qk_norm_across_heads: bool = False  # one RMSNorm over all heads (Wan) instead of per head
  rope_pairs: bool = False            # RoPE on interleaved pairs (model.rope_style='wan')

  @nn.compact
  def __call__(self, x, rope: Optional[Tuple[jnp.ndarray, jnp.ndarray]] = None,
               grid: Optional[Tuple[int, int, int]] = None):
    width = x.shape[-1]
    head_dim = width // self.num_heads
    kernel_in = nn.initializers.xavier_uniform(in_axis=-3, out_axis=(-2, -1))

    def proj(name):
      # Kernel [D, K, Dh] (fan-in D, fan-out K*Dh), declared unflattened so that
      # its logical names match its rank.
      kernel = self.param(name + '_kernel', nn.with_logical_partitioning(
          kernel_in, (axes.EMBED, axes.HEADS, axes.HEAD_DIM)),
          (width, self.num_heads, head_dim), self.param_dtype)
      bias = self.param(name + '_bias', nn.with_logical_partitioning(
          nn.initializers.zeros, (axes.HEADS, axes.HEAD_DIM)),
          (self.num_heads, head_dim), self.param_dtype)
      x_ = x.astype(self.dtype)
      return (jnp.einsum('bnd,dkh->bnkh', x_, kernel.astype(self.dtype))
              + bias.astype(self.dtype))  # [B, N, K, Dh]

    q, k, v = proj('query'), proj('key'), proj('value')
    if self.qk_norm:
      q = attention.qk_norm_layer(self.qk_norm_across_heads, self.param_dtype, 'q_norm')(q)
      k = attention.qk_norm_layer(self.qk_norm_across_heads, self.param_dtype, 'k_norm')(k)
    if rope is not None:
      q = embeddings.apply_rope(q, *rope, pairs=self.rope_pairs)
      k = embeddings.apply_rope(k, *rope, pairs=self.rope_pairs)
    names = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_HEADS, axes.ACT_KV)
    q = nn.with_logical_constraint(q, names)
    k = nn.with_logical_constraint(k, names)
    v = nn.with_logical_constraint(v, names)
    if self.grouping is None or self.grouping.kind == 'full':
      out = attention.dot_product_attention(q, k, v, self.attention_impl,
                                            self.sequence_parallel)  # [B, N, K, Dh]
    else:  # regroup onto frames / positions / windows of the grid, attend, put back
      out = attention_patterns.attend(q, k, v, grid, self.grouping, self.attention_impl,
                                      self.sequence_parallel)  # [B, N, K, Dh]
    out = nn.with_logical_constraint(out, names)
    kernel = self.param('out_kernel', nn.with_logical_partitioning(
        nn.initializers.xavier_uniform(in_axis=(-3, -2), out_axis=-1),
        (axes.HEADS, axes.HEAD_DIM, axes.EMBED)),
        (self.num_heads, head_dim, width), self.param_dtype)
    bias = self.param('out_bias', nn.with_logical_partitioning(
        nn.initializers.zeros, (axes.EMBED,)), (width,), self.param_dtype)
    return (jnp.einsum('bnkh,khd->bnd', out, kernel.astype(self.dtype))
            + bias.astype(self.dtype))  # [B, N, D]


def modulate(x, shift, scale):
  """x [B, N, D] * (1 + scale [B, D]) + shift [B, D]."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


def _norm(dtype):
  return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype)


def _dense(features, in_axis, out_axis, dtype, param_dtype, name, zero=False):
  kernel = nn.initializers.zeros if zero else nn.initializers.xavier_uniform()
  return nn.Dense(
      features, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(kernel, (in_axis, out_axis)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (out_axis,)),
      name=name)


class AdaLN(nn.Module):
  """silu(c) -> Dense(k * D), zero-initialised: k modulation vectors [B, D]."""
  width: int
  num: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, c):  # [B, D]
    mod = _dense(self.num * self.width, axes.EMBED, axes.MODULATION, self.dtype,
                 self.param_dtype, 'proj', zero=True)(nn.silu(c))  # [B, k*D]
    return jnp.split(mod, self.num, axis=-1)


MODULATIONS = ('per_block', 'shared')  # model.modulation


class ModulationTable(nn.Module):
  """model.modulation='shared' (Wan 2.1): one projection of the timestep embedding, made
  once per step for all blocks (`AdaLN` at the model level, [B, k, D]), plus this
  layer's own learned offsets [k, D] (zero-initialised, so a fresh layer is still the
  identity as with adaLN-Zero) -> k modulation vectors [B, D]."""
  num: int
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, mod):  # [B, k, D]
    table = self.param('table', nn.with_logical_partitioning(
        nn.initializers.zeros, (None, axes.EMBED)), (self.num, mod.shape[-1]),
        self.param_dtype)  # [k, D]
    mod = mod + table.astype(mod.dtype)[None]  # [B, k, D]
    return [mod[:, i] for i in range(self.num)]


def _identity_taps(key, shape, dtype=jnp.float32):
  """Depthwise kernel [kt, kh, kw, D] that passes its input through: centre tap 1."""
  del key
  kt, kh, kw = shape[:3]
  return jnp.zeros(shape, dtype).at[kt // 2, kh // 2, kw // 2].set(1)


class TokenConv(nn.Module):
  """Depthwise 3-D convolution over the token grid, 'same' size (zeros beyond the grid).

  x [B, N, D] with N = T' H' W' tokens in (t, h, w) order; each channel d gets
  y[t, h, w, d] = sum_{a, b, c} k[a, b, c, d] x[t + a - kt//2, h + b - kh//2, w + c - kw//2, d].
  The kernel [kt, kh, kw, D] (odd sizes) starts as the identity, so a fresh conv changes
  nothing. It is computed as a sum of shifted slices of the zero-padded grid: XLA:CPU runs
  `lax.conv_general_dilated` with feature_group_count=D 20-40x slower (bench/token_conv.py).
  """
  kernel_size: Tuple[int, int, int]
  grid: Tuple[int, int, int]
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, N, D]
    b, n, d = x.shape
    kt, kh, kw = self.kernel_size
    tt, hh, ww = self.grid
    if tt * hh * ww != n:
      raise ValueError(f'token grid {self.grid} holds {tt * hh * ww} tokens, but x has N={n}.')
    kernel = self.param(
        'kernel', nn.with_logical_partitioning(_identity_taps, (None, None, None, axes.EMBED)),
        (kt, kh, kw, d), self.param_dtype).astype(self.dtype)  # [kt, kh, kw, D]
    grid = x.reshape(b, tt, hh, ww, d)  # [B, T', H', W', D]
    padded = jnp.pad(grid, ((0, 0), (kt // 2,) * 2, (kh // 2,) * 2, (kw // 2,) * 2,
                            (0, 0)))  # [B, T'+kt-1, H'+kh-1, W'+kw-1, D]
    out = jnp.zeros_like(grid)
    for a in range(kt):
      for r in range(kh):
        for q in range(kw):
          out = out + padded[:, a:a + tt, r:r + hh, q:q + ww, :] * kernel[a, r, q]
    return out.reshape(b, n, d)  # [B, N, D]


class Mlp(nn.Module):
  """fc1 -> GELU -> fc2; with `conv_kernel`, a depthwise TokenConv over the token `grid`
  first mixes each token with its spacetime neighbours (Mix-FFN-like: SegFormer, Sana)."""
  hidden: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  conv_kernel: Tuple[int, ...] = ()
  grid: Optional[Tuple[int, int, int]] = None

  @nn.compact
  def __call__(self, x):  # [B, N, D]
    width = x.shape[-1]
    if self.conv_kernel:
      x = TokenConv(tuple(self.conv_kernel), self.grid, self.dtype, self.param_dtype,
                    name='conv')(x)  # [B, N, D]
    h = _dense(self.hidden, axes.EMBED, axes.MLP, self.dtype, self.param_dtype, 'fc1')(x)
    h = nn.with_logical_constraint(h, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_MLP))
    h = checkpoint_name(h, 'mlp_hidden')  # [B, N, F]
    h = nn.gelu(h, approximate=True)  # [B, N, F]
    return _dense(width, axes.MLP, axes.EMBED, self.dtype, self.param_dtype, 'fc2')(h)


class DiTBlock(nn.Module):
  """Pre-norm block: x += g1 * attn(mod(LN(x))); x += g2 * mlp(mod(LN(x))).

  The (shift, scale, gate) pairs come from the conditioning vector through a
  zero-initialised projection, so a fresh block is the identity (adaLN-Zero).
  Returns (x, None) so that the same module works under `nn.scan`.

  `pattern` (attention_patterns.PatternSpec) with the token grid `grid`
  (T', H', W') and the block index `layer` (only layer % pattern.period is
  read) picks the attention sub-layers. Factorised 'within_block' adds a
  temporal sub-layer after the spatial one, x += g_t * attn_temporal(mod_t(LN(x))),
  with its own zero-initialised (shift, scale, gate) projection `adaln_temporal`,
  so the block stays the identity at init.

  `mlp_conv` (kt, kh, kw) puts a depthwise convolution over the token grid at the MLP
  input (TokenConv, identity at init), so that neighbouring tokens decide together.

  `text` (context [B, L, D], mask bool [B, L]; model.conditioning='text') adds a
  cross-attention sub-layer after the self-attention, before the MLP:
  x += cross_attn(LN(x), context), its output projection zero-initialised (identity at
  init; see model/text.py). Without it the block and its params are unchanged.
  """
  num_heads: int
  mlp_dim: int
  qk_norm: bool = True
  attention_impl: str = 'xla'
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  sequence_parallel: str = 'none'
  pattern: attention_patterns.PatternSpec = attention_patterns.PatternSpec()
  grid: Optional[Tuple[int, int, int]] = None
  layer: int = 0
  mlp_conv: Tuple[int, ...] = ()  # depthwise TokenConv kernel at the MLP input; () = none
  modulation: str = 'per_block'   # 'shared': c is the model-level projection [B, 6, D]
  qk_norm_across_heads: bool = False
  rope_pairs: bool = False
  cross_norm_affine: bool = False  # the cross-attention's LayerNorm has scale and bias (Wan)

  @nn.compact
  def __call__(self, x, c, rope: Optional[Tuple[jnp.ndarray, jnp.ndarray]] = None,
               text: Optional[Tuple[jnp.ndarray, ...]] = None):
    # x [B, N, D], c [B, D] (modulation 'shared': [B, 6, D])
    x = nn.with_logical_constraint(x, TOKENS)
    width = x.shape[-1]
    first, *extra = attention_patterns.block_groupings(self.pattern, self.layer)
    if self.modulation == 'shared':
      mods = ModulationTable(6, self.param_dtype, name='modulation')(c)  # 6 x [B, D]
    else:
      mods = AdaLN(width, 6, self.dtype, self.param_dtype, name='adaln')(c)  # 6 x [B, D]
    shift1, scale1, gate1, shift2, scale2, gate2 = mods
    h = checkpoint_name(modulate(_norm(self.dtype)(x), shift1, scale1), 'attn_in')
    h = Attention(self.num_heads, self.qk_norm, self.attention_impl, self.dtype,
                  self.param_dtype, self.sequence_parallel, first, self.qk_norm_across_heads,
                  self.rope_pairs, name='attn')(h, rope, self.grid)  # [B, N, D]
    x = x + gate1[:, None, :] * checkpoint_name(h, 'attn_out')
    for grouping in extra:  # factorised within_block: the temporal sub-layer
      shift_t, scale_t, gate_t = AdaLN(
          width, 3, self.dtype, self.param_dtype, name=f'adaln_{grouping.kind}')(c)  # 3 x [B, D]
      h = checkpoint_name(modulate(_norm(self.dtype)(x), shift_t, scale_t), 'attn_in')
      h = Attention(self.num_heads, self.qk_norm, self.attention_impl, self.dtype,
                    self.param_dtype, self.sequence_parallel, grouping,
                    self.qk_norm_across_heads, self.rope_pairs,
                    name=f'attn_{grouping.kind}')(h, rope, self.grid)  # [B, N, D]
      x = x + gate_t[:, None, :] * checkpoint_name(h, 'attn_out')
    if text is not None:  # cross-attention to the caption (and image) tokens
      x = x + text_lib.CrossAttention(self.num_heads, self.qk_norm, self.dtype, self.param_dtype,
                                      self.qk_norm_across_heads, self.cross_norm_affine,
                                      name='cross_attn')(x, *text)  # [B, N, D]
    h = checkpoint_name(modulate(_norm(self.dtype)(x), shift2, scale2), 'mlp_in')
    h = Mlp(self.mlp_dim, self.dtype, self.param_dtype, self.mlp_conv, self.grid,
            name='mlp')(h)
    x = x + gate2[:, None, :] * checkpoint_name(h, 'mlp_out')
    return nn.with_logical_constraint(x, TOKENS), None


class BlockCycle(nn.Module):
  """`period` consecutive blocks, block_0 .. block_{period-1}, as one unit for `nn.scan`.

  Blocks that differ by layer parity (alternating spatial / temporal attention,
  shifted windows) scan as depth / period cycles, each block built with its
  static index r = layer % period, so the scanned loop has no conditional.
  Returns (x, None) like DiTBlock.
  """
  make_block: Callable[..., nn.Module]  # DiTBlock (or its nn.remat) with all but `layer` set
  period: int

  @nn.compact
  def __call__(self, x, c, rope: Optional[Tuple[jnp.ndarray, jnp.ndarray]] = None,
               text: Optional[Tuple[jnp.ndarray, ...]] = None):
    for r in range(self.period):
      x, _ = self.make_block(layer=r, name=f'block_{r}')(x, c, rope, text)  # [B, N, D]
    return x, None


def _pixel_conv(x, kernel):
  """'same' 3-D convolution of x [B, T, H, W, Cin] with kernel [kt, kh, kw, Cin, Cout]
  (odd sizes, zeros beyond the clip). A kernel one frame long runs as a 2-D convolution
  over the B T frames, about 3x faster on XLA:CPU than lax.conv in 3-D
  (bench/pixel_conv.py); x is held sharded over the batch only around the reshape that
  merges B and T (tests/sharding_test.py trains it on every mesh)."""
  b, t, h, w, c = x.shape
  if kernel.shape[0] != 1:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1, 1), 'SAME',
                                        dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'))
  frames = (axes.ACT_BATCH, None, None, None, None)
  x = nn.with_logical_constraint(x, frames)
  y = jax.lax.conv_general_dilated(x.reshape(b * t, h, w, c), kernel[0], (1, 1), 'SAME',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return nn.with_logical_constraint(y.reshape(b, t, h, w, -1), frames)


class PixelRefiner(nn.Module):
  """A residual two-layer convolution at pixel resolution after the unpatchify.

  out [B, T, H, W, C] (the transformer's prediction) and the model's input video
  [B, T, H, W, Cin] (the noisy clip, with its given-frame mask channel if any) are
  concatenated, convolved to `width` channels (kernel `kernel_size`), modulated by the
  conditioning vector c [B, D] (shift and scale, zero-initialised), passed through GELU
  and convolved back to C channels by a zero-initialised kernel that is added to `out`:
  a fresh refiner changes nothing. It gives the prediction a path at pixel resolution
  that sees the noisy input there, across tubelet borders (the outline of an object).
  """
  width: int
  kernel_size: Tuple[int, int, int]
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, out, video, c):
    channels = out.shape[-1]
    x = jnp.concatenate([out.astype(self.dtype), video.astype(self.dtype)], axis=-1)
    replicated = (None,) * 5
    k1 = self.param('in_kernel', nn.with_logical_partitioning(
        nn.initializers.lecun_normal(in_axis=(0, 1, 2, 3), out_axis=4), replicated),
        tuple(self.kernel_size) + (x.shape[-1], self.width), self.param_dtype)
    b1 = self.param('in_bias', nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                    (self.width,), self.param_dtype)
    k2 = self.param('out_kernel', nn.with_logical_partitioning(nn.initializers.zeros, replicated),
                    tuple(self.kernel_size) + (self.width, channels), self.param_dtype)
    b2 = self.param('out_bias', nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                    (channels,), self.param_dtype)
    shift, scale = AdaLN(self.width, 2, self.dtype, self.param_dtype, name='adaln')(c)
    h = _pixel_conv(x, k1.astype(self.dtype)) + b1.astype(self.dtype)  # [B, T, H, W, F]
    h = h * (1 + scale[:, None, None, None, :]) + shift[:, None, None, None, :]
    h = nn.gelu(h, approximate=True)
    return out + (_pixel_conv(h, k2.astype(self.dtype)) + b2.astype(self.dtype)).astype(out.dtype)


class FinalLayer(nn.Module):
  """LN -> adaLN modulation -> zero-initialised linear map to patch values.

  modulation 'shared' (Wan 2.1): shift and scale are the timestep embedding c itself plus
  this layer's learned offsets [2, D], without a projection."""
  patch_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  modulation: str = 'per_block'

  @nn.compact
  def __call__(self, x, c):  # x [B, N, D], c [B, D]
    if self.modulation == 'shared':
      shift, scale = ModulationTable(2, self.param_dtype, name='modulation')(
          jnp.broadcast_to(c[:, None, :], (c.shape[0], 2, c.shape[-1])))  # 2 x [B, D]
    else:
      shift, scale = AdaLN(x.shape[-1], 2, self.dtype, self.param_dtype, name='adaln')(c)
    x = modulate(_norm(self.dtype)(x), shift, scale)  # [B, N, D]
    return _dense(self.patch_dim, axes.EMBED, axes.PATCH, self.dtype, self.param_dtype,
                  'proj', zero=True)(x)  # [B, N, P]
