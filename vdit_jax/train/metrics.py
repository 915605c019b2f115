"""Metrics: JSON lines in WORKDIR/metrics.jsonl and a rate line a person can follow."""

import json
import os
import time
from typing import Dict, Optional

import jax
import numpy as np


class MetricsWriter:
  """Appends one JSON object per logged step; only process 0 writes."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.enabled = jax.process_index() == 0

  def write(self, step: int, metrics: Dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step)}
    record.update({k: _to_python(v) for k, v in metrics.items()})
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')


def _to_python(value):
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


def read_metrics(path: str):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class RateMeter:
  """Steps/s and tokens/s between consecutive logs, excluding the first (compile) step."""

  def __init__(self, tokens_per_step: int):
    self.tokens_per_step = tokens_per_step
    self._time: Optional[float] = None
    self._step: Optional[int] = None

  def start(self, step: int) -> None:
    self._time, self._step = time.perf_counter(), step

  def rates(self, step: int) -> Dict[str, float]:
    now = time.perf_counter()
    if self._time is None or step <= self._step:
      self.start(step)
      return {}
    steps_per_s = (step - self._step) / (now - self._time)
    self.start(step)
    return {'steps_per_s': steps_per_s, 'tokens_per_s': steps_per_s * self.tokens_per_step}


def format_line(step: int, num_steps: int, metrics: Dict[str, float]) -> str:
  parts = [f'step {step}/{num_steps}']
  for key in ('loss', 'grad_norm', 'learning_rate', 'steps_per_s', 'tokens_per_s'):
    if key in metrics:
      parts.append(f'{key} {metrics[key]:.4g}')
  if metrics.get('steps_per_s'):
    eta = (num_steps - step) / metrics['steps_per_s']
    parts.append(f'eta {int(eta // 60)}m{int(eta % 60):02d}s')
  return ' | '.join(parts)


def log_line(line: str) -> None:
  """Prints a progress line on process 0 (the absl log stays for library detail)."""
  if jax.process_index() == 0:
    print(line, flush=True)
