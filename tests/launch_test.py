"""The launchers in launch/, rendered for a 2-host job without starting anything.

Each launcher's dry run (for SLURM: the batch script under a fake `srun`) yields every
process's command and environment. For each launcher: the same vdit_jax.main flags reach
every process, the process ids are 0..N-1, and the coordinator is process 0's host. Where
the launcher leaves the cluster to JAX (SLURM, Cloud TPU VM, GKE), each process's
environment goes through vdit_jax's `distributed.plan` and then JAX's own cluster
detection, as `jax.distributed.initialize()` would see it. Fake `gcloud` and `kubectl`
stand first on PATH: a dry run that calls them fails, a real run records what it sent.
The SLURM script's XLA_FLAGS are parsed by the installed jaxlib, which aborts on any flag
it does not know.
"""

import contextlib
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from typing import List
from unittest import mock

import pytest
import yaml

from jax._src import clusters as jax_clusters
from jax._src.clusters import cloud_tpu_cluster
from vdit_jax.parallel import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, 'launch')
MAIN = ['-m', 'vdit_jax.main']
COORDINATOR_FLAGS = ('--coordinator_address', '--num_processes', '--process_id')
# What a user passes; the last one has a space, quotes, a backslash and a $(VAR) that
# Kubernetes would expand, so quoting or escaping lost on the way shows up.
FLAGS = ['--config=configs/dit_xl_video.py', '--workdir=gs://BUCKET/runs/xl',
         '--config.train.num_steps=10',
         '--config.note=a "b" c\\d $(VDIT_DISTRIBUTED_AUTO)']
# The flags slurm_gpu.sbatch documents; each must be in its XLA_FLAGS.
SLURM_XLA_FLAGS = (
    '--xla_gpu_enable_latency_hiding_scheduler', '--xla_gpu_all_gather_combine_threshold_bytes',
    '--xla_gpu_reduce_scatter_combine_threshold_bytes',
    '--xla_gpu_all_reduce_combine_threshold_bytes', '--xla_gpu_enable_pipelined_all_gather',
    '--xla_gpu_enable_pipelined_reduce_scatter', '--xla_gpu_enable_pipelined_all_reduce',
    '--xla_gpu_enable_while_loop_double_buffering')

# Stand-ins written into tmp_path/bin. Each appends one JSON line (its argv, stdin or
# environment) to $FAKE_LOG. The shebang names this interpreter, so PATH does not matter.
FAKE_TOOL = '''\
import json, os, sys
with open(os.environ['FAKE_LOG'], 'a') as f:
  f.write(json.dumps({'tool': os.path.basename(sys.argv[0]), 'argv': sys.argv[1:],
                      'stdin': sys.stdin.read()}) + '\\n')
'''
FAKE_PYTHON = '''\
import json, os, sys
with open(os.environ['FAKE_LOG'], 'a') as f:
  f.write(json.dumps({'tool': 'python', 'argv': sys.argv[1:], 'env': dict(os.environ)}) + '\\n')
'''
# srun as SLURM runs a step: $SLURM_NTASKS tasks spread in blocks over $FAKE_NODES (task
# i on node i // tasks_per_node), each with the variables srun gives a task.
FAKE_SRUN = '''\
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ['FAKE_LOG'], 'a') as f:
  f.write(json.dumps({'tool': 'srun', 'argv': args}) + '\\n')
while args and args[0].startswith('-'):
  args.pop(0)
nodes = os.environ['FAKE_NODES'].split()
tasks = int(os.environ['SLURM_NTASKS'])
per_node = tasks // len(nodes)
status = 0
for i in range(tasks):
  env = dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i % per_node),
             SLURM_NODEID=str(i // per_node), SLURMD_NODENAME=nodes[i // per_node],
             SLURM_STEP_ID='0', SLURM_STEP_NODELIST=os.environ['SLURM_JOB_NODELIST'],
             SLURM_STEP_NUM_NODES=str(len(nodes)), SLURM_STEP_NUM_TASKS=str(tasks))
  status = max(status, subprocess.run(args, env=env).returncode)
sys.exit(status)
'''


@dataclasses.dataclass
class Process:
  """One launched process as the launcher set it up."""
  process_id: int
  num_processes: int
  coordinator: str      # host:port
  host: str             # where this process runs
  flags: List[str]      # its vdit_jax.main flags, less the launcher's coordinator flags


def _assert_one_job(processes: List[Process], n: int):
  assert sorted(p.process_id for p in processes) == list(range(n))
  for p in processes:
    assert p.flags == FLAGS
    assert p.num_processes == n
  assert len({p.coordinator for p in processes}) == 1
  host0 = [p.host for p in processes if p.process_id == 0][0]
  assert processes[0].coordinator.rpartition(':')[0] == host0


@pytest.fixture
def tools(tmp_path):
  """A bin folder of fakes, and a runner that puts it first on PATH in a bare env."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for name, body in (('gcloud', FAKE_TOOL), ('kubectl', FAKE_TOOL), ('srun', FAKE_SRUN),
                     ('python', FAKE_PYTHON)):
    (bin_dir / name).write_text(f'#!{sys.executable}\n{body}')
    (bin_dir / name).chmod(0o755)
  log = tmp_path / 'calls.jsonl'

  def run(cmd, env=None, expect_rc=0):
    full_env = {'PATH': f'{bin_dir}{os.pathsep}{os.environ["PATH"]}',
                'HOME': os.environ.get('HOME', '/tmp'), 'LANG': 'C.UTF-8',
                'FAKE_LOG': str(log), **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)
    assert proc.returncode == expect_rc, proc.stderr
    return proc

  def calls(tool=None):
    if not log.exists():
      return []
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    return [r for r in rows if tool is None or r['tool'] == tool]

  run.calls = calls
  return run


def _dry_run(mode, env):
  """Arguments and environment that ask a launcher for a dry run: flag or DRY_RUN=1."""
  if mode == 'flag':
    return ['--dry_run'], dict(env)
  return [], dict(env, DRY_RUN='1')


@contextlib.contextmanager
def _jax_sees(env, tpu_vm=False, metadata=None):
  """What `jax.distributed.initialize()` would find with `env` as the whole environment:
  (coordinator_address, num_processes, process_id, local_device_ids). No network."""
  patches = [mock.patch.dict(os.environ, env, clear=True)]
  if tpu_vm:
    for module in (cloud_tpu_cluster, jax_clusters.cluster):
      patches.append(mock.patch.object(module, 'running_in_cloud_tpu_vm', True))
    # Host names are not resolvable here; JAX would wait for DNS to know them.
    patches.append(mock.patch.object(cloud_tpu_cluster.BaseTpuCluster, 'wait_for_coordinator',
                                     classmethod(lambda cls, address, timeout: None)))
  # A GCE TPU VM's metadata server, or none (GKE, SLURM): asking then fails the test.
  def get_metadata(key):
    assert metadata is not None, f'JAX asked the metadata server for {key!r}'
    return metadata.get(key, ''), 200
  patches.append(mock.patch.object(cloud_tpu_cluster, 'get_metadata', get_metadata))
  with contextlib.ExitStack() as stack:
    for p in patches:
      stack.enter_context(p)
    yield jax_clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, None, 10)


def _split_env(words):
  """Leading NAME=value words of a shell command, and the rest."""
  env = {}
  while words and re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*=.*', words[0]):
    name, _, value = words.pop(0).partition('=')
    env[name] = value
  return env, words


@pytest.mark.parametrize('mode', ['flag', 'env'])
def test_local_multiprocess_dry_run(tools, mode):
  args, env = _dry_run(mode, {'PYTHON': sys.executable})
  out = tools([os.path.join(LAUNCH, 'local_multiprocess.sh'), *args, '2', *FLAGS], env).stdout
  assert tools.calls() == []  # nothing ran
  lines = out.splitlines()
  assert len(lines) == 2
  processes = []
  for line in lines:
    env, words = _split_env(shlex.split(line))
    assert env['JAX_PLATFORMS'] == 'cpu'
    assert env['XLA_FLAGS'] == '--xla_force_host_platform_device_count=4'
    assert words[:3] == [sys.executable, *MAIN]
    given = {w.partition('=')[0]: w.partition('=')[2] for w in words[3:]
             if w.startswith(COORDINATOR_FLAGS)}
    plan = distributed.plan(given['--coordinator_address'], int(given['--num_processes']),
                            int(given['--process_id']), env={})
    assert plan.mode == 'explicit'
    processes.append(Process(plan.process_id, plan.num_processes, plan.coordinator_address,
                             '127.0.0.1',
                             [w for w in words[3:] if not w.startswith(COORDINATOR_FLAGS)]))
  _assert_one_job(processes, 2)


@pytest.mark.parametrize('mode', ['flag', 'env'])
def test_tpu_pod_dry_run_and_run(tools, mode):
  args, env = _dry_run(mode, {'TPU_NAME': 'my-slice', 'ZONE': 'us-central2-b',
                              'VDIT_ALLOCATOR': 'jemalloc'})
  script = os.path.join(LAUNCH, 'tpu_pod.sh')
  out = tools([script, *args, *FLAGS], env).stdout
  assert tools.calls() == []  # gcloud was not called
  gcloud_line, remote = [line for line in out.splitlines() if not line.startswith('#')]
  gcloud = shlex.split(gcloud_line)
  assert gcloud == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-slice', '--zone',
                    'us-central2-b', '--worker=all', '--command', remote]
  # What each worker's shell runs, as that shell splits it.
  assert shlex.split(remote)[:3] == ['cd', '~/vdit_jax', '&&']
  worker_env, words = _split_env(shlex.split(remote)[3:])
  assert worker_env == {'VDIT_ALLOCATOR': 'jemalloc', 'VDIT_DISTRIBUTED_AUTO': '1'}
  assert words == ['python', *MAIN, *FLAGS]
  assert distributed.plan(env=worker_env).mode == 'auto'
  # A 2-host slice: JAX takes each worker's id from the TPU metadata server
  # (agent-worker-number) and the coordinator from the slice's first endpoint.
  endpoints = ['10.130.0.2', '10.130.0.3']
  processes = []
  for worker, host in enumerate(endpoints):
    metadata = {'agent-worker-number': str(worker),
                'worker-network-endpoints': ','.join(endpoints)}
    with _jax_sees(worker_env, tpu_vm=True, metadata=metadata) as (coord, n, pid, _):
      processes.append(Process(pid, n, coord, host, words[3:]))
  _assert_one_job(processes, 2)
  # Without the dry run, gcloud gets exactly the printed command.
  env.pop('DRY_RUN', None)
  tools([script, *FLAGS], env)
  assert [['gcloud', *c['argv']] for c in tools.calls('gcloud')] == [gcloud]


@pytest.mark.parametrize('user_xla_flags',
                         [None, '--xla_gpu_all_reduce_combine_threshold_bytes=1'])
def test_slurm_batch_script_under_fake_srun(tools, user_xla_flags):
  # As sbatch --nodes=2 --ntasks-per-node=1 would start the script on the first node.
  env = {'SLURM_JOB_ID': '4242', 'SLURM_NTASKS': '2', 'SLURM_NNODES': '2',
         'SLURM_JOB_NODELIST': 'gpu[07-08]', 'FAKE_NODES': 'gpu07 gpu08'}
  if user_xla_flags:
    env['XLA_FLAGS'] = user_xla_flags
  tools(['bash', os.path.join(LAUNCH, 'slurm_gpu.sbatch'), *FLAGS], env)
  (srun,) = tools.calls('srun')
  assert srun['argv'][:2] == ['--kill-on-bad-exit=1', '--label']
  assert srun['argv'][2:] == ['python', *MAIN, *FLAGS]
  tasks = tools.calls('python')
  assert len(tasks) == 2
  processes = []
  for task in tasks:
    task_env = task['env']
    assert task['argv'][:2] == MAIN
    plan = distributed.plan(env=task_env)
    assert (plan.mode, plan.reason) == ('auto', 'SLURM job with 2 tasks')
    with _jax_sees(task_env) as (coord, n, pid, local_device_ids):
      # One GPU per task: JAX gives task SLURM_LOCALID the GPU of that index.
      assert local_device_ids == [int(task_env['SLURM_LOCALID'])]
      processes.append(Process(pid, n, coord, task_env['SLURMD_NODENAME'], task['argv'][2:]))
    assert task_env['NCCL_DEBUG'] == 'WARN'
    assert task_env['CUDA_DEVICE_MAX_CONNECTIONS'] == '1'
  _assert_one_job(processes, 2)
  xla_flags = {t['env']['XLA_FLAGS'] for t in tasks}
  assert len(xla_flags) == 1
  xla_flags = xla_flags.pop()
  names = [f.partition('=')[0] for f in xla_flags.split()]
  assert set(SLURM_XLA_FLAGS) <= set(names), xla_flags
  if user_xla_flags:  # appended last, so XLA takes its value
    assert xla_flags.split()[-1] == user_xla_flags
    assert xla_flags.split()[:-1] == _default_slurm_xla_flags()


def _default_slurm_xla_flags():
  text = open(os.path.join(LAUNCH, 'slurm_gpu.sbatch')).read()
  block = text.split('vdit_xla_flags=(', 1)[1].split('\n)', 1)[0]
  return [line.strip() for line in block.splitlines()
          if line.strip() and not line.strip().startswith('#')]


def test_slurm_xla_flags_are_accepted_by_the_installed_jaxlib():
  # Starting a CPU client parses every XLA_FLAGS entry (the GPU ones too: one flag table
  # for all backends) and aborts on an unknown name or a bad value. The bogus flag shows
  # that the check can fail.
  flags = ' '.join(_default_slurm_xla_flags())
  assert set(SLURM_XLA_FLAGS) <= {f.partition('=')[0] for f in flags.split()}
  cmd = [sys.executable, '-c', 'from jaxlib import xla_client; xla_client.make_cpu_client()']
  base = {'PATH': os.environ['PATH'], 'HOME': os.environ.get('HOME', '/tmp'),
          'TF_CPP_MIN_LOG_LEVEL': '1'}
  good, bad = [subprocess.Popen(cmd, env=dict(base, XLA_FLAGS=f), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
               for f in (flags, flags + ' --xla_gpu_vdit_no_such_flag=true')]
  good_out, bad_out = good.communicate(timeout=120), bad.communicate(timeout=120)
  assert good.returncode == 0, good_out[1][-2000:]
  assert bad.returncode != 0 and 'Unknown flag' in bad_out[1], bad_out[1][-2000:]


GKE_ENV = {'IMAGE': 'us-docker.pkg.dev/p/r/vdit:v1', 'ACCELERATOR': 'tpu-v5p-slice',
           'TOPOLOGY': '2x2x2', 'HOSTS_PER_SLICE': '2', 'SLICES': '2', 'JOB_NAME': 'xl-run1'}


def _k8s_expand(text, env):
  """Kubernetes' expansion of env values and args: $(NAME) of an earlier variable
  becomes its value, $$ becomes $."""
  return re.sub(r'\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)',
                lambda m: '$' if m[0] == '$$' else env.get(m[1], m[0]), text)


def _pod_env(container, annotations):
  env = {}
  for e in container.get('env', []):
    if 'valueFrom' in e:
      path = e['valueFrom']['fieldRef']['fieldPath']
      key = re.fullmatch(r"metadata\.annotations\['([^']+)'\]", path)[1]
      env[e['name']] = annotations[key]
    else:
      env[e['name']] = _k8s_expand(e['value'], env)
  return env


def _render(tools, env, mode='env', args=FLAGS):
  extra, env = _dry_run(mode, env)
  out = tools([os.path.join(LAUNCH, 'gke_jobset.sh'), *extra, *args], env).stdout
  assert tools.calls() == []  # kubectl was not called
  return out, yaml.safe_load(out)


@pytest.mark.parametrize('mode', ['flag', 'env'])
def test_gke_jobset_two_slices_of_two_hosts(tools, mode):
  out, doc = _render(tools, GKE_ENV, mode)
  assert (doc['apiVersion'], doc['kind']) == ('jobset.x-k8s.io/v1alpha2', 'JobSet')
  name = doc['metadata']['name']
  assert name == 'xl-run1'
  assert doc['metadata']['annotations'] == {
      'alpha.jobset.sigs.k8s.io/exclusive-topology': 'cloud.google.com/gke-nodepool'}
  assert doc['spec']['network']['enableDNSHostnames'] is True
  assert doc['spec']['failurePolicy']['maxRestarts'] == 3
  (rjob,) = doc['spec']['replicatedJobs']
  job = rjob['template']['spec']
  assert rjob['replicas'] == 2
  assert (job['parallelism'], job['completions'], job['backoffLimit'],
          job['completionMode']) == (2, 2, 0, 'Indexed')
  pod = job['template']['spec']
  assert pod['nodeSelector'] == {'cloud.google.com/gke-tpu-accelerator': 'tpu-v5p-slice',
                                 'cloud.google.com/gke-tpu-topology': '2x2x2'}
  (container,) = pod['containers']
  assert container['image'] == 'us-docker.pkg.dev/p/r/vdit:v1'
  assert container['resources'] == {'limits': {'google.com/tpu': 4}}
  assert container['command'] == ['python', *MAIN]
  assert 8482 in [p['containerPort'] for p in container['ports']]
  # Each of the 4 pods as JobSet, Kubernetes and GKE set it up: JobSet's annotations,
  # and from GKE TPU_WORKER_ID (= completion index), TPU_WORKER_HOSTNAMES (the slice's
  # hosts, named by the JobSet's headless service) and TPU_SKIP_MDS_QUERY (the TPU
  # device plugin sets it in every TPU container; JAX then skips the GCE metadata path).
  processes = []
  for s in range(rjob['replicas']):
    hostnames = [f'{name}-{rjob["name"]}-{s}-{i}.{name}' for i in range(job['parallelism'])]
    for i, host in enumerate(hostnames):
      annotations = {'jobset.sigs.k8s.io/jobset-name': name,
                     'jobset.sigs.k8s.io/replicatedjob-name': rjob['name'],
                     'jobset.sigs.k8s.io/replicatedjob-replicas': str(rjob['replicas']),
                     'jobset.sigs.k8s.io/job-index': str(s),
                     'batch.kubernetes.io/job-completion-index': str(i)}
      env = _pod_env(container, annotations)
      env.update(JOB_COMPLETION_INDEX=str(i), TPU_WORKER_ID=str(i),
                 TPU_WORKER_HOSTNAMES=','.join(hostnames), TPU_SKIP_MDS_QUERY='true')
      assert env['MEGASCALE_NUM_SLICES'] == '2' and env['MEGASCALE_SLICE_ID'] == str(s)
      assert distributed.plan(env=env).mode == 'auto'
      args = [_k8s_expand(a, env) for a in container['args']]
      with _jax_sees(env, tpu_vm=True) as (coord, n, pid, _):
        processes.append(Process(pid, n, coord, host, args))
  _assert_one_job(processes, 4)
  assert processes[0].coordinator == 'xl-run1-slice-0-0.xl-run1:8482'
  # Without the dry run, kubectl applies exactly the printed manifest.
  env = dict(GKE_ENV)
  tools([os.path.join(LAUNCH, 'gke_jobset.sh'), *FLAGS], env)
  (kubectl,) = tools.calls('kubectl')
  assert kubectl['argv'] == ['apply', '-f', '-']
  assert kubectl['stdin'] == out


@pytest.mark.parametrize('hosts,chips,topology,auto', [('2', '4', '2x2x2', '1'),
                                                       ('1', '8', '2x4', '0')])
def test_gke_jobset_one_slice_has_no_megascale(tools, hosts, chips, topology, auto):
  env = dict(GKE_ENV, SLICES='1', HOSTS_PER_SLICE=hosts, CHIPS_PER_HOST=chips,
             TOPOLOGY=topology)
  _, doc = _render(tools, env)
  (rjob,) = doc['spec']['replicatedJobs']
  assert rjob['replicas'] == 1 and rjob['template']['spec']['parallelism'] == int(hosts)
  (container,) = rjob['template']['spec']['template']['spec']['containers']
  assert container['env'] == [{'name': 'VDIT_DISTRIBUTED_AUTO', 'value': auto}]
  assert container['resources']['limits']['google.com/tpu'] == int(chips)


@pytest.mark.parametrize('env,args,match', [
    ({'TOPOLOGY': '4x4x4'}, [], 'has 64 chips, but HOSTS_PER_SLICE=2 x CHIPS_PER_HOST=4 = 8'),
    ({'HOSTS_PER_SLICE': '1', 'CHIPS_PER_HOST': '8'}, [], 'multi-host slices only'),
    ({'JOB_NAME': 'XL_run'}, [], 'JOB_NAME=XL_run must be lowercase'),
    ({'SLICES': '0'}, [], 'SLICES=0 must be an integer >= 1'),
    ({}, ['--process_id=1'], '--process_id is set up by the JobSet'),
    ({'IMAGE': 'a b'}, [], 'IMAGE=a b must be non-empty'),
])
def test_gke_jobset_refuses_bad_settings(tools, env, args, match):
  proc = tools([os.path.join(LAUNCH, 'gke_jobset.sh'), '--dry_run', *args],
               dict(GKE_ENV, **env), expect_rc=2)
  assert match in proc.stderr
  assert proc.stdout == '' and tools.calls() == []
