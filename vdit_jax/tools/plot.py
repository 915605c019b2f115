r"""Plots a run's metrics.jsonl: the loss, and throughput / MFU where the records have them.

python -m vdit_jax.tools.plot --workdir=runs/tiny [--out=runs/tiny/loss.png]

One panel per quantity present, against the step: `loss` (with a moving average when
there are enough points), `tokens_per_s`, `model_tflops_per_device` and `mfu` (drawn in
percent). A resumed run logs again the steps after its last checkpoint; the later record
of a step wins. Needs matplotlib: pip install 'vdit_jax[plot]'.
"""

import json
import math
import os
from typing import Dict, List, Optional, Sequence

from absl import app
from absl import flags
import numpy as np

from vdit_jax.parallel import paths
from vdit_jax.train import metrics as metrics_lib

METRICS_FILENAME = 'metrics.jsonl'
# (key, axis label, factor) in the order drawn; keys absent from every record are skipped.
PANELS = (('loss', 'loss', 1.0), ('tokens_per_s', 'tokens / s', 1.0),
          ('model_tflops_per_device', 'model TFLOP/s\nper device', 1.0),
          ('mfu', 'MFU (%)', 100.0))

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined only when run as a program, so importing this module claims no flag names."""
  flags.DEFINE_string('workdir', None, 'Run directory holding metrics.jsonl.')
  flags.DEFINE_string('metrics', None, 'A metrics.jsonl file (instead of --workdir).')
  flags.DEFINE_string('out', None, 'PNG to write (default WORKDIR/loss.png).')


def read_records(path: str) -> List[dict]:
  """The records of a metrics.jsonl, one per step (the last one logged for a step)."""
  if not paths.isfile(path):
    raise FileNotFoundError(f'no metrics file at {path}: train first '
                            '(python -m vdit_jax.main --config=... --workdir=...).')
  records = []
  for number, line in enumerate(paths.read_text(path).splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}:{number} is not a JSON object ({e.msg}).') from e
    if not isinstance(record, dict) or 'step' not in record:
      raise ValueError(f'{path}:{number} has no "step": {line.strip()[:100]}')
    records.append(record)
  records = metrics_lib.each_step_once(records)  # a resume's re-run steps count once
  if not records:
    raise ValueError(f'{path} holds no records yet: it is written every train.log_every '
                     'steps, so plot once a run has logged a step.')
  return records


def series(records: Sequence[dict], key: str):
  """(steps, values) of the records that have a finite number under `key`."""
  points = [(r['step'], float(r[key])) for r in records
            if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
            and math.isfinite(r[key])]
  steps, values = zip(*points) if points else ((), ())
  return np.asarray(steps), np.asarray(values)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
  kernel = np.ones(window) / window
  return np.convolve(values, kernel, mode='valid')


def plot(records: Sequence[dict], out: str, title: Optional[str] = None) -> str:
  """Draws the panels of `records` into the PNG `out`; returns `out`."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("plotting needs matplotlib: pip install 'vdit_jax[plot]'") from e
  panels = [p for p in PANELS if len(series(records, p[0])[0])]
  if not panels:
    raise ValueError(f'the records have none of {[p[0] for p in PANELS]} to plot '
                     f'(keys: {sorted(records[0])}).')
  fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), sharex=True,
                           squeeze=False)
  for ax, (key, label, factor) in zip(axes[:, 0], panels):
    steps, values = series(records, key)
    values = values * factor
    ax.plot(steps, values, marker='.' if len(steps) < 50 else None, lw=1,
            alpha=0.5 if key == 'loss' and len(steps) >= 20 else 1.0, label=key)
    if key == 'loss':
      window = max(1, len(steps) // 20)
      if len(steps) >= 20 and window > 1:
        ax.plot(steps[window - 1:], moving_average(values, window), lw=2,
                label=f'mean of {window}')
        ax.legend(loc='upper right', fontsize=8)
      if values.min() > 0 and values.max() / values.min() > 20:
        ax.set_yscale('log')
    else:
      ax.set_ylim(bottom=0)  # rates from 0: step-to-step jitter does not look like a trend
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[-1, 0].set_xlabel('step')
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  with paths.local_file_for_write(out, suffix='.png') as local:
    fig.savefig(local, dpi=100, format='png')
  plt.close(fig)
  return paths.normalize(out)


def plot_metrics(path: str, out: str) -> str:
  """metrics.jsonl at `path` -> PNG at `out`."""
  return plot(read_records(path), out, title=os.path.dirname(paths.normalize(path)))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if (FLAGS.workdir is None) == (FLAGS.metrics is None):
    raise app.UsageError('give exactly one of --workdir and --metrics.')
  path = paths.normalize(FLAGS.metrics or paths.join(FLAGS.workdir, METRICS_FILENAME))
  out = FLAGS.out or paths.join(os.path.dirname(path), 'loss.png')
  try:
    plot_metrics(path, out)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f'error: {e}') from e
  print(f'wrote {out}', flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
