"""JAX's persistent compilation cache, pointed at config.train.compilation_cache_dir.

Set once at start-up, before the first compile (`vdit_jax.main`; `train_and_evaluate`,
`sample` and `export` call it too, for notebooks). A second process that compiles the
same program for the same devices (a restart, a resume after preemption, the next run
of a sweep with the same shapes, the tests) loads the executable instead of compiling.

Default directory: JAX's own JAX_COMPILATION_CACHE_DIR when that is set (vdit_jax/config/defaults.py),
else ~/.cache/vdit_jax/jax_compilation_cache, one per user and host, not
per workdir: executables are keyed by program, devices and JAX version, not by run, so
every run of the same shapes shares them; and a workdir may be a bucket (slow for many
small reads) or be copied around (the cache would go with it). '' turns the cache off.
Several hosts: JAX writes entries from process 0 only, so the other hosts hit only if
the directory is storage every host sees (NFS, or a gs:// path with etils[epath]);
on a local disk they compile as before, which costs nothing extra.

Thresholds: JAX caches only programs that took at least 1 s to compile by default;
here every program is cached (0 s, 0 bytes), so the small CPU programs of the tiny
config and the tests are cached too, and whether a program is cached does not depend
on how loaded the machine was when it compiled.
"""

import contextlib
import dataclasses
import os
from typing import Optional

import jax
from jax.experimental.compilation_cache import compilation_cache

MIN_COMPILE_TIME_S = 0.0
MIN_ENTRY_SIZE_BYTES = 0
HIT_EVENT = '/jax/compilation_cache/cache_hits'
WRITE_EVENT = '/jax/compilation_cache/cache_misses'  # JAX records it when it writes an entry


def resolve_dir(cache_dir: str) -> Optional[str]:
  """'' -> None (off); '~/x' and relative paths -> absolute; 'gs://...' unchanged."""
  if not cache_dir:
    return None
  if '://' in cache_dir:
    return cache_dir
  return os.path.abspath(os.path.expanduser(cache_dir))


def configure(cache_dir: str) -> Optional[str]:
  """Points JAX's persistent cache at `cache_dir` ('' = off); returns the path used.

  Safe to call again: a different directory re-opens the cache there (JAX opens its
  cache once, at the first compile after a directory is set).
  """
  path = resolve_dir(cache_dir)
  if path == jax.config.jax_compilation_cache_dir:
    return path
  if path is not None:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', MIN_COMPILE_TIME_S)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', MIN_ENTRY_SIZE_BYTES)
  jax.config.update('jax_compilation_cache_dir', path)
  compilation_cache.reset_cache()
  return path


@dataclasses.dataclass
class CacheEvents:
  """Persistent-cache hits and writes seen while `count_cache_events` was open."""
  hits: int = 0
  writes: int = 0

  def describe(self) -> str:
    if not jax.config.jax_compilation_cache_dir:
      return 'persistent compilation cache off'
    if self.hits and not self.writes:
      return f'loaded from the compilation cache {jax.config.jax_compilation_cache_dir}'
    if self.writes and not self.hits:
      return f'written to the compilation cache {jax.config.jax_compilation_cache_dir}'
    return (f'compilation cache {jax.config.jax_compilation_cache_dir}: {self.hits} hit(s), '
            f'{self.writes} write(s)')


@contextlib.contextmanager
def count_cache_events():
  """Counts persistent-cache hits and writes (of any thread) inside the block."""
  events = CacheEvents()

  def listener(event, **kwargs):
    del kwargs
    if event == HIT_EVENT:
      events.hits += 1
    elif event == WRITE_EVENT:
      events.writes += 1

  jax.monitoring.register_event_listener(listener)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_listener(listener)
