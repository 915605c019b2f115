"""Sequence-parallel attention: fallbacks and config here; 8-device checks in a subprocess.

The multi-device checks (each strategy == plain attention in value and
gradients on three meshes, the collectives in the compiled HLO, the errors,
and a tiny VideoDiT on data=2 x sequence=4) need 8 fake CPU devices, which must
be set before jax starts, so they run once in tests/multidevice/sequence_attention.py
and each check is reported here as its own test.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vdit_jax.config import defaults
from vdit_jax.model import spec as spec_lib
from vdit_jax.model import attention, dit
from vdit_jax.parallel import axes
from vdit_jax.parallel import mesh as mesh_lib
from vdit_jax.parallel import sequence_attention as sa

STRATEGIES = ('all_gather', 'ring', 'ulysses')
MULTIDEVICE_CHECKS = (
    [f'equal/{m}/{s}' for m in ('seq8', 'data2_seq4', 'seq2_tensor2_data2') for s in STRATEGIES]
    + ['equal/custom_rules_explicit_mesh',
       'hlo/ring_permutes_without_full_gather', 'hlo/all_gather_gathers_full_sequence',
       'hlo/ulysses_all_to_all', 'error/ulysses_indivisible_heads',
       'error/rules_without_sequence']
    + [f'model/data2_seq4/{s}' for s in STRATEGIES])


def qkv(shape=(2, 8, 4, 8), seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(2.0 * rng.normal(size=shape), jnp.float32) for _ in range(3))


def plain(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, implementation='xla')


def test_unknown_strategy_raises():
  q, k, v = qkv()
  with pytest.raises(ValueError, match=r"sequence_parallel='rings' is not one of"):
    sa.sequence_parallel_attention(q, k, v, strategy='rings')


def test_mismatched_shapes_raise():
  q, k, v = qkv()
  with pytest.raises(ValueError, match=r'\[B, N, K, Dh\]'):
    sa.sequence_parallel_attention(q, k[:, :4], v, strategy='ring')


@pytest.mark.parametrize('strategy', ('none',) + STRATEGIES)
def test_without_mesh_is_plain_attention(strategy):
  q, k, v = qkv()
  fn = lambda q, k, v: sa.sequence_parallel_attention(q, k, v, strategy=strategy)
  assert 'shard_map' not in str(jax.make_jaxpr(fn)(q, k, v))
  np.testing.assert_allclose(fn(q, k, v), plain(q, k, v), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('strategy', STRATEGIES)
def test_sequence_axis_of_size_one_is_plain_attention(strategy):
  mesh = mesh_lib.make_mesh(defaults.base_config().mesh, jax.devices()[:1])
  q, k, v = qkv()
  fn = jax.jit(lambda q, k, v: sa.sequence_parallel_attention(q, k, v, strategy=strategy))
  with jax.set_mesh(mesh), nn.logical_axis_rules(axes.DEFAULT_RULES):
    assert 'shard_map' not in str(jax.make_jaxpr(fn)(q, k, v))
    out = fn(q, k, v)
  np.testing.assert_allclose(out, plain(q, k, v), rtol=1e-6, atol=1e-6)


def test_missing_sequence_axis_raises():
  mesh = jax.sharding.AbstractMesh((1,), ('data',))
  q, k, v = qkv()
  with pytest.raises(ValueError, match="'sequence' is not an axis of the mesh"):
    sa.sequence_parallel_attention(q, k, v, strategy='ring', mesh=mesh)


def test_token_spec_follows_rules():
  mesh = jax.sharding.AbstractMesh((2, 1, 2, 2), axes.MESH_AXES)
  with nn.logical_axis_rules(axes.DEFAULT_RULES):
    assert sa.token_spec(mesh) == jax.sharding.PartitionSpec(
        ('data', 'fsdp'), 'sequence', 'tensor', None)
  # A mesh without `fsdp`: the axis is dropped, not passed to shard_map.
  small = jax.sharding.AbstractMesh((2, 4), ('data', 'sequence'))
  assert sa.token_spec(small, rules=axes.DEFAULT_RULES) == jax.sharding.PartitionSpec(
      'data', 'sequence', None, None)
  bad = tuple((n, 'sequence') if n == axes.ACT_BATCH else (n, m)
              for n, m in axes.DEFAULT_RULES)
  with pytest.raises(ValueError, match='activation_length'):
    sa.token_spec(mesh, rules=bad)


def test_dot_product_attention_dispatch():
  q, k, v = qkv()
  np.testing.assert_allclose(attention.dot_product_attention(q, k, v, 'xla', 'ring'),
                             plain(q, k, v), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="attention_impl='cudnn'"):
    attention.dot_product_attention(q, k, v, 'cudnn', 'ring')
  with pytest.raises(ValueError, match="sequence_parallel='tree'"):
    attention.dot_product_attention(q, k, v, 'xla', 'tree')


def test_config_default_and_validation():
  cfg = defaults.base_config()
  assert cfg.model.sequence_parallel == 'none'
  assert spec_lib.from_config(cfg.model).sequence_parallel == 'none'
  cfg.model.sequence_parallel = 'ulysses'
  spec = spec_lib.from_config(cfg.model)
  assert spec.sequence_parallel == 'ulysses'
  spec_lib.check_spec(spec)
  cfg.model.sequence_parallel = 'all-gather'
  with pytest.raises(ValueError, match=r"model.sequence_parallel='all-gather' is not one of"):
    spec_lib.check_spec(spec_lib.from_config(cfg.model))


@pytest.mark.parametrize('check', MULTIDEVICE_CHECKS)
def test_multidevice(multidevice, check):
  results = multidevice.run('multidevice/sequence_attention.py')
  multidevice.assert_ok(results, MULTIDEVICE_CHECKS, check)
