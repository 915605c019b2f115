"""safetensors_load.load on 8 fake CPU devices == the host read, with the shardings asked for.

Run by safetensors_load_test.py in a subprocess. Prints one JSON line {check: 'ok' | failure}.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice/safetensors_load.py

A small Wan-like checkpoint (3 shards, torch layouts, f32 and bf16) is mapped to Flax-like
params through every recipe step and loaded on two meshes, fsdp=8 and fsdp=4 x tensor=2
(both with axes (fsdp, tensor), so one set of PartitionSpecs serves both). Each array must
equal load_on_host's exactly and carry its NamedSharding; a param replicated over `tensor`
is read once per distinct shard, not once per device.
"""

import functools
import json
import math
import os
import sys
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..')))

import jax  # pylint: disable=g-import-not-at-top
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tests import multidevice
from tests import safetensors_load_test
from vdit_jax.parallel import safetensors_load as sl

D, K, DH, C, LAYERS = 32, 4, 8, 4, 3  # width, heads, head dim, latent channels, depth
MESHES = {'fsdp8': (8, 1), 'fsdp4_tensor2': (4, 2)}


def checkpoint(folder: str) -> dict:
  """Torch-layout tensors with diffusers' Wan names, written in 3 shards."""
  rng = np.random.default_rng(0)
  tensors = {}
  for i in range(LAYERS):
    for proj in ('to_q', 'to_k', 'to_v', 'to_out.0'):
      tensors[f'blocks.{i}.attn1.{proj}.weight'] = rng.normal(size=(D, D)).astype(np.float32)
    tensors[f'blocks.{i}.scale_shift_table'] = (
        rng.normal(size=(1, 6, D)).astype(ml_dtypes.bfloat16))
  tensors['patch_embedding.weight'] = rng.normal(size=(D, C, 1, 2, 2)).astype(np.float32)
  tensors['rope_freqs'] = rng.normal(size=(64,)).astype(np.float32)
  safetensors_load_test.write_checkpoint(folder, tensors, num_shards=3)
  return tensors


def recipes_and_specs(folder):
  """{param: (recipe, PartitionSpec)}: Flax layouts from the torch tensors."""
  def per_layer(fn):
    return sl.stack([fn(i) for i in range(LAYERS)])

  def linear(i, proj):  # torch [out, in] -> [in, out]
    return sl.source(folder, f'blocks.{i}.attn1.{proj}.weight').transpose(1, 0)

  half = 64 // 2
  return {
      'blocks': {
          'query_kernel': (per_layer(lambda i: linear(i, 'to_q').reshape(D, K, DH)),
                           P(None, 'fsdp', 'tensor', None)),  # [L, D, K, Dh]
          'kv_kernel': (per_layer(lambda i: sl.concatenate(
              [linear(i, 'to_k'), linear(i, 'to_v')], axis=1)), P(None, 'fsdp', None)),
          'out_kernel': (per_layer(lambda i: linear(i, 'to_out.0').reshape(K, DH, D)),
                         P(None, 'tensor', None, 'fsdp')),  # [L, K, Dh, D]
          'modulation': (per_layer(lambda i: sl.source(folder, f'blocks.{i}.scale_shift_table')
                                   .reshape(6, D)), P(None, None, 'fsdp')),
      },
      # Conv3d [D, C, pt, ph, pw] -> a patch Dense [(pt ph pw C), D]: a merge reshape.
      'patch_kernel': (sl.source(folder, 'patch_embedding.weight').transpose(2, 3, 4, 1, 0)
                       .reshape(-1, D), P('tensor', 'fsdp')),
      'rope': (sl.source(folder, 'rope_freqs').take(
          0, list(range(half, 64)) + list(range(half))), P('fsdp')),
      'rope_replicated': (sl.source(folder, 'rope_freqs').astype(np.float16), P()),
      'scale': (sl.from_array(np.linspace(0, 1, 16, dtype=np.float32)), P(('fsdp', 'tensor'))),
  }


def check_mesh(name: str, folder: str):
  log = safetensors_load_test.ReadLog()
  src = sl.SafetensorsFolder(folder, on_read=log)
  plan = recipes_and_specs(src)
  is_pair = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], sl.Recipe)
  recipes = jax.tree.map(lambda p: p[0], plan, is_leaf=is_pair)
  mesh = Mesh(np.array(jax.devices()).reshape(MESHES[name]), ('fsdp', 'tensor'))
  shardings = jax.tree.map(lambda p: NamedSharding(mesh, p[1]), plan, is_leaf=is_pair)
  host = sl.load_on_host(recipes, dtype=np.float32)
  log.reads.clear()
  params = sl.load(recipes, shardings, dtype=np.float32)
  flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
  for (path, array), sharding, want in zip(flat_params, jax.tree.leaves(shardings),
                                           jax.tree.leaves(host)):
    where = jax.tree_util.keystr(path)
    assert array.sharding == sharding, (where, array.sharding, sharding)
    assert array.dtype == np.float32, (where, array.dtype)
    np.testing.assert_array_equal(np.asarray(array), want, err_msg=where)
    for shard in array.addressable_shards:  # each device holds its own slice
      np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index], err_msg=where)
  # kv_kernel [L, D, 2D] is P(None, 'fsdp', None): replicated over `tensor`, so on
  # fsdp4_tensor2 two devices share each box; it is read once per box: each stored
  # to_k / to_v element exactly once.
  kv = [n for n, _ in log.reads if n.endswith(('to_k.weight', 'to_v.weight'))]
  kv_elements = sum(math.prod(b - a for a, b in box) for n, box in log.reads
                    if n.endswith(('to_k.weight', 'to_v.weight')))
  assert kv_elements == 2 * LAYERS * D * D, (kv_elements, len(kv))
  assert len(kv) == 2 * LAYERS * MESHES[name][0], len(kv)  # one read per fsdp shard


def main():
  results = {}
  assert len(jax.devices()) == 8, jax.devices()
  with tempfile.TemporaryDirectory() as tmp:
    checkpoint(tmp)
    multidevice.outcomes({name: functools.partial(check_mesh, name, tmp) for name in MESHES},
                         results)
  print(json.dumps(results))


if __name__ == '__main__':
  main()
