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
msgpack is plain and language-neutral, so other tools can read and write records.

Index (`index.json`):
    {"format": "vdit_jax.shards.v1",
     "shards": [{"name": "shard-00000-of-00002.array_record", "num_records": 32}, ...],
     "num_records": 64, "clip_shape": [T, H, W, C], "dtype": "uint8",
     "num_classes": 2, "class_names": ["a", "b"], ...}
Record i of the source is record i of the shards concatenated in index order. Shards are
written with `group_size:1`, so reading one record decodes only that record.
"""

from __future__ import annotations

import json
import numbers
import os

import msgpack
import numpy as np

FORMAT = 'vdit_jax.shards.v1'
INDEX_NAME = 'index.json'
WRITER_OPTIONS = 'group_size:1'  # one record per chunk: true random access
CLIP_DTYPES = ('uint8', 'float16', 'float32')
EMBEDDING_DTYPES = ('float16', 'float32')


def shard_name(index: int, count: int) -> str:
  return f'shard-{index:05d}-of-{count:05d}.array_record'


def _array_fields(prefix: str, array: np.ndarray, dtypes) -> dict:
  if array.dtype.name not in dtypes:
    raise ValueError(f'{prefix} dtype must be one of {dtypes}, got {array.dtype.name}.')
  return {prefix: np.ascontiguousarray(array).tobytes(), f'{prefix}_shape': list(array.shape),
          f'{prefix}_dtype': array.dtype.name}


def encode_record(clip, label: int | None = None, caption: str | None = None,
                  caption_embedding=None, key: str | None = None) -> bytes:
  """One record's bytes for a clip [T, H, W, C] (uint8 frames or float latents)."""
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
  'caption': str, 'caption_embedding': float [L, D], 'key': str}."""
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
  return example


def write_index(directory, index: dict) -> str:
  """Writes `index.json` atomically (temporary file, then rename); returns its path."""
  directory = os.fspath(directory)
  path = os.path.join(directory, INDEX_NAME)
  tmp = os.path.join(directory, f'.tmp_index_{os.getpid()}.json')
  try:
    with open(tmp, 'w') as f:
      json.dump(index, f, indent=2)
      f.write('\n')
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def read_index(directory) -> dict:
  """Reads and checks a shard folder's index; raises naming the folder if it is not one."""
  directory = os.fspath(directory) if directory is not None else ''
  if not directory:
    raise ValueError('data.path is empty: set it to a folder made by '
                     'python -m vdit_jax.tools.make_shards.')
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'data.path={directory!r} is not a folder (a shard folder holds '
                            f'{INDEX_NAME} and its shards).')
  path = os.path.join(directory, INDEX_NAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'data.path={directory!r} has no {INDEX_NAME}: it is not a shard '
                            'folder, or make_shards did not finish writing it.')
  with open(path) as f:
    index = json.load(f)
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
  for shard in index['shards']:
    file = os.path.join(directory, shard['name'])
    if not os.path.isfile(file):
      raise FileNotFoundError(f'{path} names the shard {shard["name"]!r}, which is not in '
                              f'{directory!r}.')
  return index


class ShardSource:
  """Random-access source over a shard folder (grain `RandomAccessDataSource` protocol).

  Attributes: `index` (the parsed index.json), `clip_shape` (T, H, W, C), `dtype`,
  `num_classes`. `source[idx]` returns `decode_record` of record idx. Picklable (grain
  worker processes reopen the files lazily).
  """

  def __init__(self, directory):
    # array_record's own source (grain's is a thin wrapper): no jax import in tools.
    from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
    self.directory = os.fspath(directory)
    self.index = read_index(self.directory)
    self.clip_shape = tuple(self.index['clip_shape'])
    self.dtype = self.index['dtype']
    self.num_classes = self.index['num_classes']
    paths = [os.path.join(self.directory, s['name']) for s in self.index['shards']]
    self._records = array_record_data_source.ArrayRecordDataSource(paths)
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
    example = decode_record(self._records[idx])
    video = example['video']
    if video.shape != self.clip_shape or video.dtype.name != self.dtype:
      raise ValueError(f'{self.directory}: record {idx} is {list(video.shape)} '
                       f'{video.dtype.name}, the index says {list(self.clip_shape)} '
                       f'{self.dtype}.')
    return example
