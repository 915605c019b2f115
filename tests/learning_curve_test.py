"""vdit_jax/eval/learning_curve.py: a point per kept checkpoint, placed by training FLOPs and wall
clock, each score a mean with its standard error; and modes.sample(step=...) under it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vdit_jax import modes

from vdit_jax.eval import learning_curve
from tests.train_test import small_config
from vdit_jax.data import synthetic
from vdit_jax.model import spec as spec_lib
from vdit_jax.model import dit
from vdit_jax.model import flops as flops_lib
from vdit_jax.train import loop
from vdit_jax.train import metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))




def get_config(arg=None):
  """The run the curve reads: 4 steps, each logged, checkpoints 2 and 4 both kept."""
  del arg
  config = small_config(log_every=1)
  config.checkpoint.keep = 1
  config.checkpoint.keep_period = 2  # keeps every point whatever keep says
  return config


def test_mean_and_error():
  assert learning_curve.mean_and_error([1, 0, 1, 0]) == {'mean': 0.5, 'stderr': 0.2887}
  assert learning_curve.mean_and_error([float('nan'), 2.0]) == {'mean': 2.0, 'stderr': 0.0}
  assert learning_curve.mean_and_error([float('nan')]) == {'mean': None, 'stderr': None}


def test_scores_give_each_shapes_accuracy_over_the_clips_that_ask_for_it():
  source = synthetic.SyntheticShapes(8, 32, 32, num_examples=36, seed=3, bounce=False)
  clips = [source[i] for i in range(len(source))]
  videos = np.stack([c['video'] for c in clips]).astype(np.float32) / 127.5 - 1.0
  labels = np.array([c['label'] for c in clips])
  right = learning_curve.score(videos, labels, threshold=60.0)
  for name in synthetic.SHAPES:  # the detector reads data clips' shapes in >= 0.95 of them
    assert right[f'shape_accuracy_{name}']['mean'] >= 0.9, (name, right)
  # Squares' and circles' labels swapped (same directions): those two scores fall, the
  # triangles' stays.
  n = len(synthetic.DIRECTIONS)
  swapped = np.select([labels // n == 0, labels // n == 1], [labels + n, labels - n], labels)
  wrong = learning_curve.score(videos, swapped, 60.0)
  assert wrong['shape_accuracy_square']['mean'] <= 0.1, wrong
  assert wrong['shape_accuracy_circle']['mean'] <= 0.1, wrong
  assert wrong['shape_accuracy_triangle'] == right['shape_accuracy_triangle']
  # The overall score is the per-shape scores weighted by how many clips ask for each.
  share = [np.mean(labels // n == i) for i in range(len(synthetic.SHAPES))]
  for got in (right, wrong):
    np.testing.assert_allclose(got['shape_accuracy']['mean'], sum(
        w * got[f'shape_accuracy_{name}']['mean'] for w, name in zip(share, synthetic.SHAPES)),
                               atol=1e-3)


def test_point_takes_the_wall_clock_of_its_step_or_the_last_logged_before_it():
  wall = {1: 1.0, 2: 2.5, 4: 6.0}
  assert learning_curve.curve_point(2, 10, wall, {})['wall_s'] == 2.5
  assert learning_curve.curve_point(3, 10, wall, {}) == {'step': 3, 'train_flops': 30,
                                                         'wall_s': 2.5}


def test_curve_of_a_run(tmp_path):
  config = get_config()
  workdir = str(tmp_path / 'run')
  loop.train_and_evaluate(config, workdir)
  with pytest.raises(FileNotFoundError, match=r'no checkpoint of step 3 .* steps \[2, 4\]'):
    modes.sample(config, workdir, step=3)

  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env['PYTHONPATH'] = os.pathsep.join(p for p in (REPO, env.get('PYTHONPATH')) if p)
  proc = subprocess.run(
      [sys.executable, '-m', 'vdit_jax.eval.learning_curve',
       f'--config={os.path.abspath(__file__)}', f'--workdir={workdir}', '--num_samples=3'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  points = result['points']
  assert [p['step'] for p in points] == [2, 4]
  d = config.data
  step_flops = flops_lib.train_step_flops(
      spec_lib.from_config(config.model), (d.num_frames, d.height, d.width, d.channels),
      config.train.batch_size).total
  wall = {r['step']: r['wall_s']
          for r in metrics_lib.read_metrics(os.path.join(workdir, 'metrics.jsonl'))}
  for p in points:
    assert p['train_flops'] == p['step'] * step_flops
    assert p['wall_s'] == wall[p['step']]
    for key in ('one_object', 'empty', 'shape_accuracy', 'direction_accuracy'):
      assert 0 <= p[key]['mean'] <= 1 and p[key]['stderr'] >= 0, (key, p[key])
  # Each point's clips were written where --mode=sample writes them, named by its step.
  assert sorted(f for f in os.listdir(os.path.join(workdir, 'samples'))
                if f.startswith('sample_step_')) == [
                    'sample_step_0000002.gif', 'sample_step_0000004.gif']
