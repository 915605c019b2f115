"""Multi-device checks of sequence-parallel attention on 8 fake CPU devices.

Run by sequence_attention_test.py in a subprocess (the rest of the suite runs
with one device in its own process). Each check's outcome goes into one JSON
line on stdout, {check name: 'ok' | the failure}, so that the parent test can
report each check on its own.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice/sequence_attention.py
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
from jax.sharding import NamedSharding, PartitionSpec

from tests.multidevice import all_gather_shapes
from vdit_jax.config import defaults
from vdit_jax.model import spec as spec_lib
from vdit_jax.model import dit
from vdit_jax.parallel import axes
from vdit_jax.parallel import mesh as mesh_lib
from vdit_jax.parallel import sequence_attention as sa

RULES = axes.DEFAULT_RULES
STRATEGIES = ('all_gather', 'ring', 'ulysses')
MESHES = {
    'seq8': dict(sequence=8),
    'data2_seq4': dict(data=2, sequence=4),
    'seq2_tensor2_data2': dict(sequence=2, tensor=2, data=2),
}
B, N, K, DH = 2, 16, 8, 8  # ulysses on sequence=8 needs K divisible by 8
TOL = dict(rtol=1e-5, atol=1e-5)


def make_mesh(sizes):
  cfg = dict(defaults.base_config().mesh.to_dict(), data=1)  # every axis 1, one slice
  cfg.update(sizes)
  return mesh_lib.make_mesh(ml_collections.ConfigDict(cfg))


def qkv_and_cotangent(k_heads=K, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v, w = (rng.normal(size=(B, N, k_heads, DH)).astype(np.float32) for _ in range(4))
  return 2.0 * q, 2.0 * k, v, w  # scale 2: peaked softmax, so online max matters


def loss_fn(attn):
  def loss(q, k, v, w):
    out = attn(q, k, v)
    return jnp.sum(out * w), out  # gradients with a random cotangent w
  return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


def sharded_fn(mesh, strategy, arrays):
  """Compiled value_and_grad of sequence-parallel attention, and its sharded inputs."""
  spec = nn.logical_to_mesh_axes(sa.TOKEN_HEADS, RULES)
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    args = [jax.device_put(x, NamedSharding(mesh, spec)) for x in arrays]
    fn = jax.jit(loss_fn(lambda q, k, v: sa.sequence_parallel_attention(
        q, k, v, strategy=strategy)))
    compiled = fn.lower(*args).compile()
    (_, out), grads = compiled(*args)
  return compiled, np.asarray(out), [np.asarray(g) for g in grads]


def full_sequence_gathers(hlo: str):
  return [s for s in all_gather_shapes(hlo) if len(s) == 4 and s[1] == N]


def main():
  results = {}

  def check(name, fn):
    try:
      fn()
      results[name] = 'ok'
    except Exception:  # pylint: disable=broad-except
      results[name] = traceback.format_exc(limit=4)

  arrays = qkv_and_cotangent()
  (_, ref_out), ref_grads = jax.jit(loss_fn(
      lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation='xla')))(*arrays)
  hlos = {}

  for mesh_name, sizes in MESHES.items():
    mesh = make_mesh(sizes)
    for strategy in STRATEGIES:
      def equal(mesh=mesh, strategy=strategy, mesh_name=mesh_name):
        compiled, out, grads = sharded_fn(mesh, strategy, arrays)
        hlos[mesh_name, strategy] = compiled.as_text()
        np.testing.assert_allclose(out, ref_out, **TOL)
        for name, g, r in zip('qkv', grads, ref_grads):
          np.testing.assert_allclose(g, r, err_msg=f'd{name}', **TOL)
      check(f'equal/{mesh_name}/{strategy}', equal)

  def ring_hlo():
    for (mesh_name, strategy), hlo in hlos.items():
      if strategy == 'ring':
        assert 'collective-permute' in hlo, f'{mesh_name}: no collective-permute'
        bad = full_sequence_gathers(hlo)
        assert not bad, f'{mesh_name}: all-gathers of full-sequence shapes {bad}'
  check('hlo/ring_permutes_without_full_gather', ring_hlo)

  def all_gather_hlo():
    for (mesh_name, strategy), hlo in hlos.items():
      if strategy == 'all_gather':
        # Positive control for the ring check: the same parser finds the K/V gather.
        assert full_sequence_gathers(hlo), f'{mesh_name}: {all_gather_shapes(hlo)}'
  check('hlo/all_gather_gathers_full_sequence', all_gather_hlo)

  def ulysses_hlo():
    for (mesh_name, strategy), hlo in hlos.items():
      if strategy == 'ulysses':
        assert 'all-to-all' in hlo, f'{mesh_name}: no all-to-all'
        assert not full_sequence_gathers(hlo), mesh_name
  check('hlo/ulysses_all_to_all', ulysses_hlo)

  def ulysses_indivisible_heads():
    q = jnp.zeros((B, N, 4, DH))  # 4 heads on a sequence axis of 8
    with jax.set_mesh(make_mesh(dict(sequence=8))), nn.logical_axis_rules(RULES):
      try:
        jax.jit(lambda q: sa.sequence_parallel_attention(q, q, q, strategy='ulysses'))(q)
      except ValueError as e:
        assert 'ulysses' in str(e) and 'divisible' in str(e), str(e)
        return
    raise AssertionError('no ValueError for 4 heads on a sequence axis of 8')
  check('error/ulysses_indivisible_heads', ulysses_indivisible_heads)

  def rules_without_sequence():
    rules = tuple((n, None) if n == axes.ACT_LENGTH else (n, m) for n, m in RULES)
    q = jnp.zeros((B, N, K, DH))
    with jax.set_mesh(make_mesh(dict(sequence=8))), nn.logical_axis_rules(rules):
      try:
        sa.sequence_parallel_attention(q, q, q, strategy='ring')
      except ValueError as e:
        assert axes.ACT_LENGTH in str(e), str(e)
        return
    raise AssertionError('no ValueError for rules that do not shard the tokens')
  check('error/rules_without_sequence', rules_without_sequence)

  def custom_rules_and_explicit_mesh():
    # Heads over 'fsdp' instead of 'tensor', and the mesh passed, not in context.
    rules = tuple((n, 'fsdp') if n == axes.ACT_HEADS else
                  (n, 'data') if n == axes.ACT_BATCH else (n, m) for n, m in RULES)
    mesh = make_mesh(dict(fsdp=2, sequence=2, data=2))
    with nn.logical_axis_rules(rules):
      spec = sa.token_spec(mesh)
      assert spec == PartitionSpec('data', 'sequence', 'fsdp', None), spec
      args = [jax.device_put(x, NamedSharding(mesh, spec)) for x in arrays[:3]]
      for strategy in STRATEGIES:
        out = jax.jit(lambda q, k, v, s=strategy: sa.sequence_parallel_attention(
            q, k, v, strategy=s, mesh=mesh))(*args)
        assert out.sharding.spec == spec, (strategy, out.sharding)
        np.testing.assert_allclose(np.asarray(out), ref_out, err_msg=strategy, **TOL)
  check('equal/custom_rules_explicit_mesh', custom_rules_and_explicit_mesh)

  check_model(check)
  print(json.dumps(results))


def check_model(check):
  """Tiny VideoDiT on data=2, sequence=4 == the same model on one device.

  Compiled without most XLA optimisations (a third of this script's CPU time
  otherwise); the attention checks above use the default pipeline.
  """
  jax.config.update('jax_disable_most_optimizations', True)
  cfg = defaults.base_config().model
  cfg.update(dict(
      variant=None, width=48, depth=2, num_heads=4, mlp_dim=96, patch_size=(2, 4, 4),
      pos_embed='rope', qk_norm=True, attention_impl='xla', scan_layers=True,
      remat_policy='none', dtype='float32', param_dtype='float32', sequence_parallel='none'))
  rng = np.random.default_rng(0)
  video = rng.normal(size=(2, 4, 8, 16, 3)).astype(np.float32)  # 2 x 2 x 4 = 16 tokens
  target = rng.normal(size=video.shape).astype(np.float32)
  t = np.array([3.0, 700.0], np.float32)
  labels = np.array([1, 5], np.int32)

  def loss_and_grads(model, params, batch):
    def loss(params, video, t, labels, target):
      out = model.apply({'params': params}, video, t, labels)
      return jnp.mean(jnp.square(out - target)), out
    return jax.value_and_grad(loss, has_aux=True)(params, *batch)

  base = dit.build_model(spec_lib.from_config(cfg), channels=3, num_classes=10)
  # Random values everywhere (zero-init layers would hide bugs), drawn with numpy
  # from the abstract init: no init compile, no per-leaf jax.random compiles.
  shapes = nn.unbox(jax.eval_shape(base.init, jax.random.key(0), video, t, labels)['params'])
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (float('scale' in jax.tree_util.keystr(path))
                       + 0.1 * rng.normal(size=x.shape)).astype(np.float32), shapes)
  batch = (video, t, labels, target)
  (ref_loss, ref_out), ref_grads = jax.jit(
      lambda p, b: loss_and_grads(base, p, b))(params, batch)

  mesh = make_mesh(dict(data=2, sequence=4))
  for strategy in STRATEGIES:
    def equal(strategy=strategy):
      cfg_s = ml_collections.ConfigDict(cfg.to_dict())
      cfg_s.sequence_parallel = strategy
      model = dit.build_model(spec_lib.from_config(cfg_s), channels=3, num_classes=10)
      with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        sharded = tuple(jax.device_put(x, mesh_lib.batch_sharding(mesh, RULES, x.ndim))
                        for x in batch)
        compiled = jax.jit(lambda p, b: loss_and_grads(model, p, b)).lower(
            params, sharded).compile()
        (loss, out), grads = compiled(params, sharded)
      hlo = compiled.as_text()
      marker = {'all_gather': 'all-gather', 'ring': 'collective-permute',
                'ulysses': 'all-to-all'}[strategy]
      assert marker in hlo, f'{strategy}: no {marker} in the compiled model'
      np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), **TOL)
      np.testing.assert_allclose(float(loss), float(ref_loss), **TOL)
      flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
      flat = jax.tree.leaves(grads)
      for (path, r), g in zip(flat_ref, flat):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), **TOL,
                                   err_msg=jax.tree_util.keystr(path))
    check(f'model/data2_seq4/{strategy}', equal)


if __name__ == '__main__':
  main()
