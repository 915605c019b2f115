"""Peer liveness for multi-process runs: a dead or hung process ends the others, named.

Without a launcher to stop them, the survivors of a dead process used to block until
JAX's coordination service declared it lost (its heartbeat timeout, 100 s by default)
and then abort with SIGABRT and a C++ stack dump. Here each process runs two daemon
threads over the coordination service's key-value store (the store that
`jax.distributed.initialize` already set up; no other service):

- a beat: every `interval_s`, this process bumps its counter under `vdit/alive/<i>`
  and reads every process's counter in one call, noting (on this host's clock, so no
  clocks are compared across hosts) when each counter last moved;
- a watch: when a peer's counter has not moved for `timeout_s`, or the store itself has
  not answered for `timeout_s` (process 0, which serves it, is gone), this process
  prints one line naming the missing process and exits with status 1.

A process that ends its work normally calls `finish()`: it writes `vdit/done/<i>`, so
that the others no longer wait for its beat, and stops its own threads before JAX's
shutdown. A process that fails writes `vdit/failed/<i>` with its summary line
(`fatal.py` calls `record_failure`), so that the others can name it and its cause
rather than a lost connection.

Cost: per process, one small write and one read of the vdit/ keys per `interval_s` (2 s).
"""

from __future__ import annotations

import threading
import time
from typing import Dict, List, Optional

from vdit_jax.parallel import fatal

_PREFIX = 'vdit'
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_INTERVAL_S = 2.0

_monitor: Optional['Monitor'] = None


def _key(kind: str, index: int) -> str:
  return f'{_PREFIX}/{kind}/{index}'


def _tables(client) -> Dict[str, Dict[int, str]]:
  """{kind: {process: value}} of every key under vdit/ (one call to the store)."""
  out: Dict[str, Dict[int, str]] = {'alive': {}, 'done': {}, 'failed': {}}
  # Raises when the store does not answer: the caller then leaves its record untouched
  # (an empty answer would look like every peer's counter moving).
  for key, value in client.key_value_dir_get(f'{_PREFIX}/'):
    parts = key.strip('/').split('/')
    if len(parts) >= 2 and parts[-2] in out and parts[-1].isdigit():
      out[parts[-2]][int(parts[-1])] = value
  return out


class Monitor:
  """The beat and watch threads of one process; see the module docstring."""

  def __init__(self, client, process_id: int, num_processes: int,
               timeout_s: float = DEFAULT_TIMEOUT_S, interval_s: float = DEFAULT_INTERVAL_S,
               on_lost=None, clock=time.monotonic):
    if not timeout_s > 0 or not interval_s > 0 or interval_s * 2 > timeout_s:
      raise ValueError(f'peer timeout_s={timeout_s!r} and interval_s={interval_s!r} must be '
                       '> 0 with interval_s <= timeout_s / 2.')
    self.client = client
    self.process_id = process_id
    self.num_processes = num_processes
    self.timeout_s = float(timeout_s)
    self.interval_s = float(interval_s)
    self._on_lost = on_lost or _exit_naming
    self._clock = clock
    self._stop = threading.Event()
    self._lock = threading.Lock()
    start = clock()
    self._last_answer = start  # when the store last answered this process
    self._seen: Dict[int, tuple] = {i: (None, start) for i in range(num_processes)
                                     if i != process_id}  # {peer: (counter, when it moved)}
    self._done: set = set()
    self._failed: Dict[int, str] = {}
    self._count = 0
    self._threads = [threading.Thread(target=self._beat_loop, name='vdit-liveness-beat',
                                      daemon=True),
                     threading.Thread(target=self._watch_loop, name='vdit-liveness-watch',
                                      daemon=True)]

  def start(self) -> 'Monitor':
    for t in self._threads:
      t.start()
    return self

  # -- the beat -----------------------------------------------------------------------
  def beat(self) -> None:
    """One round: bump this process's counter, read everyone's."""
    self._count += 1
    self.client.key_value_set(_key('alive', self.process_id), str(self._count),
                              allow_overwrite=True)
    tables = _tables(self.client)
    alive, done, failed = tables['alive'], tables['done'], tables['failed']
    now = self._clock()
    with self._lock:
      self._last_answer = now
      self._done.update(done)
      self._failed.update(failed)
      for peer, (value, since) in self._seen.items():
        if alive.get(peer) != value:
          self._seen[peer] = (alive.get(peer), now)

  def _beat_loop(self) -> None:
    while not self._stop.is_set():
      try:
        self.beat()
      except Exception:  # pylint: disable=broad-except
        pass  # the store did not answer: the watch sees `_last_answer` age
      self._stop.wait(self.interval_s)

  # -- the watch ----------------------------------------------------------------------
  def lost(self) -> List[str]:
    """A sentence per missing process (failed, stopped beating, or the store gone)."""
    now = self._clock()
    out = []
    with self._lock:
      for peer in sorted(self._failed):
        if peer != self.process_id:
          out.append(f'process {peer} of {self.num_processes} failed: '
                     f'{self._failed[peer]}')
      if now - self._last_answer > self.timeout_s:
        out.append(f'process 0 of {self.num_processes} (the coordinator, which serves the '
                   f'run\'s key-value store) has not answered for '
                   f'{now - self._last_answer:.0f} s: it died, hung or is unreachable')
      else:
        for peer, (_, since) in sorted(self._seen.items()):
          if peer in self._done or peer in self._failed:
            continue
          if now - since > self.timeout_s:
            out.append(f'process {peer} of {self.num_processes} has not beaten for '
                       f'{now - since:.0f} s (peer timeout {self.timeout_s:g} s): it died '
                       'or hung; see its log')
    return out

  def _watch_loop(self) -> None:
    while not self._stop.wait(self.interval_s / 2):
      lost = self.lost()
      if lost and not self._stop.is_set():
        self._on_lost(self, lost)
        return

  def wait_for_lost(self, wait_s: float) -> List[str]:
    """`lost()`, after up to `wait_s` seconds for a peer's failure record to show."""
    deadline = self._clock() + wait_s
    while True:
      try:
        self.beat()
      except Exception:  # pylint: disable=broad-except
        pass
      with self._lock:
        quiet = {p for p, (_, since) in self._seen.items()
                 if p not in self._done and self._clock() - since >= 2 * self.interval_s}
      lost = self.lost()
      if lost or self._clock() >= deadline:
        if not lost and quiet:
          lost = [f'process {p} of {self.num_processes} stopped beating '
                  f'{self._clock() - self._seen[p][1]:.0f} s ago: it died or hung; see its log'
                  for p in sorted(quiet)]
        return lost
      time.sleep(min(self.interval_s / 2, max(0.0, deadline - self._clock())))

  # -- the end ------------------------------------------------------------------------
  def stop(self) -> None:
    self._stop.set()
    for t in self._threads:
      if t.is_alive() and t is not threading.current_thread():
        t.join(timeout=self.interval_s * 2)

  def finish(self) -> None:
    self.stop()
    try:
      self.client.key_value_set(_key('done', self.process_id), '1', allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      pass

  def record_failure(self, summary: str) -> None:
    self._stop.set()
    try:
      self.client.key_value_set(_key('failed', self.process_id), summary,
                                allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      pass


def _exit_naming(monitor: Monitor, lost: List[str]) -> None:
  monitor.record_failure(f'stopped because {lost[0]}')
  fatal.exit_with(f'FATAL PeerLost: process {monitor.process_id} stops because '
                  + '; '.join(lost))


def _report_failure(summary: str) -> str:
  """fatal.py's hook: records this process's failure for the others, then names the
  peers that failed or went quiet ('' when none, or with no monitor)."""
  monitor = current()
  if monitor is None:
    return ''
  monitor.record_failure(summary)
  lost = peers_lost(wait_s=3 * monitor.interval_s)
  return f'FATAL PeerLost: {"; ".join(lost)}\n' if lost else ''


fatal.on_failure(_report_failure)


def start(client, process_id: int, num_processes: int,
          timeout_s: float = DEFAULT_TIMEOUT_S,
          interval_s: float = DEFAULT_INTERVAL_S) -> Optional[Monitor]:
  """Starts this process's monitor (one per process); None for one process or timeout 0."""
  global _monitor
  if num_processes <= 1 or not timeout_s:
    return None
  if _monitor is not None:
    return _monitor
  _monitor = Monitor(client, process_id, num_processes, timeout_s, interval_s).start()
  return _monitor


def current() -> Optional[Monitor]:
  return _monitor


def finish() -> None:
  """This process ended its work normally: stop watching, tell the others."""
  global _monitor
  if _monitor is not None:
    _monitor.finish()
    _monitor = None


def peers_lost(wait_s: float) -> List[str]:
  """For an error in a multi-process run: the processes that failed or went quiet."""
  if _monitor is None:
    return []
  monitor = _monitor
  monitor.stop()
  return monitor.wait_for_lost(wait_s)
