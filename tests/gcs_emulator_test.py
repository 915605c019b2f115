"""The raw storage stack against a real GCS emulator (tests/gcs_emulator.py).

etils.epath (gcsfs) for files, Orbax + tensorstore for checkpoints with a grain iterator,
a client subprocess configured by the emulator's `env` alone, and what a missing bucket
looks like to each layer. These pin what `--workdir=gs://...` builds on.
"""

import gc
import json
import os
import socket
import subprocess
import sys
import urllib.request
import warnings

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from etils import epath

from tests import gcs_emulator
from tests.gcs_emulator import gcs  # pylint: disable=unused-import  # the fixture


def _names(path):
  return sorted(p.name for p in path.iterdir())


def test_epath_files(gcs):
  root = epath.Path(f'gs://{gcs.new_bucket()}/run')
  root.mkdir(parents=True, exist_ok=True)  # a no-op on GCS: no object is written
  assert not root.exists()
  (root / 'config.json').write_text('{"a": 1}')
  (root / 'blob.bin').write_bytes(bytes(range(256)) * 5000)  # 1.28 MB
  (root / 'samples' / 'step_1.mp4').write_bytes(b'mp4')
  assert root.exists() and root.is_dir() and (root / 'samples').is_dir()
  assert (root / 'config.json').read_text() == '{"a": 1}'
  assert (root / 'blob.bin').read_bytes() == bytes(range(256)) * 5000
  assert not (root / 'missing.json').exists()
  assert _names(root) == ['blob.bin', 'config.json', 'samples']
  assert [p.name for p in root.glob('*.json')] == ['config.json']

  (root / 'config.json').rename(root / 'renamed.json')
  (root / 'samples').rename(root / 'videos')  # a "directory": copy + delete per object
  assert _names(root) == ['blob.bin', 'renamed.json', 'videos']
  assert (root / 'videos' / 'step_1.mp4').read_bytes() == b'mp4'
  (root / 'videos').rmtree()
  (root / 'blob.bin').unlink()
  assert _names(root) == ['renamed.json']
  with pytest.raises(FileNotFoundError):
    (root / 'missing.json').read_text()


def test_epath_append_is_an_overwrite(gcs):
  """GCS objects cannot be appended to: gcsfs warns and rewrites the object.

  metrics.jsonl on gs:// therefore needs a read-modify-write or one object per chunk.
  If this fails, gs:// append works and that workaround can go.
  """
  path = epath.Path(f'gs://{gcs.new_bucket()}/metrics.jsonl')
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    for line in ('{"step": 1}\n', '{"step": 2}\n'):
      with path.open('a') as f:
        f.write(line)
  assert path.read_text() == '{"step": 2}\n'
  assert any('Append mode' in str(w.message) for w in caught)


def _dataset():
  ds = grain.MapDataset.range(64).shuffle(seed=7).repeat(None)
  return ds.batch(4, drop_remainder=True).to_iter_dataset(
      grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))


def _state(step):
  return {'w': jnp.arange(12, dtype=jnp.float32).reshape(3, 4) / 7 * step,
          'b': (jnp.arange(5) * step / 3).astype(jnp.bfloat16),
          'count': jnp.int32(step)}


def _manager(directory):
  # As vdit_jax/train/checkpoint.py makes it.
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      max_to_keep=2, create=True, enable_async_checkpointing=True))


def _bits(x):
  return np.asarray(x).reshape(-1).view(np.uint8)


def test_orbax_async_save_retention_restore(gcs):
  directory = f'gs://{gcs.new_bucket()}/run/checkpoints'
  manager = _manager(directory)
  data_iter = iter(_dataset())
  saved, next_batch = {}, {}
  for step in (1, 2, 3):
    next(data_iter)
    saved[step] = jax.device_get(_state(step))
    items = {'state': ocp.args.StandardSave(_state(step)),
             'data_iter': grain.checkpoint.CheckpointSave(data_iter)}
    assert manager.save(step, args=ocp.args.Composite(**items), force=True)
    next_batch[step] = next(data_iter)  # what the restored iterator must yield first
  manager.wait_until_finished()
  assert manager.all_steps() == [2, 3]
  assert _names(epath.Path(directory)) == ['2', '3']  # step 1's objects are deleted
  manager.close()

  # A new manager (as after a restart) finds the steps and restores them exactly.
  manager = _manager(directory)
  assert manager.latest_step() == 3
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                          saved[2])
  restored_iter = iter(_dataset())
  restored = manager.restore(2, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract),
      data_iter=grain.checkpoint.CheckpointRestore(restored_iter)))
  manager.close()
  for key, expected in saved[2].items():
    got = restored['state'][key]
    assert got.dtype == expected.dtype and got.sharding == sharding, key
    np.testing.assert_array_equal(_bits(got), _bits(expected), err_msg=key)
  np.testing.assert_array_equal(next(restored_iter), next_batch[2])


_CHILD = """
import sys
import tensorstore as ts
from etils import epath
bucket = sys.argv[1]
kv = ts.KvStore.open({'driver': 'gcs', 'bucket': bucket, 'path': 'ts/'}).result()
kv.write('key', b'from tensorstore').result()
epath.Path(f'gs://{bucket}/epath.txt').write_text('from epath')
print(bytes(kv.read('key').result().value).decode())
"""


def test_env_is_enough_for_a_client_process(gcs):
  """A fresh process with `gcs.env` alone reaches the emulator with both clients."""
  bucket = gcs.new_bucket()
  env = {k: v for k, v in os.environ.items() if k not in gcs.env}
  env.update(gcs.env)
  proc = subprocess.run([sys.executable, '-c', _CHILD, bucket], env=env, capture_output=True,
                        text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == 'from tensorstore'
  assert epath.Path(f'gs://{bucket}/epath.txt').read_text() == 'from epath'
  assert _names(epath.Path(f'gs://{bucket}/ts')) == ['key']


def probe_writable(workdir: epath.Path):
  """Writes and deletes a marker object: the cheap "bucket exists and is writable" check."""
  marker = workdir / '.write_probe'
  marker.write_text('probe')
  marker.unlink()


# After the failed save, Orbax's abandoned threads may finish on a closed event loop.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_missing_bucket(gcs):
  workdir = epath.Path('gs://no-such-bucket/run')
  assert not workdir.exists()  # reads see nothing, with no error
  workdir.mkdir(parents=True, exist_ok=True)  # and mkdir is a no-op
  with pytest.raises(FileNotFoundError, match='no-such-bucket'):
    probe_writable(workdir)
  probe_writable(epath.Path(f'gs://{gcs.new_bucket()}/run'))
  kvstore = ts.KvStore.open({'driver': 'gcs', 'bucket': 'no-such-bucket'}).result()
  with pytest.raises(ValueError, match='NOT_FOUND'):
    kvstore.write('key', b'value').result()

  # Orbax accepts the directory and the save call; the error comes when it is awaited:
  # FileNotFoundError (gcsfs) or ValueError NOT_FOUND (tensorstore), whichever is first.
  manager = _manager(str(workdir / 'checkpoints'))
  assert manager.all_steps() == []
  manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(_state(1))), force=True)
  with pytest.raises((FileNotFoundError, ValueError), match='no-such-bucket'):
    manager.wait_until_finished()
  with pytest.raises((FileNotFoundError, ValueError), match='no-such-bucket'):
    manager.close()  # the error sticks: close() raises it again
  del manager
  gc.collect()  # here, under the filter above


def test_stop_frees_the_port():
  if gcs_emulator.binary_path() is None:
    pytest.skip('GCS emulator not installed')
  emulator = gcs_emulator.GcsEmulator(buckets=['one', 'two']).start()
  port = int(emulator.url.rsplit(':', 1)[1])
  assert emulator.running()
  with urllib.request.urlopen(f'{emulator.url}/storage/v1/b') as response:
    assert sorted(b['name'] for b in json.load(response)['items']) == ['one', 'two']
  emulator.stop()
  emulator.stop()  # twice is fine
  assert not emulator.running()
  with pytest.raises(ConnectionRefusedError):
    socket.create_connection(('127.0.0.1', port), timeout=2).close()
