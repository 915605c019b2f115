"""Stop training at a step every process agrees on when the job is told to stop (SIGTERM).

Schedulers announce a preemption (spot / preemptible VMs, SLURM's `--signal`,
Kubernetes, `kill PID`) with SIGTERM and a grace period before SIGKILL. The train
loop asks `should_stop(step)` after every step; when it says so, the loop saves a
checkpoint of that step and returns.

- One process: a Python SIGTERM handler, installed on `__enter__` and replaced by
  the previous handler on `__exit__`, sets a flag; `should_stop` returns it.
- Several processes (`jax.distributed`): every process must stop and save at the
  same step, or the collective save would hang. `jax.distributed.initialize`
  already installs JAX's own SIGTERM notifier (C++, in the coordination service),
  which tells every process; `multihost_utils.reached_preemption_sync_point(step)`
  then returns True on all processes at one step (the largest step any process had
  reported, + 1). It runs on CPU with gloo too. A Python handler would displace that
  notifier, so none is installed then. The check is local until a notice arrives: no
  collective per step.
"""

import signal
import threading
import time
from typing import Optional

import jax
from absl import logging
from jax.experimental import multihost_utils


class PreemptionWatcher:
  """`with PreemptionWatcher() as w: ... if w.should_stop(step): save; break`.

  Call `should_stop` after every step, with the same steps on every process.
  """

  def __init__(self, process_count: Optional[int] = None):
    self.process_count = jax.process_count() if process_count is None else process_count
    self.received_at: Optional[float] = None   # time.time() of the (first) SIGTERM
    self._previous = None
    self._installed = False
    self._service_missing_logged = False

  @property
  def multi_process(self) -> bool:
    return self.process_count > 1

  def _on_sigterm(self, signum, frame):
    del signum, frame
    if self.received_at is None:
      self.received_at = time.time()

  def __enter__(self):
    if self.multi_process:
      return self  # JAX's notifier handles SIGTERM; see the module docstring.
    if threading.current_thread() is not threading.main_thread():
      logging.warning('Training runs outside the main thread: Python cannot install a SIGTERM '
                      'handler there, so a SIGTERM stops the run without a checkpoint.')
      return self
    self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    self._installed = True
    return self

  def __exit__(self, *exc):
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed = False
    return False

  def should_stop(self, step: int) -> bool:
    """True when the run must save `step` and stop (the same step on every process)."""
    if not self.multi_process:
      return self.received_at is not None
    try:
      stop = multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError as e:  # the service was turned off (jax_enable_preemption_service)
      if not self._service_missing_logged:
        logging.warning('No preemption checkpoints in this multi-process run: %s', e)
        self._service_missing_logged = True
      return False
    if stop and self.received_at is None:
      self.received_at = time.time()
    return stop
