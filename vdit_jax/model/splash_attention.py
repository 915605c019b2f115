"""Full (non-causal) attention through the Pallas TPU splash-attention kernel.

The kernel (jax.experimental.pallas.ops.tpu.splash_attention) takes one example's
q/k/v as [K, N, Dh] on one device and does not scale the logits. This module
- scales q by 1/sqrt(Dh) and vmaps the kernel over the batch of [B, N, K, Dh];
- pads the tokens: each block size is first capped at N rounded up to 128 (the
  kernel's lane width), then N is zero-padded to a multiple of both blocks;
  segment ids (0 real, 1 padding) keep real queries off padded keys, and the
  padded query rows are sliced off;
- under a mesh, runs the kernel inside `shard_map` with batch and heads split as
  the logical axis rules say (over the axes that divide them) and tokens and head
  dim whole on each device
  (`splash_attention`); `local_splash_attention` is the per-device body, for
  callers already inside a shard_map (sequence-parallel attention);
- on TPU lowers the compiled Mosaic kernel, elsewhere the same kernel in Pallas
  interpret mode (`lax.platform_dependent`): correct on CPU, for tests, but slow.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from vdit_jax.parallel import axes
from vdit_jax.parallel import mesh as mesh_lib

LANES = 128  # block sizes must be multiples of the TPU lane width
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_KV = 512
TOKEN_HEADS = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_HEADS, axes.ACT_KV)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def check_block_sizes(block_q: int, block_kv: int) -> None:
  for name, block in (('attention_block_q', block_q), ('attention_block_kv', block_kv)):
    if isinstance(block, bool) or not isinstance(block, int) or block <= 0 or block % LANES:
      raise ValueError(f"model.{name}={block!r}: attention_impl='splash' needs block sizes "
                       f'that are positive multiples of {LANES} (the TPU lane width).')


def padded_layout(tokens: int, block_q: int, block_kv: int):
  """(padded tokens, block_q, block_kv) the kernel runs with for `tokens` tokens."""
  check_block_sizes(block_q, block_kv)
  cap = _round_up(tokens, LANES)
  bq, bkv = min(block_q, cap), min(block_kv, cap)
  return _round_up(tokens, math.lcm(bq, bkv)), bq, bkv


def _kernel(num_heads: int, tokens: int, bq: int, bkv: int, interpret: bool):
  mask = splash.MultiHeadMask([splash.FullMask((tokens, tokens)) for _ in range(num_heads)])
  sizes = splash.BlockSizes(
      block_q=bq, block_kv=bkv, block_kv_compute=bkv,
      block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
      use_fused_bwd_kernel=True)
  return splash.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


def _splash_one_device(q, k, v, block_q: int, block_kv: int, interpret: bool):
  _, n, num_heads, dh = q.shape
  n_pad, bq, bkv = padded_layout(n, block_q, block_kv)
  kernel = _kernel(num_heads, n_pad, bq, bkv, interpret)
  segments = None
  if n_pad != n:
    ids = (jnp.arange(n_pad) >= n).astype(jnp.int32)  # [Np] 0 real, 1 padding
    segments = splash.SegmentIds(q=ids, kv=ids)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, n_pad - n), (0, 0), (0, 0)))
  q = pad(q * jnp.asarray(1.0 / math.sqrt(dh), q.dtype))  # [B, Np, K, Dh]
  k, v = pad(k), pad(v)

  def one(q, k, v):  # [Np, K, Dh] -> [K, Np, Dh] for the kernel and back
    out = kernel(q.transpose(1, 0, 2), k.transpose(1, 0, 2), v.transpose(1, 0, 2),
                 segment_ids=segments)
    return out.transpose(1, 0, 2)

  return jax.vmap(one)(q, k, v)[:, :n].astype(q.dtype)  # [B, N, K, Dh]


def local_splash_attention(q, k, v, *, block_q: int, block_kv: int):
  """q/k/v [B, N, K, Dh] on one device -> [B, N, K, Dh]; scale 1/sqrt(Dh).

  Compiled kernel on TPU, interpreted elsewhere (decided when lowering).
  """
  if not (q.ndim == 4 and q.shape == k.shape == v.shape):
    raise ValueError(f'splash attention needs q, k, v [B, N, K, Dh] of one shape, got '
                     f'{q.shape}, {k.shape}, {v.shape}.')
  run = lambda interpret: lambda q, k, v: _splash_one_device(q, k, v, block_q, block_kv,
                                                             interpret)
  return lax.platform_dependent(q, k, v, tpu=run(False), default=run(True))


def _entries(entry, mesh):
  names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  kept = tuple(a for a in names if a in mesh.axis_names)
  return None if not kept else kept[0] if len(kept) == 1 else kept


def batch_heads_spec(mesh, rules=None) -> PartitionSpec:
  """PartitionSpec of q/k/v [B, N, K, Dh] with batch and heads as the rules say, N and Dh whole."""
  if rules is None:
    rules = nn.get_logical_axis_rules() or axes.DEFAULT_RULES
  spec = nn.logical_to_mesh_axes(TOKEN_HEADS, rules)
  return PartitionSpec(_entries(spec[0], mesh), None, _entries(spec[2], mesh), None)


def splash_attention(q, k, v, *, block_q: int, block_kv: int):
  """q/k/v [B, N, K, Dh] -> [B, N, K, Dh]; under the mesh in context, per device in shard_map.

  shard_map needs even blocks, but not every batch the model sees is a multiple of the
  batch-sharding mesh axes (init traces a batch of 1, a sampler may draw fewer clips
  than there are devices): a batch or head count that an axis does not divide runs
  whole over that axis (mesh_lib.divisible_entry), each of its devices computing the
  same rows, as XLA does for any array too small to split.
  """
  mesh = jax.sharding.get_abstract_mesh()
  body = lambda q, k, v: local_splash_attention(q, k, v, block_q=block_q, block_kv=block_kv)
  if not mesh.axis_names or math.prod(mesh.shape.values()) == 1:
    return body(q, k, v)
  full = batch_heads_spec(mesh)
  spec = PartitionSpec(mesh_lib.divisible_entry(q.shape[0], full[0], mesh.shape), None,
                       mesh_lib.divisible_entry(q.shape[2], full[2], mesh.shape), None)
  return jax.shard_map(body, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q, k, v)
