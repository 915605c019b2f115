r"""How much a class-conditioned model uses its label, against how much the data says it can.

python -m vdit_jax.eval.label_use --config=configs/tiny.py --workdir=runs/tiny \
    [--step=N] [--num_clips=32] [--config.x.y=... as the run was trained]

For held-out clips of the config's synthetic data, noised at several t, prints the x0-estimate
MSE of the model (EMA params of the newest checkpoint, or --step) given each clip's own
label, the label with the direction turned a quarter (`wrong_direction`), with the next shape
(`wrong_shape`), and the null label. A model that uses a part of the label loses accuracy when
that part is wrong. The reference is the data's own: at the noisiest step the best estimate
of x0 is the mean clip of the label, so the mean clips of 2048 training clips per
label set what the label can buy there (`data_best`: each clip against its own label's mean
clip, and against the wrong direction's / shape's, and against the mean of all clips).
A measurement: it never fails on a number. One JSON line per row.
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
from vdit_jax.train import loop

FLAGS = flags.FLAGS
N_DIR = len(synthetic.DIRECTIONS)


def define_flags():
  config_flags.DEFINE_config_file('config', None, 'The config the run was trained with.')
  flags.DEFINE_string('workdir', None, 'The run: its checkpoints.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')
  flags.DEFINE_integer('num_clips', 32, 'Held-out clips, each noised 4 times per t.')
  flags.mark_flags_as_required(['config', 'workdir'])


def wrong_direction(labels):
  """The same shape, the direction one step on in synthetic.DIRECTIONS."""
  return (labels // N_DIR) * N_DIR + (labels % N_DIR + 1) % N_DIR


def wrong_shape(labels):
  """The same direction, the next shape in synthetic.SHAPES."""
  n_shapes = len(synthetic.SHAPES)
  return ((labels // N_DIR + 1) % n_shapes) * N_DIR + labels % N_DIR


def data_best(data_cfg, clips, labels, num_train: int = 2048) -> dict:
  """MSE of each clip [N, T, H, W, C] in [-1, 1] against its label's mean clip (and the wrong
  ones', and the mean of all clips), the means taken over `num_train` training clips."""
  source = synthetic.from_data_config(data_cfg, num_examples=num_train,
                                      seed=data_cfg.source_seed)
  train = [source[i] for i in range(num_train)]
  x = np.stack([e['video'] for e in train]).astype(np.float32) / 127.5 - 1.0
  y = np.array([e['label'] for e in train])
  means = np.stack([x[y == k].mean(0) for k in range(synthetic.NUM_CLASSES)])
  err = lambda m: float(np.mean((clips - m) ** 2))
  return {'own_label': err(means[labels]), 'wrong_direction': err(means[wrong_direction(labels)]),
          'wrong_shape': err(means[wrong_shape(labels)]), 'no_label': err(x.mean(0))}


def main(_):
  config = FLAGS.config
  if config.data.source != 'synthetic' or config.model.conditioning != 'class':
    raise SystemExit('label_use reads class-conditioned models of the synthetic data '
                     f'(data.source={config.data.source!r}, '
                     f'model.conditioning={config.model.conditioning!r}).')
  s = loop.build(config, FLAGS.workdir)
  try:  # the params --mode=sample reads (EMA unless sample.use_ema=False)
    params, step, _ = modes.params_to_sample(
        s, FLAGS.workdir, None, FLAGS.step)
  finally:
    s.checkpointer.close()
  d = s.diffusion
  held_out = synthetic.from_data_config(config.data, num_examples=FLAGS.num_clips,
                                        seed=10_000 + config.seed)
  examples = [held_out[i] for i in range(FLAGS.num_clips)]
  x0 = jnp.asarray(np.stack([e['video'] for e in examples]).astype(np.float32) / 127.5 - 1.0)
  labels = np.array([e['label'] for e in examples], np.int32)
  null = np.full_like(labels, synthetic.NUM_CLASSES)
  apply = jax.jit(lambda p, z, t, y: s.model.apply({'params': p}, z, t, y))
  grid = ([0.3, 0.5, 0.7, 0.9, 1.0] if d.is_flow
          else [300, 500, 700, 900, d.num_timesteps - 1])
  for t_value in grid:
    t = jnp.full((FLAGS.num_clips,), t_value, jnp.float32 if d.is_flow else jnp.int32)
    row = {'step': step, 't': t_value}
    for name, y in (('own_label', labels), ('wrong_direction', wrong_direction(labels)),
                    ('wrong_shape', wrong_shape(labels)), ('no_label', null)):
      errs = []
      for k in range(4):
        z = d.corrupt(x0, jax.random.normal(jax.random.key(k), x0.shape), t)
        x0_hat, _ = d.pred_to_x0_eps(z, apply(params, d.model_input(z, t), d.model_t(t),
                                                jnp.asarray(y)), t)
        errs.append(float(jnp.mean((jnp.clip(x0_hat, -1, 1) - x0) ** 2)))
      row[name] = round(float(np.mean(errs)), 5)
    print(json.dumps(row), flush=True)
  best = data_best(config.data, np.asarray(x0), labels)
  print(json.dumps({'data_best': {k: round(v, 5) for k, v in best.items()}}))


if __name__ == '__main__':
  define_flags()
  app.run(main)
