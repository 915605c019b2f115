"""Test session setup (CPU only, quiet logs, one compilation cache) and what many test
files share: `shrink` (a configs/*.py config made small enough to train in seconds) and the
multi-device runner (`run_checks`, and the `multidevice` fixture that runs each check script
once per session).

Importing this module does nothing else: the session's settings are made in
pytest_configure, so test modules and the check scripts (tests/multidevice/*.py, which run
without pytest) import `shrink` and `run_checks` from here (`from tests.conftest import
shrink`).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
_SESSION_CACHE = None


def _session_environment():
  global _SESSION_CACHE
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  # XLA's optimisation passes dominate the compile time of the small programs the tests
  # build (about 2.5x on the tiny train step) and buy nothing at these shapes; the
  # variable reaches every subprocess the tests start, too.
  os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
  # One persistent compilation cache for the session, empty at its start (as on a clean CI
  # machine), removed at its end: the tests' runs and their subprocesses (which inherit the
  # variable) share compiled programs, and nothing is written to ~/.cache. Runs take JAX's
  # variable as their config's default cache (vdit_jax/config/defaults.py). Every program is
  # cached, whatever its compile time (vdit_jax/train/compile_cache.py's thresholds).
  _SESSION_CACHE = tempfile.mkdtemp(prefix='vdit_tests_jax_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _SESSION_CACHE
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'


def pytest_unconfigure(config):
  del config
  if _SESSION_CACHE:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


def pytest_configure(config):
  # Before any test module is collected, so before jax is imported.
  _session_environment()
  # Tests that damage checkpoints on purpose make Orbax's restore fail part-way; the read
  # coroutines of the other arrays are then dropped unawaited and, when the garbage
  # collector finds them after their event loop closed, Python reports "Exception
  # ignored in <coroutine _read_array_index_and_device_put>" / "Event loop is closed"
  # inside whichever test runs then. Harmless (the restore already raised, and the
  # tests check that error), and out of our reach (Orbax's asyncio); a run prints
  # none of it (vdit_jax/parallel/fatal.py exits before the interpreter's teardown).
  # (A ':' separates the fields of a filter, so '.' stands for the colons below.)
  for pattern in (r'Exception ignored in. <coroutine object _read_array_index_and_device_put',
                  r'(?s)Exception ignored in. None.*RuntimeError. Event loop is closed'):
    config.addinivalue_line(
        'filterwarnings', f'ignore:{pattern}:pytest.PytestUnraisableExceptionWarning')
  for name in ('_read_array_index_and_device_put', 'Store._get_array_metadatas'):
    config.addinivalue_line(  # the same dropped coroutines, collected before the loop ends
        'filterwarnings', f"ignore:coroutine '{name}' was never awaited:RuntimeWarning")


# --------------------------------------------------------------------- a small config

# The small model, clips and run that the tests train: configs/*.py are sized for real
# runs. `shrink` sets the sections named in its `small` argument to these values.
SMALL = {
    'model': dict(variant=None, width=48, depth=1, num_heads=2, mlp_dim=96,
                  patch_size=(1, 4, 4)),          # 4 x 16 x 16 clips -> 64 tokens
    'data': dict(num_frames=4, height=16, width=16),
    'train': dict(batch_size=4, num_steps=4, warmup_steps=1, log_every=1),
    'checkpoint': dict(every_steps=2, async_save=False),
    'sample': dict(num_steps=2, num_samples=2, formats='gif'),
}


def shrink(config, small=tuple(SMALL), **sections):
  """`config` (a configs/*.py config; changed in place and returned) with SMALL's values in
  the sections named in `small` (all of them unless given), then each of `sections`
  (model=dict(width=64), mesh=dict(data=2), ...: any section) updated with its dict."""
  for name in small:
    config[name].update(SMALL[name])
  for name, fields in sections.items():
    config[name].update(fields)
  return config


# --------------------------------------------------------------------- multi-device checks

# XLA:CPU aborts the process when one fake device reaches a collective 40 s after
# the others (the default); on a 2-core machine under load that is a scheduling
# delay, not a hang, so the checks give it 10 minutes.
CPU_COLLECTIVE_TIMEOUT_FLAGS = ('--xla_cpu_collective_call_terminate_timeout_seconds=600 '
                                '--xla_cpu_collective_call_warn_stuck_timeout_seconds=120')


def run_checks(script: str, args=(), num_devices: int = 8, timeout: int = 900) -> dict:
  """Runs `script ARGS...` (a path under tests/) under `num_devices` fake CPU devices in a
  fresh process (the device count must be set before jax starts; the suite has one), and
  returns the JSON of its last stdout line: {check name: 'ok' | the failure}."""
  from vdit_jax import runtime  # pylint: disable=g-import-not-at-top  # imports jax
  env = dict(os.environ)
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' ' + CPU_COLLECTIVE_TIMEOUT_FLAGS +
                      f' --xla_force_host_platform_device_count={num_devices}').strip()
  env['JAX_PLATFORMS'] = 'cpu'
  # What vdit_jax.runtime gives every run with several CPU devices (the scripts do not go
  # through runtime.setup): XLA:CPU threads enough for waiting collectives.
  env.setdefault(runtime.ENV_PJRT_NPROC, str(runtime.cpu_pool_threads(num_devices)))
  env['PYTHONPATH'] = os.pathsep.join(
      p for p in (os.path.dirname(HERE), env.get('PYTHONPATH')) if p)
  proc = subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, args)],
                        env=env, capture_output=True, text=True, timeout=timeout, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


class MultideviceRuns:
  """The `multidevice` fixture: check scripts run once per session, their results shared
  by the parametrised tests that report each check (a failed run fails each of them)."""

  def __init__(self):
    self._runs = {}
    self._lock = threading.Lock()

  def run(self, script, args=(), num_devices=8, timeout=900):
    """run_checks(...)'s results, from the first call with these arguments."""
    key = (script, tuple(map(str, args)), num_devices)
    with self._lock:
      entry = self._runs.setdefault(key, {'lock': threading.Lock()})
    with entry['lock']:  # runs with other arguments go on side by side
      if 'results' not in entry and 'error' not in entry:
        try:
          entry['results'] = run_checks(script, args, num_devices=num_devices,
                                        timeout=timeout)
        except Exception as e:  # pylint: disable=broad-except
          entry['error'] = e
    if 'error' in entry:
      raise entry['error']
    return entry['results']

  @staticmethod
  def assert_ok(results, expected, check):
    """`results` reports exactly the checks `expected`, and `check` passed."""
    unlisted, missing = sorted(set(results) - set(expected)), sorted(set(expected) - set(results))
    assert not unlisted and not missing, (
        f'checks reported but not expected: {unlisted}; expected, not reported: {missing}')
    assert results[check] == 'ok', f'{check}:\n{results[check]}'


@pytest.fixture(scope='session')
def multidevice():
  return MultideviceRuns()
