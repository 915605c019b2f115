"""Sharded loading of safetensors checkpoints: each process reads only what its devices hold.

    folder = SafetensorsFolder('Wan2.1-T2V-14B-Diffusers/transformer')
    qkv = stack([source(folder, f'blocks.{i}.attn1.to_q.weight').transpose(1, 0)
                 .reshape(5120, 40, 128) for i in range(40)])   # [L, D, K, Dh]
    params = load({'query_kernel': qkv}, {'query_kernel': sharding}, expected=abstract)

A `Recipe` describes a target array as stored tensors put through static numpy-like steps
(transpose, row-major reshape, take along an axis, stack, concatenate, astype, or a
constant), and `recipe.read(index)` computes any rectangular slice of the target from the
matching region of the files alone: the exact region where the steps keep it rectangular,
else (a reshape that merges axes) its bounding box. `load` builds each jax.Array with
`jax.make_array_from_callback`, which asks only for the shards of this process's devices,
so a 14B model loads on a pod without any host reading or holding all of it.

Reading. `SafetensorsFolder` finds diffusers' layout (`*.safetensors.index.json`, whose
`weight_map` names each tensor's shard file) or a single `*.safetensors` file, and parses
the headers itself (8-byte length, JSON of dtype / shape / byte offsets). A slice is runs
of contiguous bytes in the file: runs of 64 KiB or more (and a contiguous slice) are read
with `preadv` straight into the output, shorter ones copied out of memory maps of 16 MiB of
the tensor at a time, each unmapped after its copy. `reader='safe_open'` reads through
safetensors' own `safe_open(path, framework='np').get_slice(name)[...]` instead: that too
copies only the slice, but keeps each file mapped while it is open, so every page a read
touched stays in the process's RSS, and where the kernel maps file pages in 2 MiB folios
(as on the machine measured) a strided read (a torch weight's columns) touches all its range. In
bench/sharded_load.py (4 processes, a 512 MiB checkpoint, each holding a quarter) a
process's peak RSS grows by 0.38 x the checkpoint with 'direct', 1.0 x with 'safe_open'.

Shapes are numpy's row-major ones; a torch Linear weight [out, in] becomes a Flax kernel
[in, out] through `.transpose(1, 0)`.
"""

import dataclasses
import difflib
import functools
import json
import math
import os
import struct
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import ml_dtypes
import numpy as np

INDEX_SUFFIX = '.safetensors.index.json'
FILE_SUFFIX = '.safetensors'
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on the JSON header
READERS = ('direct', 'safe_open')
MIN_PREAD_RUN_BYTES = 64 << 10  # shorter runs of a slice: copied from a memory map
MAP_CHUNK_BYTES = 16 << 20  # how much of a tensor such a copy maps at a time

# safetensors' dtype names -> numpy dtypes (BF16 and the FP8s through ml_dtypes).
DTYPES = {
    'BOOL': np.dtype(np.bool_), 'U8': np.dtype(np.uint8), 'I8': np.dtype(np.int8),
    'U16': np.dtype(np.uint16), 'I16': np.dtype(np.int16), 'U32': np.dtype(np.uint32),
    'I32': np.dtype(np.int32), 'U64': np.dtype(np.uint64), 'I64': np.dtype(np.int64),
    'F16': np.dtype(np.float16), 'BF16': np.dtype(ml_dtypes.bfloat16),
    'F32': np.dtype(np.float32), 'F64': np.dtype(np.float64),
    'F8_E4M3': np.dtype(ml_dtypes.float8_e4m3fn), 'F8_E5M2': np.dtype(ml_dtypes.float8_e5m2),
}

Box = Tuple[Tuple[int, int], ...]  # (start, stop) per dim: a rectangular region


# --------------------------------------------------------------------- slices


def _box(index, shape: Tuple[int, ...], what: str) -> Box:
  """`index` (None, a slice, or a tuple of step-1 slices, at most one per dim; missing
  trailing dims are whole) as a Box of `shape`."""
  if index is None:
    index = ()
  elif not isinstance(index, tuple):
    index = (index,)
  if len(index) > len(shape):
    raise ValueError(f'{what}: index {index!r} has {len(index)} entries but the array has '
                     f'{len(shape)} dims of shape {shape}; give at most one slice per dim.')
  box = []
  for d, size in enumerate(shape):
    s = index[d] if d < len(index) else slice(None)
    if not isinstance(s, slice):
      raise ValueError(f'{what}: index entry {d} is {s!r}; each entry must be a slice '
                       '(write i:i+1 for a single position).')
    start, stop, step = s.indices(size)
    if step != 1:
      raise ValueError(f'{what}: slice {s!r} of dim {d} has step {step}; only step 1 is read.')
    box.append((start, max(start, stop)))
  return tuple(box)


def _extents(box: Box) -> Tuple[int, ...]:
  return tuple(b - a for a, b in box)


def _slices(box: Box) -> Tuple[slice, ...]:
  return tuple(slice(a, b) for a, b in box)


def _as_dtype(dtype) -> np.dtype:
  """np.dtype of `dtype`, with the names numpy lacks ('bfloat16', 'float8_e4m3fn')."""
  if isinstance(dtype, str) and hasattr(ml_dtypes, dtype):
    dtype = getattr(ml_dtypes, dtype)
  return np.dtype(dtype)


# --------------------------------------------------------------------- files


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """Where one stored tensor lies: its file, dtype, shape and first byte in the file."""
  path: str
  dtype: np.dtype
  shape: Tuple[int, ...]
  offset: int


class _File:
  """One .safetensors file: its header parsed on first use, its descriptor opened once."""

  def __init__(self, path: str):
    self.path = path
    self._header = None
    self._data_start = 0
    self._size = 0
    self._fd = None
    self._tensors: Dict[str, _Tensor] = {}

  def header(self) -> Dict[str, Any]:
    """The header's tensor entries {name: {dtype, shape, data_offsets}}."""
    if self._header is None:
      self._size = os.path.getsize(self.path)
      with open(self.path, 'rb') as f:
        head = f.read(8)
        (length,) = struct.unpack('<Q', head) if len(head) == 8 else (-1,)
        if not 0 < length <= min(MAX_HEADER_BYTES, self._size - 8):
          raise ValueError(f'{self.path} is not a safetensors file: its first 8 bytes give a '
                           f'header of {length} bytes in a file of {self._size} bytes.')
        try:
          header = json.loads(f.read(length))
        except ValueError as e:
          raise ValueError(f'{self.path}: the safetensors header is not JSON ({e}).') from e
      if not isinstance(header, dict):
        raise ValueError(f'{self.path}: the safetensors header is not a JSON object.')
      header.pop('__metadata__', None)
      self._data_start = 8 + length
      self._header = header
    return self._header

  def tensor(self, name: str) -> _Tensor:
    """`name`'s location, its header entry checked (KeyError if the file lacks it)."""
    if name not in self._tensors:
      entry = self.header()[name]
      try:
        dtype = DTYPES[entry['dtype']]
        shape = tuple(int(n) for n in entry['shape'])
        begin, end = (int(n) for n in entry['data_offsets'])
      except (KeyError, TypeError, ValueError) as e:
        bad = repr(entry.get('dtype')) if isinstance(entry, dict) else repr(entry)
        raise ValueError(
            f'tensor {name!r} in {self.path}: unreadable header entry {entry!r} (dtype {bad}; '
            f'a dtype must be one of {sorted(DTYPES)}, a shape a list of ints, '
            'data_offsets [begin, end]).') from e
      nbytes = math.prod(shape) * dtype.itemsize
      if min(shape, default=0) < 0 or end - begin != nbytes:
        raise ValueError(
            f'tensor {name!r} in {self.path}: the header gives shape {shape} of '
            f'{entry["dtype"]} ({nbytes} bytes) but data_offsets [{begin}, {end}] hold '
            f'{end - begin} bytes.')
      if begin < 0 or self._data_start + end > self._size:
        raise ValueError(
            f'tensor {name!r} in {self.path}: its bytes [{begin}, {end}) after the header '
            f'run past the end of the file ({self._size - self._data_start} bytes of data); '
            'the file is truncated.')
      self._tensors[name] = _Tensor(self.path, dtype, shape, self._data_start + begin)
    return self._tensors[name]

  def fd(self) -> int:
    if self._fd is None:
      self._fd = os.open(self.path, os.O_RDONLY)
    return self._fd

  def close(self):
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


def _pread_into(fd: int, view: memoryview, offset: int, path: str):
  """Fills `view` with the file's bytes from `offset` on (preadv, repeated on short reads)."""
  done = 0
  while done < len(view):
    n = os.preadv(fd, [view[done:]], offset + done)
    if n <= 0:
      raise ValueError(f'{path}: the file ended at byte {offset + done} while reading a '
                       'tensor its header places there; the file is truncated.')
    done += n


def _read_direct(t: _Tensor, fd: int, box: Box) -> np.ndarray:
  """The `box` of tensor `t` from the open file `fd`.

  The box is `runs` runs of contiguous bytes in the file (the dims after the last partial
  one are whole). Runs of at least MIN_PREAD_RUN_BYTES (one when the box is contiguous)
  are each read with one preadv straight into the result; shorter ones are copied out of
  memory maps of MAP_CHUNK_BYTES of the tensor at a time, each unmapped after its copy.
  """
  extents = _extents(box)
  out = np.empty(extents, t.dtype)
  split = max((d for d, ((a, b), n) in enumerate(zip(box, t.shape)) if (a, b) != (0, n)),
              default=0)
  run_bytes = math.prod(extents[split:]) * t.dtype.itemsize
  if math.prod(extents[:split]) == 1 or run_bytes >= MIN_PREAD_RUN_BYTES:
    strides = np.array([math.prod(t.shape[d + 1:]) for d in range(len(t.shape))], np.int64)
    # The first element of each run: its outer coordinates (dims before `split`), the box's
    # start on `split`, 0 on the whole dims after it.
    firsts = np.zeros(1, np.int64)
    if split:
      outer = np.indices(extents[:split], np.int64).reshape(split, -1)  # [split, runs]
      firsts = strides[:split] @ (outer + np.array([a for a, _ in box[:split]])[:, None])
    if box:
      firsts += box[split][0] * strides[split]
    view = memoryview(out.reshape(-1).view(np.uint8))
    for r, first in enumerate(firsts.tolist()):
      _pread_into(fd, view[r * run_bytes:(r + 1) * run_bytes],
                  t.offset + first * t.dtype.itemsize, t.path)
  else:
    # Rows of dim 0 a few at a time, each group mapped and unmapped on its own: the pages a
    # copy touches (all of a strided range where the kernel maps 2 MiB folios) stay in this
    # process's RSS only while their group is copied.
    (a, b), rest = box[0], _slices(box[1:])
    row_bytes = math.prod(t.shape[1:]) * t.dtype.itemsize
    step = max(1, MAP_CHUNK_BYTES // max(1, row_bytes))
    for lo in range(a, b, step):
      hi = min(b, lo + step)
      mapped = np.memmap(t.path, dtype=t.dtype, mode='r', offset=t.offset + lo * row_bytes,
                         shape=(hi - lo,) + t.shape[1:])
      out[lo - a:hi - a] = mapped[(slice(None),) + rest]
      del mapped  # unmaps
  return out


class SafetensorsFolder:
  """The tensors of a safetensors checkpoint folder, read a slice at a time.

  `folder` holds either diffusers' sharded layout (`<prefix>.safetensors.index.json`, whose
  `weight_map` gives each tensor's file, beside the files) or one `*.safetensors` file;
  `index_name` picks one of several candidates (an index or a .safetensors file name), and
  `folder` may also be the path of a .safetensors file. Files are opened on first use and
  kept open until `close()` (or the end of a `with` block). `index_path` is the index
  read (or the single file).

  `reader`: 'direct' (default: this module's preadv / short-lived memory map) or
  'safe_open' (safetensors' `get_slice`; see the module docstring). `on_read(name, index)`,
  if given, is called before every read of a stored tensor with the tuple of slices read
  (tests count the elements each process reads with it); `bytes_read` adds them up.
  """

  def __init__(self, folder: str, index_name: Optional[str] = None, *, reader: str = 'direct',
               on_read: Optional[Callable[[str, Tuple[slice, ...]], None]] = None):
    if reader not in READERS:
      raise ValueError(f'reader={reader!r}: must be one of {READERS}.')
    folder = os.fspath(folder)
    if os.path.isfile(folder) and index_name is None:
      folder, index_name = os.path.split(os.path.abspath(folder))
    if not os.path.isdir(folder):
      raise ValueError(f'safetensors folder {folder!r} does not exist (or is not a folder).')
    self.folder = folder
    self.reader = reader
    self.on_read = on_read
    self.bytes_read = 0
    self._handles = {}  # path -> safe_open handle (reader='safe_open')
    if index_name is None:
      index_name = self._find_checkpoint()
    self.index_path = os.path.join(folder, index_name)
    if not os.path.isfile(self.index_path):
      raise ValueError(f'index_name={index_name!r}: no such file in {folder}.')
    if index_name.endswith(INDEX_SUFFIX):
      self._weight_map = self._read_index()
    elif index_name.endswith(FILE_SUFFIX):
      self._weight_map = None  # one file: its header lists the names
    else:
      raise ValueError(f'index_name={index_name!r}: must end in {INDEX_SUFFIX!r} (an index) '
                       f'or {FILE_SUFFIX!r} (a single file).')
    paths = (set(self._weight_map.values()) if self._weight_map is not None
             else {self.index_path})
    self._files = {p: _File(p) for p in paths}

  def _find_checkpoint(self) -> str:
    """The one index (or, without one, the one .safetensors file) in the folder."""
    names = sorted(os.listdir(self.folder))
    indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
    files = [n for n in names if n.endswith(FILE_SUFFIX)]
    candidates = indexes or files
    if len(candidates) == 1:
      return candidates[0]
    if not candidates:
      raise ValueError(f'{self.folder} holds no *{INDEX_SUFFIX} and no *{FILE_SUFFIX} file.')
    raise ValueError(f'{self.folder} holds several checkpoints {candidates}; pick one with '
                     'index_name=.')

  def _read_index(self) -> Dict[str, str]:
    """{tensor name: path of its file} from the index, every file checked to exist."""
    with open(self.index_path) as f:
      try:
        index = json.load(f)
      except ValueError as e:
        raise ValueError(f'{self.index_path} is not JSON ({e}).') from e
    weight_map = index.get('weight_map') if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
      raise ValueError(f'{self.index_path}: expected a JSON object with a "weight_map" of '
                       '{tensor name: file name}.')
    missing = {}
    for name, file_name in sorted(weight_map.items()):
      if not os.path.isfile(os.path.join(self.folder, file_name)):
        missing.setdefault(file_name, name)
    if missing:
      listed = '; '.join(f'{f!r} (which should hold tensor {t!r})' for f, t in missing.items())
      raise ValueError(f'{self.index_path} lists shard file(s) absent from {self.folder}: '
                       f'{listed}.')
    return {k: os.path.join(self.folder, v) for k, v in weight_map.items()}

  def names(self) -> List[str]:
    """Every stored tensor's name, sorted."""
    if self._weight_map is not None:
      return sorted(self._weight_map)
    return sorted(self._files[self.index_path].header())

  def _tensor(self, name: str) -> _Tensor:
    path = (self._weight_map.get(name) if self._weight_map is not None else self.index_path)
    try:
      if path is None:
        raise KeyError(name)
      return self._files[path].tensor(name)
    except KeyError:
      if path is not None and self._weight_map is not None:
        raise ValueError(f'tensor {name!r}: {self.index_path} places it in {path}, whose '
                         'header does not list it.') from None
      close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.6)
      hint = f'; close names: {close}' if close else ''
      raise ValueError(f'tensor {name!r} is not in the checkpoint {self.index_path} '
                       f'({len(self.names())} tensors){hint}.') from None

  def shape(self, name: str) -> Tuple[int, ...]:
    return self._tensor(name).shape

  def dtype(self, name: str) -> np.dtype:
    return self._tensor(name).dtype

  def read(self, name: str, index=None) -> np.ndarray:
    """The slice `index` (a tuple of step-1 slices, one per dim; None: all) of tensor
    `name`, reading only that slice's bytes from its file."""
    t = self._tensor(name)
    return self._read_box(name, _box(index, t.shape, f'tensor {name!r}'))

  def _read_box(self, name: str, box: Box) -> np.ndarray:
    t = self._tensor(name)
    if self.on_read is not None:
      self.on_read(name, _slices(box))
    if 0 in _extents(box):
      return np.empty(_extents(box), t.dtype)
    self.bytes_read += math.prod(_extents(box)) * t.dtype.itemsize
    if self.reader == 'direct':
      return _read_direct(t, self._files[t.path].fd(), box)
    if t.path not in self._handles:
      import safetensors  # pylint: disable=g-import-not-at-top  # only this reader needs it
      self._handles[t.path] = safetensors.safe_open(t.path, framework='np')
    return self._handles[t.path].get_slice(name)[_slices(box)]

  def close(self):
    """Closes the files (a later read opens them again)."""
    for f in self._files.values():
      f.close()
    self._handles.clear()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __repr__(self):
    return f'SafetensorsFolder({self.index_path!r})'


# --------------------------------------------------------------------- recipes


class Recipe:
  """A target array made from stored tensors by static steps; `read(index)` computes a
  slice of it from the matching region of the files. Immutable; build with `source`,
  `from_array`, `stack`, `concatenate` and the methods below."""

  shape: Tuple[int, ...]
  dtype: np.dtype

  def read(self, index=None) -> np.ndarray:
    """The slice `index` (a tuple of step-1 slices, one per dim; None: all) of the target."""
    return self._read(_box(index, self.shape, str(self)))

  def _read(self, box: Box) -> np.ndarray:
    raise NotImplementedError

  def sources(self) -> List[str]:
    """The names of the stored tensors this recipe reads, in order."""
    raise NotImplementedError

  def transpose(self, *perm: int) -> 'Recipe':
    """Axes permuted like `np.transpose(x, perm)`; no arguments reverses them."""
    if len(perm) == 1 and isinstance(perm[0], (tuple, list)):
      perm = tuple(perm[0])
    return _Transpose(self, tuple(perm) or tuple(reversed(range(len(self.shape)))))

  def reshape(self, *shape: int) -> 'Recipe':
    """Row-major reshape like `np.reshape` (one dim may be -1)."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
      shape = tuple(shape[0])
    return _Reshape(self, _resolve_shape(self, tuple(shape)))

  def take(self, axis: int, indices: Sequence[int]) -> 'Recipe':
    """`np.take(x, indices, axis)` for static integer `indices` (a permutation, a
    selection, repeats allowed); reads only the positions a slice needs."""
    return _Take(self, axis, indices)

  def astype(self, dtype) -> 'Recipe':
    return _AsType(self, _as_dtype(dtype))

  def __repr__(self):
    return str(self)


def _check_axis(recipe: Recipe, axis: int, ndim: int, what: str) -> int:
  if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -ndim <= axis < ndim:
    raise ValueError(f'{what}: axis {axis!r} is out of range for {ndim} dims ({recipe}).')
  return int(axis) % ndim


def _resolve_shape(recipe: Recipe, shape: Tuple[int, ...]) -> Tuple[int, ...]:
  """`shape` with its -1 filled in, checked to hold as many elements as the recipe."""
  size = math.prod(recipe.shape)
  known = math.prod(n for n in shape if n != -1)
  if (shape.count(-1) > 1 or any(n < -1 for n in shape)
      or (-1 in shape and (known == 0 or size % known))
      or (-1 not in shape and known != size)):
    raise ValueError(f'reshape of {recipe} (shape {recipe.shape}, {size} elements) to '
                     f'{shape}: the new shape must hold the same number of elements, with '
                     'at most one -1.')
  return tuple(size // known if n == -1 else int(n) for n in shape)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class _Source(Recipe):
  folder: SafetensorsFolder
  name: str

  @property
  def shape(self):
    return self.folder.shape(self.name)

  @property
  def dtype(self):
    return self.folder.dtype(self.name)

  def _read(self, box):
    return self.folder._read_box(self.name, box)  # pylint: disable=protected-access

  def sources(self):
    return [self.name]

  def __str__(self):
    return f'source({self.name!r})'


def source(folder: SafetensorsFolder, name: str) -> Recipe:
  """The stored tensor `name` of `folder` (checked to exist now)."""
  if not isinstance(folder, SafetensorsFolder):
    raise TypeError(f'source(folder, {name!r}): folder is {folder!r}; pass a '
                    'SafetensorsFolder (one per checkpoint, shared by its sources).')
  folder.shape(name)  # raises, naming close names, if there is no such tensor
  return _Source(folder, name)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class _Constant(Recipe):
  array: np.ndarray

  @property
  def shape(self):
    return self.array.shape

  @property
  def dtype(self):
    return self.array.dtype

  def _read(self, box):
    return self.array[_slices(box)].copy()

  def sources(self):
    return []

  def __str__(self):
    return f'from_array(<{self.array.dtype} {self.array.shape}>)'


def from_array(array) -> Recipe:
  """A constant array (copied, read-only), for params the checkpoint does not hold."""
  array = np.array(array)
  array.setflags(write=False)
  return _Constant(array)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class _Transpose(Recipe):
  child: Recipe
  perm: Tuple[int, ...]

  def __post_init__(self):
    if sorted(self.perm) != list(range(len(self.child.shape))):
      raise ValueError(f'transpose{self.perm} of {self.child} (shape {self.child.shape}): '
                       f'the axes must be a permutation of 0..{len(self.child.shape) - 1}.')

  @property
  def shape(self):
    return tuple(self.child.shape[p] for p in self.perm)

  @property
  def dtype(self):
    return self.child.dtype

  def _read(self, box):
    child_box = [None] * len(box)
    for d, p in enumerate(self.perm):
      child_box[p] = box[d]
    return self.child._read(tuple(child_box)).transpose(self.perm)

  def sources(self):
    return self.child.sources()

  def __str__(self):
    return f'{self.child}.transpose{self.perm}'


def _reshape_groups(src: Tuple[int, ...], dst: Tuple[int, ...]) -> List[Tuple[list, list]]:
  """Row-major reshape src -> dst as independent groups (source axes, target axes): each a
  run of source axes and a run of target axes with equal products; a size-1 axis on
  either side alone forms a group with no partner. (src, dst hold elements.)"""
  groups, i, j = [], 0, 0
  while i < len(src) or j < len(dst):
    if i < len(src) and src[i] == 1:
      groups.append(([i], []))
      i += 1
    elif j < len(dst) and dst[j] == 1:
      groups.append(([], [j]))
      j += 1
    else:
      si, tj, ps, pt = [i], [j], src[i], dst[j]
      i, j = i + 1, j + 1
      while ps != pt:
        if ps < pt:
          si.append(i)
          ps, i = ps * src[i], i + 1
        else:
          tj.append(j)
          pt, j = pt * dst[j], j + 1
      groups.append((si, tj))
  return groups


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class _Reshape(Recipe):
  """Row-major reshape. A target box maps, group by group (`_reshape_groups`), to a set of
  source positions; the source read is that set's bounding box, which is the set itself
  unless a group merges axes and the box cuts across them (then a gather picks the set)."""
  child: Recipe
  new_shape: Tuple[int, ...]

  @property
  def shape(self):
    return self.new_shape

  @property
  def dtype(self):
    return self.child.dtype

  @functools.cached_property
  def _groups(self):
    return _reshape_groups(self.child.shape, self.new_shape)

  def _read(self, box):
    if 0 in _extents(box):  # (an empty target: nothing to read, groups undefined)
      return np.empty(_extents(box), self.dtype)
    src_shape = self.child.shape
    src_box = [None] * len(src_shape)
    steps = []  # per group: how its source axes of the block become the target's axes
    for si, tj in self._groups:
      if not tj:  # a source axis of size 1 that the target drops
        src_box[si[0]] = (0, 1)
        steps.append(('drop', None))
      elif not si:  # a target axis of size 1 the source lacks
        steps.append(('add', None))
      elif len(si) == 1 and len(tj) == 1:
        src_box[si[0]] = box[tj[0]]
        steps.append(('keep', None))
      else:
        # Flat positions within the group (row-major) of the target box's elements.
        flat = np.zeros((), np.int64)
        for j in tj:
          flat = flat[..., None] * self.new_shape[j] + np.arange(*box[j])
        coords = np.unravel_index(flat.reshape(-1), [src_shape[i] for i in si])
        lows = [int(c.min()) for c in coords]
        block = [int(c.max()) + 1 - lo for c, lo in zip(coords, lows)]
        for i, lo, n in zip(si, lows, block):
          src_box[i] = (lo, lo + n)
        target = tuple(_extents(tuple(box[j] for j in tj)))
        if math.prod(block) == flat.size:
          # The set fills its bounding box; both enumerate it in increasing flat order.
          steps.append(('split', (len(si), target, None)))
        else:
          picks = np.ravel_multi_index([c - lo for c, lo in zip(coords, lows)], block)
          steps.append(('gather', (len(si), target, picks)))
    out = self.child._read(tuple(src_box))
    p = 0  # out's axes before p are target axes; from p on, source axes of the next groups
    for kind, arg in steps:
      if kind == 'drop':
        out = out.reshape(out.shape[:p] + out.shape[p + 1:])
      elif kind == 'add':
        out, p = np.expand_dims(out, p), p + 1
      elif kind == 'keep':
        p += 1
      else:
        n_src, target, picks = arg
        if kind == 'gather':
          out = out.reshape(out.shape[:p] + (-1,) + out.shape[p + n_src:])
          out, n_src = np.take(out, picks, axis=p), 1
        out = out.reshape(out.shape[:p] + target + out.shape[p + n_src:])
        p += len(target)
    return out

  def sources(self):
    return self.child.sources()

  def __str__(self):
    return f'{self.child}.reshape{self.new_shape}'


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class _Take(Recipe):
  child: Recipe
  axis: int
  indices: Tuple[int, ...]

  def __post_init__(self):
    ndim = len(self.child.shape)
    axis = _check_axis(self.child, self.axis, ndim, 'take')
    indices = np.asarray(self.indices)
    n = self.child.shape[axis]
    if indices.ndim != 1 or not (indices.size == 0 or np.issubdtype(indices.dtype, np.integer)):
      raise ValueError(f'take(axis={axis}) of {self.child}: indices must be a 1-D sequence of '
                       f'ints, got {self.indices!r}.')
    if indices.size and not (indices.min() >= -n and indices.max() < n):
      raise ValueError(f'take(axis={axis}) of {self.child}: indices must lie in [-{n}, {n}) '
                       f'(axis size {n}); got values from {indices.min()} to {indices.max()}.')
    object.__setattr__(self, 'axis', axis)
    object.__setattr__(self, 'indices', tuple(int(i) % n for i in indices.tolist()))

  @property
  def shape(self):
    s = list(self.child.shape)
    s[self.axis] = len(self.indices)
    return tuple(s)

  @property
  def dtype(self):
    return self.child.dtype

  def _read(self, box):
    a, b = box[self.axis]
    wanted = np.asarray(self.indices[a:b], np.int64)
    if 0 in _extents(box):
      return np.empty(_extents(box), self.dtype)
    unique = np.unique(wanted)
    # Each run of consecutive source positions is one read: the exact positions needed.
    runs = np.split(unique, np.nonzero(np.diff(unique) != 1)[0] + 1)
    parts = [self.child._read(box[:self.axis] + ((int(r[0]), int(r[-1]) + 1),) +
                              box[self.axis + 1:]) for r in runs]
    out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=self.axis)
    where = np.searchsorted(unique, wanted)
    if np.array_equal(where, np.arange(len(unique))):
      return out
    return np.take(out, where, axis=self.axis)

  def sources(self):
    return self.child.sources()

  def __str__(self):
    shown = (str(list(self.indices)) if len(self.indices) <= 8
             else f'[{self.indices[0]}, {self.indices[1]}, ... {len(self.indices)} indices]')
    return f'{self.child}.take({self.axis}, {shown})'


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class _AsType(Recipe):
  child: Recipe
  to: np.dtype

  @property
  def shape(self):
    return self.child.shape

  @property
  def dtype(self):
    return self.to

  def _read(self, box):
    return self.child._read(box).astype(self.to, copy=False)

  def sources(self):
    return self.child.sources()

  def __str__(self):
    return f'{self.child}.astype({self.to.name})'


def _list_str(recipes: Sequence[Recipe]) -> str:
  if len(recipes) <= 3:
    return '[' + ', '.join(map(str, recipes)) + ']'
  return f'[{recipes[0]}, ... {len(recipes)} recipes ..., {recipes[-1]}]'


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class _Join(Recipe):
  """`stack` (stacked=True: a new axis) or `concatenate` (along an existing axis)."""
  children: Tuple[Recipe, ...]
  axis: int
  stacked: bool

  def __post_init__(self):
    what = 'stack' if self.stacked else 'concatenate'
    if not self.children or not all(isinstance(r, Recipe) for r in self.children):
      raise ValueError(f'{what}: needs a non-empty sequence of Recipes, got {self.children!r}.')
    first = self.children[0].shape
    axis = _check_axis(self.children[0], self.axis, len(first) + self.stacked, what)
    for k, r in enumerate(self.children):
      rest = r.shape if self.stacked else r.shape[:axis] + r.shape[axis + 1:]
      want = first if self.stacked else first[:axis] + first[axis + 1:]
      if len(r.shape) != len(first) or rest != want:
        rule = ('the same shape' if self.stacked
                else f'the same shape outside axis {axis}')
        raise ValueError(f'{what}: recipe {k} ({r}) has shape {r.shape} but recipe 0 '
                         f'({self.children[0]}) has {first}; all need {rule}.')
    object.__setattr__(self, 'axis', axis)

  @functools.cached_property
  def _starts(self) -> List[int]:
    sizes = [1 if self.stacked else r.shape[self.axis] for r in self.children]
    return [0] + [int(n) for n in np.cumsum(sizes)]

  @property
  def shape(self):
    s = list(self.children[0].shape)
    if self.stacked:
      s.insert(self.axis, len(self.children))
    else:
      s[self.axis] = self._starts[-1]
    return tuple(s)

  @property
  def dtype(self):
    return np.result_type(*[r.dtype for r in self.children])

  def _read(self, box):
    a, b = box[self.axis]
    out = np.empty(_extents(box), self.dtype)  # each part is copied in: one slice at a time
    if out.size == 0:
      return out
    lead = (slice(None),) * self.axis
    for k, r in enumerate(self.children):
      lo, hi = max(a, self._starts[k]), min(b, self._starts[k + 1])
      if lo >= hi:
        continue
      if self.stacked:
        part = r._read(box[:self.axis] + box[self.axis + 1:])[lead + (None,)]
      else:
        part = r._read(box[:self.axis] + ((lo - self._starts[k], hi - self._starts[k]),) +
                       box[self.axis + 1:])
      out[lead + (slice(lo - a, hi - a),)] = part
    return out

  def sources(self):
    return [n for r in self.children for n in r.sources()]

  def __str__(self):
    return (f'{"stack" if self.stacked else "concatenate"}({_list_str(self.children)}, '
            f'axis={self.axis})')


def stack(recipes: Sequence[Recipe], axis: int = 0) -> Recipe:
  """`np.stack` of recipes of one shape (e.g. per-layer tensors -> the scanned [depth, ...]
  param); a slice reads only the recipes (and the part of each) it covers."""
  return _Join(tuple(recipes), axis, True)


def concatenate(recipes: Sequence[Recipe], axis: int = 0) -> Recipe:
  """`np.concatenate` of recipes along an existing axis (e.g. fusing q, k, v)."""
  return _Join(tuple(recipes), axis, False)


# --------------------------------------------------------------------- loading


def _path_str(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator='/') or '<root>'


def _leaves_like(treedef, tree, what: str) -> list:
  """The leaves of `tree`, which must have the recipes' structure."""
  try:
    return treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(f'{what} must have the same tree structure as the recipes '
                     f'({treedef}): {e}') from e


def load(recipes, shardings, dtype=None, expected=None):
  """A pytree of jax.Arrays, one per Recipe leaf of `recipes`, each placed with the matching
  leaf of `shardings` (same structure; a single Sharding applies to every leaf).

  Each array is made by `jax.make_array_from_callback`, which asks only for this process's
  shards; a shard that several local devices hold (replication) is read once. `dtype`:
  what every array becomes (default: the `expected` leaf's dtype, else the recipe's own).
  `expected` (optional, same structure: ShapeDtypeStructs, e.g. `jax.eval_shape` of an
  init) is checked first: a shape mismatch raises ValueError naming the param path, the
  stored tensor(s) and both shapes.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(recipes)
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree_util.tree_unflatten(treedef, [shardings] * len(flat))
  flat_shardings = _leaves_like(treedef, shardings, 'shardings')
  flat_expected = ([None] * len(flat) if expected is None
                   else _leaves_like(treedef, expected, 'expected'))
  plans = []
  for (path, recipe), sharding, want in zip(flat, flat_shardings, flat_expected):
    name = _path_str(path)
    if not isinstance(recipe, Recipe):
      raise TypeError(f'param {name}: the recipes tree holds {recipe!r} here; every leaf must '
                      'be a Recipe (from source, from_array, stack, ...).')
    if not isinstance(sharding, jax.sharding.Sharding):
      raise TypeError(f'param {name}: the shardings tree holds {sharding!r}; every leaf must '
                      'be a jax.sharding.Sharding (e.g. NamedSharding).')
    if want is not None and tuple(want.shape) != tuple(recipe.shape):
      raise ValueError(f'param {name}: expected shape {tuple(want.shape)} but the stored '
                       f'tensor(s) {recipe.sources()} give {tuple(recipe.shape)} through '
                       f'{recipe}.')
    target = (_as_dtype(dtype) if dtype is not None
              else _as_dtype(want.dtype) if want is not None else recipe.dtype)
    plans.append((name, recipe, sharding, target))  # every check passes before any read
  return jax.tree_util.tree_unflatten(treedef, [_load_one(*p) for p in plans])


def _load_one(name: str, recipe: Recipe, sharding, dtype: np.dtype) -> jax.Array:
  read = {}  # box -> its slice: devices holding the same box share one read

  def callback(index):
    box = _box(index, recipe.shape, f'param {name}')
    if box not in read:
      part = recipe._read(box).astype(dtype, copy=False)  # pylint: disable=protected-access
      # Contiguous, so that jax on CPU can adopt the buffer instead of copying it.
      read[box] = np.asarray(part, order='C')
    return read[box]

  try:
    return jax.make_array_from_callback(tuple(recipe.shape), sharding, callback)
  except ValueError as e:
    raise ValueError(f'param {name} ({recipe}, shape {recipe.shape}): {e}') from e


def load_on_host(recipes, dtype=None):
  """The same pytree with each Recipe read whole into a numpy array (tools and tests)."""
  def whole(recipe):
    out = recipe.read()
    return out if dtype is None else out.astype(_as_dtype(dtype), copy=False)
  return jax.tree_util.tree_map(whole, recipes)
