"""LoRA on 8 fake CPU devices (data 2 x fsdp 2 x tensor 2) == LoRA on one device.

Run by lora_test.py in a subprocess. Prints one JSON line {check: 'ok' | failure}.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice/lora.py
"""

import json
import os
import sys
import tempfile
import traceback

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..')))

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from tests import lora_test
from tests.multidevice import path_specs
from vdit_jax.data import pipeline
from vdit_jax.train import loop
from vdit_jax.train import state as state_lib

STEPS = 2
TOL = dict(rtol=1e-5, atol=1e-6)
EMBED, MLP, HEADS = 'fsdp', 'tensor', 'tensor'   # the default rules on this mesh
# Each factor keeps its kernel's sharded dims; the rank (and layers) axis is replicated.
EXPECTED_ADAPTER_SPECS = {
    **{f'blocks/attn/{k}_kernel/a': P(None, EMBED, None) for k in ('query', 'key', 'value')},
    **{f'blocks/attn/{k}_kernel/b': P(None, None, HEADS, None)
       for k in ('query', 'key', 'value')},
    'blocks/attn/out_kernel/a': P(None, HEADS, None, None),
    'blocks/attn/out_kernel/b': P(None, None, EMBED),
    'blocks/mlp/fc1/kernel/a': P(None, EMBED, None),
    'blocks/mlp/fc1/kernel/b': P(None, None, MLP),
    'blocks/mlp/fc2/kernel/a': P(None, MLP, None),
    'blocks/mlp/fc2/kernel/b': P(None, None, EMBED),
    # configs/tiny.py's class tokens: 'attn' adapts the cross-attention too (model/lora.py).
    **{f'blocks/cross_attn/attn/{k}_kernel/a': P(None, EMBED, None)
       for k in ('query', 'key', 'value')},
    **{f'blocks/cross_attn/attn/{k}_kernel/b': P(None, None, HEADS, None)
       for k in ('query', 'key', 'value')},
    'blocks/cross_attn/attn/out_kernel/a': P(None, HEADS, None, None),
    'blocks/cross_attn/attn/out_kernel/b': P(None, None, EMBED),
}


def run(config, devices):
  s = loop.build(config, None, devices=devices)
  state, shardings = state_lib.create_state(s.init_fn, jax.random.key(0), s.mesh, s.rules)
  data = pipeline.make_dataset(config.data, config.train.batch_size, seed=0,
                               process_index=0, process_count=1)
  step = loop.jit_train_step(s)
  losses = []
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    for _ in range(STEPS):
      state, metrics = step(state, loop.global_batch(next(data), s.mesh, s.rules),
                            jax.random.key(1))
      losses.append(float(metrics['loss']))
  return s, state, shardings, losses


def main():
  results = {}
  devices = jax.devices()
  assert len(devices) == 8, devices
  with tempfile.TemporaryDirectory() as tmp:
    lora_test.write_base_export(os.path.join(tmp, 'base'), lora_test.tiny_config())
    config = lora_test.lora_config(os.path.join(tmp, 'base'))
    config.mesh.data = 1
    _, ref_state, _, ref_losses = run(config, devices[:1])
    try:
      config.mesh.update(dict(data=2, fsdp=2, tensor=2))
      s, state, shardings, losses = run(config, devices)
      np.testing.assert_allclose(losses, ref_losses, **TOL)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL),
                   jax.device_get(state.params), jax.device_get(ref_state.params))
      # Adapters, their EMA and their Adam moments live on the mesh as planned.
      for tree in (shardings.params, shardings.ema_params, shardings.opt_state[1][0].mu,
                   shardings.opt_state[1][0].nu):
        specs = path_specs(tree)
        assert specs == EXPECTED_ADAPTER_SPECS, {
            k: (v, EXPECTED_ADAPTER_SPECS.get(k)) for k, v in specs.items()
            if EXPECTED_ADAPTER_SPECS.get(k) != v}
      leaf = state.params['blocks']['attn']['query_kernel']['b']
      assert leaf.sharding.spec == P(None, None, HEADS, None), leaf.sharding
      # The frozen base is sharded like the full model's params.
      base = s.lora.base_params()['blocks']['mlp']['fc1']['kernel']
      assert base.sharding.spec == P(None, EMBED, MLP), base.sharding
      results['data2_fsdp2_tensor2'] = 'ok'
    except Exception:  # pylint: disable=broad-except
      results['data2_fsdp2_tensor2'] = traceback.format_exc()[-2000:]
  print(json.dumps(results))


if __name__ == '__main__':
  main()
