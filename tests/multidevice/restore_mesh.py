"""A checkpoint saved on one mesh restores onto another: 8 devices fsdp=8 -> 4 devices data=4, 1.

Run by restore_mesh_test.py, three times, each a fresh process with its own fake CPU
device count; the role follows the device count:
  8 devices: builds a state sharded fsdp=8 (params, EMA and Adam moments split in 8),
             saves it with the data iterator through the trainer's Checkpointer, and
             writes every leaf as numpy to reference.npz beside it;
  4 devices (mesh data=4) and 1 device: restore it through the trainer's resume path
             (`loop.restore_or_init`) and compare every leaf, its sharding, and the
             next batch of the data iterator.
The directory they share is the argument. Prints one JSON line {check: 'ok' | failure}.
"""

import json
import os
import sys
import traceback

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..')))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
from jax.sharding import PartitionSpec as P

from configs import tiny
from tests.conftest import shrink
from vdit_jax.data import pipeline
from vdit_jax.train import loop

SAVED_STEP = 3
BATCHES_BEFORE_SAVE = 2
MESHES = {8: dict(fsdp=8), 4: dict(data=4), 1: dict()}


def config_for(num_devices):
  """The small model (width 48: divisible by fsdp=8), 2 layers; a batch of 8 splits over
  data x fsdp = 8 on the saving mesh; asynchronous checkpoints, as runs save."""
  return shrink(tiny.get_config(), small=('model', 'data'), model=dict(depth=2),
                train=dict(batch_size=8), checkpoint=dict(async_save=True),
                mesh={'data': 1, **MESHES[num_devices]})


def flat(tree):
  """{path: leaf} of a pytree, paths as strings."""
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def save(directory):
  config = config_for(8)
  s = loop.build(config, directory)
  # Random values for every leaf of the train state (params, EMA and both Adam
  # moments all differ: a restore that re-initialised anything would not match), put
  # straight into the fsdp=8 shardings from host memory (nothing to compile).
  rng = np.random.default_rng(5)
  host = jax.tree.map(
      lambda a: (rng.standard_normal(a.shape).astype(a.dtype)
                 if np.issubdtype(a.dtype, np.floating) else np.full(a.shape, 7, a.dtype)),
      s.abstract_state)
  state = jax.tree.map(jax.device_put, host, s.state_shardings)
  state = state.replace(step=jax.device_put(np.asarray(SAVED_STEP, np.int32),
                                            s.state_shardings.step))
  kernel = state.params['blocks']['mlp']['fc1']['kernel']  # [L, D, M]
  assert kernel.sharding.spec == P(None, 'fsdp', 'tensor'), kernel.sharding
  assert kernel.addressable_shards[0].data.shape == (2, 48 // 8, 96), \
      kernel.addressable_shards[0].data.shape
  data_iter = pipeline.make_dataset(config.data, config.train.batch_size, seed=config.seed)
  for _ in range(BATCHES_BEFORE_SAVE):
    next(data_iter)
  s.checkpointer.save(SAVED_STEP, state, data_iter)
  s.checkpointer.close()
  np.savez(os.path.join(directory, 'reference.npz'),
           **{k: np.asarray(v) for k, v in flat(state).items()})
  np.savez(os.path.join(directory, 'next_batch.npz'), **next(data_iter))
  return {'saved_on_fsdp8': 'ok'}


def restore(directory, num_devices):
  config = config_for(num_devices)
  s = loop.build(config, directory)
  assert dict(s.mesh.shape)['data'] == max(num_devices, 1), s.mesh.shape
  data_iter = pipeline.make_dataset(config.data, config.train.batch_size, seed=config.seed)
  state, step = loop.restore_or_init(s, data_iter)
  s.checkpointer.close()
  assert step == SAVED_STEP, step
  want = np.load(os.path.join(directory, 'reference.npz'))
  got = flat(state)
  targets = flat(s.state_shardings)
  assert sorted(got) == sorted(want.files), (sorted(got), sorted(want.files))
  for key, leaf in got.items():
    np.testing.assert_array_equal(np.asarray(leaf), want[key], err_msg=key)
    assert leaf.sharding == targets[key], (key, leaf.sharding, targets[key])
    assert len(leaf.sharding.device_set) == num_devices, (key, leaf.sharding)
  kernel = state.params['blocks']['mlp']['fc1']['kernel']
  # Whole on every device now (the new mesh has no fsdp axis).
  assert kernel.addressable_shards[0].data.shape == kernel.shape, kernel.addressable_shards
  batch = np.load(os.path.join(directory, 'next_batch.npz'))
  got_batch = next(data_iter)
  for key in batch.files:
    np.testing.assert_array_equal(got_batch[key], batch[key], err_msg=key)
  return {f'restored_on_{num_devices}_devices': 'ok'}


def main():
  directory = sys.argv[1]
  num_devices = jax.device_count()
  name = 'saved_on_fsdp8' if num_devices == 8 else f'restored_on_{num_devices}_devices'
  try:
    results = save(directory) if num_devices == 8 else restore(directory, num_devices)
  except Exception:  # pylint: disable=broad-except
    results = {name: traceback.format_exc()[-3000:]}
  print(json.dumps(results))


if __name__ == '__main__':
  main()
