"""A checkpoint written on 8 devices (fsdp=8) restores onto 4 devices (data=4) and onto 1.

Each side runs restore_mesh_multidevice.py in a fresh process with that many fake CPU
devices; they share one directory. The restore goes through the trainer's resume path
(`loop.restore_or_init`), which restores into the new mesh's target shardings.
"""

import pytest

from tests import multidevice

SCRIPT = 'restore_mesh_multidevice.py'


@pytest.fixture(scope='module')
def results(tmp_path_factory):
  directory = tmp_path_factory.mktemp('restore_mesh')
  out = {}
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv('RESTORE_MESH_DIR', str(directory))
    for num_devices in (8, 4, 1):  # the 8-device run writes what the others read
      out.update(multidevice.run_checks(SCRIPT, num_devices=num_devices, timeout=300))
  return out


def test_reports_exactly_the_expected_checks(results):
  assert sorted(results) == sorted(
      ['saved_on_fsdp8', 'restored_on_4_devices', 'restored_on_1_devices'])


@pytest.mark.parametrize('check', ['saved_on_fsdp8', 'restored_on_4_devices',
                                   'restored_on_1_devices'])
def test_restore_onto_another_mesh_gives_identical_state(results, check):
  assert results[check] == 'ok', results[check]
