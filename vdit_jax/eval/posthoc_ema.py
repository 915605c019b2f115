r"""Post-hoc EMA: which averaging of one run's parameters samples best, without retraining.

EDM2 (Karras et al. 2024) found that the EMA length matters as much as the recipe and
that it can be chosen after training from stored snapshots. This is the simple form of
that: keep the raw params every K steps (keep_period), then build any EMA profile as a
weighted sum of the snapshots (each update's weight, from the profile's recursion, goes
to the first snapshot at or after it), sample, and score each with the detector:

  python -m vdit_jax.main --config=configs/tiny.py --workdir=runs/snap \
      --config.checkpoint.every_steps=50 --config.checkpoint.keep_period=50
  python -m vdit_jax.eval.posthoc_ema --config=configs/tiny.py --workdir=runs/snap \
      [--profiles=raw,exp:0.99,exp:0.999,power:0.05,...] [--num_samples=96]

Profiles: `raw` (the last params), `exp:D` (the trainer's EMA with decay D, warmed up as
`step.ema_decay`: min(D, (1 + step) / (10 + step)), so that 0.999 at step 2000 is still
the warm-up's 0.9955, a power-like average of the last ~t/9 steps), `power:S` (EDM2's
power-function EMA of relative width S: decay (1 - 1/u)^(gamma + 1) at update u). Before scoring it rebuilds the run's own EMA
(train.ema_decay) from the snapshots and prints its distance to the stored ema_params
relative to the stored EMA's distance from the raw params: the error of the snapshot
approximation. Each profile is sampled with the same noise and labels as
vdit_jax/eval/learning_curve.py uses, so its scores pair with that harness's. A measurement: it
never fails on a number.
"""

import json

# The repository root, for `python vdit_jax/eval/<name>.py`; `python -m vdit_jax.eval.<name>`
# needs none.

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from vdit_jax.eval import learning_curve
from vdit_jax.data import synthetic
from vdit_jax.parallel import paths
from vdit_jax.train import loop
from vdit_jax.generate import sampling

FLAGS = flags.FLAGS


def define_flags():
  config_flags.DEFINE_config_file('config', None, 'The config the run was trained with.')
  flags.DEFINE_string('workdir', None, 'The run, with its params kept every K steps.')
  flags.DEFINE_list('profiles', ['raw', 'exp:0.98', 'exp:0.99', 'exp:0.999', 'power:0.02',
                                 'power:0.05', 'power:0.1'], 'EMA profiles to build and score.')
  flags.DEFINE_integer('num_samples', 96, 'Clips sampled and scored per profile.')
  flags.DEFINE_float('threshold', 60.0, 'Foreground: distance from the background, 0..255.')
  flags.mark_flags_as_required(['config', 'workdir'])


def power_gamma(sigma_rel: float) -> float:
  """EDM2's exponent gamma of the power-function EMA whose relative std is sigma_rel:
  sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)), solved by bisection."""
  if not 0.0 < sigma_rel < 12 ** -0.5:  # gamma = 0: the uniform average, 1 / sqrt(12)
    raise ValueError(f'power:{sigma_rel}: the relative width must be in (0, {12 ** -0.5:.4f}).')
  f = lambda g: (g + 1) / ((g + 2) ** 2 * (g + 3)) - sigma_rel ** 2
  lo, hi = 0.0, 1e6  # f decreases in gamma >= 0
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
  return 0.5 * (lo + hi)


def decays(profile: str, num_updates: int) -> np.ndarray:
  """d_u for updates u = 1..num_updates, as the trainer applies them (update u reads step
  u - 1: step.ema_decay's warm-up)."""
  u = np.arange(1, num_updates + 1, dtype=np.float64)
  kind, _, value = profile.partition(':')
  if kind == 'exp':
    d = float(value)
    return np.minimum(d, u / (9.0 + u))  # min(d, (1 + step) / (10 + step)), step = u - 1
  if kind == 'power':
    return (1.0 - 1.0 / u) ** (power_gamma(float(value)) + 1.0)
  raise ValueError(f'profile {profile!r}: expected raw, exp:DECAY or power:SIGMA_REL.')


def snapshot_weights(profile: str, snapshots, num_updates: int) -> np.ndarray:
  """Weight of each kept snapshot (steps `snapshots`, ascending, the last = num_updates) in
  the EMA after num_updates updates: update u's weight (1 - d_u) prod_{v > u} d_v goes to
  the first snapshot at or after u; the initial params' weight (prod of all d) to the first."""
  if profile == 'raw':
    w = np.zeros(len(snapshots))
    w[-1] = 1.0
    return w
  d = decays(profile, num_updates)
  later = np.concatenate([np.cumprod(d[::-1])[::-1][1:], [1.0]])  # prod_{v > u} d_v
  per_update = (1.0 - d) * later
  owner = np.searchsorted(np.asarray(snapshots), np.arange(1, num_updates + 1))
  w = np.bincount(owner, weights=per_update, minlength=len(snapshots))
  w[0] += np.prod(d)
  return w


def weighted_sum(trees, weights):
  return jax.tree.map(lambda *leaves: sum(float(w) * leaf for w, leaf in zip(weights, leaves)),
                      *trees)


def tree_norm(tree) -> float:
  return float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))))


def main(_):
  config = FLAGS.config
  if FLAGS.num_samples < 2:
    raise SystemExit(f'--num_samples={FLAGS.num_samples} must be at least 2.')
  for profile in FLAGS.profiles:
    if profile != 'raw':
      decays(profile, 1)  # a bad profile is refused before anything is read
  workdir = paths.normalize(FLAGS.workdir)
  with config.unlocked():
    config.sample.num_samples = FLAGS.num_samples
  s = loop.build(config, workdir)
  try:
    snapshots = sorted(s.checkpointer.all_steps())
    if len(snapshots) < 2:
      raise SystemExit(f'{workdir}/checkpoints holds steps {snapshots}: keep the params every '
                       'K steps (--config.checkpoint.keep_period=K) to build EMAs from them.')
    params = []  # each snapshot's params only: its optimizer state is not kept
    for step in snapshots:
      state = loop.restore_step(s, step)
      params.append(state.params)
    stored = state.ema_params  # the last snapshot's
  finally:
    s.checkpointer.close()
  last = snapshots[-1]
  own = f'exp:{config.train.ema_decay}'
  rebuilt = weighted_sum(params, snapshot_weights(own, snapshots, last))
  diff = jax.tree.map(lambda a, b: a - b, rebuilt, stored)
  span = jax.tree.map(lambda a, b: a - b, params[-1], stored)
  check = {'profile': own, 'snapshots': len(snapshots), 'every': snapshots[1] - snapshots[0],
           'rebuilt_vs_stored_ema': tree_norm(diff) / tree_norm(span)}
  print(json.dumps({'approximation': check}), flush=True)

  labels = None
  if config.model.conditioning == 'class':
    labels = np.asarray(sampling.sample_labels(FLAGS.num_samples, synthetic.NUM_CLASSES))
  rng = jax.random.key(config.sample.seed)
  results = []
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    sample_fn, condition = loop.jit_sampler(s)
    for profile in FLAGS.profiles:
      w = snapshot_weights(profile, snapshots, last)
      averaged = weighted_sum(params, w)
      videos = np.asarray(jax.block_until_ready(sample_fn(averaged, rng, condition)),
                          np.float32)[..., :3]
      results.append({'profile': profile, 'step': last,
                      'weight_in_last_500': round(float(w[np.asarray(snapshots) > last - 500]
                                                        .sum()), 4),
                      **learning_curve.score(videos, labels, FLAGS.threshold)})
      print(json.dumps(results[-1]), flush=True)
  print(json.dumps({'num_samples': FLAGS.num_samples, 'approximation': check,
                    'profiles': results}))


if __name__ == '__main__':
  define_flags()
  app.run(main)
