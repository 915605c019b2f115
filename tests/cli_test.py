"""The command users run, on the meshes of a pod: configs/tiny.py as shipped (its default
'auto' attention, which on TPU and in the program traced on CPU is the splash kernel at
its 256 tokens) trains a few steps and samples through `python -m vdit_jax.main` on 1
CPU device, on 8 fake devices as data x fsdp x tensor = 2 x 2 x 2, and through
launch/local_multiprocess.sh as 2 processes of 4 devices on the same mesh; each run's
losses equal one device's to 1e-4 (the processes' loss means are summed by gloo in another
order). A multi-process run that stops and resumes is bucket_workdir_test's.

The 8-device run is the command that once stopped at init ("splash attention: batch B=1
... is not divisible by the 4 devices of mesh axes ('data', 'fsdp')").
"""

import concurrent.futures
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import multidevice
from vdit_jax.train import metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, 'launch', 'local_multiprocess.sh')
NUM_STEPS = 5
# A few steps, each logged, two sampler steps; everything else is configs/tiny.py's own.
FLAGS = ('--config=configs/tiny.py', '--config.train.log_every=1',
         '--config.sample.num_steps=2')
MESH = ('--config.mesh.data=2', '--config.mesh.fsdp=2', '--config.mesh.tensor=2')
RTOL = 1e-4
TIMEOUT_S = 600


def _env(num_devices=None):
  env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS='cpu')
  env['XLA_FLAGS'] = multidevice.CPU_COLLECTIVE_TIMEOUT_FLAGS
  if num_devices is not None:
    env['XLA_FLAGS'] += f' --xla_force_host_platform_device_count={num_devices}'
  env['PYTHONPATH'] = os.pathsep.join(p for p in (REPO, env.get('PYTHONPATH')) if p)
  return env


def _run(cmd, env):
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=TIMEOUT_S, check=False)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, f'{cmd} exited {proc.returncode}:\n{out[-5000:]}'
  return out


def _losses(workdir):
  records = metrics_lib.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  assert [r['step'] for r in records] == list(range(1, NUM_STEPS + 1)), records
  return [r['loss'] for r in records]


def _main(workdir, *extra):
  return [sys.executable, '-m', 'vdit_jax.main', f'--workdir={workdir}', *FLAGS,
          f'--config.train.num_steps={NUM_STEPS}', *extra]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """The 1-device and the 8-device run, side by side (compiles are mostly one thread):
  {name: (workdir, output)}."""
  root = tmp_path_factory.mktemp('cli')
  commands = {'one': (_main(root / 'one'), _env(1)),
              'eight': (_main(root / 'eight', *MESH), _env(8))}
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    futures = {name: pool.submit(_run, *args) for name, args in commands.items()}
  return {name: (root / name, f.result()) for name, f in futures.items()}


@pytest.fixture(scope='module')
def one_device(runs):
  return _losses(runs['one'][0])


def test_default_config_on_eight_devices_matches_one_device(runs, one_device):
  workdir, out = runs['eight']
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2, 'sequence': 1}; 8 device(s)" in out, out
  np.testing.assert_allclose(_losses(workdir), one_device, rtol=RTOL)
  assert os.path.getsize(workdir / 'samples' / f'step_{NUM_STEPS:07d}.mp4') > 0


def test_default_config_through_the_two_process_launcher_matches_one_device(one_device, tmp_path):
  workdir = tmp_path / 'two_processes'
  env = _env()
  env['DEVICES_PER_PROCESS'] = '4'
  out = _run([LAUNCH, '2', f'--workdir={workdir}', *FLAGS,
              f'--config.train.num_steps={NUM_STEPS}', *MESH], env)
  assert "8 device(s), 2 process(es)" in out, out[-3000:]
  assert f'[0] step {NUM_STEPS}/{NUM_STEPS}' in out and '[1] step' not in out
  np.testing.assert_allclose(_losses(workdir), one_device, rtol=RTOL)
  assert sorted(os.listdir(workdir / 'checkpoints')) == [str(NUM_STEPS)]
  assert os.path.getsize(workdir / 'samples' / f'step_{NUM_STEPS:07d}.mp4') > 0
