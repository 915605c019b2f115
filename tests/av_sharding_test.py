"""Sharded audio-video training equals one-device training, with the audio stream's params
sharded by their logical names (issue 30).

The checks need 8 fake CPU devices, so they run in tests/multidevice/av_sharding.py in
subprocesses; each mesh (audio design x mesh x sequence-parallel strategy) is reported here
as its own test.
"""

import concurrent.futures

import pytest

MESHES = ('cross_data2_fsdp2_tensor2', 'cross_data2_seq4_all_gather', 'cross_data2_seq4_ring',
          'cross_data4_seq2_ulysses', 'joint_data2_fsdp2_tensor2',
          'joint_data2_seq4_all_gather')
# Two processes side by side (compiles are mostly one thread), each running the one-device
# reference of a design before its meshes. The second runs the cross design's reference
# last, by when the first has usually compiled it into the session's compilation cache.
HALVES = (('cross_data2_fsdp2_tensor2', 'cross_data2_seq4_all_gather',
           'cross_data2_seq4_ring'),
          ('joint_data2_fsdp2_tensor2', 'joint_data2_seq4_all_gather',
           'cross_data4_seq2_ulysses'))


def test_halves_cover_every_mesh_once():
  assert sorted(HALVES[0] + HALVES[1]) == sorted(MESHES), HALVES


@pytest.fixture(scope='module')
def results(multidevice):
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    futures = [pool.submit(multidevice.run, 'multidevice/av_sharding.py', half)
               for half in HALVES]
  return {k: v for f in futures for k, v in f.result().items()}


@pytest.mark.parametrize('mesh', MESHES)
def test_av_train_steps_match_one_device(multidevice, results, mesh):
  multidevice.assert_ok(results, MESHES, mesh)
