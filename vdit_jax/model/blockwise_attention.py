"""Memory-efficient (blockwise, "flash") attention in pure JAX.

softmax(Q K^T / sqrt(Dh)) V without ever holding the [K, N, M] logits: queries
are cut into blocks of `block_q` tokens and keys/values into blocks of
`block_kv`; for each query block an online softmax runs over the key/value
blocks (running max `m`, denominator `l` and output accumulator in float32,
whatever the input dtype), so the live logits are one [B, K, block_q, block_kv]
tile. The custom VJP keeps only q, k, v, the output and the float32
log-sum-exp [B, K, N] and recomputes each tile's probabilities in the backward
pass, so forward + backward memory is linear in the number of tokens.

Any length works: tokens are zero-padded up to a multiple of the block size;
padded keys are masked out of every softmax and padded queries are sliced off.
"""

import functools
import math
from typing import Tuple

import jax
import jax.numpy as jnp
from jax import lax

# Tiles of [B, K, 256, 256] float32 logits stay in a CPU core's cache: 256 x 256 ran fastest
# among 128..1024 for fwd + bwd at 4096 tokens, 6 heads, on a 2-core x86 host
# (bench/attention.py --block_q/--block_kv). TPU/GPU users may want 512 or more.
DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_KV = 256


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _to_blocks(x, block: int):
  """[B, N, K, Dh] (N a multiple of block) -> [N/block, B, K, block, Dh]."""
  b, n, k, d = x.shape
  return x.reshape(b, n // block, block, k, d).transpose(1, 0, 3, 2, 4)


def _from_blocks(x):
  """[nb, B, K, block, Dh] -> [B, nb * block, K, Dh]."""
  nb, b, k, block, d = x.shape
  return x.transpose(1, 0, 3, 2, 4).reshape(b, nb * block, k, d)


def _pad_tokens(x, n_to: int):
  """Zero-pads the token axis of [B, N, K, Dh] to n_to."""
  if x.shape[1] == n_to:
    return x
  return jnp.pad(x, ((0, 0), (0, n_to - x.shape[1]), (0, 0), (0, 0)))


def _full(shape, value, *like):
  """float32 `shape` of `value`, typed like the arrays `like` for shard_map.

  Inside a shard_map, scan carries must vary over the same manual mesh axes as
  the values the loop body makes from q, k, v; full_like of a one-element
  anchor built from them gives the constant that type.
  """
  anchor = sum(x.reshape(-1)[:1].astype(jnp.float32) for x in like)  # [1]
  return jnp.full_like(anchor, value, shape=shape)


def _logits(q_blk, k_blk, j, block_kv: int, kv_len: int, scale: float):
  """float32 logits [B, K, bq, bkv] of one tile; padded keys (index >= kv_len) masked."""
  s = jnp.einsum('bkqd,bkvd->bkqv', q_blk, k_blk,
                 preferred_element_type=jnp.float32) * scale  # [B, K, bq, bkv]
  if kv_len % block_kv:  # only the last key block holds padding
    key_idx = j * block_kv + lax.broadcasted_iota(jnp.int32, (block_kv,), 0)  # [bkv]
    s = jnp.where(key_idx < kv_len, s, jnp.finfo(jnp.float32).min)
  return s


def _forward(q, k, v, block_q: int, block_kv: int) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """q [B, N, K, Dh], k/v [B, M, K, Dh] -> (out [B, N, K, Dh], lse float32 [B, K, Nq]).

  lse is over the padded query length Nq (a multiple of block_q).
  """
  n, m = q.shape[1], k.shape[1]
  scale = 1.0 / math.sqrt(q.shape[-1])
  qb = _to_blocks(_pad_tokens(q, _round_up(n, block_q)), block_q)  # [nq, B, K, bq, Dh]
  kb = _to_blocks(_pad_tokens(k, _round_up(m, block_kv)), block_kv)  # [nk, B, K, bkv, Dh]
  vb = _to_blocks(_pad_tokens(v, _round_up(m, block_kv)), block_kv)
  stat_shape = qb.shape[1:4]  # [B, K, bq]

  def query_block(q_blk):  # [B, K, bq, Dh]
    def kv_step(carry, xs):
      m_run, l_run, acc = carry
      k_blk, v_blk, j = xs  # [B, K, bkv, Dh] x 2, block index
      s = _logits(q_blk, k_blk, j, block_kv, m, scale)  # [B, K, bq, bkv]
      m_new = jnp.maximum(m_run, jnp.max(s, axis=-1))  # [B, K, bq]
      p = jnp.exp(s - m_new[..., None])  # [B, K, bq, bkv]
      alpha = jnp.exp(m_run - m_new)  # [B, K, bq]
      l_run = alpha * l_run + jnp.sum(p, axis=-1)
      pv = jnp.einsum('bkqv,bkvd->bkqd', p.astype(v.dtype), v_blk,
                      preferred_element_type=jnp.float32)  # [B, K, bq, Dh]
      return (m_new, l_run, alpha[..., None] * acc + pv), None

    init = (_full(stat_shape, -jnp.inf, q, k, v), _full(stat_shape, 0.0, q, k, v),
            _full(q_blk.shape, 0.0, q, k, v))
    (m_run, l_run, acc), _ = lax.scan(kv_step, init, (kb, vb, jnp.arange(kb.shape[0])))
    out = (acc / l_run[..., None]).astype(q.dtype)  # [B, K, bq, Dh]
    return out, m_run + jnp.log(l_run)  # lse [B, K, bq]

  out, lse = lax.map(query_block, qb)  # [nq, B, K, bq, Dh], [nq, B, K, bq]
  out = _from_blocks(out)[:, :n]  # [B, N, K, Dh]
  lse = lse.transpose(1, 2, 0, 3).reshape(*stat_shape[:2], -1)  # [B, K, Nq]
  return out, lse


def _backward(q, k, v, out, lse, dout, block_q: int, block_kv: int):
  """Recomputes each tile's probabilities from lse; dK/dV per key block, dQ summed."""
  n, m = q.shape[1], k.shape[1]
  scale = 1.0 / math.sqrt(q.shape[-1])
  nq_pad, nk_pad = _round_up(n, block_q), _round_up(m, block_kv)
  qb = _to_blocks(_pad_tokens(q, nq_pad), block_q)  # [nq, B, K, bq, Dh]
  kb = _to_blocks(_pad_tokens(k, nk_pad), block_kv)  # [nk, B, K, bkv, Dh]
  vb = _to_blocks(_pad_tokens(v, nk_pad), block_kv)
  dob = _to_blocks(_pad_tokens(dout, nq_pad), block_q)  # [nq, B, K, bq, Dh]
  # delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij, the softmax-backward row term.
  delta = jnp.einsum('bnkd,bnkd->bkn', dout.astype(jnp.float32),
                     out.astype(jnp.float32))  # [B, K, N]
  delta = jnp.pad(delta, ((0, 0), (0, 0), (0, nq_pad - n)))
  delta_b = delta.reshape(*delta.shape[:2], -1, block_q).transpose(2, 0, 1, 3)  # [nq, B, K, bq]
  lse_b = lse.reshape(*lse.shape[:2], -1, block_q).transpose(2, 0, 1, 3)  # [nq, B, K, bq]

  def kv_block(dq_acc, xs):
    k_blk, v_blk, j = xs  # [B, K, bkv, Dh] x 2, block index

    def q_step(carry, xs):
      dk, dv = carry
      q_blk, do_blk, lse_blk, delta_blk = xs  # [B, K, bq, Dh] x 2, [B, K, bq] x 2
      s = _logits(q_blk, k_blk, j, block_kv, m, scale)  # [B, K, bq, bkv]
      p = jnp.exp(s - lse_blk[..., None])  # [B, K, bq, bkv]
      dv = dv + jnp.einsum('bkqv,bkqd->bkvd', p.astype(do_blk.dtype), do_blk,
                           preferred_element_type=jnp.float32)
      dp = jnp.einsum('bkqd,bkvd->bkqv', do_blk, v_blk,
                      preferred_element_type=jnp.float32)  # [B, K, bq, bkv]
      ds = (p * (dp - delta_blk[..., None]) * scale).astype(q.dtype)  # [B, K, bq, bkv]
      dk = dk + jnp.einsum('bkqv,bkqd->bkvd', ds, q_blk, preferred_element_type=jnp.float32)
      dq = jnp.einsum('bkqv,bkvd->bkqd', ds, k_blk,
                      preferred_element_type=jnp.float32)  # [B, K, bq, Dh]
      return (dk, dv), dq

    zeros = _full(k_blk.shape, 0.0, q, k, v, dout)
    (dk, dv), dq = lax.scan(q_step, (zeros, zeros), (qb, dob, lse_b, delta_b))
    return dq_acc + dq, (dk, dv)  # dq [nq, B, K, bq, Dh]

  dq, (dk, dv) = lax.scan(kv_block, _full(qb.shape, 0.0, q, k, v, dout),
                          (kb, vb, jnp.arange(kb.shape[0])))
  dq = _from_blocks(dq)[:, :n].astype(q.dtype)  # [B, N, K, Dh]
  dk = _from_blocks(dk)[:, :m].astype(k.dtype)  # [B, M, K, Dh]
  dv = _from_blocks(dv)[:, :m].astype(v.dtype)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attention(q, k, v, block_q, block_kv):
  return _forward(q, k, v, block_q, block_kv)[0]


def _attention_fwd(q, k, v, block_q, block_kv):
  out, lse = _forward(q, k, v, block_q, block_kv)
  return out, (q, k, v, out, lse)


def _attention_bwd(block_q, block_kv, res, dout):
  return _backward(*res, dout, block_q, block_kv)


_attention.defvjp(_attention_fwd, _attention_bwd)


def blockwise_attention(q, k, v, *, block_q: int = DEFAULT_BLOCK_Q,
                        block_kv: int = DEFAULT_BLOCK_KV):
  """q [B, N, K, Dh], k/v [B, M, K, Dh] -> [B, N, K, Dh]; scale 1/sqrt(Dh).

  Block sizes larger than the sequence shrink to it, so short sequences run as
  one tile. Statistics are float32; matmuls take the input dtype and
  accumulate in float32.
  """
  if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f'blockwise attention needs q [B, N, K, Dh] and k, v [B, M, K, Dh], got '
                     f'{q.shape}, {k.shape}, {v.shape}.')
  for name, block in (('block_q', block_q), ('block_kv', block_kv)):
    if isinstance(block, bool) or not isinstance(block, int) or block <= 0:
      raise ValueError(f'blockwise attention {name}={block!r} must be a positive integer.')
  block_q = min(block_q, q.shape[1])
  block_kv = min(block_kv, k.shape[1])
  return _attention(q, k, v, block_q, block_kv)
