"""Run and data paths, local or in a bucket (gs://, s3://), through one library: etils.epath.

Every file a run writes or reads back (config.json, metrics.jsonl, samples, TensorBoard
events, exports, data) goes through here, and Orbax writes its checkpoints through the
same epath (and tensorstore for the arrays), so `--workdir=gs://bucket/run` and a local
folder take the same code. epath rather than fsspec directly: Orbax and grain already
speak it, and its `Path` keeps pathlib's API for local paths; for gs:// it uses gcsfs
(fsspec) unless TensorFlow is installed, then tf.io.gfile.

What object stores do differently, handled here:
- no append: `GrowingFile` keeps the bytes and rewrites the object (at most every
  `min_interval_s`, and on `flush`);
- no rename of folders and no O_EXCL: `write_text` / `write_bytes` write a single object,
  which readers see whole or not at all (locally: a temporary file renamed over the name);
- tools that need a local file (video encoders, PyAV readers, np.save) get one from
  `local_file_for_write` / `local_copy`, which upload or download around them;
- a bucket that does not exist or cannot be written fails at the first write, which
  Orbax defers to the end of its first async save: `check_writable` writes and deletes
  a probe object so that a run stops at start, naming the path.
"""

import contextlib
import os
import shutil
import tempfile
import time
from typing import Iterator, Optional, Union

from etils import epath

REMOTE_PREFIXES = ('gs://', 's3://')
PathLike = Union[str, os.PathLike]


def is_remote(path: PathLike) -> bool:
  """True for bucket URLs (gs://, s3://), False for local paths (file:// included)."""
  return str(path).startswith(REMOTE_PREFIXES)


def _local(path: PathLike) -> str:
  text = os.fspath(path)
  if text.startswith('file://'):
    text = text[len('file://'):]
  return os.path.abspath(os.path.expanduser(text))


def normalize(path: PathLike) -> str:
  """A bucket URL as given (without a trailing '/'); a local path made absolute (~ and
  file:// resolved). The string form every run path is kept in."""
  if is_remote(path):
    _use_fresh_listings()
    return str(path).rstrip('/')
  return _local(path)


def path(p: PathLike) -> epath.Path:
  """epath.Path of `normalize(p)`."""
  return epath.Path(normalize(p))


def join(base: PathLike, *parts: str) -> str:
  """`base`/`parts` as a string, for local paths and bucket URLs alike."""
  return os.fspath(path(base).joinpath(*parts))


def exists(p: PathLike) -> bool:
  return path(p).exists()


def isfile(p: PathLike) -> bool:
  return path(p).is_file()


def isdir(p: PathLike) -> bool:
  """A local folder, or a bucket prefix that holds at least one object."""
  return path(p).is_dir()


def listdir(p: PathLike) -> list:
  """Names in the folder (prefix), sorted; [] when there is none."""
  d = path(p)
  if not d.is_dir():
    return []
  return sorted(child.name for child in d.iterdir())


def makedirs(p: PathLike) -> None:
  """Creates a local folder and its parents; a no-op for buckets (no folders there)."""
  if not is_remote(p):
    os.makedirs(_local(p), exist_ok=True)


def read_text(p: PathLike) -> str:
  return path(p).read_text()


def read_bytes(p: PathLike) -> bytes:
  return path(p).read_bytes()


def write_text(p: PathLike, text: str) -> str:
  """Writes `text` whole: readers see the old file, or the new one, never a part."""
  return write_bytes(p, text.encode('utf-8'))


def write_bytes(p: PathLike, data: bytes) -> str:
  """Writes `data` whole (see write_text); returns the path written."""
  target = normalize(p)
  if is_remote(target):
    epath.Path(target).write_bytes(data)  # one object upload: whole or nothing
    return target
  os.makedirs(os.path.dirname(target), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix='.tmp-')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.replace(tmp, target)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return target


def remove(p: PathLike) -> None:
  """Deletes a file (object); a missing one is fine."""
  target = path(p)
  if target.exists():
    target.unlink()


def rmtree(p: PathLike) -> None:
  """Deletes a folder (every object under a prefix); a missing one is fine."""
  target = path(p)
  if target.exists():
    target.rmtree()


@contextlib.contextmanager
def local_file_for_write(p: PathLike, suffix: str = '') -> Iterator[str]:
  """Yields a local file name to write; on a clean exit its bytes become `p` whole.

  For writers that need a real file (video encoders, np.save). Locally the file is a
  temporary name beside `p`, renamed over it; for a bucket, a temporary file uploaded
  as one object. On an exception nothing is written to `p`.
  """
  target = normalize(p)
  if is_remote(target):
    directory = None
  else:
    directory = os.path.dirname(target)
    os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix=suffix)
  os.close(fd)
  try:
    yield tmp
    if is_remote(target):
      upload(tmp, target)
    else:
      os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def upload(local: str, target: PathLike, piece_bytes: int = 8 << 20) -> str:
  """Streams the local file `local` to the bucket object `target` in pieces (a resumable
  upload: memory holds one piece, not the file). The object appears only when complete:
  an upload that fails part way is abandoned, not committed."""
  target = normalize(target)
  with open(local, 'rb') as src:
    dst = epath.Path(target).open('wb')
    try:
      shutil.copyfileobj(src, dst, piece_bytes)
    except BaseException:
      discard = getattr(dst, 'discard', None)  # fsspec's buffered files: drop the upload
      if discard is not None:
        discard()
      raise
    dst.close()
  return target


@contextlib.contextmanager
def local_copy(p: PathLike, suffix: Optional[str] = None) -> Iterator[str]:
  """Yields a local file holding `p`'s bytes: `p` itself when local, else a temporary
  download (removed after). For readers that need a real file (PyAV, imageio)."""
  target = normalize(p)
  if not is_remote(target):
    yield target
    return
  if suffix is None:
    suffix = os.path.splitext(target)[1]
  fd, tmp = tempfile.mkstemp(prefix='.tmp-', suffix=suffix)
  try:
    with os.fdopen(fd, 'wb') as f:
      with epath.Path(target).open('rb') as src:
        shutil.copyfileobj(src, f, 1 << 22)
    yield tmp
  finally:
    os.remove(tmp)


def check_writable(directory: PathLike, what: str, probe_name: str = '.write_probe') -> str:
  """Creates `directory` (locally) and writes and deletes a probe file in it.

  Raises ValueError naming `what` (e.g. '--workdir') and the path when it cannot be
  written: a bucket that does not exist, no permission, a read-only or full disk.
  Returns the normalised path. Several processes may probe one directory at once: give
  each its own `probe_name`.
  """
  target = normalize(directory)
  probe = join(target, probe_name)
  try:
    makedirs(target)
    write_bytes(probe, b'vdit_jax write probe\n')
    remove(probe)
  except (OSError, ValueError) as e:
    detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else ''
    hint = ('the bucket must exist and this job\'s credentials must be allowed to create '
            'and delete objects in it' if is_remote(target) else
            'the folder must be writable (permissions, a read-only or full disk?)')
    raise ValueError(f'{what}={target} cannot be written: {type(e).__name__}: {detail}. '
                     f'A run writes checkpoints, metrics and samples there; {hint}.') from e
  return target


class GrowingFile:
  """A file that only grows (log lines, event records): appended to locally, rewritten
  whole in a bucket.

  Objects cannot be appended to, so for a bucket the bytes so far are kept here (read
  back once, so a resumed run keeps what an earlier one wrote) and the object is
  rewritten by `flush`, which `append` calls at most every `min_interval_s` seconds;
  call `flush` (or `close`) at the end. Locally each `append` reaches the file at once.
  """

  def __init__(self, p: PathLike, min_interval_s: float = 30.0):
    self.path = normalize(p)
    self.remote = is_remote(self.path)
    self.min_interval_s = min_interval_s
    self._data = None
    self._dirty = False
    self._flushed_at = float('-inf')

  @property
  def size(self) -> int:
    """Bytes written so far (a bucket's, once read back; a local file's, from disk)."""
    if not self.remote:
      return os.path.getsize(self.path) if os.path.exists(self.path) else 0
    return len(self._data or b'')

  def append(self, data: Union[bytes, str]) -> None:
    if isinstance(data, str):
      data = data.encode('utf-8')
    if not self.remote:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      with open(self.path, 'ab') as f:
        f.write(data)
      return
    if self._data is None:
      self._data = read_bytes(self.path) if exists(self.path) else b''
    self._data += data
    self._dirty = True
    if time.monotonic() - self._flushed_at >= self.min_interval_s:
      self.flush()

  def flush(self) -> None:
    if self.remote and self._dirty:
      write_bytes(self.path, self._data)
      self._dirty = False
      self._flushed_at = time.monotonic()

  def close(self) -> None:
    self.flush()


def _use_fresh_listings() -> None:
  """gcsfs caches folder listings per process, so a file another host wrote after the
  first listing stays unseen (measured: exists() and iterdir() miss it). Listings are
  read afresh instead; set before the first gcsfs filesystem is made."""
  try:
    import fsspec  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  fsspec.config.conf.setdefault('gcs', {}).setdefault('use_listings_cache', False)
