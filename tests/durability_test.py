"""Non-finite losses and damaged checkpoints: never applied, never saved, never silently
restored.

Issue 27 ("Durability under faults"), points 1 and 2: a NaN step skips its update; the run
stops by train.nonfinite naming the step; Checkpointer.save refuses a NaN / inf state so
that retention can never replace a good step with a poisoned one; a restored state holding
NaN, or bytes that differ from the saved fingerprint, is refused naming the step and the
previous complete one (tests/checkpoint_test.py damages real checkpoint files).
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train_test import small_config
from vdit_jax.config import validate
from vdit_jax.data import pipeline
from vdit_jax.train import checkpoint as ckpt_lib
from vdit_jax.tools import plot
from vdit_jax.train import loop
from vdit_jax.train import metrics as metrics_lib
from vdit_jax.train import state as state_lib
from vdit_jax.train import step as step_lib


def _equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_a_nan_batch_skips_the_update_and_is_counted():
  config = small_config()
  s = loop.build(config, None)
  state, _ = state_lib.create_state(s.init_fn, jax.random.key(0), s.mesh, s.rules)
  step = jax.jit(step_lib.make_train_step(s.model, s.diffusion, s.tx, s.schedule,
                                          num_classes=s.num_classes, label_dropout=0.1,
                                          ema=0.99))
  batch = jax.tree.map(jnp.asarray, next(pipeline.make_dataset(config.data, 4, seed=0)))
  good, metrics = step(state, batch, jax.random.key(0))  # step 0: learning rate 0
  good, metrics = step(good, batch, jax.random.key(0))
  assert float(metrics['nonfinite']) == 0.0 and float(metrics['update_norm']) > 0
  poisoned = dict(batch, video=batch['video'].at[0, 0, 0, 0, 0].set(jnp.nan))
  after, metrics = step(good, poisoned, jax.random.key(0))
  assert float(metrics['nonfinite']) == 1.0 and float(metrics['update_norm']) == 0.0
  assert not np.isfinite(float(metrics['loss']))
  assert int(after.step) == int(good.step) + 1  # the step counter and the data move on
  _equal((after.params, after.opt_state, after.ema_params),
         (good.params, good.opt_state, good.ema_params))
  # The next good batch trains from there.
  again, metrics = step(after, batch, jax.random.key(0))
  assert float(metrics['nonfinite']) == 0.0 and float(metrics['update_norm']) > 0


def test_guard_stops_by_policy_and_counts_streaks_across_checks():
  """train.nonfinite on given per-step flags: 'skip' stops at max_nonfinite_steps in a row
  (a streak may span checks, a finite step restarts it), 'stop' at the first."""
  def run(policy, flags, check_every):
    guard = loop.NonFiniteGuard(small_config(nonfinite=policy, max_nonfinite_steps=3,
                                             learning_rate=0.5).train)
    for step, flag in enumerate(flags, 1):
      guard.add({'nonfinite': jnp.asarray(float(flag))})
      if step % check_every == 0:
        try:
          guard.check(step, resumed_from=None)
        except loop.NonFiniteError as e:
          return step, guard.total, str(e)
    return None, guard.total, ''

  assert run('skip', [0, 1, 1, 0, 1, 1, 0, 0], 2)[:2] == (None, 4)  # no 3 in a row
  step, total, message = run('skip', [0, 1, 0, 1, 1, 1, 0, 0], 2)  # steps 4-6 in a row
  assert (step, total) == (6, 4) and 'step 6: 2 step(s)' in message
  assert '3 in a row, train.max_nonfinite_steps=3' in message
  assert 'train.learning_rate=0.5' in message and 'The run started' in message
  step, _, message = run('stop', [0, 0, 1, 0], 1)
  assert step == 3 and "train.nonfinite='stop'" in message


@pytest.mark.parametrize('policy', ['stop'])
def test_a_diverging_run_stops_naming_the_step_and_saves_no_nonfinite_state(tmp_path,
                                                                             policy):
  # A learning rate of 1e30 blows the params up after the warm-up's first update; the
  # loss is then inf / NaN at every step.
  config = small_config(num_steps=12, learning_rate=1e30, nonfinite=policy,
                        max_nonfinite_steps=3)
  workdir = str(tmp_path)
  with pytest.raises(loop.NonFiniteError) as raised:
    loop.train_and_evaluate(config, workdir)
  message = str(raised.value)
  assert message.startswith('step ') and 'non-finite loss or gradient' in message
  assert 'train.learning_rate=1e+30' in message
  assert ("train.nonfinite='stop'" if policy == 'stop' else 'train.max_nonfinite_steps=3'
          ) in message
  stopped_at = int(message.split()[1].rstrip(':'))
  assert stopped_at < 12
  # Every checkpoint written is finite and restores.
  fresh = loop.build(config, workdir)
  steps = fresh.checkpointer.all_steps()
  for saved in steps:
    restored = fresh.checkpointer.restore(saved, state_lib.abstract_with_shardings(
        fresh.abstract_state, fresh.state_shardings))
    assert ckpt_lib.nonfinite_leaves(restored) == []
  assert all(s < stopped_at or s == stopped_at for s in steps)


def test_save_refuses_a_nonfinite_state_and_keeps_the_good_steps(tmp_path):
  config = small_config()
  config.checkpoint.keep = 1
  s = loop.build(config, str(tmp_path))
  state, _ = state_lib.create_state(s.init_fn, jax.random.key(3), s.mesh, s.rules)
  s.checkpointer.save(2, state)
  s.checkpointer.wait()
  leaf = state.ema_params['final']['proj']['kernel']
  poisoned = state.replace(
      step=jnp.asarray(4, jnp.int32),
      ema_params=jax.tree.map(lambda x: x, state.ema_params))
  poisoned.ema_params['final']['proj']['kernel'] = leaf.at[0, 0].set(jnp.inf)
  with pytest.raises(ckpt_lib.NonFiniteStateError,
                     match=r'step 4: the train state holds NaN or inf in '
                           r'ema_params/final/proj/kernel; not saved .* \[2\]'):
    s.checkpointer.save(4, poisoned)
  s.checkpointer.wait()
  assert s.checkpointer.all_steps() == [2]  # keep=1 did not drop the good step
  assert sorted(os.listdir(s.checkpointer.directory)) == ['2']


def test_restore_refuses_a_checkpoint_holding_nan(tmp_path, monkeypatch):
  config = small_config()
  s = loop.build(config, str(tmp_path))
  state, _ = state_lib.create_state(s.init_fn, jax.random.key(3), s.mesh, s.rules)
  s.checkpointer.save(2, state)
  # A NaN written by a version without the save guard (the guard bypassed here).
  monkeypatch.setattr(ckpt_lib, 'nonfinite_leaves', lambda tree: [])
  nan = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
  s.checkpointer.save(4, nan)
  s.checkpointer.wait()
  monkeypatch.undo()
  abstract = state_lib.abstract_with_shardings(s.abstract_state, s.state_shardings)
  with pytest.raises(ckpt_lib.CheckpointRestoreError,
                     match=r'checkpoint step 4 at .*4 could not be restored \(ValueError: NaN '
                           r'or inf in params/.*previous complete step'):
    s.checkpointer.restore(4, abstract)
  _equal(s.checkpointer.restore(2, abstract).params, state.params)


def test_fingerprint_changes_with_any_element_and_not_with_layout():
  tree = {'w': jnp.arange(24, dtype=jnp.float32).reshape(2, 3, 4),
          'h': jnp.ones((5,), jnp.bfloat16), 'step': jnp.asarray(7, jnp.int32)}
  base = ckpt_lib.fingerprint(tree)
  assert set(base) == {'w', 'h', 'step'}
  for key, changed in [('w', tree['w'].at[1, 2, 3].set(23.000002)),   # one ulp
                       ('w', tree['w'].at[0, 0, 0].set(1.0).at[0, 0, 1].set(0.0)),  # a swap
                       ('h', tree['h'].at[4].set(-1.0)),
                       ('step', jnp.asarray(8, jnp.int32))]:
    other = ckpt_lib.fingerprint(dict(tree, **{key: changed}))
    assert other[key] != base[key] and all(other[k] == base[k] for k in base if k != key)
  # The same values computed another way (a transposed copy transposed back) hash the same.
  assert ckpt_lib.fingerprint(dict(tree, w=jnp.transpose(tree['w'].T))) == base


def test_restore_refuses_bytes_that_differ_from_the_saved_fingerprint(tmp_path):
  config = small_config()
  s = loop.build(config, str(tmp_path))
  state, _ = state_lib.create_state(s.init_fn, jax.random.key(3), s.mesh, s.rules)
  s.checkpointer.save(2, state)
  s.checkpointer.save(4, state.replace(step=jnp.asarray(4, jnp.int32)))
  s.checkpointer.wait()
  abstract = state_lib.abstract_with_shardings(s.abstract_state, s.state_shardings)
  _equal(s.checkpointer.restore(4, abstract).params, state.params)  # verified and equal
  path = os.path.join(s.checkpointer.step_dir(4), ckpt_lib.FINGERPRINT_ITEM, 'metadata')
  with open(path) as f:
    saved = json.load(f)
  saved['ema_params/final/proj/kernel'] ^= 1 << 20
  with open(path, 'w') as f:
    json.dump(saved, f)
  with pytest.raises(ckpt_lib.CheckpointRestoreError,
                     match=r'checkpoint step 4 at .* could not be restored \(ValueError: the '
                           r'bytes read back differ from those saved \(fingerprint\) in '
                           r'ema_params/final/proj/kernel\).*resume from step 2'):
    s.checkpointer.restore(4, abstract)


def test_metrics_after_a_resume_hold_each_step_once_for_readers(tmp_path):
  """A run logs steps 1-4, its step-4 checkpoint is lost (as a kill before the save would
  lose it), and the resume from step 2 logs 3 and 4 again: the file marks the resume, and
  read_metrics and tools/plot.py give each step once, with the re-run's values."""
  config = small_config(num_steps=6, log_every=1)
  workdir = str(tmp_path)
  loop.train_and_evaluate(config, workdir, stop_at=4)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))
  loop.train_and_evaluate(config, workdir)
  path = os.path.join(workdir, metrics_lib.METRICS_FILENAME)
  with open(path) as f:
    raw = [json.loads(line) for line in f if line.strip()]
  assert [r['step'] for r in raw] == [1, 2, 3, 4, 2, 3, 4, 5, 6]
  assert raw[4] == {'step': 2, 'resumed_from': 2}
  records = metrics_lib.read_metrics(path)
  assert [r['step'] for r in records] == [1, 2, 3, 4, 5, 6]
  assert records[2] is not raw[2] and records[2]['loss'] == raw[5]['loss']
  assert [r['step'] for r in plot.read_records(path)] == [1, 2, 3, 4, 5, 6]
  # A stale step past the resume point, never re-logged, is dropped too.
  stale = [{'step': 1, 'loss': 1.0}, {'step': 2, 'loss': 0.9}, {'step': 3, 'loss': 0.8},
           {'step': 2, 'resumed_from': 2}, {'step': 3, 'loss': 0.7}]
  assert metrics_lib.each_step_once(stale) == [stale[0], stale[1], stale[4]]


@pytest.mark.parametrize('overrides, message', [
    (dict(nonfinite='retry'), "config.train.nonfinite='retry' must be 'skip' or 'stop'"),
    (dict(max_nonfinite_steps=0), 'config.train.max_nonfinite_steps=0 must be an integer >= 1'),
])
def test_bad_nonfinite_policy_is_rejected(overrides, message):
  config = small_config(**overrides)
  with pytest.raises(ValueError, match=message):
    validate.validate_config(config, num_devices=1)
