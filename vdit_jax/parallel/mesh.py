"""Device meshes with the axes (data, fsdp, tensor, sequence), each within a slice (ICI)
times across slices (DCN), and shardings from logical names."""

import itertools
import math
from typing import Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vdit_jax.parallel import axes


def dcn_sizes(mesh_cfg) -> Dict[str, int]:
  """How many slices each mesh axis spans: `mesh.dcn_<axis>` (default 1), checked.

  The DCN part of an axis has no -1: the slice count is fixed when the job is launched,
  so the config states it (and validation, which sees only a device count, can resolve
  the mesh without the devices).
  """
  sizes = {name: int(mesh_cfg[f'dcn_{name}']) for name in axes.MESH_AXES}
  bad = [f'mesh.dcn_{n}={s}' for n, s in sizes.items() if s < 1]
  if bad:
    raise ValueError(
        f'{", ".join(bad)}: a DCN axis size is the number of slices the axis spans and '
        'must be a positive int (no -1: write the slice count out).')
  return sizes


def _dcn_product(dcn: Dict[str, int]) -> str:
  """'mesh.dcn_data=2 x mesh.dcn_fsdp=1 x ...' for error messages."""
  return ' x '.join(f'mesh.dcn_{n}={s}' for n, s in dcn.items())


def count_slices(devices: Sequence[jax.Device]) -> int:
  """Slices among the devices: distinct `slice_index` values.

  TPU devices of a multi-slice job carry slice_index 0..S-1 (GPUs carry the partition
  index given to `jax.distributed.initialize`, if any); devices without one (CPU, a
  single TPU slice, where it is None) form one slice.
  """
  return len({getattr(d, 'slice_index', None) or 0 for d in devices})


def hybrid_shape(mesh_cfg, num_devices: int, num_slices: Optional[int] = None
                 ) -> Tuple[Dict[str, int], Dict[str, int]]:
  """(ICI sizes, DCN sizes) of the mesh axes, resolved against the devices.

  Axis `a` has `mesh.a` devices within a slice (ICI; one axis may be -1: what the
  other ICI sizes leave of a slice) times `mesh.dcn_a` slices (DCN). The slices are
  `prod(mesh.dcn_*)` equal parts of the devices; `num_slices`, where known (the
  devices' own count, see `count_slices`), must agree with that product.
  """
  dcn = dcn_sizes(mesh_cfg)
  slices = math.prod(dcn.values())
  if num_slices is not None and num_slices != slices:
    raise ValueError(
        f'{_dcn_product(dcn)} = {slices} slice(s), but the devices form {num_slices} '
        'slice(s): the product of the DCN axis sizes must be the number of slices '
        '(devices without a slice_index, such as CPU devices, form one).')
  if num_devices % slices:
    raise ValueError(f'{num_devices} devices do not split into {_dcn_product(dcn)} = '
                     f'{slices} slices of equal size.')
  per_slice = num_devices // slices
  where = (f'{num_devices} devices' if slices == 1 else
           f'{per_slice} devices per slice ({num_devices} devices / {slices} slices)')
  ici = {name: int(mesh_cfg[name]) for name in axes.MESH_AXES}
  free = [n for n, s in ici.items() if s == -1]
  bad = [f'mesh.{n}={s}' for n, s in ici.items() if s == 0 or s < -1]
  if bad:
    raise ValueError(f'{", ".join(bad)}: mesh axis sizes must be positive or -1.')
  if len(free) > 1:
    raise ValueError(f'mesh axes {free} are all -1; at most one axis may be -1.')
  fixed = math.prod(s for s in ici.values() if s != -1)
  if free:
    if per_slice % fixed:
      raise ValueError(
          f'{where} are not divisible by the product {fixed} of the fixed '
          f'mesh axes {ici}, so mesh.{free[0]}=-1 has no size.')
    ici[free[0]] = per_slice // fixed
  elif fixed != per_slice:
    available = num_devices if slices == 1 else where
    raise ValueError(f'mesh {ici} has {fixed} devices but {available} are available.')
  return ici, dcn


def mesh_shape(mesh_cfg, num_devices: int, num_slices: Optional[int] = None
               ) -> Dict[str, int]:
  """The size of each mesh axis: its ICI size times its DCN size (`hybrid_shape`)."""
  ici, dcn = hybrid_shape(mesh_cfg, num_devices, num_slices)
  return {name: ici[name] * dcn[name] for name in axes.MESH_AXES}


def _slice_grid(shape: Tuple[int, ...], devices) -> np.ndarray:
  """One slice's devices as an array of `shape`, ICI-aware where jax knows the chip."""
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  try:
    return mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):
    return np.asarray(devices).reshape(shape)


def device_grid(mesh_cfg, devices: Sequence[jax.Device]) -> np.ndarray:
  """The devices as an array of the mesh's shape, in `axes.MESH_AXES` order.

  With several slices each axis of size dcn x ici is DCN-major: index i along it is
  slice coordinate i // ici and in-slice coordinate i % ici, as
  `mesh_utils.create_hybrid_device_mesh` lays it out. So a collective over an axis
  whose `mesh.dcn_*` is 1 stays within a slice, and one over an axis whose ICI size
  is 1 runs between slices only.
  """
  devices = list(devices)
  slices = count_slices(devices)
  ici, dcn = hybrid_shape(mesh_cfg, len(devices), slices)
  ici_shape = tuple(ici[n] for n in axes.MESH_AXES)
  if slices == 1:
    return _slice_grid(ici_shape, devices)
  dcn_shape = tuple(dcn[n] for n in axes.MESH_AXES)
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  try:
    return mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)
  except (ValueError, NotImplementedError, AssertionError):
    pass  # an ICI shape the torus cannot take: lay out each slice on its own instead
  by_slice = {}
  for d in devices:
    by_slice.setdefault(getattr(d, 'slice_index', None) or 0, []).append(d)
  grids = np.stack([_slice_grid(ici_shape, by_slice[k]) for k in sorted(by_slice)])
  n = len(ici_shape)
  grid = grids.reshape(dcn_shape + ici_shape)  # [d0, .., d3, i0, .., i3]
  grid = grid.transpose([k for a in range(n) for k in (a, n + a)])  # [d0, i0, .., d3, i3]
  return grid.reshape(tuple(d * i for d, i in zip(dcn_shape, ici_shape)))


def make_mesh(mesh_cfg, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """The config's mesh over `devices` (default: all of them); see `device_grid`."""
  devices = list(devices if devices is not None else jax.devices())
  return Mesh(device_grid(mesh_cfg, devices), axes.MESH_AXES)


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
