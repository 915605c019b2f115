"""Attention patterns with the tokens sharded over the mesh axis `sequence` (8 CPU devices).

Non-full patterns keep model.sequence_parallel='none'; the token dim of q/k/v
[B, N, K, Dh] is still sharded over `sequence` by the logical axis rules, and the
XLA partitioner moves tokens as the groups need them. These checks show that
the values and gradients equal one device's, per pattern and for a VideoDiT.

Run by attention_patterns_test.py in a subprocess (the device count must
be set before jax starts); prints one JSON line {check name: 'ok' | the failure}.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice/attention_patterns.py
"""

import json
import os
import sys
import traceback

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..')))

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from vdit_jax.config import defaults
from vdit_jax.model import spec as spec_lib

from vdit_jax.model import attention_patterns as ap
from vdit_jax.model import dit
from vdit_jax.parallel import axes
from vdit_jax.parallel import mesh as mesh_lib

RULES = axes.DEFAULT_RULES
TOKEN_HEADS = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_HEADS, axes.ACT_KV)
GRID = (4, 4, 4)  # 64 tokens; sequence=4 gives each device one frame
GROUPINGS = {
    'spatial': ap.SPATIAL,
    'temporal': ap.TEMPORAL,
    'windowed_shift': ap.Grouping('windowed', ((2, 2, 2),), shifted=True),
    'hierarchical': ap.Grouping('hierarchical', ((-1, -1, -1), (1, 2, 2))),
}
TOL = dict(rtol=1e-5, atol=1e-5)


def make_mesh(**sizes):
  cfg = dict(defaults.base_config().mesh.to_dict(), data=1)  # every axis 1, one slice
  cfg.update(sizes)
  return mesh_lib.make_mesh(ml_collections.ConfigDict(cfg))


def value_and_grads(grouping, w):
  def loss(q, k, v):
    out = ap.attend(q, k, v, GRID, grouping)
    return jnp.sum(out * w), out
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def check_patterns(check, mesh):
  rng = np.random.default_rng(0)
  q, k, v, w = (rng.normal(size=(2, 64, 4, 8)).astype(np.float32) for _ in range(4))
  sharding = NamedSharding(mesh, nn.logical_to_mesh_axes(TOKEN_HEADS, RULES))
  for name, grouping in GROUPINGS.items():
    def equal(grouping=grouping):
      (_, ref_out), ref_grads = value_and_grads(grouping, w)(q, k, v)
      with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        args = [jax.device_put(x, sharding) for x in (q, k, v)]
        (_, out), grads = value_and_grads(grouping, jax.device_put(w, sharding))(*args)
      assert out.sharding.spec == sharding.spec, out.sharding
      np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), **TOL)
      for n, g, r in zip('qkv', grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), err_msg=f'd{n}', **TOL)
    check(f'pattern/data2_seq4/{name}', equal)

  def spatial_stays_local():
    # Each device holds whole frames (T' = 4 over sequence=4), so attention within
    # frames needs no communication at all.
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
      args = [jax.device_put(x, sharding) for x in (q, k, v)]
      hlo = jax.jit(lambda q, k, v: ap.spatial_attention(q, k, v, GRID)).lower(
          *args).compile().as_text()
    found = [op for op in ('all-gather', 'all-to-all', 'collective-permute', 'all-reduce')
             if op + '(' in hlo or op + '-start(' in hlo]
    assert not found, f'collectives {found} in spatial attention on whole-frame shards'
  check('hlo/spatial_without_collectives', spatial_stays_local)


def check_model(check, mesh):
  """A VideoDiT with shifted windows (alternating blocks) on data=2 x sequence=4."""
  cfg = defaults.base_config().model
  cfg.update(dict(
      variant=None, width=24, depth=2, num_heads=2, mlp_dim=32, patch_size=(1, 2, 2),
      pos_embed='rope', qk_norm=True, attention_impl='xla', scan_layers=True,
      remat_policy='none', dtype='float32', param_dtype='float32', sequence_parallel='none',
      attention_pattern='windowed', window_size=(2, 2, 2)))
  model = dit.build_model(spec_lib.from_config(cfg), channels=3, num_classes=10)
  rng = np.random.default_rng(1)
  video = rng.normal(size=(2, 4, 8, 8, 3)).astype(np.float32)  # grid (4, 4, 4)
  target = rng.normal(size=video.shape).astype(np.float32)
  batch = (video, np.array([3.0, 700.0], np.float32), np.array([1, 5], np.int32), target)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *batch[:3])['params'])
  params = jax.tree.map(lambda x: (0.2 * rng.normal(size=x.shape)).astype(np.float32), shapes)

  def loss(params, video, t, labels, target):
    out = model.apply({'params': params}, video, t, labels)
    return jnp.mean(jnp.square(out - target)), out
  step = jax.jit(jax.value_and_grad(loss, has_aux=True))

  def equal():
    (ref_loss, ref_out), ref_grads = step(params, *batch)
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
      sharded = tuple(jax.device_put(x, mesh_lib.batch_sharding(mesh, RULES, x.ndim))
                      for x in batch)
      (loss_, out), grads = step(params, *sharded)
    np.testing.assert_allclose(float(loss_), float(ref_loss), **TOL)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), **TOL)
    for (path, r), g in zip(jax.tree_util.tree_leaves_with_path(ref_grads),
                            jax.tree.leaves(grads)):
      np.testing.assert_allclose(np.asarray(g), np.asarray(r), **TOL,
                                 err_msg=jax.tree_util.keystr(path))
  check('model/data2_seq4/windowed_shift', equal)


def main():
  jax.config.update('jax_disable_most_optimizations', True)  # tiny graphs: compile time
  results = {}

  def check(name, fn):
    try:
      fn()
      results[name] = 'ok'
    except Exception:  # pylint: disable=broad-except
      results[name] = traceback.format_exc(limit=4)

  mesh = make_mesh(data=2, sequence=4)
  check_patterns(check, mesh)
  check_model(check, mesh)
  print(json.dumps(results))


if __name__ == '__main__':
  main()
