"""parallel/paths.py: one set of calls for local folders and bucket URLs (the GCS emulator
of tests/gcs_emulator.py), and what it does where object stores differ from a disk."""

import os

import pytest

from tests.gcs_emulator import gcs  # pylint: disable=unused-import  # the fixture
from vdit_jax.parallel import paths


def test_normalize_and_join(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.normalize('runs/a') == str(tmp_path / 'runs' / 'a')
  assert paths.normalize(f'file://{tmp_path}/x') == str(tmp_path / 'x')
  assert paths.normalize('gs://b/run/') == 'gs://b/run'
  assert paths.join('gs://b/run', 'checkpoints', '4') == 'gs://b/run/checkpoints/4'
  assert paths.is_remote('gs://b') and paths.is_remote('s3://b')
  assert not paths.is_remote('file:///tmp') and not paths.is_remote('/tmp')


@pytest.fixture(params=['local', 'bucket'])
def root(request, tmp_path, gcs):
  return str(tmp_path / 'run') if request.param == 'local' else f'gs://{gcs.new_bucket()}/run'


def test_files_whole_or_not_at_all(root):
  target = paths.join(root, 'samples', 'a.bin')
  paths.write_bytes(target, b'one')
  assert paths.read_bytes(target) == b'one' and paths.isfile(target)
  assert paths.listdir(paths.join(root, 'samples')) == ['a.bin']
  with pytest.raises(RuntimeError, match='encoder failed'):
    with paths.local_file_for_write(target, suffix='.bin') as local:
      with open(local, 'wb') as f:
        f.write(b'half')
      raise RuntimeError('encoder failed')
  assert paths.read_bytes(target) == b'one'  # the failed write left the old file
  with paths.local_file_for_write(target, suffix='.bin') as local:
    with open(local, 'wb') as f:
      f.write(b'two' * 100_000)
  assert paths.read_bytes(target) == b'two' * 100_000
  with paths.local_copy(target) as local:
    assert os.path.getsize(local) == 300_000
  paths.remove(target)
  assert not paths.exists(target)
  paths.remove(target)  # a missing file is fine


def test_growing_file_appends_or_rewrites_the_object(root):
  target = paths.join(root, 'metrics.jsonl')
  log = paths.GrowingFile(target, min_interval_s=3600.0)
  log.append('{"step": 1}\n')  # the first append reaches storage at once
  assert paths.read_text(target) == '{"step": 1}\n'
  log.append('{"step": 2}\n')
  # Locally every line is on disk; in a bucket the object is rewritten only at the
  # interval or at flush.
  want = '{"step": 1}\n' + ('{"step": 2}\n' if not log.remote else '')
  assert paths.read_text(target) == want
  log.close()
  assert paths.read_text(target) == '{"step": 1}\n{"step": 2}\n'
  resumed = paths.GrowingFile(target, min_interval_s=0.0)  # a resumed run keeps the lines
  resumed.append('{"step": 3}\n')
  resumed.close()
  assert paths.read_text(target).splitlines() == ['{"step": 1}', '{"step": 2}', '{"step": 3}']


def test_upload_that_fails_leaves_no_object(gcs, tmp_path):
  local = tmp_path / 'shard'
  local.write_bytes(b'x' * (12 << 20))  # gcsfs uploads in 5 MiB blocks: one is sent
  target = f'gs://{gcs.new_bucket()}/shards/shard-0'

  class Boom(Exception):
    pass

  real = paths.shutil.copyfileobj

  def fail_midway(src, dst, length):
    dst.write(src.read(length))
    raise Boom()

  paths.shutil.copyfileobj = fail_midway
  try:
    with pytest.raises(Boom):
      paths.upload(str(local), target, piece_bytes=6 << 20)
  finally:
    paths.shutil.copyfileobj = real
  assert not paths.exists(target)
  paths.upload(str(local), target, piece_bytes=6 << 20)
  assert paths.read_bytes(target) == b'x' * (12 << 20)


def test_check_writable_names_the_path(gcs, tmp_path):
  assert paths.check_writable(tmp_path / 'new', '--workdir') == str(tmp_path / 'new')
  assert os.listdir(tmp_path / 'new') == []  # the probe is gone
  bucket = f'gs://{gcs.new_bucket()}/run'
  assert paths.check_writable(bucket, '--workdir') == bucket
  assert not paths.exists(bucket)
  with pytest.raises(ValueError, match=r'--workdir=gs://no-such-bucket-vdit/run cannot be '
                                       r'written: FileNotFoundError'):
    paths.check_writable('gs://no-such-bucket-vdit/run', '--workdir')
  (tmp_path / 'file').write_text('x')
  with pytest.raises(ValueError, match='cannot be written'):  # a file where a folder goes
    paths.check_writable(tmp_path / 'file' / 'run', '--workdir')
