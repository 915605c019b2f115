"""Meshes over slices: mesh.<axis> (ICI, within a slice) x mesh.dcn_<axis> (DCN, slices)
resolve to the full axis sizes, bad DCN sizes and slice-count mismatches are refused
with the config values named, and the device grid is DCN-major along each axis."""

import re
import types

import ml_collections
import numpy as np
import pytest

from configs import tiny
from vdit_jax.config import resolve
from vdit_jax.config import validate
from vdit_jax.parallel import mesh as mesh_lib


def mesh_cfg(**sizes):
  cfg = tiny.get_config().mesh
  cfg.update(dict(data=1, fsdp=1, tensor=1, sequence=1), **sizes)
  return cfg


@pytest.mark.parametrize('sizes, devices, slices, ici, total', [
    # Defaults: one slice, data=-1 takes every device.
    (dict(data=-1), 8, None, (8, 1, 1, 1), (8, 1, 1, 1)),
    # data=-1 is what a slice leaves: 16 / 2 slices / fsdp 2 = 4 in a slice, 8 in all.
    (dict(data=-1, fsdp=2, dcn_data=2), 16, 2, (4, 2, 1, 1), (8, 2, 1, 1)),
    (dict(data=2, fsdp=-1, dcn_fsdp=2), 16, None, (2, 4, 1, 1), (2, 8, 1, 1)),
    (dict(data=1, fsdp=2, tensor=2, dcn_data=2, dcn_fsdp=2), 16, 4, (1, 2, 2, 1),
     (2, 4, 2, 1)),
])
def test_axis_size_is_ici_times_dcn(sizes, devices, slices, ici, total):
  cfg = mesh_cfg(**sizes)
  got_ici, dcn = mesh_lib.hybrid_shape(cfg, devices, slices)
  assert tuple(got_ici.values()) == ici
  assert tuple(mesh_lib.mesh_shape(cfg, devices, slices).values()) == total
  assert tuple(dcn.values()) == tuple(t // i for t, i in zip(total, ici))


@pytest.mark.parametrize('sizes, devices, slices, message', [
    (dict(dcn_data=0), 8, None, 'mesh.dcn_data=0: a DCN axis size is the number of slices'),
    (dict(data=-1, dcn_fsdp=-1), 8, None, 'mesh.dcn_fsdp=-1: a DCN axis size'),
    (dict(data=4, dcn_data=2), 8, 1,
     'mesh.dcn_data=2 x mesh.dcn_fsdp=1 x mesh.dcn_tensor=1 x mesh.dcn_sequence=1 = 2 '
     'slice(s), but the devices form 1 slice(s)'),
    (dict(data=-1), 8, 2, '= 1 slice(s), but the devices form 2 slice(s)'),
    (dict(data=-1, dcn_data=3), 8, None,
     '8 devices do not split into mesh.dcn_data=3 x mesh.dcn_fsdp=1 x mesh.dcn_tensor=1 '
     'x mesh.dcn_sequence=1 = 3 slices of equal size'),
    (dict(data=4, dcn_data=2), 16, 2,
     "mesh {'data': 4, 'fsdp': 1, 'tensor': 1, 'sequence': 1} has 4 devices but 8 devices "
     'per slice (16 devices / 2 slices) are available'),
    (dict(data=-1, fsdp=3, dcn_data=2), 16, 2,
     '8 devices per slice (16 devices / 2 slices) are not divisible by the product 3'),
])
def test_bad_dcn_sizes_are_refused_naming_them(sizes, devices, slices, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    mesh_lib.mesh_shape(mesh_cfg(**sizes), devices, slices)


def test_validation_checks_dimensions_against_the_full_axis_sizes():
  """validate sees a device count only: the DCN product is taken as the slice count,
  and the batch must divide data = ici x dcn."""
  config = tiny.get_config()
  config.mesh.update(data=4, dcn_data=2)
  config.train.batch_size = 12
  with pytest.raises(ValueError, match=re.escape(
      "train.batch_size=12 is not divisible by 8, the size of mesh axes ('data', 'fsdp') "
      '(data=8, fsdp=1)')):
    validate.validate_config(config, num_devices=8)
  config.train.batch_size = 16
  validate.validate_config(config, num_devices=8)
  config.mesh.dcn_data = -1
  with pytest.raises(ValueError, match='mesh.dcn_data=-1'):
    validate.validate_config(config, num_devices=8)


def test_shipped_defaults_have_one_slice():
  cfg = tiny.get_config().mesh
  assert [cfg[f'dcn_{a}'] for a in ('data', 'fsdp', 'tensor', 'sequence')] == [1, 1, 1, 1]
  # A config without the dcn fields (an old checkpoint's) resolves to one slice.
  old = resolve.complete({'mesh': dict(data=-1, fsdp=2, tensor=1, sequence=1)}).mesh
  assert mesh_lib.mesh_shape(old, 8) == dict(data=4, fsdp=2, tensor=1, sequence=1)


def fake_devices(num_slices, per_slice):
  """CPU-like stand-ins carrying a slice_index, listed out of order."""
  devices = [types.SimpleNamespace(id=s * 100 + i, slice_index=s, process_index=s,
                                   platform='cpu', device_kind='cpu')
             for s in range(num_slices) for i in range(per_slice)]
  return devices[::-1]


def _slices(grid):
  return np.vectorize(lambda d: d.slice_index)(grid)


@pytest.mark.parametrize('sizes, dcn_axis, ici', [
    (dict(data=2, fsdp=2, dcn_data=2), 0, 2),
    (dict(data=1, fsdp=4, dcn_fsdp=2), 1, 4),
    (dict(data=1, fsdp=2, tensor=2, dcn_data=2), 0, 1),
])
def test_device_grid_is_dcn_major_along_the_dcn_axis(sizes, dcn_axis, ici):
  grid = mesh_lib.device_grid(mesh_cfg(**sizes), fake_devices(2, 4))
  assert grid.shape == tuple(mesh_lib.mesh_shape(mesh_cfg(**sizes), 8, 2).values())
  slices = _slices(grid)
  index = np.indices(grid.shape)[dcn_axis]
  np.testing.assert_array_equal(slices, index // ici)  # slice = DCN coordinate
  assert sorted(d.id for d in grid.flat) == sorted(d.id for d in fake_devices(2, 4))


def test_fallback_grid_matches_the_hybrid_one(monkeypatch):
  """When jax cannot lay an ICI shape on the chips, the slices are placed the same way."""
  cfg = mesh_cfg(data=2, fsdp=2, dcn_data=2)
  devices = fake_devices(2, 4)
  expected = mesh_lib.device_grid(cfg, devices)
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top

  def refuse(*args, **kwargs):
    raise NotImplementedError('no torus here')

  monkeypatch.setattr(mesh_utils, 'create_hybrid_device_mesh', refuse)
  got = mesh_lib.device_grid(cfg, devices)
  np.testing.assert_array_equal(np.vectorize(lambda d: d.id)(got),
                                np.vectorize(lambda d: d.id)(expected))


def test_cpu_devices_form_one_slice():
  import jax  # pylint: disable=g-import-not-at-top
  assert mesh_lib.count_slices(jax.devices()) == 1
  with pytest.raises(ValueError, match=r'= 2 slice\(s\), but the devices form 1 slice\(s\)'):
    mesh_lib.make_mesh(mesh_cfg(data=-1, dcn_data=2), jax.devices() * 2)
