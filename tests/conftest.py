"""Test session setup: CPU only, quiet logs."""

import os
import shutil
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# XLA's optimisation passes dominate the compile time of the small programs the tests
# build (about 2.5x on the tiny train step) and buy nothing at these shapes; the
# variable reaches every subprocess the tests start, too.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
# One persistent compilation cache for the session, empty at its start (as on a clean CI
# machine), removed at its end: the tests' runs and their subprocesses (which inherit the
# variable) share compiled programs, and nothing is written to ~/.cache. Runs take JAX's
# variable as their config's default cache (vdit_jax/config/defaults.py). Every program is cached,
# whatever its compile time (vdit_jax/train/compile_cache.py's thresholds).
_SESSION_CACHE = tempfile.mkdtemp(prefix='vdit_tests_jax_cache_')
os.environ['JAX_COMPILATION_CACHE_DIR'] = _SESSION_CACHE
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'


def pytest_unconfigure(config):
  del config
  shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


def pytest_configure(config):
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
