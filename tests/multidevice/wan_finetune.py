"""Full fine-tuning from a Wan folder (train.init_from) on 8 fake CPU devices, mesh fsdp=8,
== one device: the same step-0 params, read straight into their fsdp shardings, and the
same first-step loss and gradient norm.

Run by wan_finetune_test.py in a subprocess (the Wan folder and latent shards it made are
the arguments). Prints one JSON line {check: 'ok' | failure}.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice/wan_finetune.py \
      WAN_FOLDER LATENTS
"""

import json
import os
import sys
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..')))

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import numpy as np

from tests import multidevice
from tests import wan_finetune_test
from vdit_jax.data import captions as captions_lib
from vdit_jax.data import pipeline
from vdit_jax.train import loop

TOL = dict(rtol=1e-5, atol=0)
BATCH = 8  # the batch splits over fsdp=8


def run(config, devices, workdir):
  """(step-0 params on the host, their shardings, first step's metrics) on `devices`."""
  s = loop.build(config, workdir, devices=devices)
  try:
    state, latest = loop.restore_or_init(s)
  finally:
    s.checkpointer.close()
  assert latest is None, latest
  params = jax.device_get(state.params)
  shardings = jax.tree.map(lambda x: x.sharding, state.params)
  data = pipeline.make_dataset(config.data, BATCH, seed=0, process_index=0, process_count=1,
                               captions=captions_lib.from_config(s.config))
  step = loop.jit_train_step(s)
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    _, metrics = step(state, loop.global_batch(next(data), s.mesh, s.rules), jax.random.key(1))
  metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
  return s, params, shardings, metrics


def main():
  folder, latents = sys.argv[1:3]
  devices = jax.devices()
  assert len(devices) == 8, devices
  results = {check: 'not run' for check in wan_finetune_test.FSDP_CHECKS}
  config = wan_finetune_test.tiny_wan_config(folder, latents, init_from=folder,
                                             batch_size=BATCH)
  with tempfile.TemporaryDirectory() as tmp:
    _, ref_params, _, ref_metrics = run(config, devices[:1], os.path.join(tmp, 'one'))
    config.mesh.update(dict(data=1, fsdp=8, tensor=1, sequence=1))
    s, params, shardings, metrics = run(config, devices, os.path.join(tmp, 'fsdp8'))

  def born_sharded():
    assert dict(s.mesh.shape)['fsdp'] == 8, s.mesh.shape
    assert jax.tree.structure(shardings) == jax.tree.structure(s.state_shardings.params)
    for param, got, want in zip(jax.tree.leaves(params), jax.tree.leaves(shardings),
                                jax.tree.leaves(s.state_shardings.params)):
      assert got.is_equivalent_to(want, param.ndim), (got, want)
    fc1 = shardings['blocks']['mlp']['fc1']['kernel']  # [L, D, F]: D over fsdp
    assert 'fsdp' in jax.tree.leaves(tuple(fc1.spec)), fc1

  def same_step():
    np.testing.assert_allclose(metrics['loss'], ref_metrics['loss'], **TOL)
    np.testing.assert_allclose(metrics['grad_norm'], ref_metrics['grad_norm'], **TOL)
    assert np.isfinite(metrics['loss']), metrics

  multidevice.outcomes({
      'step0_params_equal': lambda: jax.tree.map(np.testing.assert_array_equal, params,
                                                 ref_params),
      'params_born_sharded_over_fsdp': born_sharded,
      'first_step_loss_matches': same_step}, results)
  print(json.dumps(results))


if __name__ == '__main__':
  main()
