"""`--workdir=gs://bucket/run`: everything a run writes and reads back lives in the bucket.

Against a real GCS emulator that the test starts (tests/gcs_emulator.py), with the
clients pointed at it the standard way (STORAGE_EMULATOR_HOST, TENSORSTORE_GCS_HTTP_URL),
through the command line users run (`python -m vdit_jax.main`, this file as the config):
- a bucket that does not exist stops the run at start, naming it, before any compile;
- a run killed with SIGKILL after a checkpoint resumes from the bucket bit-exactly (its
  losses equal a straight run's, float for float), then samples, exports, samples the
  export, extends a clip, and restores its state onto another mesh of 8 devices (the
  exported StableHLO sampler goes to and comes from a bucket in export_sampler_test.py);
- metrics.jsonl, config.json, samples, TensorBoard events and the exports are objects in
  the bucket, and a `file://` workdir keeps working;
- two processes with separate local scratch folders (cwd, TMPDIR, HOME) and one bucket
  workdir train, resume, and keep every checkpoint retention should keep.
"""

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import gcs_emulator
from tests import multidevice
from tests.gcs_emulator import gcs  # pylint: disable=unused-import  # the fixture
from vdit_jax.parallel import paths
from vdit_jax.tools import launch_local
from vdit_jax.train import loop
from vdit_jax.train import metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300
NUM_STEPS = 60
EVERY = 4


def get_config(arg=None):
  """tests/train_test.py's small model with given frames (for --mode=extend), batch 8."""
  del arg
  from tests.train_test import small_config  # pylint: disable=g-import-not-at-top
  config = small_config(batch_size=8, num_steps=NUM_STEPS, warmup_steps=8, log_every=1)
  config.model.context_frames_max = 2
  # The storage is under test, not the model: without the token convolution and the class
  # tokens its step compiles in ~60% of the time (8 devices), and there are ten launches.
  config.model.mlp_conv = ()
  config.model.class_tokens = 0
  config.checkpoint.every_steps = EVERY
  config.checkpoint.keep = 2
  config.checkpoint.async_save = True  # the default of real runs
  config.train.tensorboard = True
  # The runs keep the default cache, the test session's (tests/conftest.py): a resume, the
  # second launch of two processes and the later tests' runs load what the first compiled.
  config.sample.formats = 'gif,mp4'
  config.sample.use_ema = True  # exports and samples the EMA params (tiny: the raw ones)
  return config


def _env(gcs_env, num_devices=1, **extra):
  env = dict(os.environ, **gcs_env, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  env['XLA_FLAGS'] = (multidevice.CPU_COLLECTIVE_TIMEOUT_FLAGS +
                      f' --xla_force_host_platform_device_count={num_devices}')
  env['PYTHONPATH'] = os.pathsep.join(p for p in (REPO, env.get('PYTHONPATH')) if p)
  env.update(extra)
  return env


def _main(workdir, *args):
  return [sys.executable, '-m', 'vdit_jax.main', f'--config={os.path.abspath(__file__)}',
          f'--workdir={workdir}', *args]


def _run(cmd, env, cwd=REPO, expect_ok=True):
  proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=TIMEOUT_S, check=False)
  out = proc.stdout + proc.stderr
  if expect_ok:
    assert proc.returncode == 0, f'{cmd} exited {proc.returncode}:\n{out[-5000:]}'
  return proc.returncode, out


def _last_per_step(workdir):
  """{step: record} of metrics.jsonl, the last record logged for each step."""
  return {r['step']: r for r in metrics_lib.read_metrics(paths.join(workdir, 'metrics.jsonl'))}


def _steps(workdir):
  return sorted(ocp.utils.checkpoint_steps(paths.join(workdir, 'checkpoints')))


def test_missing_bucket_stops_the_run_before_compiling(gcs):
  workdir = 'gs://no-such-bucket-vdit/run'
  rc, out = _run(_main(workdir), _env(gcs.env), expect_ok=False)
  assert rc != 0
  last = out.strip().splitlines()[-1]
  assert f'--workdir={workdir} cannot be written' in last, out[-3000:]
  assert 'compiled the train step' not in out


def test_bucket_that_cannot_be_written_stops_the_run_before_compiling(gcs):
  """A bucket this job may read but not write (a proxy in front of the emulator answers
  403 to every write, as GCS does without the permission)."""
  bucket = gcs.new_bucket()
  workdir = f'gs://{bucket}/run'
  with gcs_emulator.ReadOnlyProxy(gcs.url) as proxy:
    rc, out = _run(_main(workdir), _env(gcs_emulator.client_env(proxy.url)),
                   expect_ok=False)
  assert rc != 0
  last = out.strip().splitlines()[-1]
  assert f'--workdir={workdir} cannot be written' in last and 'Forbidden' in last, out[-3000:]
  assert 'compiled the train step' not in out


@pytest.fixture(scope='module')
def straight(gcs):
  """A run of NUM_STEPS in a bucket, uninterrupted, started in the background (it runs
  beside the run that the next test kills and resumes): a future of (workdir, records by
  step)."""
  def run(workdir):
    _run(_main(workdir), _env(gcs.env))
    return workdir, _last_per_step(workdir)

  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    yield pool.submit(run, f'gs://{gcs.new_bucket()}/run')


def test_sigkill_then_resume_in_a_bucket_is_bit_exact(gcs, straight, tmp_path):
  workdir = f'gs://{gcs.new_bucket()}/run'
  proc = subprocess.Popen(_main(workdir), cwd=REPO, env=_env(gcs.env),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + TIMEOUT_S
    while not _steps(workdir):  # the first complete checkpoint in the bucket
      assert proc.poll() is None, f'the run ended (status {proc.returncode}) before a save'
      assert time.monotonic() < deadline, 'no checkpoint appeared'
      time.sleep(0.1)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  killed_at = _steps(workdir)[-1]
  assert killed_at < NUM_STEPS, 'the run finished before it was killed'

  _, out = _run(_main(workdir), _env(gcs.env))
  resumed = [line for line in out.splitlines() if line.startswith('resumed from step')]
  assert resumed and resumed[0].startswith(f'resumed from step {killed_at}'), out[-3000:]
  got = _last_per_step(workdir)
  _, want = straight.result()
  assert sorted(want) == list(range(1, NUM_STEPS + 1))
  for step in range(killed_at + 1, NUM_STEPS + 1):  # the resumed run's steps
    for key in ('loss', 'grad_norm', 'param_norm'):
      assert got[step][key] == want[step][key], (step, key, got[step][key], want[step][key])
  assert _steps(workdir) == [NUM_STEPS - EVERY, NUM_STEPS]  # keep=2

  # What the run wrote are objects in the bucket, and they read back.
  saved = json.loads(paths.read_text(paths.join(workdir, 'config.json')))
  assert saved['train']['num_steps'] == NUM_STEPS
  for fmt in ('gif', 'mp4'):
    assert paths.path(paths.join(workdir, 'samples', f'step_{NUM_STEPS:07d}.{fmt}')
                      ).stat().length > 0
  events = paths.listdir(paths.join(workdir, 'tensorboard'))
  assert len(events) == 2 and all(e.startswith('events.out.tfevents.') for e in events)
  _check_events(paths.join(workdir, 'tensorboard'), tmp_path)


def _check_events(logdir, tmp_path):
  """TensorBoard's own loader reads the bucket's event files (copied down) in full."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  local = tmp_path / 'events'
  os.makedirs(local)
  for name in paths.listdir(logdir):
    (local / name).write_bytes(paths.read_bytes(paths.join(logdir, name)))
  acc = event_accumulator.EventAccumulator(str(local), size_guidance={'scalars': 0})
  acc.Reload()
  steps = sorted({e.step for e in acc.Scalars('train/loss')})
  assert steps[-1] == NUM_STEPS and 'samples' in acc.Tags()['images']


def test_sample_export_extend_and_another_mesh_from_a_bucket(gcs, straight, tmp_path):
  workdir, want = straight.result()
  env1, env8 = _env(gcs.env), _env(gcs.env, num_devices=8)
  # --mode=sample restores the train state onto 1 device, and onto a mesh of 8.
  _run(_main(workdir, '--mode=sample'), env1)
  one = _read_gif(paths.join(workdir, 'samples', f'sample_step_{NUM_STEPS:07d}.gif'))
  _run(_main(workdir, '--mode=sample', '--config.mesh.data=2', '--config.mesh.fsdp=2',
             '--config.mesh.tensor=2'), env8)
  eight = _read_gif(paths.join(workdir, 'samples', f'sample_step_{NUM_STEPS:07d}.gif'))
  assert one.shape == eight.shape
  # The clips, not the 1-pixel padding between them: GIF's palette, fitted to each file's
  # colours, can map the constant padding to entries 8 levels apart.
  clip = 128 + 1  # configs' 16-pixel frames scaled 8x for the grid, then the padding
  keep = lambda a: np.delete(np.delete(a, np.s_[128::clip], axis=1), np.s_[128::clip],
                             axis=2).astype(int)
  assert np.abs(keep(one) - keep(eight)).max() <= 2  # fp32 sums in another order

  _, out = _run(_main(workdir, '--mode=export'), env1)
  export = f'{workdir}/export/{NUM_STEPS}'
  assert f'exported the ema_params of step {NUM_STEPS} to {export}' in out, out[-2000:]
  assert paths.isfile(f'{export}/export.json') and paths.isfile(f'{export}/config.json')
  _run(_main(str(tmp_path / 'elsewhere'), '--mode=sample', f'--checkpoint={export}'), env1)
  assert os.path.getsize(
      tmp_path / 'elsewhere' / 'samples' / f'sample_export_step_{NUM_STEPS:07d}.gif') > 0

  # --mode=extend: the input clip is read from the bucket, the result written there.
  clip = paths.join(workdir, 'inputs', 'clip.gif')
  paths.write_bytes(clip, paths.read_bytes(
      paths.join(workdir, 'samples', f'step_{NUM_STEPS:07d}.gif')))
  _run(_main(workdir, '--mode=extend', f'--input={clip}', '--num_frames=6'), env1)
  assert paths.isfile(paths.join(workdir, 'samples', f'extend_clip_step_{NUM_STEPS:07d}.gif'))


def _read_gif(path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with paths.local_copy(path) as local, Image.open(local) as image:
    frames = []
    for i in range(image.n_frames):
      image.seek(i)
      frames.append(np.asarray(image.convert('RGB')))
  return np.stack(frames)


def test_file_url_workdir_is_a_local_folder(tmp_path):
  config = get_config()
  config.train.num_steps = 2
  config.train.tensorboard = False
  config.sample.formats = 'gif'
  config.checkpoint.every_steps = 2
  loop.train_and_evaluate(config, f'file://{tmp_path}/run')
  assert sorted(os.listdir(tmp_path / 'run')) == ['checkpoints', 'config.json',
                                                 'metrics.jsonl', 'samples']
  assert [r['step'] for r in metrics_lib.read_metrics(str(tmp_path / 'run/metrics.jsonl'))
          ] == [1, 2]


def _two_processes(gcs, workdir, scratch, *args):
  """2 processes x 4 devices on one bucket workdir, each in its own scratch folder."""
  commands = launch_local.process_commands(
      2, _main(workdir, *args)[3:], launch_local.free_port())
  procs = []
  for i, cmd in enumerate(commands):
    home = scratch / f'host{i}'
    os.makedirs(home / 'tmp', exist_ok=True)
    env = launch_local.process_env(4, _env(gcs.env, HOME=str(home), TMPDIR=str(home / 'tmp')))
    procs.append(subprocess.Popen(cmd, cwd=home, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outs.append(out)
    assert p.returncode == 0, out[-5000:]
  return outs


def test_two_processes_with_separate_scratch_share_a_bucket_workdir(gcs, tmp_path):
  workdir = f'gs://{gcs.new_bucket()}/run'
  mesh = ('--config.mesh.data=4', '--config.mesh.fsdp=2')
  outs = _two_processes(gcs, workdir, tmp_path, '--config.train.num_steps=8', *mesh)
  assert "8 device(s), 2 process(es)" in outs[0]
  assert _steps(workdir) == [4, 8]
  # Grain's handler wrote each process's iterator position to the bucket too.
  assert paths.listdir(paths.join(workdir, 'checkpoints', '8', 'data_iter')) == [
      'commit_success.txt', 'process_0-of-2.json', 'process_1-of-2.json']
  outs = _two_processes(gcs, workdir, tmp_path, '--config.train.num_steps=12', *mesh)
  assert 'resumed from step 8' in outs[0]  # progress lines come from process 0 only
  assert _steps(workdir) == [8, 12]  # keep=2: nothing newer lost, nothing older kept
  records = metrics_lib.read_metrics(paths.join(workdir, 'metrics.jsonl'))
  assert [r['step'] for r in records] == list(range(1, 13))  # one per step, no repeats
  assert all(np.isfinite(r['loss']) for r in records)
  assert paths.isfile(paths.join(workdir, 'samples', 'step_0000012.gif'))
  # Nothing was written to a local folder in place of the bucket.
  for i in range(2):
    assert sorted(os.listdir(tmp_path / f'host{i}')) == ['.cache', 'tmp'] or sorted(
        os.listdir(tmp_path / f'host{i}')) == ['tmp'], os.listdir(tmp_path / f'host{i}')


def test_bucket_that_turns_read_only_mid_run_ends_the_run_in_seconds(gcs):
  """Issue 27: write permission taken away while the job runs (a proxy in front of the
  emulator starts answering 403 to writes): the run ends within seconds, the cause last,
  the checkpoints complete before it intact."""
  bucket = gcs.new_bucket()
  workdir = f'gs://{bucket}/run'
  with gcs_emulator.ReadOnlyProxy(gcs.url, read_only=False) as proxy:
    proc = subprocess.Popen(_main(workdir, '--config.train.num_steps=100000'), cwd=REPO,
                            env=_env(gcs_emulator.client_env(proxy.url)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
      deadline = time.monotonic() + TIMEOUT_S
      while not _steps(workdir):  # the first complete checkpoint in the bucket
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, 'no checkpoint appeared'
        time.sleep(0.1)
      proxy.read_only = True
      start = time.monotonic()
      out, _ = proc.communicate(timeout=TIMEOUT_S)
      took = time.monotonic() - start
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  assert proc.returncode == 1, out[-3000:]
  last = out.strip().splitlines()[-1]
  assert last.startswith('FATAL CheckpointWriteError: '), out[-3000:]
  assert f'gs://{bucket}/run/checkpoints' in last and 'Forbidden' in last, last
  assert took < 60, (took, out[-3000:])
  steps = _steps(workdir)
  assert steps and f'The complete steps, {steps}, are as they were' in last, (steps, last)
