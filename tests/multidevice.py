"""Runs a check script under N fake CPU devices in a fresh process.

The suite itself runs with one device; the device count must be set before jax
starts, so multi-device checks live in `*_multidevice.py` scripts that print
one JSON line {check name: 'ok' | failure text} as their last stdout line.
"""

import json
import os
import re
import subprocess
import sys

from vdit_jax import runtime

HERE = os.path.dirname(os.path.abspath(__file__))


# XLA:CPU aborts the process when one fake device reaches a collective 40 s after
# the others (the default); on a 2-core machine under load that is a scheduling
# delay, not a hang, so the checks give it 10 minutes.
CPU_COLLECTIVE_TIMEOUT_FLAGS = ('--xla_cpu_collective_call_terminate_timeout_seconds=600 '
                                '--xla_cpu_collective_call_warn_stuck_timeout_seconds=120')


def run_checks(script: str, num_devices: int = 8, timeout: int = 900) -> dict:
  return run_checks_with_args(script, [], num_devices=num_devices, timeout=timeout)


def run_checks_with_args(script: str, args, num_devices: int = 8, timeout: int = 900) -> dict:
  """Runs `script ARGS...` under `num_devices` fake CPU devices; its last line's JSON."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' ' + CPU_COLLECTIVE_TIMEOUT_FLAGS +
                      f' --xla_force_host_platform_device_count={num_devices}').strip()
  env['JAX_PLATFORMS'] = 'cpu'
  # What vdit_jax.runtime gives every run with several CPU devices (the scripts here do
  # not go through runtime.setup): XLA:CPU threads enough for waiting collectives.
  env.setdefault(runtime.ENV_PJRT_NPROC, str(runtime.cpu_pool_threads(num_devices)))
  env['PYTHONPATH'] = os.pathsep.join(
      p for p in (os.path.dirname(HERE), env.get('PYTHONPATH')) if p)
  proc = subprocess.run([sys.executable, os.path.join(HERE, script), *args], env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def all_gather_shapes(hlo: str) -> list:
  """Result shapes (tuples of dims) of every all-gather in compiled HLO text."""
  shapes = []
  for line in hlo.splitlines():
    m = re.search(r'all-gather(?:-start)?\(', line)
    if m:
      shapes += [tuple(int(d) for d in dims.split(',') if d)
                 for dims in re.findall(r'[a-z]+\d*\[([\d,]*)\]', line[:m.start()])]
  return shapes
