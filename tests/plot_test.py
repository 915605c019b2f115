"""tools/plot.py: metrics.jsonl -> PNG, and clear errors when there is nothing to plot."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vdit_jax.tools import plot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, records):
  with open(path, 'w') as f:
    for record in records:
      f.write(json.dumps(record) + '\n')


def _records(steps, with_mfu):
  out = []
  for step in steps:
    record = {'step': step, 'loss': 1.0 / step, 'grad_norm': 0.5, 'wall_s': step * 0.1}
    if step > 1:  # the first logged step has no rate (compile), as in the trainer
      record.update(steps_per_s=2.0, tokens_per_s=1000.0 + step)
      if with_mfu:
        record.update(model_tflops_per_device=0.01 * step, mfu=0.001 * step)
    out.append(record)
  return out


@pytest.mark.parametrize('with_mfu,panels', [(False, 2), (True, 4)])
def test_writes_png_with_a_panel_per_metric(tmp_path, with_mfu, panels):
  path = tmp_path / 'metrics.jsonl'
  _write(path, _records(range(1, 41), with_mfu))
  out = plot.plot_metrics(str(path), str(tmp_path / 'plots' / 'loss.png'))
  image = Image.open(out)
  assert image.format == 'PNG'
  width, height = image.size
  assert width == 700 and height == int(100 * 2.6 * panels)  # figsize x dpi
  assert np.asarray(image.convert('L')).std() > 10  # something drawn


def test_resumed_run_keeps_the_last_record_of_each_step(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  _write(path, _records([1, 2, 3, 4], False) + [{'step': 3, 'loss': 9.0}, {'step': 5, 'loss': 8.0}])
  records = plot.read_records(str(path))
  assert [r['step'] for r in records] == [1, 2, 3, 4, 5]
  steps, losses = plot.series(records, 'loss')
  np.testing.assert_array_equal(steps, [1, 2, 3, 4, 5])
  np.testing.assert_array_equal(losses, [1.0, 0.5, 9.0, 0.25, 8.0])


def test_missing_empty_and_broken_files_raise_clearly(tmp_path):
  with pytest.raises(FileNotFoundError, match='no metrics file at .*train first'):
    plot.read_records(str(tmp_path / 'nope.jsonl'))
  empty = tmp_path / 'empty.jsonl'
  empty.write_text('\n')
  with pytest.raises(ValueError, match='holds no records yet'):
    plot.read_records(str(empty))
  broken = tmp_path / 'broken.jsonl'
  broken.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n')
  with pytest.raises(ValueError, match='broken.jsonl:2 is not a JSON object'):
    plot.read_records(str(broken))
  no_loss = tmp_path / 'no_loss.jsonl'
  _write(no_loss, [{'step': 1, 'grad_norm': 1.0}])
  with pytest.raises(ValueError, match="none of \\['loss'"):
    plot.plot_metrics(str(no_loss), str(tmp_path / 'x.png'))


def test_command_line(tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  cmd = [sys.executable, '-m', 'vdit_jax.tools.plot', f'--workdir={workdir}']
  env = dict(os.environ, PYTHONPATH=REPO)
  missing = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
  assert missing.returncode == 1
  assert 'error: no metrics file at' in missing.stderr
  _write(workdir / 'metrics.jsonl', _records(range(1, 6), True))
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr
  assert os.path.isfile(workdir / 'loss.png')
