"""Host set-up of a run, applied before jax is imported: malloc, huge pages, XLA flags.

A CPU train step of a video DiT allocates and frees hundreds of MB to GBs of buffers every
step (attention probabilities [B, K, N, N] kept for the backward pass, activations,
gradients). glibc's malloc serves every buffer over its mmap threshold (at most 32 MiB)
with a fresh mmap and unmaps it on free, so the kernel faults in and zeroes the same
memory again on every step: millions of minor page faults and seconds of system time per
step (measured numbers: bench/train_step.py and BUILD_NOTES.md). An allocator that keeps
freed memory mapped and reuses it (jemalloc, tcmalloc) removes those faults.

`setup()` is the first thing `python -m vdit_jax.main` and bench/*.py run. On Linux it
composes the environment the run should have (`compose_env`). With glibc >= 2.35 the default
is glibc malloc with transparent huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1): on the
bench shape it cut minor faults 164x and the step time by 36%, as fast as jemalloc at about
half jemalloc's peak RSS (BUILD_NOTES.md "Host side of a CPU step"). With an older glibc it
preloads the first allocator library found (jemalloc, then tcmalloc; Debian/Ubuntu packages
libjemalloc2 and libtcmalloc-minimal4) with its settings, else sets the tunables anyway. The
dynamic loader and the allocators read these variables only when a process starts, so if any
changes `setup()` re-executes the process once (`os.execv`: same pid, same arguments, same
signals) with them, and the marker VDIT_RUNTIME_APPLIED stops a second re-exec. It logs one
line to stderr saying what it set.

What the user decides:
  VDIT_RUNTIME=0 (or off / false / no)        change nothing at all.
  VDIT_ALLOCATOR=auto | jemalloc | tcmalloc | system
                                              auto (default): system on glibc >= 2.35,
                                              else jemalloc, else tcmalloc, else system;
                                              system: glibc malloc with huge pages; a
                                              named allocator that is not installed falls
                                              back to the other, then to system.
  A variable the user set is never overridden: with LD_PRELOAD set the allocator is left
  alone, with GLIBC_TUNABLES / MALLOC_CONF / a TCMALLOC_* variable set that one is kept;
  XLA_FLAGS only gains flags whose names it does not already give; JAX_PLATFORMS is
  set (to cpu) only where the user left it unset and `cpu_only_host()` says that
  libtpu is installed on a host with no TPU or GPU.
Elsewhere than Linux `setup()` does nothing.
"""

import dataclasses
import os
import sys
import sysconfig
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

ENV_SWITCH = 'VDIT_RUNTIME'
ENV_ALLOCATOR = 'VDIT_ALLOCATOR'
ENV_MARKER = 'VDIT_RUNTIME_APPLIED'
_OFF = ('0', 'off', 'false', 'no', 'none')
ALLOCATOR_CHOICES = ('auto', 'jemalloc', 'tcmalloc', 'system')


@dataclasses.dataclass(frozen=True)
class Allocator:
  """A malloc replacement loaded with LD_PRELOAD, and the settings it reads at start-up."""
  name: str
  libraries: Tuple[str, ...]             # file names, most specific first
  env: Tuple[Tuple[str, str], ...] = ()  # (variable, value) it reads at start-up


ALLOCATORS = {
    # Never give freed memory back (no decay purge): a training step frees and re-allocates
    # the same buffers, so what is freed is needed again within a step. RSS stays at the
    # peak of the step, which the step reaches every time anyway.
    'jemalloc': Allocator(
        'jemalloc', ('libjemalloc.so.2', 'libjemalloc.so'),
        (('MALLOC_CONF', 'dirty_decay_ms:-1,muzzy_decay_ms:-1'),)),
    # gperftools: release nothing to the OS, and no "large alloc" report on stderr for
    # every buffer over 1 GiB.
    'tcmalloc': Allocator(
        'tcmalloc', ('libtcmalloc_minimal.so.4', 'libtcmalloc.so.4', 'libtcmalloc_minimal.so',
                     'libtcmalloc.so'),
        (('TCMALLOC_RELEASE_RATE', '0'),
         ('TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD', str(1 << 40)))),
}
AUTO_ORDER = ('jemalloc', 'tcmalloc')
# glibc from which `auto` keeps glibc malloc (its hugetlb tunable exists from 2.35 on).
GLIBC_HUGETLB_VERSION = (2, 35)

# glibc malloc without a preloaded allocator: back the heap and mmapped chunks with
# transparent huge pages (glibc >= 2.35; older glibc ignores unknown tunables), so each
# re-fault brings in 2 MiB instead of 4 KiB.
GLIBC_TUNABLES = 'glibc.malloc.hugetlb=1'

# XLA flags added to XLA_FLAGS unless the user's XLA_FLAGS name them already.
XLA_FLAGS: Tuple[str, ...] = ()

# Threads of XLA:CPU's client pool (the variable its DefaultThreadPoolSize reads; default:
# the CPU count). A collective blocks the thread that runs it until every device has
# joined, and a device may run two at once (one inside the scanned-layers loop, one
# outside it), so with several CPU devices (fake ones, or local_multiprocess.sh) on few
# cores the pool can fill with waiting collectives and the step hangs until XLA's
# rendezvous timeout: measured on 2 cores with 8 devices, data 2 x fsdp 2 x tensor 2, for
# configs/tiny_buckets.py and configs/bench.py (BUILD_NOTES.md, "A CPU deadlock on sharded
# meshes"). With THREADS_PER_CPU_DEVICE threads a device both run, and 8-device steps take
# the same time (configs/tiny.py: 1.57 and 1.61 steps/s with 2 and 16 threads).
ENV_PJRT_NPROC = 'PJRT_NPROC'
THREADS_PER_CPU_DEVICE = 2


def cpu_pool_threads(num_devices: int) -> int:
  """XLA:CPU client threads for a process with `num_devices` CPU devices (see above)."""
  return max(os.cpu_count() or 1, THREADS_PER_CPU_DEVICE * num_devices)


def host_device_count(environ: Mapping[str, str]) -> int:
  """The CPU devices a process will have: --xla_force_host_platform_device_count in
  XLA_FLAGS, else JAX_NUM_CPU_DEVICES, else 1."""
  count = 1
  for flag in environ.get('XLA_FLAGS', '').split():
    name, _, value = flag.partition('=')
    if name == '--xla_force_host_platform_device_count' and value.isdigit():
      count = int(value)
  if count == 1 and environ.get('JAX_NUM_CPU_DEVICES', '').isdigit():
    count = int(environ['JAX_NUM_CPU_DEVICES'])
  return max(count, 1)


# Variables read only when a process starts: changing one needs a re-exec.
_START_TIME_VARS = ('LD_PRELOAD', 'GLIBC_TUNABLES')


@dataclasses.dataclass
class HostEnvPlan:
  """What `setup` would do: the variables to set and one note per decision."""
  changes: Dict[str, str]
  notes: List[str]
  needs_reexec: bool


def library_dirs(environ: Mapping[str, str]) -> List[str]:
  """Directories searched for an allocator library, most specific first."""
  arch = sysconfig.get_config_var('MULTIARCH') or ''
  dirs = []
  for prefix in (environ.get('CONDA_PREFIX'), sys.prefix):
    if prefix:
      dirs.append(os.path.join(prefix, 'lib'))
  for base in ('/usr/lib', '/lib', '/usr/local/lib'):
    if arch:
      dirs.append(os.path.join(base, arch))
    dirs.append(base)
  dirs += ['/usr/lib64', '/lib64']
  seen, out = set(), []
  for d in dirs:
    if d not in seen:
      seen.add(d)
      out.append(d)
  return out


def find_library(names: Sequence[str], dirs: Sequence[str]) -> Optional[str]:
  """The first readable file `dir/name` (names outer, dirs inner), else None."""
  for name in names:
    for d in dirs:
      path = os.path.join(d, name)
      if os.path.isfile(path) and os.access(path, os.R_OK):
        return path
  return None


def _flag_name(flag: str) -> str:
  return flag.split('=', 1)[0]


def merge_xla_flags(current: str, extra: Sequence[str]) -> str:
  """`current` plus each flag of `extra` whose name `current` does not give."""
  have = {_flag_name(f) for f in current.split()}
  added = [f for f in extra if _flag_name(f) not in have]
  return ' '.join(current.split() + added)


def glibc_version() -> Optional[Tuple[int, int]]:
  """(major, minor) of the running C library if it is glibc, else None."""
  try:
    name, version = os.confstr('CS_GNU_LIBC_VERSION').split()
    major, minor = version.split('.')[:2]
    return (int(major), int(minor)) if name == 'glibc' else None
  except (AttributeError, ValueError, OSError):
    return None


def cpu_only_host() -> Optional[str]:
  """Why this host can only run JAX on CPU although libtpu is installed, or None.

  With libtpu installed (the `tpu` and `test` extras) and JAX_PLATFORMS unset, JAX first
  starts libtpu, which on a host without TPU chips prints "Failed to find host bounds
  for accelerator type" and "unexpected worker hostname" errors, then falls back to CPU.
  The hardware checks are JAX's own (jax/_src/hardware_utils.py): a Google TPU on PCI,
  an NVIDIA or AMD GPU's device files. Reads /sys and /dev only; imports nothing large.
  """
  import glob  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec('libtpu') is None:
    return None
  for vendor in glob.glob('/sys/bus/pci/devices/*/vendor'):
    try:
      with open(vendor) as f:
        if f.read().strip() == '0x1ae0':  # Google: a TPU chip
          return None
    except OSError:
      continue
  if any(os.path.exists(d) for d in ('/dev/nvidia0', '/dev/nvidiactl', '/dev/dxg',
                                     '/dev/kfd')):
    return None
  return 'libtpu installed, no TPU or GPU on this host'


def compose_env(environ: Mapping[str, str], *, platform: str = sys.platform,
                find: Optional[Callable[[Sequence[str]], Optional[str]]] = None,
                glibc: Optional[Tuple[int, int]] = (),
                cpu_only: Optional[str] = None) -> HostEnvPlan:
  """The variables to set for a fast CPU run, given the current environment.

  Pure (reads the file system only through `find`, which maps library file names to a
  path or None; default: `find_library` over `library_dirs`; and `glibc`, the C library's
  (major, minor) or None if not glibc; default: `glibc_version()`). Raises ValueError for
  an unknown VDIT_ALLOCATOR. `cpu_only`: `cpu_only_host()`'s answer (setup() asks it);
  when given and JAX_PLATFORMS is unset, JAX_PLATFORMS=cpu.
  """
  if glibc == ():
    glibc = glibc_version()
  if find is None:
    dirs = library_dirs(environ)
    find = lambda names: find_library(names, dirs)
  switch = environ.get(ENV_SWITCH, '').strip().lower()
  if switch in _OFF:
    return HostEnvPlan({}, [f'{ENV_SWITCH}={environ[ENV_SWITCH]}: left the environment as it is'],
                False)
  if ENV_MARKER in environ:
    return HostEnvPlan({}, [f'already set up ({environ[ENV_MARKER]})'], False)
  if not platform.startswith('linux'):
    return HostEnvPlan({}, [f'platform {platform}: nothing to set'], False)

  choice = environ.get(ENV_ALLOCATOR, 'auto').strip().lower() or 'auto'
  if choice not in ALLOCATOR_CHOICES:
    raise ValueError(f'{ENV_ALLOCATOR}={environ[ENV_ALLOCATOR]!r} is not one of '
                     f'{ALLOCATOR_CHOICES}.')
  changes: Dict[str, str] = {}
  notes: List[str] = []
  allocator = None
  if environ.get('LD_PRELOAD'):
    notes.append(f'LD_PRELOAD={environ["LD_PRELOAD"]} set by the user: allocator left alone')
  elif choice == 'auto' and glibc is not None and glibc >= GLIBC_HUGETLB_VERSION:
    notes.append(f'glibc {glibc[0]}.{glibc[1]} >= '
                 f'{".".join(map(str, GLIBC_HUGETLB_VERSION))}: its malloc with huge pages')
  elif choice != 'system':
    order = AUTO_ORDER if choice == 'auto' else (choice,) + tuple(
        a for a in AUTO_ORDER if a != choice)
    for name in order:
      path = find(ALLOCATORS[name].libraries)
      if path is not None:
        allocator = ALLOCATORS[name]
        changes['LD_PRELOAD'] = path
        break
      notes.append(f'{name} not found ({", ".join(ALLOCATORS[name].libraries)})')
  if allocator is not None:
    for var, value in allocator.env:
      if var in environ:
        notes.append(f'{var}={environ[var]} set by the user: kept')
      else:
        changes[var] = value
    notes.append(f'allocator {allocator.name}')
  else:
    # glibc malloc, unless the user's LD_PRELOAD replaces it (glibc then ignores these).
    if 'GLIBC_TUNABLES' in environ:
      notes.append(f'GLIBC_TUNABLES={environ["GLIBC_TUNABLES"]} set by the user: kept')
    else:
      changes['GLIBC_TUNABLES'] = GLIBC_TUNABLES
    if not environ.get('LD_PRELOAD'):
      notes.append('allocator glibc malloc')

  xla = merge_xla_flags(environ.get('XLA_FLAGS', ''), XLA_FLAGS)
  if xla != environ.get('XLA_FLAGS', ''):
    changes['XLA_FLAGS'] = xla
  devices = host_device_count(environ)
  if devices > 1:
    if environ.get(ENV_PJRT_NPROC) or environ.get('NPROC'):
      notes.append(f'{ENV_PJRT_NPROC}/NPROC set by the user: kept')
    else:
      threads = cpu_pool_threads(devices)
      changes[ENV_PJRT_NPROC] = str(threads)
      notes.append(f'{devices} CPU devices: {threads} XLA:CPU threads, so that waiting '
                   'collectives cannot fill the pool')
  if cpu_only and 'JAX_PLATFORMS' not in environ:
    changes['JAX_PLATFORMS'] = 'cpu'
    notes.append(f'{cpu_only}: CPU only, which spares a failed libtpu start and its '
                 'errors')
  start_vars = set(_START_TIME_VARS) | {v for a in ALLOCATORS.values() for v, _ in a.env}
  needs_reexec = any(v in start_vars for v in changes)
  return HostEnvPlan(changes, notes, needs_reexec)


def describe(plan: HostEnvPlan) -> str:
  sets = ' '.join(f'{k}={v}' for k, v in plan.changes.items()) or 'nothing set'
  return f'{sets} ({"; ".join(plan.notes)})'


def setup(argv: Optional[Sequence[str]] = None, environ=None,
          execv: Callable[[str, Sequence[str]], None] = os.execv) -> HostEnvPlan:
  """Applies `compose_env` to this process; re-executes it once if that needs a restart.

  Call it before jax (or anything large) is imported. `argv` defaults to the command line
  the interpreter was started with (`sys.orig_argv`, so `python -m pkg.mod ...` and
  interpreter options survive). Returns the plan when it does not re-execute.
  """
  environ = os.environ if environ is None else environ
  try:
    plan = compose_env(environ, cpu_only=cpu_only_host())
  except ValueError as e:
    raise SystemExit(f'vdit_jax.runtime: {e}') from None
  if not plan.changes:
    return plan
  environ.update(plan.changes)
  message = describe(plan)
  if not plan.needs_reexec:
    print(f'vdit_jax.runtime: {message}', file=sys.stderr, flush=True)
    return plan
  environ[ENV_MARKER] = message
  argv = list(sys.orig_argv if argv is None else argv)
  print(f'vdit_jax.runtime: {message}; restarting the process once to apply it '
        f'({ENV_SWITCH}=0 to opt out)', file=sys.stderr, flush=True)
  sys.stdout.flush()
  execv(sys.executable, argv)
  return plan  # only reached when `execv` is replaced (tests)


def current_settings(environ: Optional[Mapping[str, str]] = None) -> Dict[str, Optional[str]]:
  """The variables this module manages, as the process sees them (for bench reports)."""
  environ = os.environ if environ is None else environ
  names = ['LD_PRELOAD', 'GLIBC_TUNABLES', 'XLA_FLAGS', ENV_SWITCH, ENV_ALLOCATOR]
  names += sorted({v for a in ALLOCATORS.values() for v, _ in a.env})
  out = {n: environ.get(n) for n in names}
  out[ENV_MARKER] = environ.get(ENV_MARKER)
  return out
