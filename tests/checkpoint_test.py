"""Durable checkpoints: keep_period, SIGTERM, SIGKILL (mid-training and mid-save), damage, export.

The runs that get killed are real `python -m vdit_jax.main` processes with this file as
the config (`--config=tests/checkpoint_test.py`, see `get_config`), sharing one JAX
compilation cache. Every run has the same HLO whatever `train.num_steps` says (the
warm-up is longer than any run, so the LR schedule does not depend on num_steps), so
only the first run compiles. One straight NUM_STEPS-step run (the `straight` fixture) is
the reference: a killed-and-resumed run must end with bit-identical params.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import tiny
from vdit_jax import modes
from vdit_jax.config import validate
from vdit_jax.data import pipeline
from vdit_jax.data import video_io
from vdit_jax.train import checkpoint as ckpt_lib
from vdit_jax.generate import export as export_lib
from vdit_jax.train import loop
from vdit_jax.train import metrics as metrics_lib
from vdit_jax.train import preemption
from vdit_jax.train import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 16      # the length of every launched run
EVERY = 2           # checkpoint.every_steps of launched runs
KILL_AFTER = 4      # signals are sent once metrics.jsonl shows at least this step
RUN_TIMEOUT_S = 240


def get_config(arg=None):
  """The launched runs' config: 4 frames of 16x16, width 48, depth 1; async checkpoints."""
  del arg
  config = tiny.get_config()
  config.model.variant = None
  config.model.width = 48            # = the 1*4*4*3 values of a tubelet
  config.model.depth = 1
  config.model.num_heads = 2
  config.model.mlp_dim = 96
  config.model.patch_size = (1, 4, 4)
  config.model.mlp_conv = ()         # checkpoints under test, not the model: it compiles
  config.model.class_tokens = 0      # in ~60% of the time without these two
  config.data.num_frames = 4
  config.data.height = 16
  config.data.width = 16
  config.train.batch_size = 4
  config.train.num_steps = NUM_STEPS
  # Warm-up longer than any run: the schedule's horizon max(num_steps, warmup + 1) is the
  # same for every num_steps, so the compiled step (and the cache entry) is too.
  config.train.warmup_steps = 1000
  config.train.learning_rate = 1e-2
  config.train.log_every = 1
  config.checkpoint.every_steps = EVERY
  config.checkpoint.keep = 3
  config.checkpoint.async_save = True
  config.sample.num_steps = 2
  config.sample.num_samples = 2
  config.sample.formats = 'gif'
  config.sample.use_ema = True       # the export under test holds the EMA (tiny: raw params)
  return config


# ---------------------------------------------------------------- launching runs


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('jax_cache')


def _env(cache_dir):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
             JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1')
  env.pop('XLA_FLAGS', None)
  env['PYTHONPATH'] = os.pathsep.join(p for p in (REPO, env.get('PYTHONPATH')) if p)
  return env


def _start(cache_dir, workdir, *args):
  """Starts `python -m vdit_jax.main` on `workdir`; output goes to WORKDIR.log."""
  log = open(f'{workdir}.log', 'a')  # pylint: disable=consider-using-with
  cmd = [sys.executable, '-m', 'vdit_jax.main', f'--config={os.path.abspath(__file__)}',
         f'--workdir={workdir}', *args]
  proc = subprocess.Popen(cmd, cwd=REPO, env=_env(cache_dir), stdout=log,
                          stderr=subprocess.STDOUT)
  proc.log_file = log
  return proc


def _finish(proc, workdir, expect_rc=0):
  try:
    rc = proc.wait(timeout=RUN_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    rc = 'timeout'
  proc.log_file.close()
  with open(f'{workdir}.log') as f:
    out = f.read()
  assert rc == expect_rc, f'{proc.args} exited {rc}, not {expect_rc}; output tail:\n{out[-4000:]}'
  return out


def _run(cache_dir, workdir, *args):
  return _finish(_start(cache_dir, workdir, *args), workdir)


def _wait_until(condition, proc, workdir, what, timeout=RUN_TIMEOUT_S):
  deadline = time.monotonic() + timeout
  while not condition():
    if proc.poll() is not None:
      _finish(proc, workdir, expect_rc=None)  # fails, showing the output
    assert time.monotonic() < deadline, f'timed out waiting for {what}'
    time.sleep(0.01)


def _logged_records(workdir):
  """The records in metrics.jsonl so far, as written: re-run steps and resume markers
  included (tolerates a line being written right now)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except ValueError:
        pass
  return records


def _logged_steps(workdir):
  """Steps logged so far, in the order written (resume markers left out)."""
  return [r['step'] for r in _logged_records(workdir) if 'resumed_from' not in r]


def _checkpoints(workdir):
  return os.path.join(workdir, 'checkpoints')


def _complete_steps(workdir):
  return sorted(int(n) for n in os.listdir(_checkpoints(workdir)) if n.isdigit())


def _tmp_dirs(workdir):
  directory = _checkpoints(workdir)
  if not os.path.isdir(directory):
    return []
  return sorted(n for n in os.listdir(directory) if '.orbax-checkpoint-tmp' in n)


def _restore(workdir, step):
  s = loop.build(get_config(), workdir)
  state = s.checkpointer.restore(
      step, state_lib.abstract_with_shardings(s.abstract_state, s.state_shardings))
  s.checkpointer.close()
  return jax.device_get(state)


def _assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope='module')
def straight(tmp_path_factory, cache_dir):
  """A NUM_STEPS-step run with no interruption: (workdir, its final state)."""
  workdir = str(tmp_path_factory.mktemp('straight') / 'run')
  _run(cache_dir, workdir)
  assert _logged_steps(workdir) == list(range(1, NUM_STEPS + 1))
  return workdir, _restore(workdir, NUM_STEPS)


# ---------------------------------------------------------------- keep_period


def test_keep_period_keeps_its_multiples_beyond_keep(tmp_path):
  config = get_config()
  config.checkpoint.keep = 2
  config.checkpoint.keep_period = 4
  s = loop.build(config, str(tmp_path / 'with_period'))
  plain_config = get_config()
  plain_config.checkpoint.keep = 2
  plain = loop.build(plain_config, str(tmp_path / 'without'))
  tree = {'w': np.arange(3.0, dtype=np.float32)}
  for step in range(2, 14, 2):
    for checkpointer in (s.checkpointer, plain.checkpointer):
      checkpointer.save(step, tree)
  s.checkpointer.close()
  plain.checkpointer.close()
  # keep=2 keeps 10 and 12; keep_period=4 also keeps 4 and 8 (never deleted).
  assert _complete_steps(str(tmp_path / 'with_period')) == [4, 8, 10, 12]
  assert _complete_steps(str(tmp_path / 'without')) == [10, 12]


@pytest.mark.parametrize('period, message', [
    (3, r'keep_period=3 is not a multiple of checkpoint.every_steps=2'),
    (0, r'keep_period=0 must be None or a positive integer'),
    (-4, r'keep_period=-4 must be None or a positive integer'),
])
def test_keep_period_is_validated(period, message):
  config = get_config()
  config.checkpoint.keep_period = period
  with pytest.raises(ValueError, match=message):
    validate.validate_config(config, 1)
  config.checkpoint.keep_period = 6
  validate.validate_config(config, 1)


# ---------------------------------------------------------------- SIGTERM


def test_sigterm_watcher_sets_flag_and_restores_previous_handler():
  calls = []
  previous = signal.signal(signal.SIGTERM, lambda *_: calls.append('previous'))
  try:
    with preemption.PreemptionWatcher() as watcher:
      assert not watcher.should_stop(1)
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.01)  # Python runs the handler at the next bytecode boundary
      assert watcher.should_stop(2)
      assert calls == []  # ours handled it, not the previous handler
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)
    assert calls == ['previous']
  finally:
    signal.signal(signal.SIGTERM, previous)


def preemption_worker(process_id, port, signalled_process, signal_step, num_steps):
  """One process of test_processes_agree_on_the_preemption_step (run in a subprocess)."""
  jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=process_id)
  stopped_at = None
  with preemption.PreemptionWatcher() as watcher:
    for step in range(1, num_steps + 1):
      time.sleep(0.02 * (1 + 2 * process_id))  # processes at different speeds
      if process_id == signalled_process and step == signal_step:
        os.kill(os.getpid(), signal.SIGTERM)
      if watcher.should_stop(step):
        stopped_at = step
        break
  print(json.dumps({'process': process_id, 'stopped_at': stopped_at}), flush=True)
  jax.distributed.shutdown()


def test_processes_agree_on_the_preemption_step(tmp_path):
  """2 processes (jax.distributed on 127.0.0.1, CPU): SIGTERM to process 1 at its step 5
  stops both at one and the same later step."""
  from vdit_jax.tools import launch_local  # pylint: disable=g-import-not-at-top
  port = launch_local.free_port()
  env = _env(tmp_path)
  procs = [subprocess.Popen(
      [sys.executable, '-c', 'from tests.checkpoint_test import preemption_worker; '
       f'preemption_worker({i}, {port}, 1, 5, 200)'],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  results = []
  for p in procs:
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out[-3000:]
    results.append(json.loads(out.strip().splitlines()[-1]))
  stops = [r['stopped_at'] for r in results]
  assert stops[0] is not None and stops[0] == stops[1], results
  assert 5 <= stops[0] < 200, results


def test_sigterm_saves_current_step_then_resume_matches_straight_run(tmp_path, cache_dir,
                                                                     straight):
  workdir = str(tmp_path / 'run')
  proc = _start(cache_dir, workdir)
  _wait_until(lambda: len(_logged_steps(workdir)) >= KILL_AFTER, proc, workdir,
              f'step {KILL_AFTER}')
  proc.send_signal(signal.SIGTERM)
  out = _finish(proc, workdir)  # a clean exit
  logged = _logged_steps(workdir)
  stopped = logged[-1]
  assert KILL_AFTER <= stopped < NUM_STEPS, (
      f'the run reached step {stopped} before SIGTERM landed: too fast to test')
  assert f'SIGTERM: saved the checkpoint of step {stopped} in ' in out, out[-2000:]
  # The current step was saved even when it is not a multiple of every_steps, and it is
  # the newest complete checkpoint; no final sample was written.
  assert _complete_steps(workdir)[-1] == stopped
  assert not _tmp_dirs(workdir)
  assert not os.path.exists(os.path.join(workdir, 'samples'))

  out = _run(cache_dir, workdir)
  assert f'resumed from step {stopped} in ' in out
  assert _logged_steps(workdir) == list(range(1, NUM_STEPS + 1))
  _assert_trees_equal(_restore(workdir, NUM_STEPS), straight[1])


# ---------------------------------------------------------------- SIGKILL


def test_sigkill_during_async_save_resumes_from_newest_complete_step(tmp_path, cache_dir,
                                                                     straight):
  workdir = str(tmp_path / 'run')
  proc = _start(cache_dir, workdir)
  in_flight = []

  def saving_after_kill_step():
    in_flight[:] = sorted(int(n.split('.')[0]) for n in _tmp_dirs(workdir))
    return bool(in_flight) and in_flight[0] >= KILL_AFTER

  _wait_until(saving_after_kill_step, proc, workdir, 'an async save in flight')
  proc.kill()  # SIGKILL: no handler, no cleanup
  _finish(proc, workdir, expect_rc=-signal.SIGKILL)
  saving = in_flight[0]  # the step whose save was in flight
  logged = _logged_steps(workdir)
  complete = _complete_steps(workdir)
  assert logged[-1] < NUM_STEPS, 'the run ended before SIGKILL landed: too fast to test'
  # Orbax waits for one save before it starts the next, so every step saved before the
  # one in flight is complete; the in-flight one is complete only if it finished in the
  # moment between seeing its temporary directory and the kill.
  newest = complete[-1]
  assert newest in (saving - EVERY, saving), (saving, complete, _tmp_dirs(workdir))
  left = _tmp_dirs(workdir)
  assert all(int(n.split('.')[0]) not in complete for n in left), (left, complete)
  checkpointer = loop.build(get_config(), workdir).checkpointer
  assert checkpointer.latest_step() == newest  # what the resumed run will pick
  checkpointer.close()

  out = _run(cache_dir, workdir)
  assert f'resumed from step {newest} in ' in out
  records = _logged_records(workdir)
  first, marker, second = records[:len(logged)], records[len(logged)], records[len(logged) + 1:]
  assert [r['step'] for r in first] == list(range(1, len(logged) + 1))
  assert marker == {'step': newest, 'resumed_from': newest}
  assert [r['step'] for r in second] == list(range(newest + 1, NUM_STEPS + 1))
  # Readers see each step once, the re-run's record where a step was run twice.
  once = metrics_lib.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  assert [r['step'] for r in once] == list(range(1, NUM_STEPS + 1))
  assert once[newest:] == second
  # Steps logged before the kill and run again after it give the same losses.
  again = {r['step']: r['loss'] for r in second}
  assert all(again[r['step']] == r['loss'] for r in first if r['step'] > newest)
  _assert_trees_equal(_restore(workdir, NUM_STEPS), straight[1])
  assert not _tmp_dirs(workdir)  # the resumed run saved the killed step again


def _host_state(config, seed):
  """A full TrainState of numpy values (no compile), distinct per seed."""
  s = loop.build(config, None)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype)
                      if np.issubdtype(a.dtype, np.floating) else np.full(a.shape, seed, a.dtype),
                      s.abstract_state)


def kill_during_async_save(workdir):
  """Saves step 2, starts the async save of step 4, and SIGKILLs itself (in a subprocess)."""
  config = get_config()
  s = loop.build(config, workdir)
  data_iter = pipeline.make_dataset(config.data, config.train.batch_size, seed=config.seed)
  s.checkpointer.save(2, _host_state(config, 2), data_iter)
  s.checkpointer.wait()
  next(data_iter)
  # Keep the GIL in this thread: Orbax's finaliser thread (the rename) cannot run before
  # the kill, while TensorStore's C++ writers may.
  sys.setswitchinterval(100)
  s.checkpointer.save(4, _host_state(config, 4), data_iter)
  os.kill(os.getpid(), signal.SIGKILL)


def test_kill_during_async_save_leaves_only_an_ignored_tmp_dir(tmp_path, cache_dir):
  workdir = str(tmp_path / 'run')
  proc = subprocess.run(
      [sys.executable, '-c', 'from tests.checkpoint_test import kill_during_async_save; '
       f'kill_during_async_save({workdir!r})'],
      cwd=REPO, env=_env(cache_dir), capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert _tmp_dirs(workdir) == ['4.orbax-checkpoint-tmp'], os.listdir(_checkpoints(workdir))
  assert _complete_steps(workdir) == [2]
  config = get_config()
  s = loop.build(config, workdir)
  data_iter = pipeline.make_dataset(config.data, config.train.batch_size, seed=config.seed)
  state, step = loop.restore_or_init(s, data_iter)
  assert step == 2
  _assert_trees_equal(jax.device_get(state), _host_state(config, 2))
  # The next save of step 4 replaces the leftover.
  s.checkpointer.save(4, state, data_iter)
  s.checkpointer.close()
  assert _complete_steps(workdir) == [2, 4] and not _tmp_dirs(workdir)


# ---------------------------------------------------------------- damage


def _truncate_data_files(step_dir):
  for root, _, files in os.walk(os.path.join(step_dir, 'state')):
    if os.path.basename(root) == 'd':
      for name in files:
        path = os.path.join(root, name)
        os.truncate(path, os.path.getsize(path) // 2)


def _overwrite_4k(step_dir):
  """4 KiB of other bytes inside the largest data file, its size unchanged (issue 27's case:
  before fingerprints, this restored, trained NaN, and retention deleted the good step)."""
  files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, 'state'))
           if os.path.basename(root) == 'd' for name in names]
  path = max(files, key=os.path.getsize)
  size = os.path.getsize(path)
  offset = max(0, size // 2 - 2048)
  with open(path, 'r+b') as f:
    f.seek(offset)
    f.write(np.random.default_rng(0).bytes(min(4096, size - offset)))
  assert os.path.getsize(path) == size


@pytest.mark.parametrize('damage', ['truncated_data', 'state_item_missing', 'overwritten_4k'])
def test_damaged_newest_checkpoint_names_its_path_and_the_previous_step(tmp_path, straight,
                                                                         damage):
  workdir = str(tmp_path / 'run')
  shutil.copytree(_checkpoints(straight[0]), _checkpoints(workdir))
  steps = _complete_steps(workdir)
  newest = os.path.join(_checkpoints(workdir), str(steps[-1]))
  if damage == 'truncated_data':
    _truncate_data_files(newest)
  elif damage == 'overwritten_4k':
    _overwrite_4k(newest)
  else:
    shutil.rmtree(os.path.join(newest, 'state'))
  s = loop.build(get_config(), workdir)
  with pytest.raises(ckpt_lib.CheckpointRestoreError) as e:
    loop.restore_or_init(s)
  s.checkpointer.close()
  message = str(e.value)
  assert f'checkpoint step {steps[-1]} at {newest} could not be restored' in message
  assert (f'To resume from step {steps[-2]}, the previous complete step, run again with '
          '--config.checkpoint.resume=latest_good') in message
  assert f'or move it aside: mv {newest} {newest}.damaged' in message
  # Following the advice resumes from the previous step: the flag...
  config = get_config()
  config.checkpoint.resume = 'latest_good'
  s = loop.build(config, workdir)
  state, step = loop.restore_or_init(s)
  s.checkpointer.close()
  assert step == steps[-2] and int(state.step) == steps[-2]
  assert ckpt_lib.nonfinite_leaves(state) == []
  # ...or moving the damaged step aside.
  os.rename(newest, newest + '.damaged')
  s = loop.build(get_config(), workdir)
  _, step = loop.restore_or_init(s)
  s.checkpointer.close()
  assert step == steps[-2]


def test_damaged_checkpoint_is_the_last_line_of_a_failed_run(tmp_path, cache_dir, straight):
  """Issue 27: the cause was line 343 of 1764, above pages of asyncio / TensorStore
  shutdown tracebacks; now the run exits 1 with one summary line last."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(_checkpoints(straight[0]), _checkpoints(workdir))
  newest = os.path.join(_checkpoints(workdir), str(_complete_steps(workdir)[-1]))
  _overwrite_4k(newest)
  out = _finish(_start(cache_dir, workdir), workdir, expect_rc=1)
  last = out.strip().splitlines()[-1]
  assert last.startswith('FATAL CheckpointRestoreError: checkpoint step '), out[-3000:]
  assert f'at {newest} could not be restored' in last and 'latest_good' in last
  # Shutdown noise may come before the fatal traceback, never after it.
  assert 'Event loop is closed' not in out[out.rindex('Traceback (most recent call last)'):]


def _mount_tmpfs(path) -> bool:
  """Mounts a small tmpfs at `path`; False where this machine does not let us (not root,
  or no mount capability in the container)."""
  try:
    result = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64m', 'tmpfs', str(path)],
                            capture_output=True, check=False, timeout=30)
  except (OSError, subprocess.TimeoutExpired):
    return False
  return result.returncode == 0


def _fill(folder) -> None:
  """Writes zeros into `folder` until its file system is full (ENOSPC)."""
  with open(os.path.join(folder, 'filler.bin'), 'wb') as f:
    block = b'\0' * (1 << 20)
    try:
      while True:
        f.write(block)
        f.flush()
    except OSError as e:
      assert e.errno == errno.ENOSPC, e
  # What the buffered writer could not place is dropped with the exception above.


@pytest.mark.parametrize('fault', ['read_only', 'full'])
def test_checkpoint_folder_turning_unwritable_ends_the_run_in_seconds(tmp_path, cache_dir,
                                                                      fault):
  """Issue 27: a checkpoint folder that became unwritable mid-run stalled 300 s in Orbax,
  then died with a TimeoutError naming neither. Read-only for root too, and full: the
  folder is its own small tmpfs, remounted read-only or filled while the run trains
  (BUILD_NOTES has the probe by hand for machines where mount is not allowed)."""
  workdir = tmp_path / 'run'
  folder = workdir / 'checkpoints'
  folder.mkdir(parents=True)
  if not _mount_tmpfs(folder):
    pytest.skip('mounting a tmpfs needs root with the mount capability')
  try:
    proc = _start(cache_dir, str(workdir), '--config.train.num_steps=100000')
    _wait_until(lambda: (len(_logged_steps(str(workdir))) >= KILL_AFTER
                         and _complete_steps(str(workdir))), proc, str(workdir),
                f'step {KILL_AFTER} and a complete checkpoint')
    if fault == 'read_only':
      for _ in range(100):  # busy while a file there is open for writing: try again
        remount = subprocess.run(['mount', '-o', 'remount,ro', str(folder)],
                                 capture_output=True, text=True, timeout=30, check=False)
        if remount.returncode == 0:
          break
        time.sleep(0.05)
      assert remount.returncode == 0, remount.stderr
    else:
      _fill(folder)
    t0 = time.monotonic()
    out = _finish(proc, str(workdir), expect_rc=1)
    elapsed = time.monotonic() - t0
    last = out.strip().splitlines()[-1]
    # Caught by the probe before a save, or from Orbax when a save was under way.
    assert last.startswith('FATAL CheckpointWriteError: '), out[-3000:]
    assert str(folder) in last, last
    cause = 'Read-only file system' if fault == 'read_only' else 'No space left on device'
    assert cause in last and 'are as they were' in last, last
    assert elapsed < 60, elapsed
    steps = _complete_steps(str(workdir))  # those finished before the fault
    assert steps and f'The complete steps, {steps}, are as they were' in last, (
        os.listdir(folder), last)
    for step in steps:
      assert ckpt_lib.nonfinite_leaves(_restore(str(workdir), step)) == []
  finally:
    subprocess.run(['umount', '-l', str(folder)], check=False, timeout=30)


def test_checkpoint_of_another_model_names_the_differences_not_damage(tmp_path, straight):
  """A workdir trained at one width, resumed or sampled with a config of another (as
  after configs/tiny_text.py went from width 128 to 256): the error names the field and
  both values from the workdir's config.json, and does not call the checkpoint damaged
  (moving it aside would not help: every step has the old shapes)."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(_checkpoints(straight[0]), _checkpoints(workdir))
  shutil.copy(os.path.join(straight[0], 'config.json'), workdir)
  config = get_config()
  config.model.width = 64
  s = loop.build(config, workdir)
  with pytest.raises(ckpt_lib.CheckpointRestoreError) as e:
    loop.restore_or_init(s)
  s.checkpointer.close()
  message = str(e.value)
  assert 'width: saved 48, this config 64' in message, message
  assert 'differs from this config' in message and 'config.json' in message
  assert 'damaged' not in message and 'mv ' not in message
  # Without the saved config there is nothing to compare: the plain error stands.
  os.remove(os.path.join(workdir, 'config.json'))
  s = loop.build(config, workdir)
  with pytest.raises(ckpt_lib.CheckpointRestoreError, match='could not be restored'):
    loop.restore_or_init(s)
  s.checkpointer.close()
  # With the saved width the same workdir restores.
  s = loop.build(get_config(), workdir)
  _, step = loop.restore_or_init(s)
  s.checkpointer.close()
  assert step == NUM_STEPS


# ---------------------------------------------------------------- export


def test_export_holds_ema_params_only_and_samples_without_train_state(tmp_path, cache_dir,
                                                                       straight):
  workdir = str(tmp_path / 'run')
  shutil.copytree(_checkpoints(straight[0]), _checkpoints(workdir))
  out = _run(cache_dir, workdir, '--mode=export')
  path = export_lib.export_dir(workdir, NUM_STEPS)
  assert f'exported the ema_params of step {NUM_STEPS} to {path}' in out
  assert sorted(os.listdir(path)) == ['config.json', 'export.json', 'params']
  with open(os.path.join(path, 'config.json')) as f:
    assert json.load(f)['model']['width'] == get_config().model.width
  s = loop.build(get_config(), None)
  params, info = export_lib.read(path, s.abstract_state.ema_params)
  assert info == {'step': NUM_STEPS, 'params': 'ema_params'}
  _assert_trees_equal(jax.device_get(params), straight[1].ema_params)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(straight[1].ema_params),
                                                       jax.tree.leaves(straight[1].params)))

  # --checkpoint=EXPORT samples in a fresh workdir (no train state anywhere), and the
  # clip equals the straight run's final sample (the same EMA params, the same seed).
  fresh = str(tmp_path / 'fresh')
  out = _run(cache_dir, fresh, '--mode=sample', f'--checkpoint={path}')
  assert f'sampling from the ema_params exported in {path}' in out
  got = video_io.read_video(
      os.path.join(fresh, 'samples', f'sample_export_step_{NUM_STEPS:07d}.gif'))
  want = video_io.read_video(os.path.join(straight[0], 'samples', f'step_{NUM_STEPS:07d}.gif'))
  np.testing.assert_array_equal(got, want)

  # Without --checkpoint, a workdir that holds only an export samples from it.
  only_export = str(tmp_path / 'only_export')
  shutil.copytree(path, export_lib.export_dir(only_export, NUM_STEPS))
  s = loop.build(get_config(), only_export)
  # pylint: disable-next=protected-access
  params, step, name = modes.params_to_sample(s, only_export, None)
  s.checkpointer.close()
  assert (step, name) == (NUM_STEPS, f'sample_export_step_{NUM_STEPS:07d}')
  _assert_trees_equal(jax.device_get(params), straight[1].ema_params)


def test_sample_without_checkpoint_or_complete_export_names_what_is_missing(tmp_path):
  empty = str(tmp_path / 'empty')
  with pytest.raises(FileNotFoundError,
                     match='no export in .*export and no checkpoint in .*checkpoints: train first'):
    modes.sample(get_config(), empty)
  unfinished = os.path.join(empty, 'export', '7')
  os.makedirs(os.path.join(unfinished, 'params'))
  assert export_lib.latest(empty) is None  # no export.json: never read
  with pytest.raises(FileNotFoundError, match=f'{unfinished} is not a complete export'):
    modes.sample(get_config(), empty, checkpoint=unfinished)
