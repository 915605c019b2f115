#!/usr/bin/env bash
# N local processes of vdit_jax.main joined on 127.0.0.1 (multi-host on one machine, CPU):
#
#   launch/local_multiprocess.sh 2 --config=configs/tiny.py --workdir=runs/mp
#   DEVICES_PER_PROCESS=8 launch/local_multiprocess.sh 1 ...   # one process, 8 devices
#   launch/local_multiprocess.sh --dry_run 2 ...   # (or DRY_RUN=1) print each process's
#                                                  # command line with its env, run nothing
#
# Each process: JAX_PLATFORMS=cpu, $DEVICES_PER_PROCESS (default 4) fake CPU devices,
# --coordinator_address=127.0.0.1:<free port> --num_processes=N --process_id=i.
# Output lines are prefixed with [i]; if one process fails the rest are stopped and the
# script exits with its status. The logic is in vdit_jax/tools/launch_local.py.
# Each process sets up its host allocator before importing jax (vdit_jax/runtime.py:
# glibc malloc with huge pages on glibc >= 2.35, else jemalloc / tcmalloc if installed;
# one restart, logged);
# VDIT_RUNTIME=0 keeps the environment as it is, VDIT_ALLOCATOR=jemalloc|tcmalloc|system picks.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${repo}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python}" -m vdit_jax.tools.launch_local "$@"
