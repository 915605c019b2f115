"""Multi-device checks of the attention kernels on 8 fake CPU devices.

Run by attention_impl_test.py in a subprocess; prints one JSON line on stdout,
{check name: 'ok' | the failure}.
- splash under a data=2 x tensor=2 mesh runs per device in shard_map (interpreted
  on CPU) and equals XLA's attention in value and gradients; so does a batch that
  the batch axes cannot split (3 on data=2; 1 on data x fsdp, as init traces), and
  ring and ulysses on a batch of 1;
- ulysses sequence parallelism runs the chosen kernel (blockwise, splash) on
  each device's share (all_gather shares that path), equal to XLA's attention.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice/attention_impl.py
"""

import json
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..')))

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from tests import multidevice
from vdit_jax.config import defaults
from vdit_jax.model import attention
from vdit_jax.parallel import axes
from vdit_jax.parallel import mesh as mesh_lib
from vdit_jax.parallel import sequence_attention as sa

RULES = axes.DEFAULT_RULES
TOL = dict(rtol=1e-5, atol=2e-5)


def make_mesh(**sizes):
  cfg = dict(defaults.base_config().mesh.to_dict(), data=1)  # every axis 1, one slice
  cfg.update(sizes)
  count = cfg['data'] * cfg['fsdp'] * cfg['tensor'] * cfg['sequence']
  return mesh_lib.make_mesh(ml_collections.ConfigDict(cfg), devices=jax.devices()[:count])


def arrays(shape, seed=0):
  rng = np.random.default_rng(seed)
  return [(1.5 * rng.normal(size=shape)).astype(np.float32) for _ in range(4)]


def value_and_grads(impl, sequence_parallel='none'):
  def loss(q, k, v, w):
    out = attention.dot_product_attention(q, k, v, impl, sequence_parallel)
    return jnp.sum(out * w), out
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def check_equal(mesh, impl, sequence_parallel, shape, expect_in_jaxpr=()):
  q, k, v, w = arrays(shape)
  (_, want), want_grads = value_and_grads('xla')(q, k, v, w)
  spec = nn.logical_to_mesh_axes(sa.TOKEN_HEADS, RULES)
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    args = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v, w)]
    fn = value_and_grads(impl, sequence_parallel)
    text = str(jax.make_jaxpr(fn)(*args))
    (_, out), grads = fn(*args)
  for name in expect_in_jaxpr:
    assert name in text, f'{name} not in the jaxpr'
  np.testing.assert_allclose(out, want, **TOL)
  for g, r in zip(grads, want_grads):
    np.testing.assert_allclose(g, r, **TOL)


def check_indivisible_batch(mesh, impl, sequence_parallel, shape):
  """A batch the batch axes do not split (init's batch of 1, a sampler's few clips) runs
  whole over the axes that do not divide it, and equals XLA's attention."""
  q, k, v, w = arrays(shape, seed=1)
  (_, want), want_grads = value_and_grads('xla')(q, k, v, w)
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    fn = value_and_grads(impl, sequence_parallel)
    assert 'shard_map' in str(jax.make_jaxpr(fn)(q, k, v, w))
    (_, out), grads = fn(q, k, v, w)
  np.testing.assert_allclose(out, want, **TOL)
  for g, r in zip(grads, want_grads):
    np.testing.assert_allclose(g, r, **TOL)


def main():
  results = {}
  checks = {
      # B=4 over data=2, K=4 over tensor=2; N=200 pads to 256 on each device.
      'splash_shard_map/data2_tensor2': lambda: check_equal(
          make_mesh(data=2, tensor=2), 'splash:128x128', 'none', (4, 200, 4, 16),
          ('shard_map', 'pallas_call')),
      # B=3 over data=2 runs whole; B=1 (what init traces) over data x fsdp = 2 x 2.
      'splash_shard_map/indivisible_batch': lambda: check_indivisible_batch(
          make_mesh(data=2, tensor=2), 'splash:128x128', 'none', (3, 128, 4, 8)),
      'splash_shard_map/batch_of_one': lambda: check_indivisible_batch(
          make_mesh(data=2, fsdp=2, tensor=2), 'splash:128x128', 'none', (1, 256, 4, 8)),
      'ring/batch_of_one': lambda: check_indivisible_batch(
          make_mesh(data=2, sequence=4), 'xla', 'ring', (1, 64, 4, 8)),
      'ulysses/splash_batch_of_one': lambda: check_indivisible_batch(
          make_mesh(data=4, sequence=2), 'splash:128x128', 'ulysses', (1, 256, 2, 8)),
      # ulysses on sequence=4: 8 heads -> 2 per device over all N=160 tokens.
      'ulysses/blockwise': lambda: check_equal(
          make_mesh(data=2, sequence=4), 'blockwise:32x64', 'ulysses', (2, 160, 8, 8),
          ('all_to_all', 'scan')),
      'ulysses/splash': lambda: check_equal(
          make_mesh(sequence=2), 'splash:128x128', 'ulysses', (1, 256, 2, 8),
          ('all_to_all', 'pallas_call')),
  }
  print(json.dumps(multidevice.outcomes(checks, results)))


if __name__ == '__main__':
  main()
