"""vdit_jax/parallel/safetensors_load.py: sharded reads of safetensors checkpoints.

Checkpoints are written here with safetensors' numpy API, sharded with an index as
diffusers writes them (f32 and bf16). Every recipe step's `read(index)` is compared, over
random shapes and random slices, with numpy applied to the whole tensor, and the elements
it reads from the files (counted by the folder's `on_read` hook) with the fewest possible:
the needed positions themselves, or their bounding box through a reshape. Under 8 fake
devices (tests/multidevice/safetensors_load.py) `load` equals the host read exactly with
the requested shardings; across 4 processes (jax.distributed, gloo) each reads exactly
the bytes its devices hold, and its peak RSS grows by well under the checkpoint's size.
"""

import json
import math
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors.numpy import save_file

from tests.conftest import CPU_COLLECTIVE_TIMEOUT_FLAGS
from vdit_jax.parallel import safetensors_load as sl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = 'diffusion_pytorch_model'


# --------------------------------------------------------------------- checkpoints


def write_checkpoint(folder: str, tensors: dict, num_shards: int = 1) -> str:
  """`tensors` written as diffusers does: one file, or `num_shards` files plus
  `<PREFIX>.safetensors.index.json` (total_size, weight_map). Returns the folder."""
  os.makedirs(folder, exist_ok=True)
  names = list(tensors)
  if num_shards == 1:
    save_file(tensors, os.path.join(folder, f'{PREFIX}.safetensors'))
    return folder
  weight_map = {}
  for k, part in enumerate(np.array_split(np.arange(len(names)), num_shards)):
    file_name = f'{PREFIX}-{k + 1:05d}-of-{num_shards:05d}.safetensors'
    save_file({names[i]: tensors[names[i]] for i in part}, os.path.join(folder, file_name))
    weight_map.update({names[i]: file_name for i in part})
  total = sum(t.nbytes for t in tensors.values())
  with open(os.path.join(folder, f'{PREFIX}.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
  return folder


class ReadLog:
  """An `on_read` hook: the boxes read per stored tensor, and their element counts."""

  def __init__(self):
    self.reads = []

  def __call__(self, name, index):
    self.reads.append((name, tuple((s.start, s.stop) for s in index)))

  def elements(self, name=None) -> int:
    return sum(math.prod(b - a for a, b in box) for n, box in self.reads
               if name is None or n == name)


def random_index(rng, shape):
  """A random tuple of step-1 slices (sometimes whole, sometimes empty, sometimes short)."""
  index = []
  for n in shape:
    u = rng.random()
    if u < 0.2:
      index.append(slice(None))
    elif u < 0.25:
      a = int(rng.integers(0, n + 1))
      index.append(slice(a, a))
    else:
      a, b = sorted(int(v) for v in rng.integers(0, n + 1, size=2))
      index.append(slice(a, max(b, a + 1)) if a < n else slice(n - 1, n))
  if index and rng.random() < 0.1:
    index = index[:int(rng.integers(0, len(index)))]  # the rest whole
  return tuple(index)


def random_shape(rng, ndim_max=4, dim_max=6):
  return tuple(int(n) for n in rng.integers(1, dim_max + 1, size=rng.integers(1, ndim_max + 1)))


def random_factors(rng, size):
  """A random shape of `size` elements (any factorisation, with a few 1s)."""
  dims, left = [], size
  while left > 1:
    divisors = [d for d in range(2, left + 1) if left % d == 0]
    d = int(rng.choice(divisors))
    dims.append(d)
    left //= d
  for _ in range(int(rng.integers(0, 2))):
    dims.insert(int(rng.integers(0, len(dims) + 1)), 1)
  return tuple(dims) or (1,)


@pytest.fixture(scope='module')
def sharded(tmp_path_factory):
  """A 3-shard checkpoint: f32 tensors and a bf16 one, with their numpy values."""
  rng = np.random.default_rng(0)
  tensors = {
      'blocks.0.attn1.to_q.weight': rng.normal(size=(16, 12)).astype(np.float32),
      'blocks.0.attn1.to_q.bias': rng.normal(size=(16,)).astype(np.float32),
      'blocks.1.attn1.to_q.weight': rng.normal(size=(16, 12)).astype(np.float32),
      'patch_embedding.weight': rng.normal(size=(8, 4, 1, 2, 2)).astype(np.float32),
      'scale_shift_table': rng.normal(size=(1, 6, 8)).astype(ml_dtypes.bfloat16),
      'step': np.array(7, np.int64),
  }
  folder = write_checkpoint(str(tmp_path_factory.mktemp('sharded')), tensors, num_shards=3)
  return folder, tensors


# --------------------------------------------------------------------- the folder


# The direct reader reads runs of at least MIN_PREAD_RUN_BYTES with preadv, shorter ones
# from memory maps of MAP_CHUNK_BYTES at a time. The tests' tensors are small, so they
# run with the bound at 0 (preadv for every run) and above any run (memory maps unless the
# slice is contiguous), mapping 64 bytes at a time (one row or a few).
RUN_BOUNDS = {'pread': 0, 'memmap': 1 << 40}


@pytest.fixture(params=sorted(RUN_BOUNDS))
def runs_by(request, monkeypatch):
  monkeypatch.setattr(sl, 'MIN_PREAD_RUN_BYTES', RUN_BOUNDS[request.param])
  monkeypatch.setattr(sl, 'MAP_CHUNK_BYTES', 64)
  return request.param


@pytest.mark.parametrize('reader', sl.READERS)
def test_folder_reads_every_slice_of_a_sharded_checkpoint(sharded, reader, runs_by):
  del runs_by
  path, tensors = sharded
  log = ReadLog()
  folder = sl.SafetensorsFolder(path, reader=reader, on_read=log)
  assert folder.names() == sorted(tensors)
  rng = np.random.default_rng(1)
  for name, value in tensors.items():
    assert folder.shape(name) == value.shape and folder.dtype(name) == value.dtype
    np.testing.assert_array_equal(folder.read(name), value)
    for _ in range(30):
      index = random_index(rng, value.shape)
      got = folder.read(name, index)
      assert got.dtype == value.dtype
      np.testing.assert_array_equal(got, value[index])
  # Every read asked the files for exactly the slice requested.
  assert folder.bytes_read == sum(
      math.prod(b - a for a, b in box) * tensors[n].dtype.itemsize for n, box in log.reads)
  folder.close()


def test_single_file_folder_and_file_path(tmp_path):
  x = np.arange(24, dtype=np.float32).reshape(4, 6)
  write_checkpoint(str(tmp_path), {'x': x})
  for where in (str(tmp_path), str(tmp_path / f'{PREFIX}.safetensors')):
    with sl.SafetensorsFolder(where) as folder:
      assert folder.names() == ['x']
      np.testing.assert_array_equal(folder.read('x', (slice(1, 3), slice(2, 5))), x[1:3, 2:5])


def test_direct_reads_agree_with_safe_open_get_slice(sharded):
  """The oracle is safetensors' own slicing."""
  path, tensors = sharded
  folder = sl.SafetensorsFolder(path)
  rng = np.random.default_rng(2)
  with open(os.path.join(path, f'{PREFIX}.safetensors.index.json')) as f:
    weight_map = json.load(f)['weight_map']
  for name, value in tensors.items():
    if not value.shape:
      continue
    with safetensors.safe_open(os.path.join(path, weight_map[name]), framework='np') as f:
      for _ in range(10):
        # get_slice wants every dim, and rejects an empty slice at a dim's end (n:n).
        index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(
            random_index(rng, value.shape), value.shape))
        index = tuple(s if s.start < s.stop else slice(0, 1) for s in index)
        index += tuple(slice(0, n) for n in value.shape[len(index):])
        np.testing.assert_array_equal(folder.read(name, index), f.get_slice(name)[index])


# --------------------------------------------------------------------- recipes


def _tagged_folder(tmp_path, shapes):
  """Files whose tensors hold their own flat positions (exact in f32): values tell which
  source elements a target element came from."""
  tensors = {f't{k}': np.arange(math.prod(s), dtype=np.float32).reshape(s)
             for k, s in enumerate(shapes)}
  write_checkpoint(str(tmp_path), tensors, num_shards=min(2, len(tensors)))
  log = ReadLog()
  return sl.SafetensorsFolder(str(tmp_path), on_read=log), tensors, log


def _cases(rng, folder, tensors):
  """{case: (recipe, the numpy function of the source tensor it computes, the number of
  source elements a slice of it must read)} for one random recipe of each step."""
  (name, x), = tensors.items()
  src = sl.source(folder, name)
  perm = tuple(int(p) for p in rng.permutation(x.ndim))
  new = random_factors(rng, x.size)
  axis = int(rng.integers(0, x.ndim))
  n = x.shape[axis]
  picks = [int(i) for i in rng.integers(-n, n, size=int(rng.integers(1, 2 * n + 1)))]
  halves = list(range(n // 2, n)) + list(range(n // 2))
  stack_axis = int(rng.integers(-x.ndim - 1, x.ndim + 1))
  flipped = sl.from_array(-x)

  def one_to_one(fn):  # each target element is one source element
    return lambda index: fn(x)[index].size

  def distinct(fn):  # each distinct source position once (x holds its positions)
    return lambda index: np.unique(fn(x)[index]).size

  def bounding_box(fn):  # the box around the source positions needed
    def count(index):
      needed = fn(x)[index].astype(np.int64).reshape(-1)
      if not needed.size:
        return 0
      return math.prod(int(c.max()) - int(c.min()) + 1 for c in np.unravel_index(needed, x.shape))
    return count

  def from_source(mask_fn):  # the target elements that come from the files (1) not constants (0)
    return lambda index: int(mask_fn(np.ones_like(x), np.zeros_like(x))[index].sum())

  cases = {
      'source': (src, lambda v: v, one_to_one),
      'transpose': (src.transpose(*perm), lambda v: v.transpose(perm), one_to_one),
      'reshape': (src.reshape(*new), lambda v: v.reshape(new), bounding_box),
      'transpose_reshape': (src.transpose(*perm).reshape(-1),
                            lambda v: v.transpose(perm).reshape(-1), bounding_box),
      'take': (src.take(axis, picks), lambda v: np.take(v, picks, axis), distinct),
      'take_halves': (src.take(axis, halves), lambda v: np.take(v, halves, axis), distinct),
      'astype': (src.astype('bfloat16'), lambda v: v.astype(ml_dtypes.bfloat16), one_to_one),
      'from_array': (flipped, lambda v: -v, lambda fn: lambda index: 0),
  }
  cases = {k: (r, fn, count(fn)) for k, (r, fn, count) in cases.items()}
  stack_fn = lambda v, c: np.stack([v, c, v], axis=stack_axis)
  concat_fn = lambda v, c: np.concatenate([v, c], axis=axis)
  cases['stack'] = (sl.stack([src, flipped, src], axis=stack_axis), lambda v: stack_fn(v, -v),
                    from_source(stack_fn))
  cases['concatenate'] = (sl.concatenate([src, flipped], axis=axis),
                          lambda v: concat_fn(v, -v), from_source(concat_fn))
  return cases


CASES = ('source', 'transpose', 'reshape', 'transpose_reshape', 'take', 'take_halves',
         'stack', 'concatenate', 'astype', 'from_array')


@pytest.mark.parametrize('case', CASES)
def test_recipe_reads_any_slice_exactly_and_only_what_it_needs(tmp_path, case, runs_by):
  """Property-style: random source shapes, a random recipe of the step for each, random
  slices of it; values against numpy on the whole tensor, reads against the fewest."""
  del runs_by
  rng = np.random.default_rng(CASES.index(case))
  for trial in range(30):
    shape = random_shape(rng)
    folder, tensors, log = _tagged_folder(tmp_path / str(trial), [shape])
    recipe, fn, needs = _cases(rng, folder, tensors)[case]
    whole = fn(tensors['t0'])
    assert recipe.shape == whole.shape and recipe.dtype == whole.dtype, (recipe, whole.shape)
    np.testing.assert_array_equal(recipe.read(), whole)
    for _ in range(30):
      index = random_index(rng, whole.shape)
      log.reads.clear()
      got = recipe.read(index)
      np.testing.assert_array_equal(got, whole[index], err_msg=f'{recipe} at {index}')
      assert got.dtype == whole.dtype
      assert log.elements() == needs(index), (
          f'{recipe} at {index}: read {log.elements()} elements, needs {needs(index)}: '
          f'{log.reads}')
    folder.close()


def test_half_swap_and_merge_reshape_read_only_what_they_need(tmp_path):
  """Swapping the halves of a 256 axis reads just the 16 rows a slice across the middle
  needs; a merge reshape reads the bounding box of what it needs."""
  folder, tensors, log = _tagged_folder(tmp_path, [(256, 3), (4, 8)])
  swapped = sl.source(folder, 't0').take(0, list(range(128, 256)) + list(range(128)))
  np.testing.assert_array_equal(swapped.read((slice(120, 136),)),
                                np.concatenate([tensors['t0'][248:], tensors['t0'][:8]]))
  assert sorted(log.reads) == [('t0', ((0, 8), (0, 3))), ('t0', ((248, 256), (0, 3)))]
  log.reads.clear()
  flat = sl.source(folder, 't1').reshape(32)
  np.testing.assert_array_equal(flat.read((slice(6, 10),)), np.arange(6, 10))
  assert log.reads == [('t1', ((0, 2), (0, 8)))]  # rows 0-1 (cols 6, 7 then 0, 1): 16
  log.reads.clear()
  split = sl.source(folder, 't1').reshape(2, 2, 8)  # splitting rows keeps boxes exact
  np.testing.assert_array_equal(split.read((slice(1, 2), slice(0, 1), slice(3, 5))),
                                tensors['t1'].reshape(2, 2, 8)[1:2, 0:1, 3:5])
  assert log.reads == [('t1', ((2, 3), (3, 5)))]


def test_a_stack_of_layers_reads_only_the_layers_of_a_slice(sharded):
  path, tensors = sharded
  log = ReadLog()
  folder = sl.SafetensorsFolder(path, on_read=log)
  q = sl.stack([sl.source(folder, f'blocks.{i}.attn1.to_q.weight').transpose(1, 0)
                .reshape(12, 4, 4) for i in range(2)])  # [L, D, K, Dh]
  assert q.shape == (2, 12, 4, 4)
  assert q.sources() == ['blocks.0.attn1.to_q.weight', 'blocks.1.attn1.to_q.weight']
  got = q.read((slice(1, 2), slice(0, 6), slice(2, 4)))
  want = tensors['blocks.1.attn1.to_q.weight'].T.reshape(12, 4, 4)[None, 0:6, 2:4]
  np.testing.assert_array_equal(got, want)
  assert log.reads == [('blocks.1.attn1.to_q.weight', ((8, 16), (0, 6)))]


# --------------------------------------------------------------------- load


def test_load_on_one_device_equals_host_read(sharded):
  path, tensors = sharded
  folder = sl.SafetensorsFolder(path)
  recipes = {'table': sl.source(folder, 'scale_shift_table').reshape(6, 8),
             'embed': {'kernel': sl.source(folder, 'patch_embedding.weight')
                       .transpose(2, 3, 4, 1, 0).reshape(16, 8)},
             'step': sl.source(folder, 'step')}
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ('fsdp', 'tensor'))
  shardings = {'table': NamedSharding(mesh, P(None, 'fsdp')),
               'embed': {'kernel': NamedSharding(mesh, P('tensor', 'fsdp'))},
               'step': NamedSharding(mesh, P())}
  expected = jax.tree.map(lambda r: jax.ShapeDtypeStruct(r.shape, np.float32), recipes)
  params = sl.load(recipes, shardings, expected=expected)
  host = sl.load_on_host(recipes)
  assert jax.tree.structure(params) == jax.tree.structure(host)
  jax.tree.map(lambda a, h: np.testing.assert_array_equal(np.asarray(a), h.astype(np.float32)),
               params, host)
  assert all(a.dtype == np.float32 for a in jax.tree.leaves(params))  # expected's dtype
  assert params['embed']['kernel'].sharding == shardings['embed']['kernel']
  np.testing.assert_array_equal(
      host['embed']['kernel'],
      tensors['patch_embedding.weight'].transpose(2, 3, 4, 1, 0).reshape(16, 8))
  # dtype= wins, and one Sharding serves every leaf.
  kept = sl.load(recipes, NamedSharding(mesh, P()), dtype='bfloat16')
  assert {a.dtype for a in jax.tree.leaves(kept)} == {np.dtype(ml_dtypes.bfloat16)}


MESHES = ('fsdp8', 'fsdp4_tensor2')


@pytest.mark.parametrize('mesh', MESHES)
def test_sharded_load_on_8_devices_matches_host(multidevice, mesh):
  """tests/multidevice/safetensors_load.py: load == load_on_host exactly, with the
  requested NamedShardings, a shard shared by devices read once."""
  results = multidevice.run('multidevice/safetensors_load.py')
  multidevice.assert_ok(results, MESHES, mesh)


# --------------------------------------------------------------------- several processes

SHARE_TENSORS = 8
SHARE_SHAPE = (2048, 4096)  # 32 MiB of f32 each: a 256 MiB checkpoint


def memory_status(field: str) -> int:
  """Bytes of /proc/self/status's `field`: VmRSS (resident now) or VmHWM (its peak).

  VmHWM rather than getrusage's ru_maxrss: Linux carries ru_maxrss over fork and exec, so
  a process started by one that held a lot (pytest, after writing the checkpoint) reports
  its parent's peak; VmHWM is this process's own, since its exec.
  """
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1]) * 1024
  raise ValueError(f'/proc/self/status has no field {field!r}.')


def share_recipes(folder):
  """Half the tensors as stored, half transposed (torch -> Flax), each sharded over all
  devices along its first axis: column reads from the files for the transposed ones."""
  return {f'w{k}': (sl.source(folder, f'w{k}') if k % 2 == 0
                    else sl.source(folder, f'w{k}').transpose(1, 0))
          for k in range(SHARE_TENSORS)}


def share_worker(process_id: int, num_processes: int, port: int, path: str):
  """One process of test_each_process_reads_only_its_share: prints a JSON line."""
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=num_processes,
                             process_id=process_id)
  mesh = Mesh(np.array(jax.devices()), ('fsdp',))
  log = ReadLog()
  folder = sl.SafetensorsFolder(path, on_read=log)
  recipes = share_recipes(folder)
  shardings = jax.tree.map(lambda _: NamedSharding(mesh, P('fsdp')), recipes)
  rss_before = memory_status('VmRSS')
  params = sl.load(recipes, shardings)
  peak = memory_status('VmHWM')
  # What this process's devices hold, each distinct box once.
  held = 0
  for a in jax.tree.leaves(params):
    boxes = {tuple(s.indices(n)[:2] for s, n in zip(index, a.shape))
             for index in a.sharding.addressable_devices_indices_map(a.shape).values()}
    held += sum(math.prod(b - a for a, b in box) for box in boxes) * a.dtype.itemsize
  with open(os.path.join(path, f'{PREFIX}.safetensors.index.json')) as f:
    weight_map = json.load(f)['weight_map']
  for key, a in params.items():  # the values, against safetensors' own reader
    with safetensors.safe_open(os.path.join(path, weight_map[key]), 'np') as f:
      for shard in a.addressable_shards:
        index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(shard.index, a.shape))
        want = (f.get_slice(key)[index] if int(key[1:]) % 2 == 0
                else f.get_slice(key)[index[::-1]].T)
        np.testing.assert_array_equal(np.asarray(shard.data), want)
  total = jax.jit(lambda t: sum(x.sum() for x in jax.tree.leaves(t)))(params)
  print(json.dumps({
      'process': process_id, 'devices': jax.local_device_count(),
      'bytes_read': log.elements() * 4, 'bytes_held': held,
      'rss_before': rss_before, 'peak_rss': peak, 'total': float(total)}), flush=True)
  jax.distributed.shutdown()


def test_each_process_reads_only_its_share(tmp_path):
  """4 processes of 2 fake CPU devices (jax.distributed, gloo) load a 256 MiB checkpoint
  sharded over all 8 devices: each reads exactly the bytes its devices hold (a quarter),
  and its peak RSS grows by less than 0.6 x the checkpoint (holding it whole would be 1x;
  the rest above the share is one tensor's reads in flight and freed heap)."""
  from vdit_jax.tools import launch_local  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  tensors = {f'w{k}': rng.standard_normal(SHARE_SHAPE, dtype=np.float32)
             for k in range(SHARE_TENSORS)}
  path = write_checkpoint(str(tmp_path / 'ckpt'), tensors, num_shards=3)
  size = sum(t.nbytes for t in tensors.values())
  expected_total = float(sum(t.sum(dtype=np.float64) for t in tensors.values()))
  del tensors
  port, num_processes = launch_local.free_port(), 4
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'{CPU_COLLECTIVE_TIMEOUT_FLAGS} --xla_force_host_platform_device_count=2',
             PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get('PYTHONPATH')) if p))
  procs = [subprocess.Popen(
      [sys.executable, '-c', 'from tests.safetensors_load_test import share_worker; '
       f'share_worker({i}, {num_processes}, {port}, {path!r})'],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(num_processes)]
  results = []
  for p in procs:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
    results.append(json.loads(out.strip().splitlines()[-1]))
  for r in results:
    assert r['devices'] == 2
    assert r['bytes_held'] == size // num_processes, (r, size)
    assert r['bytes_read'] == r['bytes_held'], r  # its share, to the byte
    growth = r['peak_rss'] - r['rss_before']
    print(f'process {r["process"]}: read {r["bytes_read"] / 2**20:.0f} MiB of '
          f'{size / 2**20:.0f}, peak RSS growth {growth / 2**20:.0f} MiB '
          f'({growth / size:.2f} x the checkpoint)')  # (pytest -rP shows it)
    assert growth < 0.6 * size, f'process {r["process"]}: RSS grew {growth / size:.2f} x the ' \
                                f'checkpoint while loading {r["bytes_held"] / size:.2f} of it'
    np.testing.assert_allclose(r['total'], expected_total, rtol=1e-5)  # one global array


# --------------------------------------------------------------------- errors


def test_missing_shard_file_names_the_file_and_a_tensor(sharded, tmp_path):
  _, tensors = sharded
  broken = write_checkpoint(str(tmp_path / 'broken'), tensors, num_shards=3)
  os.remove(os.path.join(broken, f'{PREFIX}-00002-of-00003.safetensors'))
  with pytest.raises(ValueError, match=r"'diffusion_pytorch_model-00002-of-00003\.safetensors'"
                     r" \(which should hold tensor 'blocks\.1\.attn1\.to_q\.weight'\)"):
    sl.SafetensorsFolder(broken)


def test_unknown_tensor_names_it_the_folder_and_close_names(sharded):
  path, _ = sharded
  folder = sl.SafetensorsFolder(path)
  with pytest.raises(ValueError, match=r"tensor 'blocks\.0\.attn1\.to_k\.weight' is not in the "
                     rf"checkpoint {path}.*close names: \['blocks\.0\.attn1\.to_q\.weight'"):
    sl.source(folder, 'blocks.0.attn1.to_k.weight')
  with pytest.raises(ValueError, match=r"tensor 'nope' is not in"):
    folder.read('nope')


def test_index_naming_a_tensor_its_file_lacks(tmp_path):
  folder = write_checkpoint(str(tmp_path), {'a': np.ones(2, np.float32),
                                            'b': np.ones(3, np.float32)}, num_shards=2)
  index = os.path.join(folder, f'{PREFIX}.safetensors.index.json')
  with open(index) as f:
    data = json.load(f)
  data['weight_map']['c'] = data['weight_map']['a']
  with open(index, 'w') as f:
    json.dump(data, f)
  with pytest.raises(ValueError, match=r"tensor 'c': .* places it in .*00001-of-00002"
                     r"\.safetensors, whose header does not list it"):
    sl.SafetensorsFolder(folder).shape('c')


def _write_raw(path, header: dict, data: bytes):
  """A safetensors file with a hand-written header (for headers save_file refuses)."""
  text = json.dumps(header).encode()
  with open(path, 'wb') as f:
    f.write(len(text).to_bytes(8, 'little') + text + data)


def test_header_shape_mismatch_and_truncation_name_the_tensor(tmp_path):
  _write_raw(str(tmp_path / 'bad.safetensors'), {
      'good': {'dtype': 'F32', 'shape': [2], 'data_offsets': [0, 8]},
      'short': {'dtype': 'F32', 'shape': [3, 2], 'data_offsets': [8, 24]},
      'cut': {'dtype': 'BF16', 'shape': [8], 'data_offsets': [24, 40]},
      'odd': {'dtype': 'C64', 'shape': [1], 'data_offsets': [0, 8]}}, bytes(32))
  folder = sl.SafetensorsFolder(str(tmp_path))
  np.testing.assert_array_equal(folder.read('good'), np.zeros(2, np.float32))
  with pytest.raises(ValueError, match=r"tensor 'short' in .*bad\.safetensors: the header gives "
                     r'shape \(3, 2\) of F32 \(24 bytes\) but data_offsets \[8, 24\] hold 16'):
    folder.read('short')
  with pytest.raises(ValueError, match=r"tensor 'cut' .* run past the end of the file"):
    folder.shape('cut')
  with pytest.raises(ValueError, match=r"tensor 'odd' .*dtype 'C64'"):
    folder.dtype('odd')


def test_folder_candidates_and_bad_arguments(tmp_path):
  for name in ('a.safetensors', 'b.safetensors'):
    save_file({'x': np.zeros(2, np.float32)}, str(tmp_path / name))
  with pytest.raises(ValueError, match=r"several checkpoints \['a\.safetensors', "
                     r"'b\.safetensors'\]; pick one with index_name="):
    sl.SafetensorsFolder(str(tmp_path))
  folder = sl.SafetensorsFolder(str(tmp_path), index_name='b.safetensors')
  assert folder.names() == ['x']
  with pytest.raises(ValueError, match='no \\*.safetensors.index.json and no'):
    sl.SafetensorsFolder(str(tmp_path.parent))
  with pytest.raises(ValueError, match=r"reader='mmap': must be one of"):
    sl.SafetensorsFolder(str(tmp_path), 'a.safetensors', reader='mmap')
  with pytest.raises(ValueError, match=r'has step 2; only step 1'):
    folder.read('x', (slice(0, 2, 2),))
  with pytest.raises(ValueError, match=r'index entry 0 is 1; each entry must be a slice'):
    folder.read('x', (1,))
  x = sl.source(folder, 'x')
  with pytest.raises(ValueError, match=r'reshape of .* to \(3,\): the new shape must hold'):
    x.reshape(3)
  with pytest.raises(ValueError, match=r'transpose\(1, 0\) of .*: the axes must be a perm'):
    x.transpose(1, 0)
  with pytest.raises(ValueError, match=r'indices must lie in \[-2, 2\)'):
    x.take(0, [0, 2])
  with pytest.raises(ValueError, match=r'stack: recipe 1 .* has shape \(1, 2\) but recipe 0'):
    sl.stack([x, x.reshape(1, 2)])
  with pytest.raises(TypeError, match=r'pass a SafetensorsFolder'):
    sl.source(str(tmp_path), 'x')


def test_load_shape_mismatch_names_param_tensor_and_both_shapes(sharded):
  path, _ = sharded
  folder = sl.SafetensorsFolder(path)
  recipes = {'blocks': {'q': sl.source(folder, 'blocks.0.attn1.to_q.weight').transpose(1, 0)}}
  mesh = Mesh(np.array(jax.devices()[:1]), ('fsdp',))
  shardings = {'blocks': {'q': NamedSharding(mesh, P())}}
  expected = {'blocks': {'q': jax.ShapeDtypeStruct((16, 12), np.float32)}}
  with pytest.raises(ValueError, match=r"param blocks/q: expected shape \(16, 12\) but the "
                     r"stored tensor\(s\) \['blocks\.0\.attn1\.to_q\.weight'\] give \(12, 16\)"):
    sl.load(recipes, shardings, expected=expected)
  with pytest.raises(ValueError, match='shardings must have the same tree structure'):
    sl.load(recipes, {'blocks': {}})
