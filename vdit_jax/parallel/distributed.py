"""Multi-host start-up: join this process to the others with `jax.distributed.initialize`.

    from vdit_jax.parallel import distributed
    distributed.initialize()            # first thing in main(), before any other JAX call

Where the cluster description comes from, first match wins:
  1. explicit arguments (main.py passes its flags `--coordinator_address`,
     `--num_processes`, `--process_id`), completed field by field from
  2. the environment: `VDIT_COORDINATOR_ADDRESS`, `VDIT_NUM_PROCESSES`, `VDIT_PROCESS_ID`;
  3. a cluster JAX detects by itself: an srun step of more than one task (`SLURM_PROCID`
     with `SLURM_STEP_NUM_TASKS` or `SLURM_NTASKS` > 1), a multi-host Cloud TPU slice
     (`TPU_WORKER_HOSTNAMES` with several hosts, or `CLOUD_TPU_TASK_ID`), or any cluster
     when `VDIT_DISTRIBUTED_AUTO=1` (launch/tpu_pod.sh sets it: on a GCE TPU VM JAX finds
     the slice through the metadata server, which env vars do not show):
     plain `jax.distributed.initialize()`;
  4. otherwise one process: nothing to do.

`num_processes=1` is always a no-op, so one launch command serves 1 and N processes.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from typing import Mapping, Optional, Sequence, Union

from absl import logging
import jax

from vdit_jax.parallel import liveness

JAX_HEARTBEAT_TIMEOUT_S = 100  # jax.distributed.initialize's default
ENV_COORDINATOR_ADDRESS = 'VDIT_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'VDIT_NUM_PROCESSES'
ENV_PROCESS_ID = 'VDIT_PROCESS_ID'
ENV_AUTO = 'VDIT_DISTRIBUTED_AUTO'
ENV_PEER_TIMEOUT_S = 'VDIT_PEER_TIMEOUT_S'


@dataclasses.dataclass(frozen=True)
class InitPlan:
  """What `initialize` will do: `mode` is 'single', 'explicit' or 'auto'."""
  mode: str
  reason: str
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  local_device_ids: Optional[tuple] = None


def check_address(address: str, source: str = 'coordinator_address') -> str:
  """`host:port` (IPv6 hosts in brackets, `[::1]:1234`) with a port in [1, 65535]."""
  if not isinstance(address, str) or ':' not in address:
    raise ValueError(f'{source}={address!r} must have the form host:port '
                     '(e.g. 10.0.0.1:1234).')
  host, _, port = address.rpartition(':')
  if not host or host in ('[', '[]'):
    raise ValueError(f'{source}={address!r} has no host before the port; it must have the '
                     'form host:port.')
  if not port.isdigit() or not 1 <= int(port) <= 65535:
    raise ValueError(f'{source}={address!r} has port {port!r}; the port must be an integer '
                     'in [1, 65535].')
  return address


def _as_int(value, source: str) -> int:
  if isinstance(value, str):
    try:
      return int(value.strip())
    except ValueError:
      raise ValueError(f'{source}={value!r} is not an integer.') from None
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f'{source}={value!r} is not an integer.')
  return int(value)


def _device_ids(ids: Union[None, str, Sequence[int]]) -> Optional[tuple]:
  if ids is None:
    return None
  if isinstance(ids, str):
    ids = [p for p in ids.split(',') if p.strip()]
  out = tuple(_as_int(i, 'local_device_ids') for i in ids)
  if not out or any(i < 0 for i in out):
    raise ValueError(f'local_device_ids={ids!r} must be a non-empty list of integers >= 0.')
  return out


def _auto_reason(env: Mapping[str, str]) -> Optional[str]:
  """Why JAX's own cluster detection applies here, or None. Reads env vars only."""
  if env.get(ENV_AUTO, '').strip() == '1':
    return f'{ENV_AUTO}=1'
  # SLURM_PROCID marks a task started by srun; a batch script run without srun on an
  # allocation of several tasks is one process and must not wait for the others.
  tasks = env.get('SLURM_STEP_NUM_TASKS') or env.get('SLURM_NTASKS')
  if ('SLURM_JOB_ID' in env and 'SLURM_PROCID' in env and tasks and tasks.strip().isdigit()
      and int(tasks) > 1):
    return f'SLURM job with {int(tasks)} tasks'
  hosts = [h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h.strip()]
  if len(hosts) > 1:
    return f'Cloud TPU slice with {len(hosts)} hosts'
  if 'CLOUD_TPU_TASK_ID' in env:
    return f'Cloud TPU task {env["CLOUD_TPU_TASK_ID"]}'
  return None


def plan(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
         process_id: Optional[int] = None,
         local_device_ids: Union[None, str, Sequence[int]] = None,
         env: Optional[Mapping[str, str]] = None) -> InitPlan:
  """Resolves arguments, then env, then auto-detection into a validated `InitPlan`."""
  env = os.environ if env is None else env
  fields = {}
  for name, value, var in (('coordinator_address', coordinator_address, ENV_COORDINATOR_ADDRESS),
                           ('num_processes', num_processes, ENV_NUM_PROCESSES),
                           ('process_id', process_id, ENV_PROCESS_ID)):
    if value is not None:
      fields[name] = (value, name)
    elif env.get(var, '').strip():
      fields[name] = (env[var].strip(), var)
  device_ids = _device_ids(local_device_ids)

  if not fields:
    reason = _auto_reason(env)
    if reason is None:
      return InitPlan('single', 'no coordinator given and no multi-process cluster detected')
    return InitPlan('auto', reason, local_device_ids=device_ids)

  if 'num_processes' not in fields:
    given = ', '.join(f'{src}={val!r}' for val, src in fields.values())
    raise ValueError(f'{given} given without num_processes: set --num_processes or '
                     f'{ENV_NUM_PROCESSES} as well.')
  value, src = fields['num_processes']
  count = _as_int(value, src)
  if count < 1:
    raise ValueError(f'{src}={value!r} must be >= 1.')
  index = None
  if 'process_id' in fields:
    value, src = fields['process_id']
    index = _as_int(value, src)
    if not 0 <= index < count:
      raise ValueError(f'{src}={value!r} must be in [0, num_processes={count}).')
  address = None
  if 'coordinator_address' in fields:
    value, src = fields['coordinator_address']
    address = check_address(value, src)
  if count == 1:
    return InitPlan('single', 'num_processes=1', address, 1, index or 0, device_ids)
  missing = [n for n, v in (('coordinator_address', address), ('process_id', index))
             if v is None]
  if missing:
    raise ValueError(f'num_processes={count} needs {" and ".join(missing)} too (flags '
                     f'--{" and --".join(missing)}, or env {ENV_COORDINATOR_ADDRESS} / '
                     f'{ENV_PROCESS_ID}).')
  return InitPlan('explicit', f'process {index} of {count} via {address}', address, count, index,
              device_ids)


def peer_timeout(value: Union[None, str, float] = None,
                 env: Optional[Mapping[str, str]] = None) -> float:
  """Seconds without a peer's beat before the others stop (0: never); see liveness.py."""
  source = 'peer_timeout_s'
  if value is None:
    env = os.environ if env is None else env
    if not env.get(ENV_PEER_TIMEOUT_S, '').strip():
      return liveness.DEFAULT_TIMEOUT_S
    value, source = env[ENV_PEER_TIMEOUT_S].strip(), ENV_PEER_TIMEOUT_S
  try:
    seconds = float(value)
  except (TypeError, ValueError):
    raise ValueError(f'{source}={value!r} is not a number of seconds.') from None
  if not math.isfinite(seconds) or (seconds != 0 and seconds < 2 * liveness.DEFAULT_INTERVAL_S):
    raise ValueError(f'{source}={value!r} must be 0 (no peer watch) or a finite number of '
                     f'seconds >= {2 * liveness.DEFAULT_INTERVAL_S:g} (two beats).')
  return seconds


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               local_device_ids: Union[None, str, Sequence[int]] = None,
               peer_timeout_s: Union[None, str, float] = None) -> InitPlan:
  """Joins the processes of this run; call before any other JAX call. Returns the plan.

  For more than one process, CPU collectives are switched to gloo first: the setting
  touches only the CPU backend (which every host has), and without it CPU arrays that
  span processes cannot be reduced or gathered. Then the peer watch starts
  (`liveness.py`): a process that dies or hangs ends the others within
  `peer_timeout_s` (default 30 s, env VDIT_PEER_TIMEOUT_S, 0 turns it off), with a line
  naming it. JAX's own heartbeat timeout is set above it, so that its abort (SIGABRT,
  a C++ stack dump) is only the fallback.
  """
  timeout_s = peer_timeout(peer_timeout_s)
  p = plan(coordinator_address, num_processes, process_id, local_device_ids)
  if p.mode == 'single':
    logging.info('distributed: single process (%s)', p.reason)
    return p
  if jax.distributed.is_initialized():
    logging.info('distributed: already initialised; %s ignored', p.reason)
    return p
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  logging.info('distributed: initialising, %s', p.reason)
  heartbeat_s = max(JAX_HEARTBEAT_TIMEOUT_S, int(math.ceil(timeout_s)) + 30)
  if p.mode == 'auto':
    jax.distributed.initialize(local_device_ids=p.local_device_ids,
                               heartbeat_timeout_seconds=heartbeat_s)
  else:
    jax.distributed.initialize(coordinator_address=p.coordinator_address,
                               num_processes=p.num_processes, process_id=p.process_id,
                               local_device_ids=p.local_device_ids,
                               heartbeat_timeout_seconds=heartbeat_s)
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  liveness.start(jax_distributed.global_state.client, jax.process_index(),
                 jax.process_count(), timeout_s)
  return p


def log_line(line: str) -> None:
  """Prints a progress line on process 0 (the absl log stays for library detail)."""
  if jax.process_index() == 0:
    print(line, flush=True)
