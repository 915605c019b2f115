r"""Runs N local processes of `vdit_jax.main` joined on 127.0.0.1: multi-host on one machine.

python -m vdit_jax.tools.launch_local N --config=configs/tiny.py --workdir=runs/mp
(or launch/local_multiprocess.sh N ...)
python -m vdit_jax.tools.launch_local --dry_run N ...   # or DRY_RUN=1: print, run nothing

Each process gets JAX_PLATFORMS=cpu, XLA_FLAGS=--xla_force_host_platform_device_count=D
(D = $DEVICES_PER_PROCESS, default 4) and `--coordinator_address=127.0.0.1:PORT
--num_processes=N --process_id=i` on a free port. Output lines are prefixed with `[i] `.
When a process fails, the others are stopped and the exit status is the failed one's.
A dry run prints each process's command line, one per line in process order, prefixed
with the variables the launcher sets (`JAX_PLATFORMS=cpu XLA_FLAGS=... python -m ...`),
shell-quoted so that a line can be pasted into a shell to start that one process.
"""

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
from typing import List, Optional, Sequence

MODULE = 'vdit_jax.main'  # what each process runs (`python -m MODULE`)
DEFAULT_DEVICES_PER_PROCESS = 4
LAUNCHER_ENV = ('JAX_PLATFORMS', 'XLA_FLAGS', 'PYTHONUNBUFFERED')  # what process_env sets
_STOP_GRACE_S = 10.0


def free_port() -> int:
  """A TCP port that was free on 127.0.0.1 a moment ago (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def process_commands(num_processes: int, args: Sequence[str], port: int,
                     python: str = sys.executable) -> List[List[str]]:
  """The command line of each process."""
  if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
    raise ValueError(f'number of processes must be an integer >= 1, got {num_processes!r}.')
  for flag in ('--coordinator_address', '--num_processes', '--process_id'):
    if any(a == flag or a.startswith(flag + '=') for a in args):
      raise ValueError(f'{flag} is set by the launcher; remove it from the arguments.')
  return [[python, '-m', MODULE, *args, f'--coordinator_address=127.0.0.1:{port}',
           f'--num_processes={num_processes}', f'--process_id={i}']
          for i in range(num_processes)]


def process_env(devices_per_process: int, base: Optional[dict] = None) -> dict:
  if devices_per_process < 1:
    raise ValueError(f'DEVICES_PER_PROCESS={devices_per_process} must be >= 1.')
  env = dict(os.environ if base is None else base)
  env['JAX_PLATFORMS'] = 'cpu'
  env['XLA_FLAGS'] = ' '.join(
      [f for f in env.get('XLA_FLAGS', '').split()
       if not f.startswith('--xla_force_host_platform_device_count')] +
      [f'--xla_force_host_platform_device_count={devices_per_process}'])
  env['PYTHONUNBUFFERED'] = '1'
  return env


def dry_run_lines(num_processes: int, args: Sequence[str], devices_per_process: int,
                  port: int, python: str = sys.executable,
                  base: Optional[dict] = None) -> List[str]:
  """One shell line per process: the launcher's variables, then the command."""
  env = process_env(devices_per_process, base)
  prefix = [f'{k}={env[k]}' for k in LAUNCHER_ENV]
  return [shlex.join(prefix + cmd)
          for cmd in process_commands(num_processes, args, port, python)]


def _pump(index: int, stream, out, lock: threading.Lock) -> None:
  for line in iter(stream.readline, b''):
    with lock:
      out.write(f'[{index}] ' + line.decode(errors='replace'))
      out.flush()
  stream.close()


def _stop(procs) -> None:
  """SIGTERM each still-running process group we started, then SIGKILL after a grace."""
  running = [p for p in procs if p.poll() is None]
  for p in running:
    try:
      os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
      pass
  for p in running:
    try:
      p.wait(timeout=_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      p.wait()


def run(num_processes: int, args: Sequence[str], devices_per_process: int, out=None) -> int:
  """Starts the processes, relays their output, returns 0 or the first failure's status."""
  out = sys.stdout if out is None else out
  commands = process_commands(num_processes, args, free_port())
  env = process_env(devices_per_process)
  lock = threading.Lock()
  procs, pumps = [], []
  try:
    for i, cmd in enumerate(commands):
      # Own process group: stopping a process also stops its grain workers.
      p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           start_new_session=True)
      procs.append(p)
      t = threading.Thread(target=_pump, args=(i, p.stdout, out, lock), daemon=True)
      t.start()
      pumps.append(t)
    failed = None
    remaining = set(range(len(procs)))
    while remaining and failed is None:
      for i in sorted(remaining):
        try:
          rc = procs[i].wait(timeout=0.2)
        except subprocess.TimeoutExpired:
          continue
        remaining.discard(i)
        if rc != 0:
          failed = (i, rc)
          break
    if failed is not None:
      with lock:
        out.write(f'[launch] process {failed[0]} exited with status {failed[1]}; '
                  'stopping the others\n')
        out.flush()
      _stop(procs)
    for t in pumps:
      t.join(timeout=5)
    return 0 if failed is None else (failed[1] if failed[1] > 0 else 128 - failed[1])
  finally:
    _stop(procs)


def main(argv: Sequence[str]) -> int:
  argv = list(argv)
  dry_run = os.environ.get('DRY_RUN', '').strip() == '1'
  if len(argv) > 1 and argv[1] == '--dry_run':
    dry_run = True
    del argv[1]
  if len(argv) < 2 or not argv[1].isdigit():
    sys.stderr.write(f'usage: {argv[0]} [--dry_run] N [vdit_jax.main args...]  (N >= 1 '
                     f'processes; got {argv[1:2]})\n')
    return 2
  devices = os.environ.get('DEVICES_PER_PROCESS', str(DEFAULT_DEVICES_PER_PROCESS))
  if not devices.isdigit():
    sys.stderr.write(f'DEVICES_PER_PROCESS={devices!r} must be an integer >= 1\n')
    return 2
  try:
    if dry_run:
      for line in dry_run_lines(int(argv[1]), argv[2:], int(devices), free_port()):
        sys.stdout.write(line + '\n')
      return 0
    return run(int(argv[1]), argv[2:], int(devices))
  except ValueError as e:
    sys.stderr.write(f'{e}\n')
    return 2


if __name__ == '__main__':
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  sys.exit(main(sys.argv))
