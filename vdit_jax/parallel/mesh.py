"""Device meshes with the axes (data, fsdp, tensor, sequence), and shardings from logical names."""

import itertools
import math
from typing import Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vdit_jax.model import axes


def mesh_shape(mesh_cfg, num_devices: int) -> Dict[str, int]:
  """Resolves the config's axis sizes (one may be -1) against the device count."""
  sizes = {name: int(mesh_cfg.get(name, 1)) for name in axes.MESH_AXES}
  free = [n for n, s in sizes.items() if s == -1]
  bad = [f'mesh.{n}={s}' for n, s in sizes.items() if s == 0 or s < -1]
  if bad:
    raise ValueError(f'{", ".join(bad)}: mesh axis sizes must be positive or -1.')
  if len(free) > 1:
    raise ValueError(f'mesh axes {free} are all -1; at most one axis may be -1.')
  fixed = int(np.prod([s for s in sizes.values() if s != -1]))
  if free:
    if num_devices % fixed:
      raise ValueError(
          f'{num_devices} devices are not divisible by the product {fixed} of the fixed '
          f'mesh axes {sizes}, so mesh.{free[0]}=-1 has no size.')
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f'mesh {sizes} has {fixed} devices but {num_devices} are available.')
  return sizes


def make_mesh(mesh_cfg, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  sizes = mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[n] for n in axes.MESH_AXES)
  try:
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, axes.MESH_AXES)


def logical_sharding(mesh: Mesh, rules, logical_names) -> NamedSharding:
  """NamedSharding for an array whose dims carry these logical names."""
  spec = nn.logical_to_mesh_axes(logical_names, rules)
  return NamedSharding(mesh, spec)


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
  """Sharding of a batch array: leading dim over the batch axes, the rest replicated."""
  return logical_sharding(mesh, rules, (axes.ACT_BATCH,) + (None,) * (ndim - 1))


def spec_axes(entry) -> Tuple[str, ...]:
  """A PartitionSpec entry (None | name | tuple of names) as a tuple of names."""
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def divisible_entry(size: int, entry, mesh_shape) -> Optional[object]:
  """The part of a PartitionSpec entry whose mesh axes split `size` evenly.

  Of the ordered subsets of `entry`'s axes whose sizes multiply to a divisor of
  `size`, the one with the largest product (the first of equals): batch 2 over
  ('data', 'fsdp') = (2, 2) keeps ('data',); batch 1 keeps none (None).
  """
  names = spec_axes(entry)
  best, best_ways = (), 1
  for r in range(len(names), 0, -1):
    for subset in itertools.combinations(names, r):
      ways = math.prod(mesh_shape[a] for a in subset)
      if size % ways == 0 and ways > best_ways:
        best, best_ways = subset, ways
  return None if not best else best[0] if len(best) == 1 else best


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
