r"""At which noise level does a trained model decide a clip's shape and direction?

python -m vdit_jax.eval.finish_from_noise --config=configs/tiny.py --workdir=runs/tiny \
    [--num_clips=16] [--config.x.y=... as the run was trained]

Noises held-out clips of the config's synthetic data to a start step t0 (the same noise for
every t0), then runs DDIM with the config's guidance from t0 down to 0 (25 steps, each
clip with its own label), and scores the results with `vdit_jax.eval.detect` as the
learning curve does: one object per frame, the shape fit (IoU with the ideal shape, and the
share of crisp clips) and whether the detected shape and direction are the label's. From
a low t0 the clip's own layout is still visible, so the scores say how well the model
finishes a shape it is given; the t0 where the accuracies fall to chance is where the
model, not the data, has to decide. Discrete objectives (eps, v); a measurement that never
fails on a number. One JSON line per t0.
"""

import json

# The repository root, for `python vdit_jax/eval/<name>.py`; `python -m vdit_jax.eval.<name>`
# needs none.

from absl import app, flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from vdit_jax import modes

from vdit_jax.data import synthetic
from vdit_jax.diffusion import samplers
from vdit_jax.eval import detect
from vdit_jax.train import loop

FLAGS = flags.FLAGS
START_STEPS = (300, 500, 700, 850, 950)


def define_flags():
  config_flags.DEFINE_config_file('config', None, 'The config the run was trained with.')
  flags.DEFINE_string('workdir', None, 'The run: its checkpoints.')
  flags.DEFINE_integer('num_clips', 16, 'Held-out clips per start step.')
  flags.DEFINE_integer('num_steps', 25, 'DDIM steps from t0 to 0.')
  flags.mark_flags_as_required(['config', 'workdir'])


def ddim_from(d, predict, z, t0: int, num_steps: int):
  """Deterministic DDIM (x0 clipped to [-1, 1]) from z at step t0 to x0."""
  ts = np.unique(np.linspace(t0, 0, num_steps + 1).round().astype(int))[::-1]  # t0 .. 0
  batch = z.shape[0]
  for t, t_next in zip(ts[:-1], ts[1:]):
    t_vec = jnp.full((batch,), t, jnp.int32)
    x0_hat, _ = d.pred_to_x0_eps(z, predict(d.model_input(z, t_vec), d.model_t(t_vec)), t_vec)
    x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
    if t_next == 0:
      return x0_hat
    eps_hat = d.eps_from_x0(z, x0_hat, t_vec)
    a, b = d._coefs(jnp.full((batch,), t_next, jnp.int32))  # pylint: disable=protected-access
    z = a[:, None, None, None, None] * x0_hat + b[:, None, None, None, None] * eps_hat
  return z


def main(_):
  config = FLAGS.config
  if config.data.source != 'synthetic' or config.model.conditioning != 'class':
    raise SystemExit('finish_from_noise reads class-conditioned models of the synthetic data.')
  if config.diffusion.objective == 'flow':
    raise SystemExit('finish_from_noise runs DDIM: use a discrete objective (eps or v).')
  s = loop.build(config, FLAGS.workdir)
  try:  # the params --mode=sample reads (EMA unless sample.use_ema=False)
    params, step, _ = modes.params_to_sample(
        s, FLAGS.workdir, None)
  finally:
    s.checkpointer.close()
  d, n = s.diffusion, FLAGS.num_clips
  held_out = synthetic.from_data_config(config.data, num_examples=n, seed=10_000 + config.seed)
  x0 = jnp.asarray(np.stack([held_out[i]['video'] for i in range(n)]).astype(np.float32)
                   / 127.5 - 1.0)
  labels = np.array([held_out[i]['label'] for i in range(n)], np.int32)
  model_fn = lambda z, t, y: s.model.apply({'params': params}, z, t, y)
  predict = jax.jit(lambda z, t: samplers.guided_prediction(
      model_fn, z, t, jnp.asarray(labels), cfg_scale=config.sample.cfg_scale,
      null_label=synthetic.NUM_CLASSES))
  noise = jax.random.normal(jax.random.key(0), x0.shape)
  for t0 in START_STEPS:
    z = d.corrupt(x0, noise, jnp.full((n,), t0, jnp.int32))
    clips = np.asarray(ddim_from(d, predict, z, t0, FLAGS.num_steps))
    scores = [detect.coherence(c) for c in clips]
    shape, direction = detect.label_hits(clips, labels)
    print(json.dumps({'step': step, 't0': t0, **{
        k: round(float(np.mean([c[k] for c in scores])), 3)
        for k in ('one_object', 'empty', 'shape_iou', 'crisp')},
        'shape_accuracy': round(float(shape.mean()), 3),
        'direction_accuracy': round(float(direction.mean()), 3)}), flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
