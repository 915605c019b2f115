"""A checkpoint written on 8 devices (fsdp=8) restores onto 4 devices (data=4) and onto 1.

Each side runs tests/multidevice/restore_mesh.py in a fresh process with that many fake CPU
devices; they share one directory. The restore goes through the trainer's resume path
(`loop.restore_or_init`), which restores into the new mesh's target shardings.
"""

import pytest

CHECKS = ('saved_on_fsdp8', 'restored_on_4_devices', 'restored_on_1_devices')


@pytest.fixture(scope='module')
def results(multidevice, tmp_path_factory):
  directory = tmp_path_factory.mktemp('restore_mesh')
  out = {}
  for num_devices in (8, 4, 1):  # the 8-device run writes what the others read
    out.update(multidevice.run('multidevice/restore_mesh.py', [directory],
                               num_devices=num_devices, timeout=300))
  return out


@pytest.mark.parametrize('check', CHECKS)
def test_restore_onto_another_mesh_gives_identical_state(multidevice, results, check):
  multidevice.assert_ok(results, CHECKS, check)
