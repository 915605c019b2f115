"""DiT blocks with adaLN-Zero modulation, and the zero-initialised final layer."""

from typing import Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp

from vdit_jax.model import axes
from vdit_jax.model.attention import Attention

TOKENS = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED)


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


class Mlp(nn.Module):
  hidden: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, N, D]
    width = x.shape[-1]
    h = _dense(self.hidden, axes.EMBED, axes.MLP, self.dtype, self.param_dtype, 'fc1')(x)
    h = nn.with_logical_constraint(h, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_MLP))
    h = nn.gelu(h, approximate=True)  # [B, N, F]
    return _dense(width, axes.MLP, axes.EMBED, self.dtype, self.param_dtype, 'fc2')(h)


class DiTBlock(nn.Module):
  """Pre-norm block: x += g1 * attn(mod(LN(x))); x += g2 * mlp(mod(LN(x))).

  The (shift, scale, gate) pairs come from the conditioning vector through a
  zero-initialised projection, so a fresh block is the identity (adaLN-Zero).
  Returns (x, None) so that the same module works under `nn.scan`.
  """
  num_heads: int
  mlp_dim: int
  qk_norm: bool = True
  attention_impl: str = 'xla'
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  sequence_parallel: str = 'none'

  @nn.compact
  def __call__(self, x, c, rope: Optional[Tuple[jnp.ndarray, jnp.ndarray]] = None):
    # x [B, N, D], c [B, D]
    x = nn.with_logical_constraint(x, TOKENS)
    width = x.shape[-1]
    shift1, scale1, gate1, shift2, scale2, gate2 = AdaLN(
        width, 6, self.dtype, self.param_dtype, name='adaln')(c)  # 6 x [B, D]
    h = modulate(_norm(self.dtype)(x), shift1, scale1)
    h = Attention(self.num_heads, self.qk_norm, self.attention_impl, self.dtype,
                  self.param_dtype, self.sequence_parallel, name='attn')(h, rope)  # [B, N, D]
    x = x + gate1[:, None, :] * h
    h = modulate(_norm(self.dtype)(x), shift2, scale2)
    h = Mlp(self.mlp_dim, self.dtype, self.param_dtype, name='mlp')(h)
    x = x + gate2[:, None, :] * h
    return nn.with_logical_constraint(x, TOKENS), None


class FinalLayer(nn.Module):
  """LN -> adaLN modulation -> zero-initialised linear map to patch values."""
  patch_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c):  # x [B, N, D], c [B, D]
    shift, scale = AdaLN(x.shape[-1], 2, self.dtype, self.param_dtype, name='adaln')(c)
    x = modulate(_norm(self.dtype)(x), shift, scale)
    return _dense(self.patch_dim, axes.EMBED, axes.PATCH, self.dtype, self.param_dtype,
                  'proj', zero=True)(x)  # [B, N, P]
