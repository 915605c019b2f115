r"""Per-timestep error of a trained model, and how its samples saturate.

python -m vdit_jax.eval.denoise_error --config=configs/tiny.py --workdir=runs/tiny \
    [--image=/tmp/x0.png] [--probe]

Restores the newest checkpoint in WORKDIR, noises a batch of real clips at
several t, and prints the objective's prediction MSE and the clipped x0-estimate
MSE (EMA params); then samples with each sampler the objective allows, with and
without x0 clipping, and prints the fraction of pixels at |x| > 0.98 (real clips
have none). A diagnostic, not a timing: it never fails on a number.

--image writes a PNG grid to look at: per clip, frames 0 and T/2; row 0 the clean
clip, then for each t the noised input and the model's x0 estimate.
--probe measures how far the model's prediction reaches (at t = 90% of the range):
the mean change of the prediction at the last tubelet, elsewhere, and at the first
tubelet when +3 is added to the last tubelet's input; and the change at the first
tubelet when every other tubelet's input moves by +0.5 (a clip-wide cue that only
attention can carry there).
"""

import json

# The repository root, for `python vdit_jax/eval/<name>.py`; `python -m vdit_jax.eval.<name>`
# needs none.

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vdit_jax.config import validate
from vdit_jax.data import pipeline
from vdit_jax.diffusion import samplers
from vdit_jax.train import loop, state as state_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'configs/*.py file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Workdir holding checkpoints/.')
flags.DEFINE_integer('batch', 4, 'Real clips / samples to use.')
flags.DEFINE_string('image', None, 'Write the clean / noised / x0-estimate grid here (PNG).')
flags.DEFINE_bool('probe', False, 'Also measure how far a change of the input reaches.')


def _grid_image(x0, rows, path):
  """Clean frames on top, then (noised, x0 estimate) row pairs; frames 0 and T/2 per clip."""
  from PIL import Image  # Pillow comes with the [video] extra

  def img(v):  # [H, W, C] in [-1, 1] -> uint8
    return np.clip((np.asarray(v, np.float32)[..., :3] + 1.0) * 127.5, 0, 255).astype(np.uint8)

  b, t_len, h, w = x0.shape[:4]
  frames = (0, t_len // 2)
  pad = 2
  canvas = np.full(((2 * len(rows) + 1) * (h + pad), b * len(frames) * (w + pad), 3), 255,
                   np.uint8)
  for i in range(b):
    for j, f in enumerate(frames):
      col = (i * len(frames) + j) * (w + pad)
      panels = [x0[i, f]] + [v[i, f] for z, xh in rows for v in (z, xh)]
      for r, panel in enumerate(panels):
        canvas[r * (h + pad):r * (h + pad) + h, col:col + w] = img(panel)
  Image.fromarray(canvas).resize((canvas.shape[1] * 3, canvas.shape[0] * 3),
                                 Image.NEAREST).save(path)


def _t_batch(d, t_value, batch):
  """[batch] copies of one timestep, in the dtype the objective's t has."""
  return jnp.full((batch,), t_value, jnp.float32 if d.is_flow else jnp.int32)


def _probe(apply, params, d, x0, labels, patch):
  """How far changes of the input reach in the prediction (see the module doc)."""
  pt, ph, pw = patch
  t_value = 0.9 if d.is_flow else int(0.9 * d.num_timesteps)
  t = _t_batch(d, t_value, x0.shape[0])
  t_model = d.model_t(t)
  z = d.corrupt(x0, jax.random.normal(jax.random.key(2), x0.shape), t)
  base = apply(params, d.model_input(z, t), t_model, labels)
  change = jnp.abs(apply(params, d.model_input(z.at[:, -pt:, -ph:, -pw:].add(3.0), t),
                         t_model, labels) - base).mean(axis=(0, 4))  # [T, H, W]
  t_len, h, w = x0.shape[1:4]
  per_tubelet = change.reshape(t_len // pt, pt, h // ph, ph, w // pw, pw).mean(axis=(1, 3, 5))
  last = float(per_tubelet[-1, -1, -1])
  others = float((per_tubelet.sum() - last) / (per_tubelet.size - 1))
  shifted = (z + 0.5).at[:, :pt, :ph, :pw].set(z[:, :pt, :ph, :pw])
  first = jnp.abs(apply(params, d.model_input(shifted, t), t_model, labels)
                  - base)[:, :pt, :ph, :pw]
  print(json.dumps({'probe_t': t_value, 'last_tubelet_change': last,
                    'mean_change_elsewhere': others,
                    'first_tubelet_change': float(per_tubelet[0, 0, 0]),
                    'first_tubelet_change_when_others_shift': float(first.mean())}))


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
  grid = ([0.01, 0.1, 0.3, 0.5, 0.7, 0.85, 0.95, 1.0] if d.is_flow
          else [10, 100, 300, 500, 700, 850, 950, 999])
  for t_value in grid:
    t = _t_batch(d, t_value, x0.shape[0])
    z = d.corrupt(x0, noise, t)
    pred = apply(params, d.model_input(z, t), d.model_t(t), labels)
    x0_hat, _ = d.pred_to_x0_eps(z, pred, t)
    row = {'t': t_value,
           'pred_mse': float(jnp.mean((pred - d.output_target(x0, noise, t)) ** 2)),
           'x0_mse': float(jnp.mean((jnp.clip(x0_hat, -1, 1) - x0) ** 2))}
    rows.append((z, x0_hat))
    print(json.dumps(row))
  if FLAGS.image:
    _grid_image(np.asarray(x0), [(np.asarray(z), np.asarray(xh)) for z, xh in rows], FLAGS.image)
    print(json.dumps({'image': FLAGS.image}))
  if FLAGS.probe:
    _probe(apply, params, d, x0, labels, s.model.spec.patch_size)
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
