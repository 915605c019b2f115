"""A dead or hung process of a multi-process run, without the launcher (issue 27, point 6).

The survivors exit with status 1 within the peer timeout, the last line naming the
missing process (vdit_jax/parallel/liveness.py). The unit tests drive one Monitor over
an in-memory key-value store and a hand-moved clock; the process tests start two real
processes joined by `jax.distributed` (gloo collectives, the coordination service's
store), one of which dies (kill -9) or hangs (SIGSTOP) while the other runs collectives.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from vdit_jax.parallel import distributed
from vdit_jax.parallel import liveness
from vdit_jax.tools import launch_local

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Store:
  """The three calls Monitor makes on jax's DistributedRuntimeClient, in memory."""

  def __init__(self):
    self.data = {}
    self.down = False

  def key_value_set(self, key, value, allow_overwrite=False):
    if self.down:
      raise RuntimeError('UNAVAILABLE: connection refused')
    assert allow_overwrite or key not in self.data
    self.data[key] = value

  def key_value_dir_get(self, prefix):
    if self.down:
      raise RuntimeError('UNAVAILABLE: connection refused')
    return [(k, v) for k, v in self.data.items() if k.startswith(prefix)]


class _Clock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def _monitors(store, clock, n=3):
  return [liveness.Monitor(store, i, n, timeout_s=10, interval_s=2, clock=clock)
          for i in range(n)]


def test_a_peer_that_stops_beating_is_named_after_the_timeout():
  store, clock = _Store(), _Clock()
  m0, m1, m2 = _monitors(store, clock)
  for _ in range(3):
    for m in (m0, m1, m2):
      m.beat()
    clock.now += 2
  assert m0.lost() == []
  # Process 2 stops; 0 and 1 keep beating.
  for _ in range(5):
    m0.beat()
    m1.beat()
    clock.now += 2
  assert m0.lost() == []  # 10 s: not yet past the timeout
  clock.now += 1
  lost = m0.lost()
  assert len(lost) == 1 and lost[0].startswith('process 2 of 3 has not beaten for 11 s'), lost


def test_a_finished_peer_is_not_waited_for_and_a_failed_one_is_named_with_its_cause():
  store, clock = _Store(), _Clock()
  m0, m1, m2 = _monitors(store, clock)
  for m in (m0, m1, m2):
    m.beat()
  m1.finish()
  m2.record_failure('FATAL CheckpointWriteError: cannot write gs://b/run/checkpoints/8')
  clock.now += 60
  m0.beat()
  assert m0.lost() == ['process 2 of 3 failed: FATAL CheckpointWriteError: cannot write '
                       'gs://b/run/checkpoints/8']


def test_a_store_that_stops_answering_names_the_coordinator():
  store, clock = _Store(), _Clock()
  m0, m1 = _monitors(store, clock, n=2)
  m0.beat()
  m1.beat()
  store.down = True
  clock.now += 11
  with pytest.raises(RuntimeError):
    m1.beat()
  lost = m1.lost()
  assert len(lost) == 1 and lost[0].startswith('process 0 of 2 (the coordinator'), lost


def test_wait_for_lost_names_a_quiet_peer_before_the_timeout():
  """After an error (a collective's "connection closed"), two missed beats name a peer."""
  store, clock = _Store(), _Clock()
  m0, m1 = _monitors(store, clock, n=2)
  m1.beat()
  m0.beat()  # has seen process 1's beat
  clock.now += 5  # process 1 is gone; sleep() inside the wait does not move this clock
  lost = m0.wait_for_lost(wait_s=0)
  assert lost == ['process 1 of 2 stopped beating 5 s ago: it died or hung; see its log']


@pytest.mark.parametrize('value, env, match', [
    ('x', {}, "peer_timeout_s='x' is not a number"),
    (float('nan'), {}, 'must be 0 .* or a finite number of seconds >= 4'),
    (1, {}, 'must be 0'),
    (None, {'VDIT_PEER_TIMEOUT_S': 'inf'}, "VDIT_PEER_TIMEOUT_S='inf' must be 0"),
])
def test_bad_peer_timeouts_name_the_value(value, env, match):
  with pytest.raises(ValueError, match=match):
    distributed.peer_timeout(value, env)


def test_peer_timeout_default_and_off():
  assert distributed.peer_timeout(None, {}) == liveness.DEFAULT_TIMEOUT_S == 30
  assert distributed.peer_timeout(None, {'VDIT_PEER_TIMEOUT_S': '0'}) == 0
  assert distributed.peer_timeout('12', {}) == 12


# -- two real processes ------------------------------------------------------------------

_WORKER = textwrap.dedent('''
    import os, sys, time
    from absl import app
    from vdit_jax.parallel import fatal
    from vdit_jax.parallel import distributed, liveness

    def main(argv):
      port, pid, fate = argv[1], int(argv[2]), argv[3]
      distributed.initialize(f'127.0.0.1:{port}', 2, pid)
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import NamedSharding, PartitionSpec as P
      mesh = jax.make_mesh((2,), ('d',), devices=jax.devices())
      total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))
      for step in range(40 if fate == 'finish' else 10_000):
        x = jax.make_array_from_callback((2,), NamedSharding(mesh, P('d')),
                                         lambda i: np.ones((1,), np.float32))
        assert float(total(x)) == 2.0
        if pid == 1 and step == 20:
          print('ready', flush=True)
          if fate == 'hang':
            os.kill(os.getpid(), 19)  # SIGSTOP: a hung process, its threads included
          elif fate == 'die':
            os.kill(os.getpid(), 9)
        time.sleep(0.05)
      if fate == 'finish' and pid == 0:
        time.sleep(16)  # twice the peer timeout: process 1 is done, not a lost peer
      liveness.finish()
      print('finished', flush=True)

    fatal.run(main)
''')


def _start(tmp_path, fate, timeout_s):
  script = tmp_path / 'worker.py'
  script.write_text(_WORKER)
  port = launch_local.free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO,
             XLA_FLAGS='--xla_force_host_platform_device_count=1',
             VDIT_PEER_TIMEOUT_S=str(timeout_s))
  return [subprocess.Popen([sys.executable, str(script), str(port), str(i), fate], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for i in range(2)]


def _last_line(text):
  return [line for line in text.splitlines() if line.strip()][-1]


@pytest.mark.parametrize('fate', ['hang', 'die'])
def test_the_survivor_of_a_dead_or_hung_peer_exits_naming_it(tmp_path, fate):
  procs = _start(tmp_path, fate, timeout_s=6)
  try:
    for line in procs[1].stdout:
      if 'ready' in line:
        break
    start = time.monotonic()
    out, _ = procs[0].communicate(timeout=120)
    took = time.monotonic() - start
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  assert procs[0].returncode == 1, out[-3000:]
  last = _last_line(out)
  assert last.startswith('FATAL PeerLost: ') and 'process 1 of 2' in last, out[-3000:]
  # Hung: the peer timeout (6 s) and a beat or two. Dead: the collective fails at once,
  # then two missed beats (4 s) name the peer.
  assert took < 30, (took, out[-3000:])
  assert 'SIGABRT' not in out and 'Fatal Python error' not in out, out[-3000:]


def test_processes_that_finish_at_different_times_both_exit_cleanly(tmp_path):
  # 8 s: a loaded 2-core machine can stall a process for 4 s between its last beat and
  # its finish (seen once in a full suite run), which would read as a lost peer.
  procs = _start(tmp_path, 'finish', timeout_s=8)
  outs = [p.communicate(timeout=120)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0 and 'finished' in out, out[-3000:]
