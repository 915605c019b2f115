r"""Per-timestep error of a trained model, and how its samples saturate.

python bench/denoise_error.py --config=configs/tiny.py --workdir=runs/tiny

Restores the newest checkpoint in WORKDIR, noises a batch of real clips at
several t, and prints the objective's prediction MSE and the clipped x0-estimate
MSE (EMA params); then samples with each sampler the objective allows, with and
without x0 clipping, and prints the fraction of pixels at |x| > 0.98 (real clips
have none). A diagnostic, not a timing: it never fails on a number.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vdit_jax import validate
from vdit_jax.data import pipeline
from vdit_jax.diffusion import samplers
from vdit_jax.train import loop, state as state_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'configs/*.py file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Workdir holding checkpoints/.')
flags.DEFINE_integer('batch', 4, 'Real clips / samples to use.')


def main(_):
  config = FLAGS.config
  s = loop.build(config, FLAGS.workdir)
  step = s.checkpointer.latest_step()
  if step is None:
    raise SystemExit(f'no checkpoint in {s.checkpointer.directory}')
  state = s.checkpointer.restore(
      step, state_lib.abstract_with_shardings(s.abstract_state, s.state_shardings))
  params, d = state.ema_params, s.diffusion
  batch = next(pipeline.make_dataset(config.data, FLAGS.batch, seed=0))
  x0, labels = jnp.asarray(batch['video']), jnp.asarray(batch['label'])
  apply = jax.jit(lambda p, z, t, y: s.model.apply({'params': p}, z, t, y))
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  rows = []
  grid = [0.01, 0.1, 0.5, 0.9, 0.99, 1.0] if d.is_flow else [10, 100, 500, 900, 990, 999]
  for t_value in grid:
    t = jnp.full((x0.shape[0],), t_value, jnp.float32 if d.is_flow else jnp.int32)
    z = d.corrupt(x0, noise, t)
    pred = apply(params, z, d.model_t(t), labels)
    x0_hat, _ = d.pred_to_x0_eps(z, pred, t)
    row = {'t': t_value,
           'pred_mse': float(jnp.mean((pred - d.target(x0, noise, t)) ** 2)),
           'x0_mse': float(jnp.mean((jnp.clip(x0_hat, -1, 1) - x0) ** 2))}
    rows.append(row)
    print(json.dumps(row))
  shape = (FLAGS.batch,) + x0.shape[1:]
  model_fn = lambda z, t, y: apply(params, z, t, y)
  for sampler in validate.OBJECTIVE_SAMPLERS[d.objective]:
    for clip in (True, False):
      out = np.asarray(samplers.sample(d, model_fn, jax.random.key(3), shape, labels,
                                       sampler=sampler, num_steps=config.sample.num_steps,
                                       clip_x0=clip))
      print(json.dumps({'sampler': sampler, 'clip_x0': clip,
                        'saturated_fraction': float(np.mean(np.abs(out) > 0.98)),
                        'mean': float(np.nanmean(out))}))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
