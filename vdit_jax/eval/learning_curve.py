r"""Quality against training compute: the detector's scores at every kept checkpoint of a run.

Train once, keeping a checkpoint at each point of the curve (keep_period keeps them
whatever checkpoint.keep says), then score them all:

  python -m vdit_jax.main --config=configs/tiny.py --workdir=runs/curve \
      --config.checkpoint.every_steps=300 --config.checkpoint.keep_period=300
  python vdit_jax/eval/learning_curve.py --config=configs/tiny.py --workdir=runs/curve \
      [--num_samples=24] [--config.x.y=... as the run was trained]

For each checkpoint step, samples --num_samples clips from its params with the config's
sampler (the same noise and labels at every step, so the points differ only by the
params), and scores each clip with `vdit_jax.eval.detect`: the coherence scores (one
object per frame, empty frames, IoU frame to frame) and, for class-conditioned models,
whether the detected shape and direction are the label's. Each point has the mean and
its standard error over the clips, and its position on two axes that compare any two
recipes: training FLOPs (analytic, `vdit_jax.model.flops`, steps x the step's count) and
wall-clock seconds (`wall_s` of the run's metrics.jsonl at that step; only comparable
between runs on the same machine). One JSON line per point, then one with all of them.
A measurement: it never fails on a number.
"""

import json

from absl import app, flags
from ml_collections import config_flags
import numpy as np

from vdit_jax import modes

from vdit_jax.config import resolve
from vdit_jax.data import synthetic
from vdit_jax.model import spec as spec_lib
from vdit_jax.model import flops as flops_lib
from vdit_jax.parallel import paths
from vdit_jax.eval import detect
from vdit_jax.train import checkpoint as ckpt_lib
from vdit_jax.train import metrics as metrics_lib
from vdit_jax.generate import sampling

FLAGS = flags.FLAGS


def define_flags():
  """The command line's flags; defined when run as a script only, so that tests can import
  the functions here beside other modules that define --config."""
  config_flags.DEFINE_config_file('config', None, 'The config the run was trained with.')
  flags.DEFINE_string('workdir', None, 'The run: its checkpoints and metrics.jsonl.')
  flags.DEFINE_integer('num_samples', 24, 'Clips sampled and scored at each checkpoint.')
  flags.DEFINE_float('threshold', 60.0, 'Foreground: distance from the background, 0..255.')
  flags.DEFINE_list('steps', [], 'Score only these kept steps (default: all of them).')
  flags.mark_flags_as_required(['config', 'workdir'])


def mean_and_error(values) -> dict:
  """{'mean', 'stderr'} of per-clip values (NaN ones left out; stderr 0 for one value)."""
  v = np.asarray(values, np.float64)
  v = v[np.isfinite(v)]
  if not len(v):
    return {'mean': None, 'stderr': None}
  err = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
  return {'mean': round(float(v.mean()), 4), 'stderr': round(err, 4)}


def judge(videos, threshold: float = 60.0, **hits) -> dict:
  """{score: mean_and_error} over the clips [N, T, H, W, 3]: detect.coherence's scores of
  each clip, then each of `hits` (name=[N] per-clip values, e.g. whether the detected
  shape is the asked one)."""
  per_clip = [detect.coherence(v, threshold) for v in videos]
  out = {k: mean_and_error([c[k] for c in per_clip]) for k in per_clip[0]}
  out.update({k: mean_and_error(v) for k, v in hits.items()})
  return out


def score(videos, labels, threshold: float) -> dict:
  """Per score, its mean and standard error over the clips [N, T, H, W, 3]; `labels`
  None for models without class labels."""
  if labels is None:
    return judge(videos, threshold)
  shape, direction = detect.label_hits(videos, labels, threshold)
  # The goal is per shape: each class's shape accuracy over the clips asking for it.
  asked = np.asarray(labels) // len(synthetic.DIRECTIONS)
  per_shape = {f'shape_accuracy_{name}': np.where(asked == i, shape, np.nan)
               for i, name in enumerate(synthetic.SHAPES)}
  return judge(videos, threshold, shape_accuracy=shape, direction_accuracy=direction,
               **per_shape)


def wall_s_by_step(metrics_path: str) -> dict:
  """{step: wall_s} of the newest record of each logged step (a resumed run logs the
  re-run steps again; its wall clock restarts)."""
  return {r['step']: r.get('wall_s') for r in metrics_lib.read_metrics(metrics_path)}


def curve_point(step: int, step_flops: int, wall_s: dict, scores: dict) -> dict:
  logged = [s for s in wall_s if s <= step]
  return {'step': step, 'train_flops': step * step_flops,
          'wall_s': wall_s[max(logged)] if logged else None, **scores}


def main(_):
  config = resolve.complete(FLAGS.config)  # every default from config/defaults.py
  if FLAGS.num_samples < 2:
    raise SystemExit(f'--num_samples={FLAGS.num_samples} must be at least 2 (a standard '
                     'error needs two clips).')
  if config.data.source != 'synthetic' or config.data.latents:
    raise SystemExit(f'data.source={config.data.source!r}: the detector reads clips of one '
                     'shape on a dark background: train on the synthetic data.')
  workdir = paths.normalize(FLAGS.workdir)
  if not paths.isdir(paths.join(workdir, 'checkpoints')):
    raise SystemExit(f'no checkpoints folder in --workdir={workdir}: train first, with '
                     '--config.checkpoint.keep_period set to keep the curve\'s points.')
  checkpointer = ckpt_lib.Checkpointer(paths.join(workdir, 'checkpoints'), keep=1,
                                       every_steps=1)
  try:
    steps = sorted(checkpointer.all_steps())
  finally:
    checkpointer.close()
  if not steps:
    raise SystemExit(f'no checkpoint in {workdir}/checkpoints: train first, with '
                     '--config.checkpoint.keep_period set to keep the curve\'s points.')
  if FLAGS.steps:
    wanted = sorted({int(v) for v in FLAGS.steps})
    missing = [v for v in wanted if v not in steps]
    if missing:
      raise SystemExit(f'--steps={",".join(FLAGS.steps)}: {missing} not kept in {workdir}; '
                       f'kept: {steps}.')
    steps = wanted
  d = config.data
  step_flops = flops_lib.train_step_flops(
      spec_lib.from_config(config.model), (d.num_frames, d.height, d.width, d.channels),
      config.train.batch_size).total
  wall_s = wall_s_by_step(paths.join(workdir, 'metrics.jsonl'))
  with config.unlocked():
    config.sample.num_samples = FLAGS.num_samples
  labels = None
  if config.model.conditioning == 'class':
    # --mode=sample cycles the labels through the classes (sampling.sample_labels).
    labels = np.asarray(sampling.sample_labels(FLAGS.num_samples, synthetic.NUM_CLASSES))
  points = []
  for step in steps:
    videos, _ = modes.sample(config, workdir, step=step)
    videos = np.asarray(videos, np.float32)[..., :3]
    points.append(curve_point(step, step_flops, wall_s, score(videos, labels,
                                                              FLAGS.threshold)))
    print(json.dumps(points[-1]), flush=True)
  print(json.dumps({'num_samples': FLAGS.num_samples, 'points': points}))


if __name__ == '__main__':
  define_flags()
  app.run(main)
