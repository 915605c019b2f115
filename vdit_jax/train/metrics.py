"""Metrics: JSON lines in WORKDIR/metrics.jsonl and a rate line a person can follow."""

import json
import time
from typing import Dict, Optional

import jax
import numpy as np

from vdit_jax.parallel import paths
from vdit_jax.train import mfu as mfu_lib
from vdit_jax.parallel import distributed


METRICS_FILENAME = 'metrics.jsonl'


class MetricsWriter:
  """Appends one JSON object per logged step; only process 0 writes.

  In a bucket workdir the file is rewritten whole at most every `min_interval_s`
  seconds and at `close` (objects cannot be appended to; paths.GrowingFile).
  """

  def __init__(self, workdir: str, min_interval_s: float = 30.0):
    self.path = paths.join(workdir, METRICS_FILENAME)
    self.enabled = jax.process_index() == 0
    self._file = paths.GrowingFile(self.path, min_interval_s) if self.enabled else None

  def write(self, step: int, metrics: Dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step)}
    record.update({k: _to_python(v) for k, v in metrics.items()})
    self._file.append(json.dumps(record) + '\n')

  def resumed(self, step: int) -> None:
    """Marks a resume from checkpoint `step`: the records of later steps logged before it
    were re-run, and readers (`read_metrics`, tools/plot.py) drop them."""
    if self.enabled:
      self._file.append(json.dumps({'step': int(step), 'resumed_from': int(step)}) + '\n')

  def close(self) -> None:
    if self._file is not None:
      self._file.close()


def _to_python(value):
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


def read_metrics(path: str):
  """The records of a metrics.jsonl file (local or in a bucket), each step once: see
  `each_step_once`."""
  return each_step_once(
      [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()])


def each_step_once(records):
  """Records in step order, one per step: at a resume marker ({'resumed_from': S}) the
  records of steps after S logged before it are dropped (those steps were re-run from
  checkpoint S), and of two records of one step the later wins. Markers are dropped."""
  by_step = {}
  for record in records:
    if 'resumed_from' in record:
      by_step = {s: r for s, r in by_step.items() if s <= record['resumed_from']}
      continue
    by_step[int(record['step'])] = record
  return [by_step[s] for s in sorted(by_step)]


class RateMeter:
  """Steps/s, tokens/s and (given the model FLOPs of a step) model TFLOP/s per device and
  MFU between consecutive logs.

  Call `start(step)` when timing may begin (after the step is compiled); until then
  the first `rates` call only starts the clock and returns {}.
  """

  def __init__(self, tokens_per_step: int, *, flops_per_step: Optional[float] = None,
               num_devices: int = 1, peak: Optional[mfu_lib.Peak] = None):
    self.tokens_per_step = tokens_per_step
    self.flops_per_step = flops_per_step
    self.num_devices = num_devices
    self.peak = peak
    self._time: Optional[float] = None
    self._step: Optional[int] = None

  @property
  def started(self) -> bool:
    return self._time is not None

  def start(self, step: int) -> None:
    self._time, self._step = time.perf_counter(), step

  def skip(self, steps: int, seconds: float) -> None:
    """Leaves `steps` steps that took `seconds` out of the current window (the first,
    compiling step of a data bucket's new shape)."""
    if self._time is not None:
      self._time += seconds
      self._step += steps

  def rates(self, step: int) -> Dict[str, float]:
    now = time.perf_counter()
    if self._time is None or step <= self._step:
      self.start(step)
      return {}
    steps_per_s = (step - self._step) / (now - self._time)
    self.start(step)
    out = {'steps_per_s': steps_per_s, 'tokens_per_s': steps_per_s * self.tokens_per_step}
    if self.flops_per_step is not None:
      out.update(mfu_lib.utilization(self.flops_per_step, steps_per_s, self.num_devices,
                                     self.peak))
    return out


def format_line(step: int, num_steps: int, metrics: Dict[str, float]) -> str:
  parts = [f'step {step}/{num_steps}']
  for key in ('loss', 'grad_norm', 'learning_rate', 'steps_per_s', 'tokens_per_s'):
    if key in metrics:
      parts.append(f'{key} {metrics[key]:.4g}')
  if 'model_tflops_per_device' in metrics:
    parts.append(f'TFLOP/s/device {metrics["model_tflops_per_device"]:.4g}')
  if 'mfu' in metrics:
    parts.append(f'MFU {100 * metrics["mfu"]:.2f}%')
  buckets = [int(v) for k, v in metrics.items()  # data.buckets: batches per bucket so far
             if k.startswith('bucket') and k.endswith('_batches')]
  if buckets:
    parts.append(f'batches/bucket {",".join(map(str, buckets))}')
  if metrics.get('steps_per_s'):
    eta = (num_steps - step) / metrics['steps_per_s']
    parts.append(f'eta {int(eta // 60)}m{int(eta % 60):02d}s')
  return ' | '.join(parts)


log_line = distributed.log_line  # progress lines, printed by process 0
