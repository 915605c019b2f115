r"""Ahead-of-time plan of the train step for a TPU topology (or N fake CPU devices).

python -m vdit_jax.tools.plan --config=configs/dit_xl_video.py --topology=v5p:4x4x8
python -m vdit_jax.tools.plan --config=configs/dit_xl_video.py --topology=v5p:4x4x4 \
    --num_slices=2 --config.mesh.dcn_data=2
python -m vdit_jax.tools.plan --config=configs/tiny.py --num_devices=8 --config.mesh.fsdp=4

Compiles what the trainer compiles, for abstract inputs, on this machine, without
allocating the state: the sharded init (`state.jit_init`), the jitted step
(`loop.jit_train_step`: the same `step.make_train_step`, state and batch shardings,
`donate_argnums=0`) and the sampler of its samples (`loop.jit_sampler`), each under the
config's mesh and logical axis rules. `--topology` takes abstract TPU devices from
libtpu's compiler (`pip install "jax[tpu]"`, no TPU needed); without it the devices are
`--num_devices` CPU devices. Prints per-device memory of the step and the sampler from
the compiler, the compiler's and the analytic FLOPs, and whether both fit the chip's HBM;
the last line is one JSON object.

`--num_slices=N` plans N slices of the topology joined by DCN (`mesh.dcn_*` say which
mesh axes span them). The plan then also prints the bytes each device sends to other
slices per train step, read from the compiled step's HLO (tools/hlo_collectives.py:
the cross-slice transfers, times the trip counts of the loops around them), next to
the analytic figure for a gradient all-reduce where only `data` crosses slices.

Exit status: 0 compiled and fits (or no HBM figure to check against), 1 compiled but does
not fit, 2 bad input (a ValueError).
"""

import dataclasses
import importlib.util
import json
import os
import sys
import threading
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
from vdit_jax.tools import hlo_collectives
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
# Held while a plan traces (see plan()).
_TRACE_LOCK = threading.Lock()

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
flags.DEFINE_integer('num_slices', 1,
                     'With --topology: number of slices of that topology, joined by DCN '
                     '(set mesh.dcn_* to match).')
flags.DEFINE_float('hbm_gib', None,
                   'Memory per chip in GiB to check against; default from the table of '
                   'known TPU kinds (none for CPU).')


@dataclasses.dataclass
class StepPlan:
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
  sampler_num_samples: int
  sampler_total_bytes: int       # the sampler's program, like total_bytes for the step
  hbm_bytes_per_device: Optional[int]
  hbm_source: str
  fits: Optional[bool]
  compile_s: float
  num_slices: int = 1
  mesh_dcn: Optional[dict] = None   # each mesh axis's slice count (its DCN part)
  # Bytes one device sends to other slices per train step (DCN), from the compiled step's
  # HLO; the total is over all devices. See tools/hlo_collectives.py for the cost model.
  dcn_bytes_per_step: int = 0
  dcn_bytes_per_step_total: int = 0
  dcn_data_bytes_per_step: int = 0  # the same less the zeros libtpu pads each transfer with
  dcn_bytes_by_dtype: Optional[dict] = None  # dcn_bytes_per_step by element type
  dcn_transfers: int = 0            # cross-slice transfers in the program text
  dcn_loops: str = ''               # how loops around them were counted
  # 2 (S-1)/S x params x bytes of dcn_analytic_dtype / devices per slice: the gradient
  # all-reduce over S slices when only `data` crosses slices (None otherwise), in the
  # element type most DCN bytes have (bf16 compute all-reduces bf16 gradients).
  dcn_analytic_bytes_per_step: Optional[int] = None
  dcn_analytic_dtype: str = ''


def libtpu_available() -> bool:
  return importlib.util.find_spec('libtpu') is not None


def topology_devices(topology: str, num_slices: int = 1):
  """Abstract TPU devices of a topology name such as 'v5p:4x4x8' (no TPU needed).

  With `num_slices` > 1, that many copies of the topology joined by DCN: each device
  carries its `slice_index`.
  """
  if num_slices < 1:
    raise ValueError(f'--num_slices={num_slices} must be a positive int.')
  if not libtpu_available():
    raise ValueError(
        f'--topology={topology!r} needs libtpu, which is not installed: '
        f'pip install "jax[tpu]=={jax.__version__}".')
  # Planning needs libtpu's compiler only: let several planners (tests, other users) load
  # it at once instead of taking its one-process lock, and skip the GCE metadata queries.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  try:
    kwargs = {'num_slices': num_slices} if num_slices > 1 else {}
    desc = topologies.get_topology_desc(platform='tpu', topology_name=topology, **kwargs)
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
  """Distinct chips (TPU devices of one chip share coords; v4 has 2 devices a chip).

  Coordinates repeat in every slice, so a chip is (slice, coords).
  """
  if all(getattr(d, 'coords', None) is not None for d in devices):
    return len({(getattr(d, 'slice_index', None) or 0, tuple(d.coords)) for d in devices})
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
         num_classes: Optional[int] = None, hbm_gib: Optional[float] = None) -> StepPlan:
  """Validates the config, then AOT-compiles the trainer's jitted step for `devices`."""
  devices = list(devices)
  if num_classes is None:
    num_classes = DEFAULT_NUM_CLASSES
  if num_classes < 0:
    raise ValueError(f'--num_classes={num_classes} must be >= 0.')
  hosts = len({d.process_index for d in devices})
  hbm, hbm_source = hbm_per_device(devices, hbm_gib)
  # Tracing reads JAX's and Flax's mesh and rule contexts and shares their caches across
  # threads: plans made in parallel threads (two topologies at once) race there, so one
  # thread traces at a time; the compiles, which are most of the time, run in parallel.
  t0 = time.perf_counter()
  with _TRACE_LOCK:
    # Validation first (in build), for this device and host count; no pipeline, no checkpointer.
    s = loop.build(config, None, devices=devices, process_count=hosts, num_classes=num_classes)
    config = s.config  # complete: every default from config/defaults.py
    state, batch, rng = abstract_inputs(s, config)
    # The sampler's condition (labels, or captions and given frames) as shapes: made here on
    # the host's CPU, since the mesh's devices may be abstract.
    sample_fn, condition = loop.jit_sampler(s)
    condition = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), condition)
    with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
      # What a run compiles, in its order: the sharded init, the step, the sampler.
      lowered = (state_lib.jit_init(s.init_fn, s.state_shardings).lower(rng),
                 loop.jit_train_step(s).lower(state, batch, rng),
                 sample_fn.lower(_sample_params(s, state), rng, condition))
  _, compiled, sampler = (x.compile() for x in lowered)
  compile_s = time.perf_counter() - t0

  mem = compiled.memory_analysis()
  sampler_mem = sampler.memory_analysis()
  if mem is None or sampler_mem is None:
    raise RuntimeError(f'the compiler gave no memory analysis for {topology}.')
  total = _total_bytes(mem)
  sampler_total = _total_bytes(sampler_mem)
  dcn = _dcn_fields(s, config, compiled, devices)
  spec = s.model.spec
  d = config.data
  model_flops = flops_lib.train_step_flops(
      spec, (d.num_frames, d.height, d.width, d.channels), config.train.batch_size)
  return StepPlan(
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
      sampler_num_samples=int(config.sample.num_samples),
      sampler_total_bytes=sampler_total,
      hbm_bytes_per_device=hbm, hbm_source=hbm_source,
      fits=None if hbm is None else max(total, sampler_total) <= hbm,
      compile_s=round(compile_s, 1), **dcn)


def _dcn_fields(s, config, compiled, devices) -> dict:
  """The StepPlan's DCN fields: the compiled step's cross-slice bytes and the analytic figure."""
  slices = mesh_lib.count_slices(devices)
  _, dcn = mesh_lib.hybrid_shape(config.mesh, len(devices), slices)
  fields = dict(num_slices=slices, mesh_dcn=dict(dcn))
  if slices == 1:
    return dict(fields, dcn_loops='one slice: nothing crosses DCN')
  # Replica-group ids index the program's device assignment: the mesh's devices in order.
  slice_of = [getattr(d, 'slice_index', None) or 0 for d in s.mesh.devices.flat]
  traffic = hlo_collectives.dcn_traffic(compiled.as_text(), slice_of)
  analytic, dtype = None, ''
  if dcn['data'] == slices and traffic.bytes_by_dtype:
    # Only data crosses slices: the gradients' one all-reduce over them, each slice's
    # share split over its devices.
    dtype = max(traffic.bytes_by_dtype, key=traffic.bytes_by_dtype.get)
    grad_bytes = state_lib.param_count(s.abstract_state.params) * hlo_collectives.shape_bytes(
        f'{dtype}[1]')
    analytic = int(2 * (slices - 1) / slices * grad_bytes / (len(devices) // slices))
  return dict(fields, dcn_bytes_per_step=traffic.bytes_per_device,
              dcn_bytes_per_step_total=traffic.bytes_per_device * len(devices),
              dcn_data_bytes_per_step=traffic.data_bytes_per_device,
              dcn_bytes_by_dtype=traffic.bytes_by_dtype,
              dcn_transfers=len(traffic.transfers), dcn_loops=traffic.loop_summary(),
              dcn_analytic_bytes_per_step=analytic, dcn_analytic_dtype=dtype)


def _total_bytes(mem) -> int:
  """What a compiled program holds per device at its peak: arguments + outputs +
  temporaries - aliased (donated) + code."""
  return (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
          - mem.alias_size_in_bytes + mem.generated_code_size_in_bytes)


def _sample_params(s, state):
  """Abstract params the sampler takes: the EMA params, or with LoRA the merged model's."""
  if s.lora is None:
    return state.ema_params
  return state_lib.abstract_with_shardings(s.lora.base_abstract, s.lora.base_shardings)


def _gib(n) -> str:
  return f'{n / GIB:8.3f} GiB ({n:,} B)'


def report(p: StepPlan) -> str:
  """Human-readable lines, then the JSON object as the last line."""
  lines = [
      f'topology        {p.topology}: {p.num_devices} x {p.device_kind!r} devices, '
      f'{p.num_chips} chips, {p.num_hosts} hosts',
      f'mesh            {p.mesh}' + (
          f' over {p.num_slices} slices joined by DCN; slices per axis {p.mesh_dcn}'
          if p.num_slices > 1 else ''),
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
      f'sampler         {_gib(p.sampler_total_bytes)} per device ({p.sampler_num_samples} '
      'clips, the same sum)',
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
  if p.num_slices > 1:
    by_dtype = ', '.join(f'{k} {v:,} B' for k, v in sorted(p.dcn_bytes_by_dtype.items()))
    lines += [
        f'DCN per step    {_gib(p.dcn_bytes_per_step)} sent per device ({by_dtype}), '
        f'{_gib(p.dcn_bytes_per_step_total)} by all {p.num_devices} devices; '
        f'{p.dcn_transfers} cross-slice transfers in the compiled step',
        f'  data          {_gib(p.dcn_data_bytes_per_step)} per device without the zeros '
        'the compiler pads transfers with',
        f'  loops         {p.dcn_loops}',
    ]
    if p.dcn_analytic_bytes_per_step is None:
      lines.append('DCN analytic    (only for meshes where data alone crosses slices)')
    else:
      a = max(p.dcn_analytic_bytes_per_step, 1)
      lines.append(f'DCN analytic    {_gib(p.dcn_analytic_bytes_per_step)} per device = '
                   f'2 (S-1)/S x params x {p.dcn_analytic_dtype} bytes / devices per slice '
                   f'(the gradient all-reduce, S={p.num_slices}); compiled / analytic = '
                   f'{p.dcn_bytes_per_step / a:.2f} sent, {p.dcn_data_bytes_per_step / a:.2f} '
                   'data')
  if p.hbm_bytes_per_device is None:
    lines.append(f'HBM             {p.hbm_source}')
    lines.append('verdict         compiled; memory not checked')
  else:
    lines.append(f'HBM             {_gib(p.hbm_bytes_per_device)} per device; {p.hbm_source}')
    peak = max(p.total_bytes, p.sampler_total_bytes)
    used = peak / p.hbm_bytes_per_device
    if p.fits:
      lines.append(f'verdict         FITS: {used:.1%} of HBM per device')
    else:
      lines.append(f'verdict         DOES NOT FIT: needs {used:.1%} of HBM per device, '
                   f'{(peak - p.hbm_bytes_per_device) / GIB:.2f} GiB too much')
  lines.append(json.dumps(dataclasses.asdict(p), sort_keys=True))
  return '\n'.join(lines)


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.config is None:
    raise app.UsageError('--config is required.')
  try:
    if FLAGS.topology:
      devices = topology_devices(FLAGS.topology, FLAGS.num_slices)
      if FLAGS.num_devices is not None and FLAGS.num_devices != len(devices):
        raise ValueError(
            f'--num_devices={FLAGS.num_devices} disagrees with --topology='
            f'{FLAGS.topology!r}, which has {len(devices)} devices; drop --num_devices.')
    else:
      if FLAGS.num_slices != 1:
        raise ValueError(f'--num_slices={FLAGS.num_slices} needs --topology: CPU devices '
                         'form one slice.')
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
