r"""Ahead-of-time plan of the train step for a TPU topology (or N fake CPU devices).

python -m vdit_jax.tools.plan --config=configs/dit_xl_video.py --topology=v5p:4x4x8
python -m vdit_jax.tools.plan --config=configs/tiny.py --num_devices=8 --config.mesh.fsdp=4

Compiles the trainer's own jitted step (`loop.jit_train_step`: the same
`step.make_train_step`, state and batch shardings, `donate_argnums=0`, under the config's
mesh and logical axis rules) for abstract inputs, on this machine, without allocating the
state: `--topology` takes abstract TPU devices from libtpu's compiler
(`pip install "jax[tpu]"`, no TPU needed); without it the devices are `--num_devices` CPU
devices. Prints per-device memory from the compiler, the compiler's and the analytic FLOPs,
and whether the step fits the chip's HBM; the last line is one JSON object.

Exit status: 0 compiled and fits (or no HBM figure to check against), 1 compiled but does
not fit, 2 bad input (a ValueError).
"""

import dataclasses
import importlib.util
import json
import os
import sys
import time
from typing import Any, Optional, Sequence

from absl import app
from absl import flags
import flax.linen as nn
import jax
from jax.experimental import topologies
import jax.numpy as jnp
from ml_collections import config_flags

from vdit_jax.data import synthetic
from vdit_jax.model import flops as flops_lib
from vdit_jax.parallel import mesh as mesh_lib
from vdit_jax.train import loop
from vdit_jax.train import state as state_lib

# HBM per chip in GiB, by `device.device_kind`. From the "System architecture" tables of
# the Cloud TPU docs (cloud.google.com/tpu/docs/v4, .../v5e, .../v5p, .../v6e): v4 32 GiB
# HBM2, v5e 16 GiB HBM2, v5p 95 GiB HBM2e, v6e 32 GiB. The runtime keeps a little for
# itself, so a plan within a few percent of the limit may still fail to load.
HBM_GIB_PER_CHIP = {
    'TPU v4': 32,
    'TPU v5 lite': 16,   # v5e
    'TPU v5': 95,        # v5p
    'TPU v6 lite': 32,   # v6e (Trillium)
}
GIB = 1 << 30
# The plan never builds the data pipeline, so it does not ask the source for its label
# count: it assumes the synthetic source's (12) unless told (the table is a few rows of D).
DEFAULT_NUM_CLASSES = synthetic.NUM_CLASSES

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a configs/*.py file.',
                                lock_config=True)
flags.DEFINE_string('topology', None,
                    'TPU topology name, e.g. v5p:4x4x8 or v6e:16x16 (needs libtpu). '
                    'Default: fake CPU devices.')
flags.DEFINE_integer('num_devices', None,
                     'Without --topology: number of fake CPU devices '
                     '(default: the current device count).')
flags.DEFINE_integer('num_classes', None,
                     f'Class labels of the data source (default {DEFAULT_NUM_CLASSES}, '
                     'the synthetic source).')
flags.DEFINE_float('hbm_gib', None,
                   'Memory per chip in GiB to check against; default from the table of '
                   'known TPU kinds (none for CPU).')


@dataclasses.dataclass
class Plan:
  """Figures of one AOT-compiled train step. Bytes and compiler FLOPs are per device."""
  topology: str
  device_kind: str
  num_devices: int
  num_chips: int
  num_hosts: int
  mesh: dict
  param_count: int
  global_batch: int
  batch_per_device: float
  tokens_per_clip: int
  remat_policy: str
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  code_bytes: int
  total_bytes: int
  compiler_flops_per_device: Optional[float]
  model_flops_per_step: int
  model_flops_per_device: float
  hbm_bytes_per_device: Optional[int]
  hbm_source: str
  fits: Optional[bool]
  compile_s: float


def libtpu_available() -> bool:
  return importlib.util.find_spec('libtpu') is not None


def topology_devices(topology: str):
  """Abstract TPU devices of a topology name such as 'v5p:4x4x8' (no TPU needed)."""
  if not libtpu_available():
    raise ValueError(
        f'--topology={topology!r} needs libtpu, which is not installed: '
        f'pip install "jax[tpu]=={jax.__version__}".')
  # Planning needs libtpu's compiler only: let several planners (tests, other users) load
  # it at once instead of taking its one-process lock, and skip the GCE metadata queries.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  try:
    desc = topologies.get_topology_desc(platform='tpu', topology_name=topology)
  except jax.errors.JaxRuntimeError as e:
    if 'INVALID_ARGUMENT' not in str(e):
      raise
    raise ValueError(
        f'--topology={topology!r} is not a TPU topology libtpu knows; use '
        f"VERSION:AxB[xC] such as 'v5p:4x4x8' or 'v6e:16x16' ({e}).") from e
  return list(desc.devices)


def cpu_devices(num_devices: Optional[int]):
  """`num_devices` CPU devices (default: as many as there are)."""
  if num_devices is not None:
    if num_devices <= 0:
      raise ValueError(f'--num_devices={num_devices} must be positive.')
    try:
      jax.config.update('jax_num_cpu_devices', num_devices)
    except RuntimeError:
      pass  # backend already up: fine if it already has the right count
  devices = jax.devices('cpu')
  if num_devices is not None and len(devices) != num_devices:
    raise ValueError(
        f'--num_devices={num_devices} but JAX already started with {len(devices)} CPU '
        f'devices; ask for the count before JAX starts (as the command line does), or set '
        f'XLA_FLAGS=--xla_force_host_platform_device_count={num_devices} before importing jax.')
  return devices


def _chips(devices) -> int:
  """Distinct chips (TPU devices of one chip share coords; v4 has 2 devices a chip)."""
  if all(getattr(d, 'coords', None) is not None for d in devices):
    return len({tuple(d.coords) for d in devices})
  return len(devices)


def hbm_per_device(devices, hbm_gib: Optional[float] = None):
  """(bytes per device or None, where the figure comes from)."""
  kind = devices[0].device_kind
  chips = _chips(devices)
  if hbm_gib is not None:
    if hbm_gib <= 0:
      raise ValueError(f'--hbm_gib={hbm_gib} must be positive.')
    per_chip, source = hbm_gib, f'--hbm_gib={hbm_gib:g}'
  elif kind in HBM_GIB_PER_CHIP:
    per_chip = HBM_GIB_PER_CHIP[kind]
    source = f'{kind}: {per_chip} GiB per chip (Cloud TPU docs, system architecture)'
  else:
    return None, f'no HBM figure for device kind {kind!r}; pass --hbm_gib to check'
  return int(per_chip * GIB * chips / len(devices)), source


def _cost_flops(compiled) -> Optional[float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
    cost = cost[0] if cost else None
  if not cost or 'flops' not in cost:
    return None
  return float(cost['flops'])


def abstract_inputs(s, config):
  """(state, batch, rng) as ShapeDtypeStructs carrying the step's input shardings."""
  state = state_lib.abstract_with_shardings(s.abstract_state, s.state_shardings)
  d = config.data
  shardings = loop.batch_shardings(s.mesh, s.rules)
  batch = {
      'video': jax.ShapeDtypeStruct(
          (config.train.batch_size, d.num_frames, d.height, d.width, d.channels),
          jnp.float32, sharding=shardings['video']),  # [B, T, H, W, C]
      'label': jax.ShapeDtypeStruct((config.train.batch_size,), jnp.int32,
                                    sharding=shardings['label']),  # [B]
  }
  key = jax.eval_shape(lambda: jax.random.key(0))
  rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=mesh_lib.replicated(s.mesh))
  return state, batch, rng


def plan(config, devices: Sequence[Any], *, topology: str = 'cpu',
         num_classes: Optional[int] = None, hbm_gib: Optional[float] = None) -> Plan:
  """Validates the config, then AOT-compiles the trainer's jitted step for `devices`."""
  devices = list(devices)
  if num_classes is None:
    num_classes = DEFAULT_NUM_CLASSES
  if num_classes < 0:
    raise ValueError(f'--num_classes={num_classes} must be >= 0.')
  hosts = len({d.process_index for d in devices})
  hbm, hbm_source = hbm_per_device(devices, hbm_gib)
  # Validation first (in build), for this device and host count; no pipeline, no checkpointer.
  s = loop.build(config, None, devices=devices, process_count=hosts, num_classes=num_classes)
  state, batch, rng = abstract_inputs(s, config)

  t0 = time.perf_counter()
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    compiled = loop.jit_train_step(s).lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - t0

  mem = compiled.memory_analysis()
  if mem is None:
    raise RuntimeError(f'the compiler gave no memory analysis for {topology}.')
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
           - mem.alias_size_in_bytes + mem.generated_code_size_in_bytes)
  spec = s.model.spec
  d = config.data
  model_flops = flops_lib.train_step_flops(
      spec, (d.num_frames, d.height, d.width, d.channels), config.train.batch_size)
  return Plan(
      topology=topology, device_kind=devices[0].device_kind, num_devices=len(devices),
      num_chips=_chips(devices), num_hosts=hosts, mesh=dict(s.mesh.shape),
      param_count=state_lib.param_count(s.abstract_state.params),
      global_batch=config.train.batch_size,
      batch_per_device=config.train.batch_size / len(devices),
      tokens_per_clip=model_flops.tokens_per_clip, remat_policy=spec.remat_policy,
      argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
      temp_bytes=mem.temp_size_in_bytes, alias_bytes=mem.alias_size_in_bytes,
      code_bytes=mem.generated_code_size_in_bytes, total_bytes=total,
      compiler_flops_per_device=_cost_flops(compiled),
      model_flops_per_step=model_flops.total,
      model_flops_per_device=model_flops.total / len(devices),
      hbm_bytes_per_device=hbm, hbm_source=hbm_source,
      fits=None if hbm is None else total <= hbm, compile_s=round(compile_s, 1))


def _gib(n) -> str:
  return f'{n / GIB:8.3f} GiB ({n:,} B)'


def report(p: Plan) -> str:
  """Human-readable lines, then the JSON object as the last line."""
  lines = [
      f'topology        {p.topology}: {p.num_devices} x {p.device_kind!r} devices, '
      f'{p.num_chips} chips, {p.num_hosts} hosts',
      f'mesh            {p.mesh}',
      f'params          {p.param_count:,}',
      f'batch           {p.global_batch} global, {p.batch_per_device:g} per device, '
      f'{p.tokens_per_clip:,} tokens/clip; remat {p.remat_policy}',
      f'lower+compile   {p.compile_s:.1f} s',
      'memory per device (compiler memory_analysis):',
      f'  arguments     {_gib(p.argument_bytes)}',
      f'  outputs       {_gib(p.output_bytes)}',
      f'  temporaries   {_gib(p.temp_bytes)}',
      f'  aliased       {_gib(p.alias_bytes)}  (donated state: counted once)',
      f'  code          {_gib(p.code_bytes)}',
      f'  total         {_gib(p.total_bytes)}  = arguments + outputs + temporaries '
      '- aliased + code',
  ]
  if p.compiler_flops_per_device is None:
    lines.append('compiler FLOPs  (no cost analysis)')
  else:
    lines.append(f'compiler FLOPs  {p.compiler_flops_per_device:.4g} per device per step '
                 '(cost_analysis: includes remat recompute, but counts a while loop body '
                 'such as scanned layers once)')
  lines.append(f'model FLOPs     {p.model_flops_per_step:.4g} per step, '
               f'{p.model_flops_per_device:.4g} per device (analytic, 6 x matmul params x '
               'tokens + 12 L N D per token attention, no remat)')
  if p.hbm_bytes_per_device is None:
    lines.append(f'HBM             {p.hbm_source}')
    lines.append('verdict         compiled; memory not checked')
  else:
    lines.append(f'HBM             {_gib(p.hbm_bytes_per_device)} per device; {p.hbm_source}')
    used = p.total_bytes / p.hbm_bytes_per_device
    if p.fits:
      lines.append(f'verdict         FITS: {used:.1%} of HBM per device')
    else:
      lines.append(f'verdict         DOES NOT FIT: needs {used:.1%} of HBM per device, '
                   f'{(p.total_bytes - p.hbm_bytes_per_device) / GIB:.2f} GiB too much')
  lines.append(json.dumps(dataclasses.asdict(p), sort_keys=True))
  return '\n'.join(lines)


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.config is None:
    raise app.UsageError('--config is required.')
  try:
    if FLAGS.topology:
      devices = topology_devices(FLAGS.topology)
      if FLAGS.num_devices is not None and FLAGS.num_devices != len(devices):
        raise ValueError(
            f'--num_devices={FLAGS.num_devices} disagrees with --topology='
            f'{FLAGS.topology!r}, which has {len(devices)} devices; drop --num_devices.')
    else:
      devices = cpu_devices(FLAGS.num_devices)
    p = plan(FLAGS.config, devices, topology=FLAGS.topology or 'cpu',
             num_classes=FLAGS.num_classes, hbm_gib=FLAGS.hbm_gib)
  except ValueError as e:
    print(f'plan: error: {e}', file=sys.stderr)
    return 2
  print(report(p), flush=True)
  return 1 if p.fits is False else 0


if __name__ == '__main__':
  # TPU programs compile through libtpu without a TPU; the host side only needs the CPU
  # backend (and libtpu's "no TPU found" noise is avoided).
  if not os.environ.get('JAX_PLATFORMS'):
    jax.config.update('jax_platforms', 'cpu')
  app.run(main)
