"""Sequence-parallel self-attention over the mesh axis `sequence`.

Tokens q/k/v [B, N, K, Dh] arrive sharded like every attention activation:
batch over the axes of `activation_batch`, N over `activation_length` (the
`sequence` mesh axis), heads over `activation_heads`. Plain attention on such
arrays makes XLA gather whole K/V wherever it likes; the strategies here say
exactly what moves (P = size of the sequence axis, n = N / P):

- `all_gather`: every device gathers the full K/V [B, N, K, Dh] and attends
  with its own query block. Simple; memory O(N) for K/V per device.
- `ring`: K/V blocks travel round the ring with `ppermute`, P steps, combined
  with an online softmax (running max and denominator in float32). No device
  ever holds more than one remote K/V block; the backward pass (custom VJP)
  sends dK/dV round the ring with their blocks, recomputing scores.
- `ulysses`: an all-to-all trades the sequence shard for a heads shard
  ([B, n, K, Dh] -> [B, N, K/P, Dh]), full-length attention on K/P heads, and
  an all-to-all back. Needs the local heads divisible by P.

`none`, or a sequence axis of size 1, is plain attention (the caller's kernel, else XLA's).
"""

import math
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from vdit_jax.parallel import axes
from vdit_jax.parallel import mesh as mesh_lib

SEQUENCE_PARALLEL = ('none', 'all_gather', 'ring', 'ulysses')

TOKEN_HEADS = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_HEADS, axes.ACT_KV)


def _plain(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, implementation='xla')


_axes_of = mesh_lib.spec_axes


def token_spec(mesh, axis: str = 'sequence', rules=None) -> PartitionSpec:
  """PartitionSpec of q/k/v [B, N, K, Dh] from the logical rules (context, else defaults).

  Mesh axes named by the rules but absent from `mesh` are dropped (they have
  size 1 in effect). The token dim must map to exactly `axis`.
  """
  if rules is None:
    rules = nn.get_logical_axis_rules() or axes.DEFAULT_RULES
  spec = nn.logical_to_mesh_axes(TOKEN_HEADS, rules)
  entries = []
  for entry in spec:
    kept = tuple(a for a in _axes_of(entry) if a in mesh.axis_names)
    entries.append(None if not kept else kept[0] if len(kept) == 1 else kept)
  if _axes_of(entries[1]) != (axis,):
    raise ValueError(
        f'sequence-parallel attention over mesh axis {axis!r} needs the logical axis '
        f'{axes.ACT_LENGTH!r} mapped to exactly {axis!r}, but the logical axis rules map it '
        f'to {spec[1]!r} (token spec {spec}).')
  for i in (0, 2, 3):
    if axis in _axes_of(entries[i]):
      raise ValueError(f'mesh axis {axis!r} shards both the tokens and dim {i} of '
                       f'{TOKEN_HEADS} in {spec}; it may shard only the tokens.')
  return PartitionSpec(*entries)


def _check_divisible(shape, spec: PartitionSpec, mesh):
  names = ('batch B', 'tokens N', 'heads K', 'head dim Dh')
  for dim, entry, name in zip(shape, spec, names):
    size = math.prod(mesh.shape[a] for a in _axes_of(entry))
    if dim % size:
      raise ValueError(
          f'{name}={dim} of q/k/v {tuple(shape)} is not divisible by the size {size} of the '
          f'mesh axes {_axes_of(entry)} that shard it (PartitionSpec {spec}).')


# --- ring attention -------------------------------------------------------------------------


def _scores(q, k, scale):
  """q [B, n, K, Dh], k [B, m, K, Dh] -> float32 scores [B, K, n, m]."""
  return jnp.einsum('bnkh,bmkh->bknm', q, k, preferred_element_type=jnp.float32) * scale


def _ring_forward(q, k, v, axis, size):
  """Online-softmax attention over the K/V blocks of the ring; returns (out, lse [B, K, n])."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  perm = [(i, (i + 1) % size) for i in range(size)]

  def block(k_blk, v_blk):
    s = _scores(q, k_blk, scale)  # [B, K, n, m]
    m = jnp.max(s, axis=-1)  # [B, K, n]
    p = jnp.exp(s - m[..., None])
    o = jnp.einsum('bknm,bmkh->bknh', p, v_blk.astype(jnp.float32))  # [B, K, n, Dh]
    return m, jnp.sum(p, axis=-1), o

  # Own block first: it initialises the running max m, denominator l and output o.
  m, l, o = block(k, v)

  def step(carry, _):
    k_blk, v_blk, m, l, o = carry
    k_blk = lax.ppermute(k_blk, axis, perm)
    v_blk = lax.ppermute(v_blk, axis, perm)
    m_blk, l_blk, o_blk = block(k_blk, v_blk)
    m_new = jnp.maximum(m, m_blk)
    a, b = jnp.exp(m - m_new), jnp.exp(m_blk - m_new)  # [B, K, n]
    l = a * l + b * l_blk
    o = a[..., None] * o + b[..., None] * o_blk  # [B, K, n, Dh]
    return (k_blk, v_blk, m_new, l, o), None

  (_, _, m, l, o), _ = lax.scan(step, (k, v, m, l, o), None, length=size - 1)
  out = (o / l[..., None]).transpose(0, 2, 1, 3)  # [B, n, K, Dh]
  lse = m + jnp.log(l)  # [B, K, n]
  return out.astype(q.dtype), lse


def _ring_backward(q, k, v, out, lse, dout, axis, size):
  """Flash-attention backward with K/V and their dK/dV accumulators travelling the ring."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  perm = [(i, (i + 1) % size) for i in range(size)]
  do = dout.astype(jnp.float32)
  delta = jnp.einsum('bnkh,bnkh->bkn', do, out.astype(jnp.float32))  # [B, K, n]
  q32 = q.astype(jnp.float32)

  def block(k_blk, v_blk):
    p = jnp.exp(_scores(q, k_blk, scale) - lse[..., None])  # [B, K, n, m]
    dv = jnp.einsum('bknm,bnkh->bmkh', p, do)  # [B, m, K, Dh]
    dp = jnp.einsum('bnkh,bmkh->bknm', do, v_blk.astype(jnp.float32))
    ds = p * (dp - delta[..., None]) * scale  # [B, K, n, m]
    dq = jnp.einsum('bknm,bmkh->bnkh', ds, k_blk.astype(jnp.float32))  # [B, n, K, Dh]
    dk = jnp.einsum('bknm,bnkh->bmkh', ds, q32)  # [B, m, K, Dh]
    return dq, dk, dv

  dq, dk, dv = block(k, v)

  def step(carry, _):
    k_blk, v_blk, dk, dv, dq = carry
    k_blk, v_blk, dk, dv = (lax.ppermute(x, axis, perm) for x in (k_blk, v_blk, dk, dv))
    dq_blk, dk_blk, dv_blk = block(k_blk, v_blk)
    return (k_blk, v_blk, dk + dk_blk, dv + dv_blk, dq + dq_blk), None

  (_, _, dk, dv, dq), _ = lax.scan(step, (k, v, dk, dv, dq), None, length=size - 1)
  # After P - 1 hops each accumulator sits one device short of its block's owner.
  dk, dv = (lax.ppermute(x, axis, perm) for x in (dk, dv))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _ring_attention(q, k, v, axis: str, size: int):
  """Per-shard ring attention: q/k/v [B, n, K, Dh] local blocks -> [B, n, K, Dh]."""

  @jax.custom_vjp
  def ring(q, k, v):
    return _ring_forward(q, k, v, axis, size)[0]

  def fwd(q, k, v):
    out, lse = _ring_forward(q, k, v, axis, size)
    return out, (q, k, v, out, lse)

  def bwd(res, dout):
    return _ring_backward(*res, dout, axis, size)

  ring.defvjp(fwd, bwd)
  return ring(q, k, v)


# --- other strategies -----------------------------------------------------------------------


def _all_gather_attention(q, k, v, axis: str, local=_plain):
  k = lax.all_gather(k, axis, axis=1, tiled=True)  # [B, N, K, Dh]
  v = lax.all_gather(v, axis, axis=1, tiled=True)
  return local(q, k, v)  # [B, n, K, Dh]


def _ulysses_attention(q, k, v, axis: str, local=_plain):
  # [B, n, K, Dh] -> [B, N, K/P, Dh]: give away head groups, receive token blocks.
  q, k, v = (lax.all_to_all(x, axis, split_axis=2, concat_axis=1, tiled=True)
             for x in (q, k, v))
  out = local(q, k, v)  # [B, N, K/P, Dh]
  return lax.all_to_all(out, axis, split_axis=1, concat_axis=2, tiled=True)  # [B, n, K, Dh]


def sequence_parallel_attention(q, k, v, *, strategy: str, mesh=None, axis: str = 'sequence',
                                attention_fn: Optional[Callable] = None,
                                local_attention_fn: Optional[Callable] = None,
                                check_vma: bool = True):
  """Bidirectional attention, scale 1/sqrt(Dh), q/k/v [B, N, K, Dh] -> [B, N, K, Dh].

  `mesh` (a Mesh or AbstractMesh) defaults to the one in context
  (`jax.set_mesh`); the shard_map specs come from the logical axis rules in
  context (`nn.logical_axis_rules`), else `axes.DEFAULT_RULES`. With no mesh,
  strategy 'none', or a sequence axis of size 1 this is plain attention.

  `attention_fn(q, k, v)` is that plain attention (default: XLA's) and
  `local_attention_fn` the per-device attention of all_gather and ulysses inside
  the shard_map (default: XLA's); ring has its own online softmax. `check_vma=False`
  lets that be a Pallas kernel, which shard_map's type checks cannot see into.
  """
  if strategy not in SEQUENCE_PARALLEL:
    raise ValueError(f'sequence_parallel={strategy!r} is not one of {SEQUENCE_PARALLEL}.')
  if not (q.ndim == k.ndim == v.ndim == 4) or not (q.shape == k.shape == v.shape):
    raise ValueError(f'q, k, v must all be [B, N, K, Dh] of one shape, got {q.shape}, '
                     f'{k.shape}, {v.shape}.')
  plain = attention_fn or _plain
  local = local_attention_fn or _plain
  given = mesh
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  if strategy == 'none' or not mesh.axis_names:
    return plain(q, k, v)
  if axis not in mesh.axis_names:
    raise ValueError(f'sequence axis {axis!r} is not an axis of the mesh {mesh.axis_names}.')
  size = mesh.shape[axis]
  if size == 1:
    return plain(q, k, v)

  spec = token_spec(mesh, axis)
  # A batch that the batch axes do not split evenly (init's batch of 1, a sampler's few
  # clips) runs whole over the axes that do not divide it; tokens and heads must divide.
  spec = PartitionSpec(mesh_lib.divisible_entry(q.shape[0], spec[0], mesh.shape), *spec[1:])
  _check_divisible(q.shape, spec, mesh)
  if strategy == 'ulysses':
    heads_sharding = math.prod(mesh.shape[a] for a in _axes_of(spec[2]))
    local_heads = q.shape[2] // heads_sharding
    if local_heads % size:
      raise ValueError(
          f"sequence_parallel='ulysses' needs the heads per device, K={q.shape[2]} / "
          f'{heads_sharding} (heads sharding {spec[2]!r}) = {local_heads}, divisible by the '
          f'{axis!r} axis size {size}.')
    body = lambda q, k, v: _ulysses_attention(q, k, v, axis, local)
  elif strategy == 'all_gather':
    body = lambda q, k, v: _all_gather_attention(q, k, v, axis, local)
  else:
    body = lambda q, k, v: _ring_attention(q, k, v, axis, size)
  return jax.shard_map(body, mesh=given, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=check_vma)(q, k, v)
