"""Orbax checkpoints of the train state and the data iterator, in one manager.

Durability: on a local disk Orbax writes step N to `N.orbax-checkpoint-tmp` and renames
it to `N` only when every item is written (on every process); in a bucket (gs://), where
folders cannot be renamed, it writes into `N/` and marks it complete with a
`commit_success.txt` object last. Either way a process killed during a save leaves a step
that is never listed; the next save of N replaces it. A finalised step whose files were damaged later (a copy cut short, a
full disk, a manual edit) cannot be told apart without reading it: `restore` raises
`CheckpointRestoreError` naming the step's directory and the previous complete step,
rather than silently resuming from an older step. Silent fallback could also make
processes of a multi-host run resume from different steps (each reads its own shards).
"""

import contextlib
import json
import os
from typing import Any, Optional

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging

from vdit_jax.parallel import paths


class CheckpointRestoreError(RuntimeError):
  """A listed (finalised) checkpoint step could not be read back."""


class NonFiniteStateError(ValueError):
  """A state holding NaN or inf was about to be saved."""


class CheckpointWriteError(OSError):
  """The checkpoint directory cannot be written (permissions, read-only or full disk,
  bucket errors): found by a probe before each save, not by Orbax minutes later."""


def nonfinite_leaves(tree) -> list:
  """Paths ('/'-joined keys) of the float leaves of `tree` that hold NaN or inf."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  floats = [(p, x) for p, x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
  finite = jax.device_get(_all_finite([x for _, x in floats]))
  return [_path_name(p) for (p, _), ok in zip(floats, finite) if not ok]


@jax.jit
def _all_finite(leaves):
  return [jnp.all(jnp.isfinite(x)) for x in leaves]


FINGERPRINT_ITEM = 'fingerprint'


def _path_name(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def fingerprint(tree) -> dict:
  """{leaf path: uint32 hash of its bytes} for every array leaf of `tree`.

  Each element's bit pattern times an odd multiplier of its position, summed modulo 2^32:
  one changed element changes the sum, and integer addition does not depend on the order,
  so the hash is the same whatever mesh holds the array (a checkpoint restored onto
  another mesh verifies). One jitted pass over the state, on its devices.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  arrays = [(p, x) for p, x in leaves if hasattr(x, 'dtype') and hasattr(x, 'shape')]
  hashes = jax.device_get(_hashes([x for _, x in arrays]))
  return {_path_name(p): int(h) for (p, _), h in zip(arrays, hashes)}


@jax.jit
def _hashes(leaves):
  return [_hash(x) for x in leaves]


def _hash(x):
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  elif x.dtype.itemsize == 4:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  elif x.dtype.itemsize == 2:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  elif x.dtype.itemsize == 1:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
  else:  # 8-byte values: both halves
    halves = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
    bits = halves[..., 0] ^ (halves[..., 1] * jnp.uint32(0x85EBCA6B))
  if bits.ndim == 0:
    return bits * jnp.uint32(0x9E3779B1)
  index = jnp.zeros(bits.shape, jnp.uint32)  # the row-major position, modulo 2^32
  stride = 1
  for axis in reversed(range(bits.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride)
    stride = (stride * bits.shape[axis]) % (1 << 32)
  multiplier = index * jnp.uint32(0x9E3779B1) + jnp.uint32(0x7F4A7C15) | jnp.uint32(1)
  return jnp.sum(bits * multiplier, dtype=jnp.uint32)


def changed_leaves(step_dir: str, tree) -> list:
  """The leaves of `tree` (a whole restored state, or part of one with the state's top-level
  keys, e.g. {'ema_params': ...}) whose fingerprint differs from the one step_dir saved;
  [] when it saved none (steps older than fingerprints)."""
  path = paths.join(step_dir, FINGERPRINT_ITEM, 'metadata')
  if not paths.exists(path):
    return []
  saved, now = json.loads(paths.read_text(path)), fingerprint(tree)
  return sorted(k for k in now if saved.get(k) != now[k])


def _shown(names) -> str:
  return ', '.join(names[:4]) + (f' and {len(names) - 4} more' if len(names) > 4 else '')


class Checkpointer:
  """Saves `state` (and `data_iter`, when given) every N steps, keeps the newest K.

  `keep_period` (optional) additionally keeps every step that is a multiple of it,
  whatever `keep` says (Orbax's `keep_period`).
  """

  def __init__(self, directory: str, *, keep: int, every_steps: int, async_save: bool = True,
               keep_period: Optional[int] = None):
    self.directory = paths.normalize(directory)
    self.workdir = os.path.dirname(self.directory)  # the run's folder (or bucket prefix)
    self.every_steps = every_steps
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, keep_period=keep_period, create=True,
            enable_async_checkpointing=async_save,
            # The step's folder is made in the save call itself: made by Orbax's
            # background thread, a failure (read-only, full) left the save waiting 300 s
            # for that thread's signal (measured). A mkdir costs milliseconds.
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False)))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def complete_steps(self) -> list:
    """The steps complete in storage now, read afresh (`all_steps` is the manager's
    cache, which lists a step from the moment its save starts); for error messages."""
    try:
      return sorted(self.manager.all_steps(read=True))
    except Exception:  # pylint: disable=broad-except  # the storage is failing too
      return self.all_steps()

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def should_save(self, step: int) -> bool:
    return step % self.every_steps == 0

  def save(self, step: int, state: Any, data_iter: Any = None) -> bool:
    """Saves `state` (and the iterator) as step `step`; NonFiniteStateError, and nothing
    written, when a float leaf holds NaN or inf: no checkpoint holds one, so retention
    never replaces a good step by a poisoned one."""
    bad = nonfinite_leaves(state)
    if bad:
      raise NonFiniteStateError(
          f'step {step}: the train state holds NaN or inf in {_shown(bad)}; not saved to '
          f'{self.directory} (the complete steps there, {self.complete_steps()}, are kept).')
    # Orbax creates the step's folder in a background thread and, when that fails, waits
    # 300 s for a signal that never comes (a read-only remount, measured: 301 s, then a
    # TimeoutError naming neither the folder nor the cause); a probe file first fails fast.
    try:
      paths.check_writable(self.directory, 'checkpoint directory',
                           probe_name=f'.write_probe.{jax.process_index()}')
    except ValueError as e:
      raise CheckpointWriteError(
          f'step {step}: not saved: {e} The complete steps, {self.complete_steps()}, are as they '
          'were; make the folder writable (or free space) and run again to resume.') from e
    items = {'state': ocp.args.StandardSave(state),
             FINGERPRINT_ITEM: ocp.args.JsonSave(fingerprint(state))}
    if data_iter is not None:
      items['data_iter'] = grain.checkpoint.CheckpointSave(data_iter)
    with self._write_errors(f'saving step {step}'):  # also an earlier async save's failure
      saved = self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    if saved:
      logging.info('Saving checkpoint for step %d to %s', step, self.directory)
    return saved

  def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> Any:
    """Restores step `step` into `abstract_state`'s shapes and shardings.

    `data_iter`, when given, is set in place to the saved iterator position.
    Raises FileNotFoundError for a step that is not a complete checkpoint, and
    CheckpointRestoreError when a listed step cannot be read back.
    """
    steps = sorted(self.manager.all_steps())
    if step not in steps:
      raise FileNotFoundError(
          f'no complete checkpoint for step {step} in {self.directory} '
          f'(complete steps: {steps}).')
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items['data_iter'] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except  # Orbax/TensorStore raise many kinds
      raise CheckpointRestoreError(_restore_failure(self.step_dir(step), step, steps, e)) from e
    state = restored['state']
    changed = changed_leaves(self.step_dir(step), state)  # [] for steps saved without one
    if changed:
      raise CheckpointRestoreError(_restore_failure(
          self.step_dir(step), step, steps, ValueError(
              f'the bytes read back differ from those saved (fingerprint) in '
              f'{_shown(changed)}')))
    bad = nonfinite_leaves(state)
    if bad:
      raise CheckpointRestoreError(_restore_failure(
          self.step_dir(step), step, steps, ValueError(f'NaN or inf in {_shown(bad)}')))
    return state

  def wait(self):
    with self._write_errors('finishing the saves under way'):
      self.manager.wait_until_finished()

  def close(self):
    self.wait()
    self.manager.close()

  @contextlib.contextmanager
  def _write_errors(self, doing: str):
    """Orbax's (and TensorStore's) write failures, re-raised as CheckpointWriteError
    naming the folder, the cause and what is intact."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except  # Orbax/TensorStore raise many kinds
      raise CheckpointWriteError(
          f'{doing} in {self.directory} failed ({type(e).__name__}: {_first_line(e, 600)}). '
          f'The complete steps, {self.complete_steps()}, are as they were; make the folder '
          'writable (or free space) and run again to resume.') from e


def _first_line(error: Exception, limit: int) -> str:
  """The first line of an error's message, cut to `limit` characters ('' if none)."""
  reason = (str(error).strip().splitlines() or [''])[0]
  return reason if len(reason) <= limit else reason[:limit] + '...'


def _restore_failure(path: str, step: int, steps, error: Exception) -> str:
  reason = _first_line(error, 400)
  older = [s for s in steps if s < step]
  if older:
    way_out = (f'To resume from step {older[-1]}, the previous complete step, run again with '
               '--config.checkpoint.resume=latest_good (it skips steps that do not restore), '
               f'or move it aside: mv {path} {path}.damaged')
  else:
    way_out = ('No earlier complete step exists; move it aside to start afresh: '
               f'mv {path} {path}.damaged')
  return (f'checkpoint step {step} at {path} could not be restored '
          f'({type(error).__name__}: {reason}). Its files are incomplete or damaged (Orbax lists a '
          'step only after every file was written, so this happened after the save: a copy '
          'cut short, a full disk, a manual edit), or the config no longer describes the model '
          f'that saved it. {way_out}')
