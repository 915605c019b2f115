"""Multi-host start-up without starting JAX: where the cluster description comes from,
its validation, and the local launcher (commands, environment, failure handling)."""

import io
import textwrap
import time

import pytest

from vdit_jax.parallel import distributed
from vdit_jax.tools import launch_local

ENV3 = {'VDIT_COORDINATOR_ADDRESS': '10.0.0.1:1234', 'VDIT_NUM_PROCESSES': '4',
        'VDIT_PROCESS_ID': '3'}


def test_no_cluster_is_a_single_process():
  assert distributed.plan(env={}).mode == 'single'
  assert distributed.plan(env={'SLURM_JOB_ID': '7', 'SLURM_PROCID': '0',
                                'SLURM_NTASKS': '1'}).mode == 'single'
  # A batch script on an 8-task allocation, not started by srun: one process.
  assert distributed.plan(env={'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '8'}).mode == 'single'
  assert distributed.plan(env={'TPU_WORKER_HOSTNAMES': 'localhost'}).mode == 'single'
  # num_processes=1 is a no-op, with or without an address.
  assert distributed.plan(num_processes=1, env={}).mode == 'single'
  assert distributed.plan('127.0.0.1:5', 1, 0, env={}).mode == 'single'


def test_explicit_values_win_over_env_field_by_field():
  p = distributed.plan('127.0.0.1:999', None, 1, env=ENV3)
  assert (p.mode, p.coordinator_address, p.num_processes, p.process_id) == (
      'explicit', '127.0.0.1:999', 4, 1)
  p = distributed.plan(env=ENV3)
  assert (p.mode, p.coordinator_address, p.num_processes, p.process_id) == (
      'explicit', '10.0.0.1:1234', 4, 3)
  p = distributed.plan('[::1]:80', 2, 0, local_device_ids='0,1', env={})
  assert p.coordinator_address == '[::1]:80' and p.local_device_ids == (0, 1)


@pytest.mark.parametrize('env,reason', [
    ({'SLURM_JOB_ID': '7', 'SLURM_PROCID': '0', 'SLURM_NTASKS': '8'}, 'SLURM job with 8 tasks'),
    ({'SLURM_JOB_ID': '7', 'SLURM_PROCID': '1', 'SLURM_NTASKS': '8',
      'SLURM_STEP_NUM_TASKS': '2'}, 'SLURM job with 2 tasks'),
    ({'VDIT_DISTRIBUTED_AUTO': '1'}, 'VDIT_DISTRIBUTED_AUTO=1'),
    ({'TPU_WORKER_HOSTNAMES': 'w0,w1,w2,w3'}, 'Cloud TPU slice with 4 hosts'),
    ({'CLOUD_TPU_TASK_ID': '2'}, 'Cloud TPU task 2'),
])
def test_clusters_jax_detects_are_left_to_jax(env, reason):
  p = distributed.plan(env=env)
  assert (p.mode, p.reason, p.coordinator_address, p.num_processes) == (
      'auto', reason, None, None)
  # An explicit description still wins over detection.
  assert distributed.plan('h:1', 2, 0, env=env).mode == 'explicit'


@pytest.mark.parametrize('args,env,match', [
    (('h:1', 2, 2), {}, r'process_id=2 must be in \[0, num_processes=2\)'),
    (('h:1', 2, -1), {}, r'process_id=-1 must be in \[0, num_processes=2\)'),
    (('h:1', 0, 0), {}, 'num_processes=0 must be >= 1'),
    (('h:1', 2, None), {'VDIT_PROCESS_ID': '5'}, r"VDIT_PROCESS_ID='5' must be in \[0"),
    ((None, None, None), {'VDIT_NUM_PROCESSES': 'two'}, "VDIT_NUM_PROCESSES='two' is not an "
     'integer'),
    (('localhost', 2, 0), {}, "coordinator_address='localhost' must have the form host:port"),
    ((':1234', 2, 0), {}, "coordinator_address=':1234' has no host"),
    (('h:0', 2, 0), {}, "coordinator_address='h:0' has port '0'"),
    (('h:http', 2, 0), {}, "has port 'http'"),
    ((None, None, None), {'VDIT_COORDINATOR_ADDRESS': 'h', 'VDIT_NUM_PROCESSES': '2',
                          'VDIT_PROCESS_ID': '0'},
     "VDIT_COORDINATOR_ADDRESS='h' must have the form host:port"),
    (('h:1', None, 0), {}, 'given without num_processes'),
    ((None, 2, 0), {}, 'num_processes=2 needs coordinator_address too'),
    (('h:1', 2, None), {}, 'num_processes=2 needs process_id too'),
    ((None, 2, None), {}, 'needs coordinator_address and process_id'),
])
def test_bad_descriptions_name_the_value(args, env, match):
  with pytest.raises(ValueError, match=match):
    distributed.plan(*args, env=env)


def test_bad_local_device_ids():
  with pytest.raises(ValueError, match='local_device_ids'):
    distributed.plan('h:1', 2, 0, local_device_ids=[0, -1], env={})


def test_single_process_initialize_is_a_no_op():
  assert distributed.initialize(num_processes=1).mode == 'single'
  import jax  # pylint: disable=g-import-not-at-top
  assert not jax.distributed.is_initialized()


def test_launcher_commands_and_env():
  cmds = launch_local.process_commands(2, ['--config=c.py', '--workdir=w'], 4321, python='py')
  assert cmds == [
      ['py', '-m', 'vdit_jax.main', '--config=c.py', '--workdir=w',
       '--coordinator_address=127.0.0.1:4321', '--num_processes=2', f'--process_id={i}']
      for i in range(2)]
  env = launch_local.process_env(4, {'XLA_FLAGS': '--xla_force_host_platform_device_count=8 '
                                                  '--xla_dump_to=/tmp/d'})
  assert env['JAX_PLATFORMS'] == 'cpu'
  assert env['XLA_FLAGS'] == '--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=4'
  with pytest.raises(ValueError, match='--process_id is set by the launcher'):
    launch_local.process_commands(2, ['--process_id=1'], 1)
  with pytest.raises(ValueError, match='integer >= 1, got 0'):
    launch_local.process_commands(0, [], 1)
  assert 0 < launch_local.free_port() < 65536


def test_launcher_failure_stops_the_others_and_returns_its_status(tmp_path, monkeypatch):
  # A stand-in for vdit_jax.main: process 1 fails at once, process 0 would run a minute.
  (tmp_path / 'fake_main.py').write_text(textwrap.dedent('''
      import sys, time
      pid = int([a for a in sys.argv if a.startswith('--process_id=')][0].split('=')[1])
      print('hello from', pid, flush=True)
      if pid == 1:
        sys.exit(3)
      time.sleep(60)
  '''))
  monkeypatch.setenv('PYTHONPATH', str(tmp_path))
  monkeypatch.setattr(launch_local, 'MODULE', 'fake_main')
  out = io.StringIO()
  t0 = time.perf_counter()
  rc = launch_local.run(2, [], 1, out=out)
  assert rc == 3
  assert time.perf_counter() - t0 < 30  # process 0 was stopped, not waited for
  text = out.getvalue()
  assert '[0] hello from 0' in text and '[1] hello from 1' in text
  assert 'process 1 exited with status 3; stopping the others' in text


def test_launcher_usage_errors(capsys):
  assert launch_local.main(['launch_local']) == 2
  assert launch_local.main(['launch_local', 'x']) == 2
  assert 'usage' in capsys.readouterr().err
