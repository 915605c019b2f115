"""LoRA: rank-r adapters on the DiT blocks' attention and MLP kernels, as params of their own.

The model modules are untouched. Adapters are a pytree that mirrors the paths of the
kernels they adapt, each kernel W [*L, *I, *O] (L: the `layers` axis of scanned blocks,
absent when unrolled; I / O: the kernel's input / output dims) getting

    {'a': [*L, *I, r], 'b': [*L, r, *O]}      e.g. query_kernel [L, D, K, Dh]:
                                              a [L, D, r], b [L, r, K, Dh]

and the model runs on `merge(base, adapters, alpha, rank)`:  W + (alpha / r) * A @ B,
the product contracting r and keeping I and O unflattened (so each factor keeps the
base kernel's logical axis names: `embed`, `heads`, `kv`, `mlp`, plus `lora_rank`).
A starts random (normal / sqrt(fan-in)), B at zero, so a fresh adapter leaves the
model exactly unchanged.

    adapters = init_adapters(rng, abstract_params, parse_targets('attn,mlp'), rank=8)
    y = model.apply({'params': merge(params, adapters, alpha=8.0, rank=8)}, x, t, labels)

Targets: 'attn' = query, key, value, out; 'mlp' = fc1, fc2; or any of those six names,
comma-separated ('query,value,fc1'). They are looked up in the DiT blocks only (params
under `blocks` / `blocks_<i>`; not the text encoder): 'query' adapts the query kernel of
every attention of a block, the self-attention `attn`, a factorised `attn_<kind>` and the
text cross-attention `cross_attn/attn`.
"""

import dataclasses
import math
import numbers
import string
from typing import Any, Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from vdit_jax.parallel import axes


@dataclasses.dataclass(frozen=True)
class Target:
  """A kernel kind: the end of its param path and its numbers of input / output dims."""
  suffix: Tuple[str, ...]
  num_in: int
  num_out: int

  def matches(self, path: Tuple[str, ...]) -> bool:
    """A param of the DiT blocks whose path ends in `suffix`, the module name matching as
    itself or with a '_<kind>' ending ('attn' matches 'attn' and 'attn_temporal')."""
    if len(path) <= len(self.suffix) or not path[0].startswith('blocks'):
      return False
    tail = path[-len(self.suffix):]
    return tail[1:] == self.suffix[1:] and (
        tail[0] == self.suffix[0] or tail[0].startswith(self.suffix[0] + '_'))


TARGETS = {
    'query': Target(('attn', 'query_kernel'), 1, 2),  # [D, K, Dh]
    'key': Target(('attn', 'key_kernel'), 1, 2),      # [D, K, Dh]
    'value': Target(('attn', 'value_kernel'), 1, 2),  # [D, K, Dh]
    'out': Target(('attn', 'out_kernel'), 2, 1),      # [K, Dh, D]
    'fc1': Target(('mlp', 'fc1', 'kernel'), 1, 1),    # [D, F]
    'fc2': Target(('mlp', 'fc2', 'kernel'), 1, 1),    # [F, D]
}
GROUPS = {'attn': ('query', 'key', 'value', 'out'), 'mlp': ('fc1', 'fc2')}


def parse_targets(targets) -> Tuple[str, ...]:
  """'attn,mlp' | 'query,value' | a sequence of names -> kernel names in TARGETS order."""
  names = targets.split(',') if isinstance(targets, str) else list(targets or ())
  names = [n.strip() for n in names if n and n.strip()]
  known = tuple(GROUPS) + tuple(TARGETS)
  unknown = [n for n in names if n not in known]
  if unknown or not names:
    raise ValueError(f'lora.targets={targets!r} must be a comma list of {known} '
                     f"(groups 'attn' and 'mlp' or single kernels); unknown: {unknown}.")
  chosen = set()
  for n in names:
    chosen.update(GROUPS.get(n, (n,)))
  return tuple(n for n in TARGETS if n in chosen)


def target_sizes(name: str, width: int, mlp_dim: int) -> Tuple[int, int]:
  """(fan-in, fan-out) of a target kernel of a model of this width / MLP width."""
  return {'fc1': (width, mlp_dim), 'fc2': (mlp_dim, width)}.get(name, (width, width))


def check_config(lora_cfg, width: int, mlp_dim: int) -> None:
  """config.lora: rank >= 0; with rank > 0: alpha > 0, known targets, rank <= min(in, out)
  of every target kernel, and a base checkpoint. Raises ValueError naming the value."""
  if lora_cfg is None:
    return
  rank = lora_cfg.rank
  if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 0:
    raise ValueError(f'config.lora.rank={rank!r} must be an integer >= 0 (0 = LoRA off).')
  if rank == 0:
    return
  alpha = lora_cfg.alpha
  if (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real)
      or not math.isfinite(alpha) or alpha <= 0):
    raise ValueError(f'config.lora.alpha={alpha!r} must be a finite number > 0 '
                     '(the adapters are scaled by alpha / rank).')
  for name in parse_targets(lora_cfg.targets):
    fan_in, fan_out = target_sizes(name, width, mlp_dim)
    if rank > min(fan_in, fan_out):
      raise ValueError(f'config.lora.rank={rank} exceeds min(in, out) = {min(fan_in, fan_out)} '
                       f'of the {name} kernel ({fan_in} -> {fan_out}): a rank-{rank} update '
                       'of it is not low-rank.')
  base = lora_cfg.base_checkpoint
  if not isinstance(base, str) or not base.strip():
    raise ValueError(f'config.lora.rank={rank} needs config.lora.base_checkpoint, the workdir, '
                     'export directory or Wan 2.1 diffusers folder of the trained model to '
                     f'adapt (got {base!r}).')


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
  """Shapes and logical names of one kernel's factors."""
  target: str
  a_shape: Tuple[int, ...]   # [*L, *I, r]
  b_shape: Tuple[int, ...]   # [*L, r, *O]
  a_names: Tuple[Any, ...]
  b_names: Tuple[Any, ...]
  boxed: bool                # the base kernel carried logical names

  @property
  def fan_in(self) -> int:
    return math.prod(self.a_shape[self.num_lead:-1])

  @property
  def num_lead(self) -> int:
    return len(self.a_shape) - 1 - TARGETS[self.target].num_in


def _unboxed_leaf(x):
  return x.value if isinstance(x, nn.meta.AxisMetadata) else x


def adapter_specs(params, targets: Sequence[str], rank: int) -> Dict[Tuple[str, ...], AdapterSpec]:
  """{kernel path: AdapterSpec} for every target kernel in `params`.

  `params` may be boxed (nn.LogicallyPartitioned, from `jax.eval_shape(model.init)`):
  the factors then get the kernel's logical names plus `lora_rank`; unboxed params give
  names of None. Raises ValueError for a target with no kernel, or a rank above a
  kernel's min(in, out).
  """
  flat = traverse_util.flatten_dict(params, is_leaf=lambda _, x: isinstance(
      x, nn.meta.AxisMetadata))
  specs = {}
  for name in targets:
    target = TARGETS[name]
    found = [p for p in flat if target.matches(tuple(p))]
    if not found:
      raise ValueError(f'lora target {name!r}: the model has no param ending in '
                       f'{"/".join(target.suffix)} in its blocks.')
    for path in found:
      leaf = flat[path]
      shape = tuple(_unboxed_leaf(leaf).shape)
      boxed = isinstance(leaf, nn.LogicallyPartitioned)
      names = tuple(leaf.names) if boxed else (None,) * len(shape)
      lead = len(shape) - target.num_in - target.num_out
      if lead < 0:
        raise ValueError(f'lora target {name!r}: param {"/".join(path)} has shape {shape}, '
                         f'fewer than its {target.num_in} + {target.num_out} kernel dims.')
      split = lead + target.num_in
      fan_in, fan_out = math.prod(shape[lead:split]), math.prod(shape[split:])
      if rank > min(fan_in, fan_out):
        raise ValueError(f'lora rank {rank} exceeds min(in, out) = {min(fan_in, fan_out)} of '
                         f'{"/".join(path)} (shape {shape}).')
      specs[tuple(path)] = AdapterSpec(
          target=name,
          a_shape=shape[:split] + (rank,), b_shape=shape[:lead] + (rank,) + shape[split:],
          a_names=names[:split] + (axes.LORA_RANK,),
          b_names=names[:lead] + (axes.LORA_RANK,) + names[split:], boxed=boxed)
  return specs


def num_adapter_params(specs: Dict[Tuple[str, ...], AdapterSpec]) -> int:
  return sum(math.prod(s.a_shape) + math.prod(s.b_shape) for s in specs.values())


def init_adapters(rng, params, targets: Sequence[str], rank: int, dtype=jnp.float32):
  """Fresh adapters for `params` (arrays or ShapeDtypeStructs, boxed or not).

  A ~ normal / sqrt(fan-in), B = 0. For boxed `params` each factor is an
  nn.LogicallyPartitioned, so `nn.get_partition_spec` gives the adapters' shardings.
  """
  specs = sorted(adapter_specs(params, targets, rank).items())
  # One draw for every A (one random-bits op to compile, not one per kernel), then cut.
  sizes = [math.prod(spec.a_shape) for _, spec in specs]
  noise = jax.random.normal(rng, (sum(sizes),), jnp.float32)
  offsets = [sum(sizes[:i]) for i in range(len(sizes))]
  flat = {}
  for offset, size, (path, spec) in zip(offsets, sizes, specs):
    a = (noise[offset:offset + size].reshape(spec.a_shape)
         / math.sqrt(spec.fan_in)).astype(dtype)  # [*L, *I, r]
    b = jnp.zeros(spec.b_shape, dtype)  # [*L, r, *O]
    if spec.boxed:
      a, b = nn.LogicallyPartitioned(a, spec.a_names), nn.LogicallyPartitioned(b, spec.b_names)
    flat[path + ('a',)] = a
    flat[path + ('b',)] = b
  return traverse_util.unflatten_dict(flat)


def _factor_pairs(adapters) -> Dict[Tuple[str, ...], Dict[str, Any]]:
  """{kernel path: {'a': ..., 'b': ...}} from the nested adapter tree."""
  pairs = {}
  for path, leaf in traverse_util.flatten_dict(adapters).items():
    if path[-1] not in ('a', 'b'):
      raise ValueError(f'adapter leaf {"/".join(path)} is neither an a nor a b factor.')
    pairs.setdefault(path[:-1], {})[path[-1]] = leaf
  for path, pair in pairs.items():
    if set(pair) != {'a', 'b'}:
      raise ValueError(f'adapter {"/".join(path)} has factors {sorted(pair)}, not a and b.')
  return pairs


def delta(a, b, num_in: int, scale: float = 1.0):
  """scale * A @ B: a [*L, *I, r], b [*L, r, *O] (len(I) = num_in) -> [*L, *I, *O]."""
  num_lead = a.ndim - 1 - num_in
  num_out = b.ndim - 1 - num_lead
  letters = iter(string.ascii_lowercase.replace('r', ''))
  lead = ''.join(next(letters) for _ in range(num_lead))
  ins = ''.join(next(letters) for _ in range(num_in))
  outs = ''.join(next(letters) for _ in range(num_out))
  product = jnp.einsum(f'{lead}{ins}r,{lead}r{outs}->{lead}{ins}{outs}',
                       a.astype(jnp.float32), b.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)  # [*L, *I, *O]
  return scale * product


def merge(base, adapters, alpha: float, rank: int):
  """The base params with W + (alpha / rank) * A @ B for every adapted kernel W.

  Pure and differentiable in both arguments; kernels without an adapter pass through
  as the same arrays. Each merged kernel keeps its base dtype.
  """
  scale = float(alpha) / float(rank)
  flat = traverse_util.flatten_dict(base)
  for path, pair in _factor_pairs(adapters).items():
    if path not in flat:
      raise ValueError(f'adapter {"/".join(path)} has no kernel in the base params.')
    w = flat[path]
    # a [*L, *I, r], b [*L, r, *O], w [*L, *I, *O]: len(L) = a.ndim - 1 + b.ndim - 1 - w.ndim.
    num_lead = pair['a'].ndim + pair['b'].ndim - 2 - w.ndim
    num_in = pair['a'].ndim - 1 - num_lead
    d = delta(pair['a'], pair['b'], num_in, scale)  # [*L, *I, *O]
    if d.shape != w.shape:
      raise ValueError(f'adapter {"/".join(path)} factors {pair["a"].shape} x '
                       f'{pair["b"].shape} make {d.shape}, not the kernel shape {w.shape}.')
    flat[path] = (w.astype(jnp.float32) + d).astype(w.dtype)
  return traverse_util.unflatten_dict(flat)


def apply_unmerged(x, kernel, a, b, num_in: int, scale: float):
  """x @ W + scale * (x @ A) @ B for one unscanned kernel, without forming W + AB.

  x [..., *I], kernel [*I, *O], a [*I, r], b [r, *O] -> [..., *O]: the forward an
  unmerged LoRA layer computes, equal to x @ (W + scale * A @ B).
  """
  contract = (tuple(range(x.ndim - num_in, x.ndim)), tuple(range(num_in)))
  hi = jax.lax.Precision.HIGHEST
  y = jnp.tensordot(x, kernel, contract, precision=hi)  # [..., *O]
  h = jnp.tensordot(x, a, contract, precision=hi)  # [..., r]
  return y + scale * jnp.tensordot(h, b, ((h.ndim - 1,), (0,)), precision=hi)  # [..., *O]
