"""Multi-head self-attention with QK-normalisation.

softmax(norm(Q) norm(K)^T / sqrt(Dh)) V, where norm is an RMSNorm over each
head's features with a learnable scale. Every attention call goes through
`dot_product_attention`, the one seam later kernels (blockwise, cuDNN, splash,
sequence-parallel) plug into.
"""

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdit_jax.model import axes
from vdit_jax.model import embeddings
from vdit_jax.parallel import sequence_attention

ATTENTION_IMPLS = ('xla',)
SEQUENCE_PARALLEL = sequence_attention.SEQUENCE_PARALLEL


def rms_normalize(x: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
  """x / rms(x) over the last axis, statistics in float32."""
  x32 = x.astype(jnp.float32)
  inv = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (x32 * inv).astype(x.dtype)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis with a learnable per-feature scale (init 1)."""
  logical_axis: str = axes.HEAD_DIM
  eps: float = 1e-6
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [..., F]
    scale = self.param(
        'scale', nn.with_logical_partitioning(nn.initializers.ones, (self.logical_axis,)),
        (x.shape[-1],), self.param_dtype)
    return rms_normalize(x, self.eps) * scale.astype(x.dtype)


def dot_product_attention(q, k, v, impl: str = 'xla', sequence_parallel: str = 'none'):
  """q [B, N, K, Dh], k/v [B, M, K, Dh] -> [B, N, K, Dh]; scale 1/sqrt(Dh).

  `sequence_parallel` other than 'none' splits the tokens over the mesh axis
  `sequence` of the mesh in context (see parallel/sequence_attention.py).
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f'attention_impl={impl!r} is not one of {ATTENTION_IMPLS}.')
  if sequence_parallel != 'none':
    return sequence_attention.sequence_parallel_attention(q, k, v, strategy=sequence_parallel)
  return jax.nn.dot_product_attention(q, k, v, implementation='xla')


class Attention(nn.Module):
  """Multi-head self-attention over tokens [B, N, D] with optional QK-norm and RoPE."""
  num_heads: int
  qk_norm: bool = True
  attention_impl: str = 'xla'
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  sequence_parallel: str = 'none'

  @nn.compact
  def __call__(self, x, rope: Optional[Tuple[jnp.ndarray, jnp.ndarray]] = None):
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
      q = RMSNorm(param_dtype=self.param_dtype, name='q_norm')(q)
      k = RMSNorm(param_dtype=self.param_dtype, name='k_norm')(k)
    if rope is not None:
      q = embeddings.apply_rope(q, *rope)
      k = embeddings.apply_rope(k, *rope)
    names = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_HEADS, axes.ACT_KV)
    q = nn.with_logical_constraint(q, names)
    k = nn.with_logical_constraint(k, names)
    v = nn.with_logical_constraint(v, names)
    out = dot_product_attention(q, k, v, self.attention_impl,
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
