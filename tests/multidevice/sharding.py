"""One train step on 8 fake CPU devices under several meshes == the same step on one device.

Run by sharding_test.py in a subprocess. Prints one JSON line {check: 'ok' | failure}.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice/sharding.py
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
import numpy as np
from jax.sharding import PartitionSpec as P

from configs import tiny
from tests.conftest import shrink
from tests.multidevice import all_gather_shapes, path_specs
from vdit_jax.data import pipeline
from vdit_jax.train import loop
from vdit_jax.train import state as state_lib

MESHES = {
    'data8': dict(data=8),
    'fsdp8': dict(fsdp=8),
    'data2_fsdp2_tensor2': dict(data=2, fsdp=2, tensor=2),
    'data2_seq4_all_gather': dict(data=2, sequence=4),
    'data2_seq4_ring': dict(data=2, sequence=4),
    'data2_seq4_ulysses': dict(data=2, sequence=4),
    # train.optimizer='muon': Newton-Schulz on fsdp- and tensor-sharded block matrices;
    # with model.self_condition: the loss's first pass under lax.cond, on sharded
    # activations (one mesh for both: each is a compile of its own on 8 and 1 devices).
    'data2_fsdp2_tensor2_muon_selfcond': dict(data=2, fsdp=2, tensor=2),
}
STEPS = 2
# x0 output's loss weighs clean-end x0 errors by up to 1/0.05^2 = 400, so a sum in another
# order moves it by more: 1.3e-5 relative on data2_seq4_all_gather (configs/tiny.py, 2026-12-06).
TOL = dict(rtol=3e-5, atol=1e-6)

# Logical names -> mesh axes under the default rules, for every parameter path.
EMBED, MLP, HEADS = 'fsdp', 'tensor', 'tensor'
EXPECTED_PARAM_SPECS = {
    'patch_embed/proj/kernel': P(None, EMBED),
    'patch_embed/proj/bias': P(EMBED),
    't_embed/mlp_in/kernel': P(None, EMBED),
    't_embed/mlp_in/bias': P(EMBED),
    't_embed/mlp_out/kernel': P(MLP, EMBED),
    't_embed/mlp_out/bias': P(EMBED),
    'y_embed/table/embedding': P(None, EMBED),
    'loss_logvar/proj/kernel': P(None, None),  # model.loss_uncertainty: replicated
    'loss_logvar/proj/bias': P(None),
    'blocks/adaln/proj/kernel': P(None, EMBED, None),
    'blocks/adaln/proj/bias': P(None, None),
    'blocks/attn/query_kernel': P(None, EMBED, HEADS, None),
    'blocks/attn/key_kernel': P(None, EMBED, HEADS, None),
    'blocks/attn/value_kernel': P(None, EMBED, HEADS, None),
    'blocks/attn/query_bias': P(None, HEADS, None),
    'blocks/attn/key_bias': P(None, HEADS, None),
    'blocks/attn/value_bias': P(None, HEADS, None),
    'blocks/attn/q_norm/scale': P(None, None),
    'blocks/attn/k_norm/scale': P(None, None),
    'blocks/attn/out_kernel': P(None, HEADS, None, EMBED),
    'blocks/attn/out_bias': P(None, EMBED),
    'blocks/mlp/conv/kernel': P(None, None, None, None, EMBED),  # model.mlp_conv taps
    'blocks/mlp/fc1/kernel': P(None, EMBED, MLP),
    'blocks/mlp/fc1/bias': P(None, MLP),
    'blocks/mlp/fc2/kernel': P(None, MLP, EMBED),
    'blocks/mlp/fc2/bias': P(None, EMBED),
    'final/adaln/proj/kernel': P(EMBED, None),
    'final/adaln/proj/bias': P(None),
    'final/proj/kernel': P(EMBED, None),
    'final/proj/bias': P(None),
    # model.class_tokens: the label's tokens and the cross-attention that reads them.
    'y_tokens/table': P(None, None, EMBED),
    # model.refiner_width (set below): the pixel refiner's kernels are replicated.
    'refiner/adaln/proj/kernel': P(EMBED, None),
    'refiner/adaln/proj/bias': P(None),
    'refiner/in_kernel': P(None, None, None, None, None),
    'refiner/in_bias': P(None),
    'refiner/out_kernel': P(None, None, None, None, None),
    'refiner/out_bias': P(None),
    **{f'blocks/cross_attn/attn/{k}_kernel': P(None, EMBED, HEADS, None)
       for k in ('query', 'key', 'value')},
    **{f'blocks/cross_attn/attn/{k}_bias': P(None, HEADS, None)
       for k in ('query', 'key', 'value')},
    'blocks/cross_attn/attn/q_norm/scale': P(None, None),
    'blocks/cross_attn/attn/k_norm/scale': P(None, None),
    'blocks/cross_attn/attn/out_kernel': P(None, HEADS, None, EMBED),
    'blocks/cross_attn/attn/out_bias': P(None, EMBED),
}


def config_for(name=None):
  config = shrink(
      tiny.get_config(), small=('model', 'data'),
      model=dict(width=32, depth=2, num_heads=4, mlp_dim=64,
                 patch_size=(2, 4, 4),  # 4 x 16 x 16 clip -> 32 tokens
                 refiner_width=8),      # its pixel convolutions on every mesh too
      train=dict(batch_size=8, warmup_steps=0,  # a real update on the first step
                 learning_rate=1e-3),
      mesh=dict(data=1))
  if name is not None:
    config.mesh.update(MESHES[name])
    if 'seq4_' in name:
      config.model.sequence_parallel = name.split('seq4_')[1]
  if name is not None and '_muon' in name:
    config.train.optimizer = 'muon'
  if name is not None and name.endswith('_selfcond'):
    config.model.self_condition = True
  return config


def run(config, devices):
  s = loop.build(config, None, devices=devices)
  state, shardings = state_lib.create_state(s.init_fn, jax.random.key(0), s.mesh, s.rules)
  data = pipeline.make_dataset(config.data, config.train.batch_size, seed=0,
                               process_index=0, process_count=1)
  losses = []
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    for i in range(STEPS):
      batch = loop.global_batch(next(data), s.mesh, s.rules)
      if i == 0:  # compile once, keep the executable: its HLO is checked, and it runs
        step = loop.jit_train_step(s).lower(state, batch, jax.random.key(1)).compile()
        hlo = step.as_text()
      state, metrics = step(state, batch, jax.random.key(1))
      losses.append(float(metrics['loss']))
  return s, state, shardings, losses, hlo


def check_ring_step(config, hlo):
  """The compiled train step passes K/V blocks round the ring and never gathers a full
  K/V [B/data, N, K, Dh] (here [4, 32, 4, 8])."""
  assert 'collective-permute' in hlo, 'no collective-permute in the ring train step'
  pt, ph, pw = config.model.patch_size
  tokens = (config.data.num_frames // pt) * (config.data.height // ph) * (
      config.data.width // pw)
  heads = config.model.num_heads
  full_kv = (config.train.batch_size // config.mesh.data, tokens, heads,
             config.model.width // heads)
  gathered = all_gather_shapes(hlo)
  assert full_kv not in gathered, f'full K/V {full_kv} all-gathered: {gathered}'


def main(argv):
  """argv[1:]: the meshes to check (default: all of MESHES)."""
  results = {}
  devices = jax.devices()
  assert len(devices) == 8, devices
  refs = {}
  for name in argv[1:] or MESHES:
    try:
      config = config_for(name)
      optimizer = config.train.optimizer
      recipe = (optimizer, config.model.self_condition)
      if recipe not in refs:  # the one-device run with the same optimizer and model
        one = config_for()
        one.train.optimizer, one.model.self_condition = recipe
        _, ref_state, _, ref_losses, _ = run(one, devices[:1])
        refs[recipe] = ref_losses, jax.device_get(ref_state.params)
      ref_losses, ref_params = refs[recipe]
      s, state, shardings, losses, hlo = run(config, devices)
      np.testing.assert_allclose(losses, ref_losses, **TOL)
      params = jax.device_get(state.params)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), params, ref_params)
      # The state really lives on the mesh as planned.
      specs = path_specs(shardings.params)
      assert specs == EXPECTED_PARAM_SPECS, {k: (v, EXPECTED_PARAM_SPECS.get(k))
                                             for k, v in specs.items()
                                             if EXPECTED_PARAM_SPECS.get(k) != v}
      assert path_specs(shardings.ema_params) == EXPECTED_PARAM_SPECS
      if optimizer == 'adamw':
        adam = shardings.opt_state[1][0]  # chain(clip, adamw) -> its ScaleByAdamState
        assert path_specs(adam.mu) == EXPECTED_PARAM_SPECS
        assert path_specs(adam.nu) == EXPECTED_PARAM_SPECS
        assert adam.count.spec == P()
      else:  # Muon's momentum and AdamW's moments are sharded like their params
        specs = path_specs(shardings.opt_state[1])
        muon_mu = {k.split('/mu/', 1)[1]: v for k, v in specs.items() if '/mu/' in k and
                   'muon' in k.split('/mu/')[0]}
        assert muon_mu and all(EXPECTED_PARAM_SPECS[k] == v for k, v in muon_mu.items()), (
            muon_mu)
      assert shardings.step.spec == P()
      leaf = state.params['blocks']['mlp']['fc1']['kernel']
      assert leaf.sharding.spec == P(None, EMBED, MLP), leaf.sharding
      if name.endswith('_ring'):
        check_ring_step(config_for(name), hlo)
      if name.endswith('_all_gather'):  # the oracle above can see a full K/V gather
        gathered = all_gather_shapes(hlo)
        assert (4, 32, 4, 8) in gathered, gathered
      results[name] = 'ok'
    except Exception:  # pylint: disable=broad-except
      results[name] = traceback.format_exc()[-2000:]
  print(json.dumps(results))


if __name__ == '__main__':
  main(sys.argv)
