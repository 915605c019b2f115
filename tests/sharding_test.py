"""Sharded training equals one-device training, with exactly the planned shardings.

The checks need 8 fake CPU devices, so they run in tests/multidevice/sharding.py in a
subprocess; each mesh is reported here as its own test.
"""

import concurrent.futures

import pytest

MESHES = ('data8', 'fsdp8', 'data2_fsdp2_tensor2', 'data2_seq4_all_gather',
          'data2_seq4_ring', 'data2_seq4_ulysses',
          'data2_fsdp2_tensor2_muon_selfcond')


@pytest.fixture(scope='module')
def results(multidevice):
  # Two processes side by side, half the work each (compiles are mostly one thread): each
  # process also runs a one-device reference per recipe (AdamW; Muon + self-conditioning).
  halves = (('data8', 'data2_fsdp2_tensor2', 'data2_fsdp2_tensor2_muon_selfcond'),
            ('fsdp8', 'data2_seq4_all_gather', 'data2_seq4_ring', 'data2_seq4_ulysses'))
  assert sorted(halves[0] + halves[1]) == sorted(MESHES)
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    futures = [pool.submit(multidevice.run, 'multidevice/sharding.py', half)
               for half in halves]
  return {k: v for f in futures for k, v in f.result().items()}


@pytest.mark.parametrize('mesh', MESHES)
def test_one_train_step_matches_one_device(multidevice, results, mesh):
  multidevice.assert_ok(results, MESHES, mesh)
