r"""Ahead-of-time plan of a run's programs for a TPU topology (or N fake CPU devices).

python -m vdit_jax.tools.plan --config=configs/dit_xl_video.py --topology=v5p:4x4x8
python -m vdit_jax.tools.plan --config=configs/dit_xl_video.py --topology=v5p:4x4x4 \
    --num_slices=2 --config.mesh.dcn_data=2
python -m vdit_jax.tools.plan --config=configs/tiny.py --num_devices=8 --config.mesh.fsdp=4
python -m vdit_jax.tools.plan --config=configs/wan.py:t2v_14b --topology=v5p:4x4x4 \
    --what=train --config.train.batch_size=64
python -m vdit_jax.tools.plan --config=configs/wan.py:t2v_14b,lora --topology=v5p:2x2x2 \
    --what=train --config.train.batch_size=8
python -m vdit_jax.tools.plan --config=configs/wan.py:t2v_14b --topology=v5p:2x2x1 --what=sample
python -m vdit_jax.tools.plan --config=configs/wan.py:t2v_14b --topology=v6e:8x8 \
    --what=train --config.train.batch_size=16 --search_mesh
python -m vdit_jax.tools.plan --config=configs/tiny_av.py --topology=v5p:2x2x1 \
    --config.mesh.fsdp=2 --config.mesh.sequence=2 --config.model.sequence_parallel=ulysses
(docs/wan_plans.md and docs/av_plans.md: what these give.)

Compiles what the trainer compiles, for abstract inputs, on this machine, without
allocating the state: the sharded init (`state.jit_init`), the jitted step
(`loop.jit_train_step`: the same `step.make_train_step`, state and batch shardings (the
captions' arrays too, for a text model), `donate_argnums=0`) and the sampler of its samples
(`loop.jit_sampler`: sample.num_samples clips, sample.num_steps model calls in one loop,
each on the batch doubled for guidance), each under the config's mesh and logical axis
rules. `--what` picks them: `all` (the default: what a training run compiles), `train`
(init and step) or `sample` (the sampler alone: what `--mode=sample` runs). `--topology`
takes abstract TPU devices from libtpu's compiler (`pip install "jax[tpu]"`, no TPU
needed); without it the devices are `--num_devices` CPU devices. Prints per-device memory
of each program from the compiler (arguments, outputs, temporaries, code), the compiler's
and the analytic FLOPs, and whether the largest fits the chip's HBM; the last line is one
JSON object. A program whose temporaries alone exceed HBM is refused by the TPU compiler
(RESOURCE_EXHAUSTED): the plan reports that as not fitting, with the compiler's message.
A shards or files source with no data.path is planned with a placeholder path, and latent
shards so named as plain arrays of data.channels (`plan_config`): the plan reads no data.

Audio (audio.enabled, model/av_dit.py): the step's batch also holds 'audio' [B, F, M], the
clips' log-mel features (F = data.num_frames x sample_rate / fps / hop, M = audio.mel_bins),
sharded like the trainer's (`loop.batch_shardings(..., audio=True)`); tokens per clip count
the audio tokens (F / audio.patch) beside the video's, and the analytic FLOPs the audio
stream (model/flops.py). The sampler is the one a run's samples use
(generate/av_sampling.py: both streams, label guidance and, when audio.modality_cfg_* is
not 1, the uncoupled pass of the modality guidance).

LoRA (lora.rank > 0): the state is the adapters, their Adam moments and their EMA; the
frozen base model is the step's second input (train/lora.py). The plan builds that setup
from the model's shapes alone (`abstract_lora_setup`): no base weights are read, and
lora.base_checkpoint need not exist (empty, it is set to a placeholder for the checks).
The sampler of a LoRA run takes the merged model, the base's shapes.

`--search_mesh` tries splits of the devices in the order of `mesh_candidates` (data
parallel first, then fsdp, then sequence and tensor parallelism, the collectives each adds
growing in that order) for the config's train.batch_size, skipping the ones the config's
checks refuse and those whose sharded arguments alone exceed HBM, compiles the others one
at a time and reports the first that fits (exit 0), or that none does (exit 1). A
sequence split turns on model.sequence_parallel='ulysses' unless the config names a
strategy. With several slices it searches each slice's split; mesh.dcn_* stay the config's.

`--num_slices=N` plans N slices of the topology joined by DCN (`mesh.dcn_*` say which
mesh axes span them). The plan then also prints the bytes each device sends to other
slices per train step, read from the compiled step's HLO (tools/hlo_collectives.py:
the cross-slice transfers, times the trip counts of the loops around them), next to
the analytic figure for a gradient all-reduce where only `data` crosses slices.

Exit status: 0 compiled and fits (or no HBM figure to check against), 1 compiled but does
not fit (with --search_mesh: no split fits), 2 bad input (a ValueError).
"""

import dataclasses
import importlib.util
import json
import math
import os
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import app
from absl import flags
import flax.linen as nn
import jax
from jax.experimental import topologies
import jax.numpy as jnp
from ml_collections import config_flags

from vdit_jax.config import resolve
from vdit_jax.data import audio as audio_lib
from vdit_jax.data import synthetic
from vdit_jax.generate import av_sampling
from vdit_jax.generate import conditional
from vdit_jax.generate import sampling
from vdit_jax.model import flops as flops_lib
from vdit_jax.parallel import axes
from vdit_jax.parallel import mesh as mesh_lib
from vdit_jax.tools import hlo_collectives
from vdit_jax.train import lora as lora_lib
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
# What --what compiles, in a run's order.
PROGRAMS = {'all': ('init', 'step', 'sampler'), 'train': ('init', 'step'),
            'sample': ('sampler',)}
WHATS = tuple(PROGRAMS)
# lora.base_checkpoint of a LoRA plan that names none, and data.path of a config that
# names none (shards or files): the checks want a path; nothing reads either.
ABSTRACT_BASE = '<tools.plan: abstract base, no weights read>'
ABSTRACT_DATA = '<tools.plan: no data read>'
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
flags.DEFINE_enum('what', 'all', WHATS,
                  'Programs to compile: all (init, train step, sampler: what a training '
                  'run compiles), train (init and train step), sample (the sampler alone, '
                  'as --mode=sample runs it).')
flags.DEFINE_bool('search_mesh', False,
                  'Try data / fsdp / sequence / tensor splits of the devices for '
                  'train.batch_size, in the order of mesh_candidates, and report the '
                  'first that fits.')


@dataclasses.dataclass
class Memory:
  """Per-device figures of one compiled program (compiler memory and cost analyses)."""
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  code_bytes: int
  total_bytes: int
  compiler_flops: Optional[float]


@dataclasses.dataclass
class StepPlan:
  """Figures of one plan. Bytes and compiler FLOPs are per device; the step's fields are
  None when the step was not compiled (--what=sample), the sampler's when it was not
  (--what=train)."""
  topology: str
  device_kind: str
  num_devices: int
  num_chips: int
  num_hosts: int
  mesh: dict
  param_count: int                # the model's params (with LoRA: the frozen base's)
  global_batch: int
  batch_per_device: float
  tokens_per_clip: int
  remat_policy: str
  argument_bytes: Optional[int]
  output_bytes: Optional[int]
  temp_bytes: Optional[int]
  alias_bytes: Optional[int]
  code_bytes: Optional[int]
  total_bytes: Optional[int]
  compiler_flops_per_device: Optional[float]
  model_flops_per_step: int
  model_flops_per_device: float
  sampler_num_samples: int
  sampler_total_bytes: Optional[int]  # the sampler's program, like total_bytes for the step
  hbm_bytes_per_device: Optional[int]
  hbm_source: str
  fits: Optional[bool]
  compile_s: float
  what: str = 'all'
  trainable_param_count: int = 0  # the state's params: with LoRA, the adapters
  lora_rank: int = 0
  attention_impl: str = ''
  sequence_parallel: str = 'none'
  init_total_bytes: Optional[int] = None
  # The sampler: sample.num_steps model calls on sampler_rows clips (guidance doubles them).
  sampler_name: str = ''
  sampler_num_steps: int = 0
  sampler_rows: int = 0
  sampler_argument_bytes: Optional[int] = None
  sampler_output_bytes: Optional[int] = None
  sampler_temp_bytes: Optional[int] = None
  sampler_code_bytes: Optional[int] = None
  sampler_compiler_flops_per_device: Optional[float] = None
  sampler_model_flops: int = 0    # analytic: num_steps forward passes of sampler_rows clips
  peak_bytes: Optional[int] = None  # the largest total of the compiled programs
  notes: List[str] = dataclasses.field(default_factory=list)  # what the plan changed
  compile_s_by_program: Dict[str, float] = dataclasses.field(default_factory=dict)
  # Programs the compiler refused for want of HBM: name -> its message (fits is False).
  out_of_memory: Dict[str, str] = dataclasses.field(default_factory=dict)
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
  # audio.enabled: tokens_per_clip = video_tokens_per_clip + audio_tokens_per_clip.
  video_tokens_per_clip: int = 0
  audio_tokens_per_clip: int = 0
  audio_design: str = ''            # audio.design ('cross' | 'joint'); '' without audio
  audio_batch_shape: Optional[List[int]] = None  # the step's 'audio' [B, F, M]
  # The sampler's uncoupled rows per model call (the modality guidance's pass; audio only).
  sampler_uncoupled_rows: int = 0


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


def program_memory(compiled, name: str) -> Memory:
  """The compiled program's per-device memory and compiler FLOPs."""
  mem = compiled.memory_analysis()
  if mem is None:
    raise RuntimeError(f'the compiler gave no memory analysis for the {name}.')
  return Memory(argument_bytes=mem.argument_size_in_bytes,
                output_bytes=mem.output_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
                alias_bytes=mem.alias_size_in_bytes,
                code_bytes=mem.generated_code_size_in_bytes, total_bytes=_total_bytes(mem),
                compiler_flops=_cost_flops(compiled))


def audio_batch_shape(config) -> Optional[Tuple[int, int, int]]:
  """The step's 'audio' [B, F, M] (log-mel features, F = data.num_frames x mel frames per
  video frame, M = audio.mel_bins) when config.audio.enabled, else None."""
  if not audio_enabled(config):
    return None
  spec = audio_lib.AudioSpec.from_config(config.audio)
  return (int(config.train.batch_size), spec.num_mel_frames(int(config.data.num_frames)),
          int(spec.mel_bins))


def audio_enabled(config) -> bool:
  """Whether the config trains the audio-video DiT (config.audio.enabled)."""
  return 'audio' in config and bool(config.audio.enabled)


def abstract_batch(config, shardings) -> dict:
  """The train step's batch as ShapeDtypeStructs: video [B, T, H, W, C], label [B], with
  audio.enabled the clips' log-mel features audio float32 [B, F, M] (data/pipeline.py)
  and, for a text model, the captions' arrays as the input pipeline makes them
  (data/captions.py: tokens int32 [B, L] or text_embed float32 [B, L, E], text_mask bool
  [B, L])."""
  d, b = config.data, config.train.batch_size
  shapes = {'video': ((b, d.num_frames, d.height, d.width, d.channels), jnp.float32),
            'label': ((b,), jnp.int32)}
  audio = audio_batch_shape(config)
  if audio is not None:
    if 'audio' not in shardings:
      raise ValueError('config.audio.enabled=True, but the batch shardings have no '
                       "'audio': make them with loop.batch_shardings(..., audio=True).")
    shapes['audio'] = (audio, jnp.float32)
  cond = conditional.conditioning(config)
  if cond is not None and cond.text_encoder:
    data_key, mask_key = cond.batch_keys()
    length = int(config.model.text.max_length)
    shapes[data_key] = (((b, length), jnp.int32) if data_key == 'tokens' else
                        ((b, length, int(config.model.text.embed_dim)), jnp.float32))
    shapes[mask_key] = ((b, length), jnp.bool_)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[k])
          for k, (shape, dtype) in shapes.items()}


def abstract_inputs(s, config):
  """(state, batch, rng) as ShapeDtypeStructs carrying the step's input shardings."""
  state = state_lib.abstract_with_shardings(s.abstract_state, s.state_shardings)
  shardings = loop.batch_shardings(s.mesh, s.rules, conditional.batch_ndims(config),
                                   audio=audio_enabled(config))
  batch = abstract_batch(config, shardings)
  key = jax.eval_shape(lambda: jax.random.key(0))
  rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=mesh_lib.replicated(s.mesh))
  return state, batch, rng


def abstract_lora_setup(model, tx, config, mesh, rules) -> lora_lib.LoraSetup:
  """train/lora.py's `make_setup` with an abstract base: the adapters' init and
  shardings as a run has them, the base params as ShapeDtypeStructs in the model's
  shardings, bound as the step's second input. Resolves and reads no base checkpoint."""
  return lora_lib.make_setup(
      model, tx, config, mesh, rules,
      abstract_source=lora_lib.BaseSource('abstract', ABSTRACT_BASE, 0, None))


def plan_config(config) -> Tuple[Any, List[str]]:
  """(a complete copy of `config` the plan can check without data, notes on what
  changed). A shards or files source with no data.path gets a placeholder path (the plan
  reads no data); latent shards so named are planned as plain arrays of data.channels,
  since their index and VAE, which the latents check reads, are not there."""
  full = resolve.complete(config)
  notes = []
  d = full.data
  if d.source != 'synthetic' and not d.path and not (d.latents and d.vae):
    if d.latents:
      d.latents = False
      notes.append('data.latents: no shard index or VAE to read, so planned as arrays of '
                   f'{d.channels} channels (the same model and shapes; the sampler then '
                   'clips x0 to [-1, 1], a few elementwise ops more than a latent run)')
    d.path = ABSTRACT_DATA
  return full, notes


def build(config, devices: Sequence[Any], *, process_count: int,
          num_classes: int) -> loop.Setup:
  """`loop.build` without a workdir for `devices`; a LoRA config gets
  `abstract_lora_setup` (the LoRA run's checks still apply, against a placeholder base
  path when lora.base_checkpoint is empty)."""
  full = resolve.complete(config)
  kwargs = dict(devices=devices, process_count=process_count, num_classes=num_classes)
  if not lora_lib.enabled(full):
    return loop.build(full, None, **kwargs)
  if not str(full.lora.base_checkpoint).strip():
    full.lora.base_checkpoint = ABSTRACT_BASE
  resolved = resolve.resolve(full, devices=devices, process_count=process_count).config
  base = resolve.complete(resolved)
  base.lora.rank = 0  # the same model, mesh and optimizer; the state made below
  s = loop.build(base, None, **kwargs)
  setup = abstract_lora_setup(s.model, s.tx, resolved, s.mesh, s.rules)
  abstract, shardings = state_lib.state_shardings(setup.init_fn, s.mesh, s.rules)
  return dataclasses.replace(s, config=resolved, init_fn=setup.init_fn,
                             abstract_state=abstract, state_shardings=shardings, lora=setup)


def _sample_params(s, state):
  """Abstract params the sampler takes: the state's (EMA params unless sample.use_ema is
  False), or with LoRA the merged model's."""
  if s.lora is None:
    return loop.sample_params(state, s.config)
  return state_lib.abstract_with_shardings(s.lora.base_abstract, s.lora.base_shardings)


def lower(s, what: str) -> Dict[str, Any]:
  """{program name: lowered} of PROGRAMS[what], traced under the mesh and rules."""
  state, batch, rng = abstract_inputs(s, s.config)
  programs = PROGRAMS[what]
  sampler = None
  if 'sampler' in programs:
    # The sampler's condition (labels, or captions and given frames) as shapes: made here
    # on the host's CPU, since the mesh's devices may be abstract.
    sample_fn, condition = (av_sampler(s) if audio_enabled(s.config)
                            else loop.jit_sampler(s))
    condition = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), condition)
    sampler = (sample_fn, condition)
  lowered = {}
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    # What a run compiles, in its order: the sharded init, the step, the sampler.
    if 'init' in programs:
      lowered['init'] = state_lib.jit_init(s.init_fn, s.state_shardings).lower(rng)
    if 'step' in programs:
      lowered['step'] = loop.jit_train_step(s).lower(state, batch, rng)
    if sampler is not None:
      lowered['sampler'] = sampler[0].lower(_sample_params(s, state), rng, sampler[1])
  return lowered


def av_sampler(s):
  """(jitted sample_fn(params, rng, condition) -> (frames, log-mel features), the
  condition): the audio-video sampler a run's samples use (loop.sample_and_write ->
  generate/av_sampling.py), sample.num_samples clips of audio.task. The condition holds
  'labels' and, for audio.task 'v2a' / 'a2v', the given 'video' / 'audio'."""
  cfg = s.config
  n = int(cfg.sample.num_samples)
  fn = av_sampling.make_sample_fn(s.model, s.diffusion, cfg, s.num_classes, n)
  video_shape, audio_shape = av_sampling.shapes(cfg, n)
  condition = {'labels': sampling.sample_labels(n, s.num_classes)}
  if cfg.audio.task == 'v2a':
    condition['video'] = jax.ShapeDtypeStruct(video_shape, jnp.float32)
  elif cfg.audio.task == 'a2v':
    condition['audio'] = jax.ShapeDtypeStruct(audio_shape, jnp.float32)

  def sample_fn(params, rng, cond):
    return fn(params, rng, cond['labels'], video=cond.get('video'), audio=cond.get('audio'))

  return jax.jit(sample_fn, out_shardings=mesh_lib.replicated(s.mesh)), condition


def argument_bytes(s, what: str) -> int:
  """Bytes per device of the arguments of the programs --what compiles, from their
  shardings (the largest: the state and the LoRA base for the step, the params for the
  sampler), without compiling."""
  state = state_lib.abstract_with_shardings(s.abstract_state, s.state_shardings)
  step = _shard_bytes(state) if 'step' in PROGRAMS[what] else 0
  if s.lora is not None:
    step += _shard_bytes(s.lora.base_params()) if step else 0
  sampler = (_shard_bytes(_sample_params(s, state)) if 'sampler' in PROGRAMS[what] else 0)
  return max(step, sampler)


def _shard_bytes(tree) -> int:
  """Bytes one device holds of ShapeDtypeStructs carrying shardings (its largest shard)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree) if getattr(x, 'sharding', None) is not None)


def plan(config, devices: Sequence[Any], *, topology: str = 'cpu',
         num_classes: Optional[int] = None, hbm_gib: Optional[float] = None,
         what: str = 'all') -> StepPlan:
  """Validates the config, then AOT-compiles the programs of --what for `devices`."""
  s, hbm, notes = _setup(config, devices, num_classes, hbm_gib, what)
  return _compile(s, list(devices), hbm, topology, what, notes)


def _setup(config, devices, num_classes, hbm_gib, what):
  """(Setup, (HBM bytes per device or None, its source), notes) after the cheap checks."""
  if what not in PROGRAMS:
    raise ValueError(f'--what={what!r} is not one of {WHATS}.')
  devices = list(devices)
  if num_classes is None:
    num_classes = DEFAULT_NUM_CLASSES
  if num_classes < 0:
    raise ValueError(f'--num_classes={num_classes} must be >= 0.')
  hosts = len({d.process_index for d in devices})
  hbm = hbm_per_device(devices, hbm_gib)
  config, notes = plan_config(config)
  with _TRACE_LOCK:
    # Validation first (in build), for this device and host count; no pipeline, no checkpointer.
    s = build(config, devices, process_count=hosts, num_classes=num_classes)
  if s.lora is not None:
    notes.append(f'lora: the frozen base is abstract (lora.base_checkpoint='
                 f'{s.config.lora.base_checkpoint!r} is not read)')
  return s, hbm, notes


def _compile(s, devices, hbm, topology: str, what: str, notes: List[str], *,
             stop_early: bool = False) -> StepPlan:
  """Lowers and compiles the programs of `what`; with `stop_early`, none after the
  first that the compiler refuses for want of HBM (the split does not fit anyway)."""
  # Tracing reads JAX's and Flax's mesh and rule contexts and shares their caches across
  # threads: plans made in parallel threads (two topologies at once) race there, so one
  # thread traces at a time; the compiles, which are most of the time, run in parallel.
  t0 = time.perf_counter()
  with _TRACE_LOCK:
    lowered = lower(s, what)
  compiled, seconds, refused = {}, {}, {}
  for name, x in lowered.items():
    if refused and stop_early:
      break
    t1 = time.perf_counter()
    try:
      compiled[name] = x.compile()
    except jax.errors.JaxRuntimeError as e:
      # The TPU compiler refuses a program whose temporaries alone exceed HBM: that is
      # the plan's answer (does not fit), not a failure of the plan.
      if 'RESOURCE_EXHAUSTED' not in str(e):
        raise
      refused[name] = str(e).strip().splitlines()[0]
    seconds[name] = round(time.perf_counter() - t1, 1)
  compile_s = time.perf_counter() - t0
  memory = {name: program_memory(c, name) for name, c in compiled.items()}
  return _step_plan(s, devices, memory, compiled.get('step'), hbm, topology, what,
                    compile_s, notes, seconds, refused)


def _step_plan(s, devices, memory, step, hbm, topology, what, compile_s, notes,
               seconds, refused) -> StepPlan:
  config = s.config  # complete: every default from config/defaults.py
  spec = s.model.spec
  d = config.data
  shape = (d.num_frames, d.height, d.width, d.channels)
  model_flops = flops_lib.train_step_flops(spec, shape, config.train.batch_size)
  rows = _sampler_rows(config, s.num_classes)
  uncoupled = _sampler_uncoupled_rows(config)
  # A forward pass is a third of a train step's FLOPs (6 per MAC -> 2).
  forward = lambda count: (count.matmul + count.attention) // 3
  sample_flops = forward(flops_lib.train_step_flops(spec, shape, rows))
  if uncoupled:  # the modality guidance's pass: the streams do not meet
    sample_flops += forward(flops_lib.train_step_flops(spec, shape, uncoupled,
                                                       coupled=False))
  sample_flops *= config.sample.num_steps
  hbm_bytes, hbm_source = hbm
  peak = max((m.total_bytes for m in memory.values()), default=None)
  if refused:
    fits = False
  else:
    fits = None if hbm_bytes is None else peak <= hbm_bytes
  train, sampler, init = memory.get('step'), memory.get('sampler'), memory.get('init')
  field = lambda m, key: None if m is None else getattr(m, key)
  dcn = (_dcn_fields(s, config, step, devices) if step is not None
         else _one_slice_fields(config, devices))
  return StepPlan(
      topology=topology, device_kind=devices[0].device_kind, num_devices=len(devices),
      num_chips=_chips(devices), num_hosts=len({x.process_index for x in devices}),
      mesh=dict(s.mesh.shape), what=what,
      param_count=state_lib.param_count(s.lora.base_abstract if s.lora is not None
                                        else s.abstract_state.params),
      trainable_param_count=state_lib.param_count(s.abstract_state.params),
      lora_rank=int(config.lora.rank), attention_impl=spec.attention_impl,
      sequence_parallel=spec.sequence_parallel,
      global_batch=config.train.batch_size,
      batch_per_device=config.train.batch_size / len(devices),
      tokens_per_clip=model_flops.tokens_per_clip, remat_policy=spec.remat_policy,
      argument_bytes=field(train, 'argument_bytes'),
      output_bytes=field(train, 'output_bytes'), temp_bytes=field(train, 'temp_bytes'),
      alias_bytes=field(train, 'alias_bytes'), code_bytes=field(train, 'code_bytes'),
      total_bytes=field(train, 'total_bytes'),
      compiler_flops_per_device=field(train, 'compiler_flops'),
      model_flops_per_step=model_flops.total,
      model_flops_per_device=model_flops.total / len(devices),
      init_total_bytes=field(init, 'total_bytes'),
      sampler_num_samples=int(config.sample.num_samples), sampler_rows=rows,
      sampler_name=str(config.sample.sampler), sampler_num_steps=int(config.sample.num_steps),
      sampler_argument_bytes=field(sampler, 'argument_bytes'),
      sampler_output_bytes=field(sampler, 'output_bytes'),
      sampler_temp_bytes=field(sampler, 'temp_bytes'),
      sampler_code_bytes=field(sampler, 'code_bytes'),
      sampler_total_bytes=field(sampler, 'total_bytes'),
      sampler_compiler_flops_per_device=field(sampler, 'compiler_flops'),
      sampler_model_flops=sample_flops, peak_bytes=peak,
      hbm_bytes_per_device=hbm_bytes, hbm_source=hbm_source,
      fits=fits, compile_s=round(compile_s, 1), compile_s_by_program=seconds,
      out_of_memory=refused, notes=list(notes),
      video_tokens_per_clip=model_flops.video_tokens_per_clip,
      audio_tokens_per_clip=model_flops.audio_tokens_per_clip,
      audio_design=spec.audio.design if spec.audio is not None else '',
      audio_batch_shape=(None if audio_batch_shape(config) is None
                         else list(audio_batch_shape(config))),
      sampler_uncoupled_rows=uncoupled, **dcn)


def _sampler_rows(config, num_classes: int) -> int:
  """Clips per (coupled) model call of the sampler: sample.num_samples, doubled by guidance
  (the conditional and the null rows in one batch) when there is a caption or label to
  guide toward and sample.cfg_scale (with audio: or audio.cfg_scale) is not 1."""
  guided = conditional.is_text(config) or num_classes > 0
  n = int(config.sample.num_samples)
  scales = [float(config.sample.cfg_scale)]
  if audio_enabled(config):  # diffusion/av.py: one null pass serves both streams
    scales.append(float(config.audio.cfg_scale))
  return 2 * n if guided and any(x != 1.0 for x in scales) else n


def _sampler_uncoupled_rows(config) -> int:
  """Clips per step of the audio sampler's uncoupled call (the modality guidance,
  audio.modality_cfg_video / _audio not 1); 0 without audio or that guidance."""
  if not audio_enabled(config):
    return 0
  if (float(config.audio.modality_cfg_video) == 1.0
      and float(config.audio.modality_cfg_audio) == 1.0):
    return 0
  return int(config.sample.num_samples)


def _one_slice_fields(config, devices) -> dict:
  slices = mesh_lib.count_slices(devices)
  _, dcn = mesh_lib.hybrid_shape(config.mesh, len(devices), slices)
  return dict(num_slices=slices, mesh_dcn=dict(dcn),
              dcn_loops='no train step compiled' if slices > 1 else
              'one slice: nothing crosses DCN')


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


# ------------------------------------------------------------------------- mesh search


def _divisors(n: int) -> List[int]:
  return [k for k in range(1, n + 1) if n % k == 0]


def mesh_candidates(per_slice: int, batch_ways: Optional[int] = None,
                    dcn_batch: int = 1) -> List[Dict[str, int]]:
  """Splits {data, fsdp, tensor, sequence} of `per_slice` devices, in the order tried.

  Fewest model-parallel ways (tensor x sequence) first, since their collectives sit in
  every layer's critical path; within those, fsdp ascending (data parallelism, one
  gradient all-reduce a step, before fsdp's per-layer gathers), then sequence before
  tensor (an all-to-all around attention, against all-reduces around attention and MLP).
  With `batch_ways` (the global batch), only splits whose batch axes (data x fsdp, times
  `dcn_batch`, their slice count) divide it.
  """
  out = []
  for model_ways in _divisors(per_slice):
    for fsdp in _divisors(per_slice // model_ways):
      data = per_slice // model_ways // fsdp
      if batch_ways is not None and batch_ways % (data * fsdp * dcn_batch):
        continue
      for tensor in _divisors(model_ways):
        out.append(dict(data=data, fsdp=fsdp, tensor=tensor, sequence=model_ways // tensor))
  return out


def _with_mesh(config, sizes: Dict[str, int]):
  """A complete copy of `config` with the mesh's ICI sizes `sizes`; a sequence split
  turns on Ulysses attention unless the config names a sequence_parallel strategy."""
  out = resolve.complete(config)
  out.mesh.update(sizes)
  if sizes['sequence'] > 1 and out.model.sequence_parallel == 'none':
    out.model.sequence_parallel = 'ulysses'
  return out


def _mesh_name(sizes: Dict[str, int]) -> str:
  return ' '.join(f'{a}={sizes[a]}' for a in axes.MESH_AXES)


@dataclasses.dataclass
class MeshTry:
  """One split tried by `search_mesh`: what became of it."""
  mesh: Dict[str, int]
  outcome: str                  # 'refused' | 'skipped' | 'does not fit' | 'fits'
  detail: str
  plan: Optional[StepPlan] = None


def search_mesh(config, devices: Sequence[Any], *, topology: str = 'cpu',
                num_classes: Optional[int] = None, hbm_gib: Optional[float] = None,
                what: str = 'all', log=print) -> Tuple[Optional[StepPlan], List[MeshTry]]:
  """(the plan of the first split of `mesh_candidates` that fits, or None; every try).

  A split the config's checks refuse (heads, widths or tokens it does not divide) or
  whose arguments per device (state, LoRA base, sampler params) alone exceed HBM is not
  compiled; the others compile one at a time until one fits. `log` gets a line per try.
  """
  devices = list(devices)
  hbm_bytes, _ = hbm_per_device(devices, hbm_gib)
  full = resolve.complete(config)
  slices = mesh_lib.count_slices(devices)
  dcn = mesh_lib.dcn_sizes(full.mesh)
  tries = []
  candidates = mesh_candidates(len(devices) // slices, int(full.train.batch_size),
                               dcn['data'] * dcn['fsdp'])
  if not candidates:
    raise ValueError(f'train.batch_size={full.train.batch_size} is not divisible by any '
                     f'data x fsdp split of {len(devices) // slices} devices per slice; '
                     'use a multiple of the slice count.')
  for sizes in candidates:
    name = _mesh_name(sizes)
    try:
      s, hbm, notes = _setup(_with_mesh(full, sizes), devices, num_classes, hbm_gib, what)
    except ValueError as e:
      tries.append(MeshTry(sizes, 'refused', str(e)))
      log(f'mesh {name}: refused: {e}')
      continue
    args = argument_bytes(s, what)
    if hbm_bytes is not None and args > hbm_bytes:
      detail = (f'arguments alone {args / GIB:.2f} GiB per device > '
                f'{hbm_bytes / GIB:.2f} GiB HBM')
      tries.append(MeshTry(sizes, 'skipped', detail))
      log(f'mesh {name}: skipped: {detail}')
      continue
    log(f'mesh {name}: compiling ({args / GIB:.2f} GiB of arguments per device) ...')
    p = _compile(s, devices, hbm, topology, what, notes, stop_early=True)
    detail = f'{_peak_text(p)}, {p.compile_s:.0f} s'
    if p.out_of_memory:
      detail = (f'the compiler ran out of HBM for the {", ".join(p.out_of_memory)} (the '
                f'programs before it: {detail})')
    outcome = 'does not fit' if p.fits is False else 'fits'
    tries.append(MeshTry(sizes, outcome, detail, p))
    log(f'mesh {name}: {outcome}: {detail}')
    if p.fits is not False:
      return p, tries
  return None, tries


# ------------------------------------------------------------------------------ report


def _peak_text(p: StepPlan) -> str:
  """'peak X GiB per device (Y% of HBM)' of the compiled programs."""
  if p.peak_bytes is None:
    return 'no program compiled'
  used = ('' if p.hbm_bytes_per_device is None else
          f' ({p.peak_bytes / p.hbm_bytes_per_device:.1%} of HBM)')
  return f'peak {p.peak_bytes / GIB:.3f} GiB per device{used}'


def _gib(n) -> str:
  return f'{n / GIB:8.3f} GiB ({n:,} B)'


def _memory_lines(p: StepPlan, prefix: str) -> List[str]:
  get = lambda key: getattr(p, prefix + key)
  lines = [f'  arguments     {_gib(get("argument_bytes"))}',
           f'  outputs       {_gib(get("output_bytes"))}',
           f'  temporaries   {_gib(get("temp_bytes"))}']
  if not prefix:
    lines.append(f'  aliased       {_gib(p.alias_bytes)}  (donated state: counted once)')
  lines += [f'  code          {_gib(get("code_bytes"))}',
            f'  total         {_gib(get("total_bytes"))}  = arguments + outputs + '
            'temporaries - aliased + code']
  return lines


def _tokens_text(p: StepPlan, batch: bool = True) -> str:
  """'N tokens/clip', with audio '(Nv video + Na audio, audio.design=...)' and, with
  `batch`, the train batch's audio shape [B, F, M]."""
  text = f'{p.tokens_per_clip:,} tokens/clip'
  if p.audio_design:
    text += (f' ({p.video_tokens_per_clip:,} video + {p.audio_tokens_per_clip:,} audio, '
             f'audio.design={p.audio_design}'
             + (f'; batch audio {p.audio_batch_shape}' if batch else '') + ')')
  return text


def report(p: StepPlan) -> str:
  """Human-readable lines, then the JSON object as the last line."""
  params = f'params          {p.param_count:,}'
  if p.lora_rank:
    params += (f' frozen base; trains {p.trainable_param_count:,} LoRA rank-{p.lora_rank} '
               f'adapter params ({p.trainable_param_count / max(p.param_count, 1):.2%})')
  lines = [
      f'topology        {p.topology}: {p.num_devices} x {p.device_kind!r} devices, '
      f'{p.num_chips} chips, {p.num_hosts} hosts',
      f'mesh            {p.mesh}' + (
          f' over {p.num_slices} slices joined by DCN; slices per axis {p.mesh_dcn}'
          if p.num_slices > 1 else ''),
      params,
      f'model           attention {p.attention_impl} (auto: splash on TPU), sequence '
      f'parallel {p.sequence_parallel}, remat {p.remat_policy}',
      f'lower+compile   {p.compile_s:.1f} s (' + ', '.join(
          f'{name} {p.compile_s_by_program.get(name, 0):.1f} s' for name in PROGRAMS[p.what])
      + ')',
  ]
  lines += [f'out of memory   {name}: the compiler refused it: {message}'
            for name, message in p.out_of_memory.items()]
  lines += [f'note            {n}' for n in p.notes]
  if 'step' in PROGRAMS[p.what]:
    lines.append(f'train batch     {p.global_batch} global, {p.batch_per_device:g} per device, '
                 f'{_tokens_text(p)}')
  if p.total_bytes is not None:
    lines.append('train step, memory per device (compiler memory_analysis):')
    lines += _memory_lines(p, '')
    if p.compiler_flops_per_device is None:
      lines.append('compiler FLOPs  (no cost analysis)')
    else:
      lines.append(f'compiler FLOPs  {p.compiler_flops_per_device:.4g} per device per step '
                   '(cost_analysis: includes remat recompute, but counts a while loop '
                   'body such as scanned layers once)')
    lines.append(f'model FLOPs     {p.model_flops_per_step:.4g} per step, '
                 f'{p.model_flops_per_device:.4g} per device (analytic, 6 x matmul params x '
                 'tokens + 12 L N D per token attention, no remat' +
                 ('; LoRA skips the frozen weights\' gradients' if p.lora_rank else '') +
                 ('; the audio stream included' if p.audio_design else '') + ')')
  if p.init_total_bytes is not None:
    lines.append(f'init          {_gib(p.init_total_bytes)} per device (the sharded init, '
                 'the same sum)')
  if p.sampler_total_bytes is not None:
    lines += [f'sampler         {p.sampler_name}, {p.sampler_num_steps} steps, '
              f'{p.sampler_num_samples} clips: {p.sampler_rows} rows per model call '
              f'(guidance doubles them)'
              + (f' + {p.sampler_uncoupled_rows} uncoupled (modality guidance)'
                 if p.sampler_uncoupled_rows else '')
              + f', {_tokens_text(p, batch=False)}; memory per device:']
    lines += _memory_lines(p, 'sampler_')
    if p.sampler_compiler_flops_per_device is not None:
      lines.append(f'compiler FLOPs  {p.sampler_compiler_flops_per_device:.4g} per device '
                   '(cost_analysis; the steps\' loop body counted once)')
    lines.append(f'model FLOPs     {p.sampler_model_flops:.4g} per sample call '
                 f'({p.sampler_num_steps} forward passes of {p.sampler_rows} clips'
                 + (f' and {p.sampler_uncoupled_rows} uncoupled' if p.sampler_uncoupled_rows
                    else '') + ', analytic)')
  if p.num_slices > 1 and p.total_bytes is not None:
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
    if p.fits:
      lines.append(f'verdict         FITS: {_peak_text(p)} (the largest program)')
    elif p.out_of_memory:
      lines.append(f'verdict         DOES NOT FIT: the compiler ran out of HBM for the '
                   f'{", ".join(p.out_of_memory)}'
                   + (f'; the rest: {_peak_text(p)}' if p.peak_bytes is not None else ''))
    else:
      lines.append(f'verdict         DOES NOT FIT: {_peak_text(p)}, '
                   f'{(p.peak_bytes - p.hbm_bytes_per_device) / GIB:.2f} GiB too much')
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
    kwargs = dict(topology=FLAGS.topology or 'cpu', num_classes=FLAGS.num_classes,
                  hbm_gib=FLAGS.hbm_gib, what=FLAGS.what)
    if FLAGS.search_mesh:
      p, tries = search_mesh(FLAGS.config, devices,
                             log=lambda line: print(line, flush=True), **kwargs)
      if p is None:
        counts = {k: sum(t.outcome == k for t in tries)
                  for k in ('does not fit', 'skipped', 'refused')}
        print(f'search_mesh: none of the {len(tries)} splits fits: '
              f'{counts["does not fit"]} compiled and did not fit, {counts["skipped"]} '
              'skipped (arguments alone over HBM), '
              f'{counts["refused"]} refused by the config\'s checks', flush=True)
        return 1
      print(f'search_mesh: first split that fits: {_mesh_name(p.mesh)}'
            + (f" (--config.model.sequence_parallel={p.sequence_parallel})"
               if p.mesh['sequence'] > 1 else ''), flush=True)
    else:
      p = plan(FLAGS.config, devices, **kwargs)
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
