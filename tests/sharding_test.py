"""Sharded training equals one-device training, with exactly the planned shardings.

The checks need 8 fake CPU devices, so they run in sharding_multidevice.py in a
subprocess; each mesh is reported here as its own test.
"""

import concurrent.futures

import pytest

from tests import multidevice

MESHES = ('data8', 'fsdp8', 'data2_fsdp2_tensor2', 'data2_seq4_all_gather',
          'data2_seq4_ring', 'data2_seq4_ulysses',
          'data2_fsdp2_tensor2_muon_selfcond')


@pytest.fixture(scope='module')
def results():
  # Two processes side by side, half the work each (compiles are mostly one thread): each
  # process also runs a one-device reference per recipe (AdamW; Muon + self-conditioning).
  halves = (('data8', 'data2_fsdp2_tensor2', 'data2_fsdp2_tensor2_muon_selfcond'),
            ('fsdp8', 'data2_seq4_all_gather', 'data2_seq4_ring', 'data2_seq4_ulysses'))
  assert sorted(halves[0] + halves[1]) == sorted(MESHES)
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    futures = [pool.submit(multidevice.run_checks_with_args, 'sharding_multidevice.py', half)
               for half in halves]
  return {k: v for f in futures for k, v in f.result().items()}


def test_reports_exactly_the_expected_meshes(results):
  assert sorted(results) == sorted(MESHES)


@pytest.mark.parametrize('mesh', MESHES)
def test_one_train_step_matches_one_device(results, mesh):
  assert results[mesh] == 'ok', results[mesh]
