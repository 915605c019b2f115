"""ArrayRecord shards of preprocessed clips: the record format, the index, and the reader.

    source = ShardSource('data/shards')   # reads data/shards/index.json
    example = source[7]  # {'video': uint8 [T, H, W, C] (or float latents), 'label': int32 []}

A shard folder holds `index.json` and the shard files it names. `tools.make_shards`
writes them from video files; anything else (a VAE encoder writing latents, say) can write
the same format with `encode_record` and `write_index`.

Record (one per clip): a msgpack map with string keys,
    'clip'        bytes: the array in C order
    'shape'       [T, H, W, C]
    'dtype'       'uint8' (frames, normalised to [-1, 1] by the pipeline) or 'float16' /
                  'float32' (latents, passed to the model as they are)
    'label'       int, optional (0 when absent)
    'caption'     str, optional
    'caption_embedding', 'caption_embedding_shape', 'caption_embedding_dtype'
                  optional: bytes, [L, D] and 'float16' | 'float32'
    'key'         str, optional: where the clip came from (e.g. its video's relative path)
    'audio', 'audio_shape', 'audio_dtype'
                  optional: bytes, [S] and 'float32': the clip's sound, mono in [-1, 1]
msgpack is plain and language-neutral, so other tools can read and write records.

Index (`index.json`):
    {"format": "vdit_jax.shards.v1",
     "shards": [{"name": "shard-00000-of-00002.array_record", "num_records": 32}, ...],
     "num_records": 64, "clip_shape": [T, H, W, C], "dtype": "uint8",
     "num_classes": 2, "class_names": ["a", "b"], ...}
Shards whose records carry sound also say how it was cut, and every record then has it:
     "audio": {"sample_rate": 16000, "fps": 16.0, "num_samples": 16000}
Record i of the source is record i of the shards concatenated in index order. Shards are
written with `group_size:1`, so reading one record decodes only that record.

Buckets: a shard folder may be a gs:// URL. array_record (>= 0.8.3) reads gs:// objects
itself (riegeli's GcsReader, the google-cloud-cpp client: application default
credentials, or the emulator at CLOUD_STORAGE_EMULATOR_ENDPOINT): one ranged GET per
record read plus one per shard opened, so each host fetches only the records it reads,
with nothing staged on its disk. Its writer writes local files only, so `ShardWriter`
writes each shard to a local temporary file and uploads it whole under its final name
when it is finished; index.json is written last (`write_index`), so a folder with an index
is complete, in a bucket as on disk.
"""

from __future__ import annotations

import importlib.metadata
import json
import numbers
import os
import re
import tempfile

import msgpack
import numpy as np

from vdit_jax.parallel import paths

FORMAT = 'vdit_jax.shards.v1'
INDEX_NAME = 'index.json'
WRITER_OPTIONS = 'group_size:1'  # one record per chunk: true random access
CLIP_DTYPES = ('uint8', 'float16', 'float32')
EMBEDDING_DTYPES = ('float16', 'float32')
AUDIO_DTYPES = ('float32',)
_SHARD_NAME = re.compile(r'shard-\d{5}-of-\d{5}\.array_record')
_TMP_PREFIX = '.tmp-'      # unfinished files (local shards, paths.write_text's temporaries)
_GCS_READS_SINCE = (0, 8, 3)  # the first array_record whose reader opens gs:// objects
_UPLOAD_PIECE = 8 << 20   # bytes per read of a local shard while it is uploaded


def shard_name(index: int, count: int) -> str:
  return f'shard-{index:05d}-of-{count:05d}.array_record'


def _data_path(directory) -> str:
  """A folder as a string: a bucket URL normalised (paths.normalize), a local path as
  given (messages name what the user wrote) without a file:// scheme."""
  directory = os.fspath(directory) if directory is not None else ''
  if paths.is_remote(directory):
    return paths.normalize(directory)
  return directory[len('file://'):] if directory.startswith('file://') else directory


def _array_fields(prefix: str, array: np.ndarray, dtypes) -> dict:
  if array.dtype.name not in dtypes:
    raise ValueError(f'{prefix} dtype must be one of {dtypes}, got {array.dtype.name}.')
  return {prefix: np.ascontiguousarray(array).tobytes(), f'{prefix}_shape': list(array.shape),
          f'{prefix}_dtype': array.dtype.name}


def encode_record(clip, label: int | None = None, caption: str | None = None,
                  caption_embedding=None, key: str | None = None, audio=None) -> bytes:
  """One record's bytes for a clip [T, H, W, C] (uint8 frames or float latents), with its
  sound `audio` (float32 [S] mono) when given."""
  clip = np.asarray(clip)
  if clip.ndim != 4 or min(clip.shape) < 1:
    raise ValueError(f'a clip must have shape [T, H, W, C] with every size >= 1, got '
                     f'{clip.shape}.')
  fields = _array_fields('clip', clip, CLIP_DTYPES)
  record = {'clip': fields['clip'], 'shape': fields['clip_shape'], 'dtype': fields['clip_dtype']}
  if label is not None:
    if isinstance(label, bool) or not isinstance(label, numbers.Integral) or label < 0:
      raise ValueError(f'label must be an integer >= 0, got {label!r}.')
    record['label'] = int(label)
  if caption is not None:
    record['caption'] = str(caption)
  if caption_embedding is not None:
    embedding = np.asarray(caption_embedding)
    if embedding.ndim != 2:
      raise ValueError(f'caption_embedding must have shape [L, D], got {embedding.shape}.')
    record.update(_array_fields('caption_embedding', embedding, EMBEDDING_DTYPES))
  if key is not None:
    record['key'] = str(key)
  if audio is not None:
    audio = np.asarray(audio)
    if audio.ndim != 1 or audio.size < 1:
      raise ValueError(f'audio must have shape [S] (mono) with S >= 1, got {audio.shape}.')
    record.update(_array_fields('audio', audio, AUDIO_DTYPES))
  return msgpack.packb(record, use_bin_type=True)


def _array(record: dict, data_key: str, shape_key: str, dtype_key: str, dtypes) -> np.ndarray:
  dtype = record[dtype_key]
  if dtype not in dtypes:
    raise ValueError(f'record field {dtype_key}={dtype!r} is not one of {dtypes}.')
  shape = tuple(int(s) for s in record[shape_key])
  array = np.frombuffer(record[data_key], dtype=np.dtype(dtype))
  if array.size != int(np.prod(shape)):
    raise ValueError(f'record field {data_key!r} holds {array.size} values, but its shape '
                     f'{list(shape)} needs {int(np.prod(shape))}.')
  return array.reshape(shape)


def decode_record(data: bytes) -> dict:
  """A record's bytes -> {'video': array [T, H, W, C], 'label': int32 [], optional
  'caption': str, 'caption_embedding': float [L, D], 'key': str, 'audio': float32 [S]}."""
  record = msgpack.unpackb(data, raw=False)
  missing = [k for k in ('clip', 'shape', 'dtype') if k not in record]
  if missing:
    raise ValueError(f'record is missing field(s) {missing}; see vdit_jax/data/shards.py.')
  example = {'video': _array(record, 'clip', 'shape', 'dtype', CLIP_DTYPES),
             'label': np.int32(record.get('label', 0))}
  if 'caption' in record:
    example['caption'] = record['caption']
  if 'caption_embedding' in record:
    example['caption_embedding'] = _array(record, 'caption_embedding',
                                          'caption_embedding_shape',
                                          'caption_embedding_dtype', EMBEDDING_DTYPES)
  if 'key' in record:
    example['key'] = record['key']
  if 'audio' in record:
    example['audio'] = _array(record, 'audio', 'audio_shape', 'audio_dtype', AUDIO_DTYPES)
  return example


def write_index(directory, index: dict) -> str:
  """Writes `index.json` whole (a temporary file renamed, or one bucket object); returns
  its path."""
  return paths.write_text(paths.join(_data_path(directory), INDEX_NAME),
                          json.dumps(index, indent=2) + '\n')


def read_index(directory) -> dict:
  """Reads and checks a shard folder's index; raises naming the folder if it is not one."""
  directory = _data_path(directory)
  if not directory:
    raise ValueError('data.path is empty: set it to a folder made by '
                     'python -m vdit_jax.tools.make_shards.')
  if not paths.isdir(directory):
    if paths.is_remote(directory):
      raise FileNotFoundError(
          f'data.path={directory!r} does not exist: no object in the bucket has that prefix '
          "(is the bucket name right, and may this job's credentials list it?); a shard "
          f'folder holds {INDEX_NAME} and its shards.')
    raise FileNotFoundError(f'data.path={directory!r} is not a folder (a shard folder holds '
                            f'{INDEX_NAME} and its shards).')
  path = paths.join(directory, INDEX_NAME)
  if not paths.isfile(path):
    raise FileNotFoundError(f'data.path={directory!r} has no {INDEX_NAME}: it is not a shard '
                            'folder, or make_shards did not finish writing it.')
  try:
    index = json.loads(paths.read_text(path))
  except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
    raise ValueError(f'{path} is not the JSON index make_shards writes ({e}): the file is cut '
                     'short or foreign; write the folder again with '
                     'python -m vdit_jax.tools.make_shards.') from None
  if not isinstance(index, dict):
    raise ValueError(f'{path} holds {type(index).__name__}, not the object make_shards writes.')
  if index.get('format') != FORMAT:
    raise ValueError(f'{path}: format={index.get("format")!r}, expected {FORMAT!r}.')
  for key in ('shards', 'clip_shape', 'dtype', 'num_classes'):
    if key not in index:
      raise ValueError(f'{path} is missing the field {key!r}.')
  shape = index['clip_shape']
  if len(shape) != 4 or any(not isinstance(s, int) or s < 1 for s in shape):
    raise ValueError(f'{path}: clip_shape={shape!r} must be [T, H, W, C] of positive integers.')
  if index['dtype'] not in CLIP_DTYPES:
    raise ValueError(f'{path}: dtype={index["dtype"]!r} is not one of {CLIP_DTYPES}.')
  if not isinstance(index['num_classes'], int) or index['num_classes'] < 1:
    raise ValueError(f'{path}: num_classes={index["num_classes"]!r} must be an integer >= 1.')
  if not index['shards']:
    raise ValueError(f'{path} lists no shards: the folder holds no clips.')
  if index.get('audio') is not None:
    _check_audio_index(path, index['audio'])
  present = set(paths.listdir(directory))  # one listing, not a request per shard
  for shard in index['shards']:
    if shard['name'] not in present:
      raise FileNotFoundError(f'{path} names the shard {shard["name"]!r}, which is not in '
                              f'{directory!r}.')
  return index


def _check_audio_index(path: str, audio) -> None:
  """Raises naming `path` unless `audio` is {sample_rate: int >= 1, fps: number > 0,
  num_samples: int >= 1}."""
  rule = 'must be {"sample_rate": int >= 1, "fps": number > 0, "num_samples": int >= 1}'
  if not isinstance(audio, dict):
    raise ValueError(f'{path}: audio={audio!r} {rule}.')
  for key, kinds in (('sample_rate', (int,)), ('fps', (int, float)), ('num_samples', (int,))):
    value = audio.get(key)
    if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0:
      raise ValueError(f'{path}: audio.{key}={value!r}; audio {rule}.')


def _unreadable_shard(files, error: Exception, module) -> str:
  """Which of `files` array_record cannot open, and why (its errors name no file)."""
  for path in files:
    try:
      module.ArrayRecordDataSource([path])
    except Exception as e:  # pylint: disable=broad-except
      reason = str(e).strip() or type(e).__name__
      return (f'{path} is not a readable ArrayRecord shard ({reason}): the file is cut '
              'short, damaged or foreign; write the folder again with make_shards.')
  return f'the shards {files} cannot be opened together ({type(error).__name__}: {error}).'


def check_readable(directory) -> None:
  """Raises ValueError naming data.path if this process cannot read shards from the bucket
  `directory` (a no-op for a local folder): only gs:// is read, by array_record >= 0.8.3,
  and its C++ client needs its own emulator variable where the Python clients have one."""
  directory = _data_path(directory)
  if not paths.is_remote(directory):
    return
  if not directory.startswith('gs://'):
    raise ValueError(f'data.path={directory!r}: ArrayRecord shards are read from local '
                     'folders or gs:// buckets (array_record opens those itself), not '
                     f'{directory.split("://", 1)[0]}://.')
  version = importlib.metadata.version('array_record')
  if tuple(int(v) for v in re.findall(r'\d+', version)[:3]) < _GCS_READS_SINCE:
    raise ValueError(f'data.path={directory!r}: reading shards from gs:// needs array_record '
                     f'>= {".".join(map(str, _GCS_READS_SINCE))} (its reader opens gs:// '
                     f'objects), but {version} is installed: pip install -U array_record.')
  if os.environ.get('STORAGE_EMULATOR_HOST') and not os.environ.get(
      'CLOUD_STORAGE_EMULATOR_ENDPOINT'):
    # Without it array_record's C++ client would wait on the real GCS for minutes.
    raise ValueError(f'data.path={directory!r}: STORAGE_EMULATOR_HOST points the Python GCS '
                     'clients at an emulator, but array_record reads through the C++ client, '
                     'which needs CLOUD_STORAGE_EMULATOR_ENDPOINT set to the same URL.')


class ShardSource:
  """Random-access source over a shard folder (grain `RandomAccessDataSource` protocol).

  Attributes: `index` (the parsed index.json), `clip_shape` (T, H, W, C), `dtype`,
  `num_classes`, `audio` (the index's {sample_rate, fps, num_samples}, or None when the
  clips carry no sound). `source[idx]` returns `decode_record` of record idx (with 'audio',
  float32 [S], when the shards have sound). Picklable (grain worker processes reopen the
  files lazily).
  """

  def __init__(self, directory):
    # array_record's own source (grain's is a thin wrapper): no jax import in tools.
    from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
    self.directory = _data_path(directory)
    self.index = read_index(self.directory)
    check_readable(self.directory)
    self.clip_shape = tuple(self.index['clip_shape'])
    self.dtype = self.index['dtype']
    self.num_classes = self.index['num_classes']
    self.audio = self.index.get('audio')
    files = [paths.join(self.directory, s['name']) for s in self.index['shards']]
    try:
      self._records = array_record_data_source.ArrayRecordDataSource(files)
    except Exception as e:  # pylint: disable=broad-except  # array_record raises RuntimeError
      raise ValueError(_unreadable_shard(files, e, array_record_data_source)) from e
    expected = sum(int(s['num_records']) for s in self.index['shards'])
    if len(self._records) != expected:
      raise ValueError(f'{self.directory}: the shards hold {len(self._records)} records but '
                       f'{INDEX_NAME} lists {expected}; the folder is incomplete or changed.')

  def __len__(self) -> int:
    return len(self._records)

  def __repr__(self) -> str:
    return (f'ShardSource({self.directory!r}: {len(self)} clips of {list(self.clip_shape)} '
            f'{self.dtype}, {self.num_classes} classes)')

  def __getitem__(self, idx) -> dict:
    if isinstance(idx, bool) or not isinstance(idx, numbers.Integral):
      raise TypeError(f'ShardSource index must be an integer, got {idx!r}.')
    n = len(self)
    requested = int(idx)
    idx = requested + n if requested < 0 else requested
    if not 0 <= idx < n:
      raise IndexError(f'index {requested} is out of range for ShardSource of length {n}.')
    try:
      example = decode_record(self._records[idx])
    except Exception as e:  # pylint: disable=broad-except  # a damaged record: msgpack, numpy
      raise ValueError(f'{self.directory}: record {idx} cannot be decoded '
                       f'({type(e).__name__}: {str(e).strip()[:300]}); the shard holding it is '
                       'damaged: write the folder again with make_shards.') from e
    video = example['video']
    if video.shape != self.clip_shape or video.dtype.name != self.dtype:
      raise ValueError(f'{self.directory}: record {idx} is {list(video.shape)} '
                       f'{video.dtype.name}, the index says {list(self.clip_shape)} '
                       f'{self.dtype}.')
    if self.audio is not None:
      sound = example.get('audio')
      if sound is None or sound.shape != (self.audio['num_samples'],):
        raise ValueError(f'{self.directory}: record {idx} holds '
                         + ('no audio' if sound is None else f'audio {list(sound.shape)}')
                         + f', the index says [{self.audio["num_samples"]}] samples.')
    return example


def _upload(local: str, target: str) -> None:
  """Streams the finished local shard `local` to the bucket object `target`
  (paths.upload: in pieces, and an upload that fails part way leaves no object)."""
  paths.upload(local, target, _UPLOAD_PIECE)


def prepare_output(directory, overwrite: bool, flag: str = '--out') -> str:
  """Readies `directory` (local or gs://) for new shards; returns it as `ShardWriter` takes it.

  A folder with an index.json is refused unless `overwrite`; then the index is removed
  first (a half-replaced folder must not look complete), then its shards. What an
  interrupted run left (temporary files, shards with no index) is removed. `flag` names
  the option in the error.
  """
  given = os.fspath(directory)
  directory = _data_path(directory)
  paths.makedirs(directory)
  index_path = paths.join(directory, INDEX_NAME)
  if paths.exists(index_path):
    if not overwrite:
      raise ValueError(f'{flag}={given!r} already holds shards ({INDEX_NAME}); pass '
                       '--overwrite to replace them, or choose another folder.')
    old = read_index(directory)
    paths.remove(index_path)
    for shard in old['shards']:
      paths.remove(paths.join(directory, shard['name']))
  for name in paths.listdir(directory):  # left by an interrupted run
    if name.startswith(_TMP_PREFIX) or _SHARD_NAME.fullmatch(name):
      paths.remove(paths.join(directory, name))
  return directory


class ShardWriter:
  """Writes the shards of a folder, local or in a bucket, one shard at a time.

  array_record writes local files only, so each shard is written to a local temporary
  file: for a bucket one in the temporary directory, uploaded under the shard's final name
  when the shard is finished (the disk holds one shard at a time); locally `.tmp-NAME` in
  the folder, renamed when finished. A shard name therefore always holds a whole shard.
  Shards come in order; `finish` returns the index entries, and the caller writes
  index.json last (`write_index`).

      writer = ShardWriter(prepare_output(out, overwrite), num_shards)
      try:
        for k, record in ...:   # k non-decreasing
          writer.write(k, record)
        entries = writer.finish()
      finally:
        writer.abort()           # drops an unfinished shard; a no-op after finish

  Attributes:
    counts: records written to each shard so far.
  """

  def __init__(self, directory, num_shards: int):
    self.directory = _data_path(directory)
    self.num_shards = num_shards
    self.counts = [0] * num_shards
    self._remote = paths.is_remote(self.directory)
    self._writer = None
    self._shard = -1  # the shard open or last finished
    self._local = None  # the open shard's local file

  def write(self, shard: int, record: bytes) -> None:
    """Appends `record` to shard number `shard` (>= every shard written before)."""
    if shard != self._shard or self._writer is None:
      if not self._shard < shard < self.num_shards:
        raise ValueError(f'shard {shard} cannot be written now: shards are written in order '
                         f'(the last was {self._shard}) and number fewer than '
                         f'{self.num_shards}.')
      self._finish_shard()
      self._open(shard)
    self._writer.write(record)
    self.counts[shard] += 1

  def _target(self, shard: int) -> str:
    return paths.join(self.directory, shard_name(shard, self.num_shards))

  def _open(self, shard: int) -> None:
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    if self._remote:
      fd, self._local = tempfile.mkstemp(prefix=_TMP_PREFIX + 'shard-', suffix='.array_record')
      os.close(fd)
    else:
      self._local = paths.join(self.directory, _TMP_PREFIX + shard_name(shard, self.num_shards))
    self._writer = array_record_module.ArrayRecordWriter(self._local, WRITER_OPTIONS)
    self._shard = shard

  def _finish_shard(self) -> None:
    """Closes the open shard and gives it its name (uploads it, for a bucket)."""
    self._close_shard(keep=True)

  def _close_shard(self, keep: bool) -> None:
    """Closes the open shard, if any: `keep` names (or uploads) it, else it is dropped."""
    if self._writer is None:
      return
    writer, self._writer = self._writer, None
    local, self._local = self._local, None
    try:
      writer.close()
      if keep and self._remote:
        _upload(local, self._target(self._shard))
      elif keep:
        os.replace(local, self._target(self._shard))
    finally:
      if os.path.exists(local):  # a local temporary file, never a bucket object
        os.remove(local)

  def finish(self) -> list:
    """Finishes the last shard; returns the index entries {'name', 'num_records'} of the
    shards that hold records. When some hold none (every clip of theirs was skipped), the
    others are renamed shard-j-of-<their number> (a copy and delete, in a bucket)."""
    self._finish_shard()
    kept = [k for k in range(self.num_shards) if self.counts[k]]
    entries = []
    for j, k in enumerate(kept):
      name = shard_name(j, len(kept))
      if len(kept) != self.num_shards:
        paths.path(self._target(k)).replace(paths.join(self.directory, name))
      entries.append({'name': name, 'num_records': self.counts[k]})
    return entries

  def abort(self) -> None:
    """Drops the shard being written, if any (its local file is removed, nothing uploaded)."""
    self._close_shard(keep=False)