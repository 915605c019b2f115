"""Config validation: every rule a run depends on, checked before anything compiles."""

import math
import os
from typing import Optional

import jax
import ml_collections

from vdit_jax.data import audio as audio_lib
from vdit_jax.data import buckets
from vdit_jax.data import pipeline
from vdit_jax.data import synthetic
from vdit_jax.diffusion import av
from vdit_jax.diffusion import objectives, samplers
from vdit_jax.model import spec as spec_lib
from vdit_jax.model import attention
from vdit_jax.model import attention_patterns
from vdit_jax.parallel import axes
from vdit_jax.model import lora
from vdit_jax.model import patching
from vdit_jax.model import wan
from vdit_jax.parallel import mesh as mesh_lib
from vdit_jax.generate import conditional
from vdit_jax.config import defaults
from vdit_jax.vae import latents as vae_latents

OBJECTIVE_SAMPLERS = {'eps': ('ddpm', 'ddim'), 'v': ('ddpm', 'ddim'), 'flow': ('euler', 'unipc')}


def _field(config, path):
  """The value at a dotted path, e.g. 'train.learning_rate'."""
  value = config
  for part in path.split('.'):
    value = value[part]
  return value


def _positive(config, *paths):
  for path in paths:
    value = _field(config, path)
    if value is None or value <= 0:
      raise ValueError(f'config.{path}={value} must be positive.')


def _non_negative(config, *paths):
  for path in paths:
    value = _field(config, path)
    if value is None or value < 0:
      raise ValueError(f'config.{path}={value} must be >= 0.')


def _non_finite_fields(node, path):
  """(path, value) of every NaN or infinite float in a config, tuples and lists included."""
  if isinstance(node, (ml_collections.ConfigDict, dict)):
    for key in node.keys():
      yield from _non_finite_fields(node[key], f'{path}.{key}' if path else key)
  elif isinstance(node, (tuple, list)):
    for i, item in enumerate(node):
      yield from _non_finite_fields(item, f'{path}[{i}]')
  elif isinstance(node, float) and not math.isfinite(node):
    yield path, node


def _in_range(config, path, low, high, high_open=True):
  value = _field(config, path)
  if not (low <= value < high if high_open else low <= value <= high):
    raise ValueError(f'config.{path}={value} must be in [{low:g}, {high:g}'
                     f'{")" if high_open else "]"}.')


def validate_config(config, num_devices: int, process_count: int = 1,
                    platform: Optional[str] = None) -> spec_lib.ModelSpec:
  """Raises ValueError naming the first value that breaks a rule; returns the model's
  spec, built and checked here (config/resolve.py hands it on).

  `platform` is the devices' jax platform ('cpu', 'gpu', 'tpu'; default: the
  default backend's), for the rules of platform-specific kernels.
  """
  # NaN passes every `value <= 0` test and inf every upper bound: refuse both everywhere.
  for path, value in _non_finite_fields(config, ''):
    raise ValueError(f'config.{path}={value} must be a finite number.')
  _positive(config, 'data.num_frames', 'data.height', 'data.width', 'data.channels',
            'data.num_examples', 'train.num_steps', 'train.batch_size', 'train.log_every',
            'train.learning_rate', 'checkpoint.every_steps', 'checkpoint.keep',
            'sample.num_steps', 'sample.num_samples', 'sample.fps',
            'diffusion.num_timesteps')
  _non_negative(config, 'train.warmup_steps', 'sample.every_steps', 'data.num_workers',
                'train.weight_decay', 'train.grad_clip', 'sample.eta')
  # Data fields and names; the files on disk are checked when the source is built
  # (pipeline.num_classes in loop.build, still before anything compiles).
  # Synthetic-only options first: a clearer error than the path.
  _check_synthetic_options(config.data)
  pipeline.check_data_config(config.data)
  vae_latents.check_config(config)  # data.latents: shards of latents and the VAE to decode
  for path in ('train.ema_decay', 'model.label_dropout', 'train.b1', 'train.b2'):
    _in_range(config, path, 0.0, 1.0)  # decay rates and a probability
  _in_range(config, 'train.end_lr_fraction', 0.0, 1.0, high_open=False)

  _check_checkpoint(config.checkpoint)
  _check_nonfinite_policy(config.train)
  _check_optimizer(config.train)
  tensorboard = config.train.get('tensorboard', False)
  if not isinstance(tensorboard, bool):
    raise ValueError(f'config.train.tensorboard={tensorboard!r} must be True or False '
                     '(write WORKDIR/tensorboard event files or not).')

  audio_cfg = _check_audio(config)  # before the spec: its rates decide the audio tokens
  spec = spec_lib.from_config(config.model, audio_cfg)
  spec_lib.check_spec(spec)
  conditional.check_config(config)  # captions, prompts, given frames
  if platform is None and spec.attention_impl in ('cudnn', 'splash'):
    platform = jax.default_backend()  # only those two kernels are platform-specific
  attention.check_impl(spec_lib.attention_impl(spec), dtype=spec.dtype,
                       head_dim=spec.width // spec.num_heads, platform=platform)
  lora.check_config(config.get('lora'), spec.width, spec.mlp_dim)
  _check_init_from(config, spec)
  patching.check_patch((config.data.num_frames, config.data.height, config.data.width),
                       spec.patch_size)
  attention_patterns.check_grid(spec.pattern, patching.token_grid(
      (config.data.num_frames, config.data.height, config.data.width), spec.patch_size))

  objective = config.diffusion.objective
  if objective not in objectives.OBJECTIVES:
    raise ValueError(f'diffusion.objective={objective!r} is not one of {objectives.OBJECTIVES}.')
  sampler = config.sample.sampler
  if sampler not in samplers.SAMPLERS:
    raise ValueError(f'sample.sampler={sampler!r} is not one of {samplers.SAMPLERS}.')
  if sampler not in OBJECTIVE_SAMPLERS[objective]:
    raise ValueError(f'sample.sampler={sampler!r} does not sample objective {objective!r}; '
                     f'use one of {OBJECTIVE_SAMPLERS[objective]}.')
  if objective != 'flow' and config.sample.num_steps > config.diffusion.num_timesteps:
    raise ValueError(f'sample.num_steps={config.sample.num_steps} exceeds '
                     f'diffusion.num_timesteps={config.diffusion.num_timesteps}.')
  samplers.cfg_interval_of(config.sample)  # () or (lo, hi) with 0 <= lo < hi <= 1
  # schedule / t_sampling names; sample.shift only where flow's grid can be re-timed
  objectives.Diffusion.from_config(config.diffusion).for_sampling(config.sample.get('shift'))

  formats = [f.strip() for f in config.sample.formats.split(',') if f.strip()]
  bad = [f for f in formats if f not in ('mp4', 'gif')]
  if bad or not formats:
    raise ValueError(f'sample.formats={config.sample.formats!r} must list mp4 and/or gif.')

  sizes = mesh_lib.mesh_shape(config.mesh, num_devices)
  batch = config.train.batch_size
  # The batch splits over the mesh axes of 'activation_batch' (data x fsdp by default; the
  # whole device count when the mesh is all data), checked with the other dimensions below.
  if batch % process_count:
    raise ValueError(f'train.batch_size={batch} is not divisible by the process count '
                     f'{process_count}.')
  rules = _check_rules(config.logical_axis_rules)
  # data.buckets: each bucket's shape and batch against the patch, mesh and processes.
  buckets.check_config(config, spec, process_count, _ways(rules, axes.ACT_BATCH, sizes),
                       _ways(rules, axes.ACT_LENGTH, sizes))
  pt, ph, pw = spec.patch_size
  tokens = (config.data.num_frames // pt) * (config.data.height // ph) * (
      config.data.width // pw)
  dims = [  # (what, size, logical axis that shards it)
      (f'train.batch_size={batch}', batch, axes.ACT_BATCH),
      (f'model width={spec.width}', spec.width, axes.EMBED),
      (f'model mlp_dim={spec.mlp_dim}', spec.mlp_dim, axes.MLP),
      (f'model mlp_dim={spec.mlp_dim}', spec.mlp_dim, axes.ACT_MLP),
      (f'model num_heads={spec.num_heads}', spec.num_heads, axes.HEADS),
      (f'model num_heads={spec.num_heads}', spec.num_heads, axes.ACT_HEADS),
      (f'head dim width/num_heads={spec.width // spec.num_heads}',
       spec.width // spec.num_heads, axes.HEAD_DIM),
      (f'model depth={spec.depth}', spec.depth, axes.LAYERS),
      (f'tubelet size pt*ph*pw*C={pt * ph * pw * config.data.channels}',
       pt * ph * pw * config.data.channels, axes.PATCH),
      (f'tokens per clip {tokens} (T/pt * H/ph * W/pw)', tokens, axes.ACT_LENGTH),
  ]
  if spec.audio is not None:  # the audio tokens take the video's logical axes
    audio_tokens = (config.data.num_frames * spec.audio.mel_frames_per_frame
                    // spec.audio.patch)
    dims += [(f'audio tokens per clip {audio_tokens} (mel frames / audio.patch)',
              audio_tokens, axes.ACT_LENGTH),
             (f'audio token size audio.patch*mel_bins={spec.audio.patch * spec.audio.mel_bins}',
              spec.audio.patch * spec.audio.mel_bins, axes.PATCH)]
  dims += conditional.sharded_dims(spec.text)  # the text encoder's widths and heads
  seq_ways = _ways(rules, axes.ACT_LENGTH, sizes)[1]
  # sample.num_samples need not divide the batch axes: the sampler's batch splits where it
  # can, and the shard_map'd kernels (splash, sequence-parallel attention) run a batch
  # that the axes do not divide whole over them (parallel/mesh.py divisible_entry).
  for what, size, logical in dims:
    mesh_axes, ways = _ways(rules, logical, sizes)
    if size % ways:
      raise ValueError(
          f'{what} is not divisible by {ways}, the size of mesh axes {mesh_axes} '
          f'({", ".join(f"{a}={sizes[a]}" for a in mesh_axes)}) that shard it through '
          f'the logical axis {logical!r} in config.logical_axis_rules.')
  if spec.sequence_parallel == 'ulysses' and seq_ways > 1:
    head_ways = _ways(rules, axes.ACT_HEADS, sizes)[1]
    if (spec.num_heads // head_ways) % seq_ways:
      raise ValueError(
          f"model.sequence_parallel='ulysses' swaps heads for tokens, so the heads per "
          f'device, num_heads={spec.num_heads} / {head_ways} = {spec.num_heads // head_ways}, '
          f'must be divisible by the sequence-sharding mesh size {seq_ways}.')
  _check_train_speed(config.train, rules, sizes)
  return spec


AUDIO_MISSING = ('skip', 'silence')  # audio.missing: files without readable audio


def _check_audio(config):
  """config.audio's rules (issue 30); returns the section when enabled, else None."""
  audio = config.get('audio')
  if audio is None:
    return None
  if not isinstance(audio.enabled, bool):
    raise ValueError(f'config.audio.enabled={audio.enabled!r} must be True or False.')
  if not audio.enabled:
    return None
  spec = audio_lib.AudioSpec.from_config(audio)  # the rates' own rules, named
  frames = spec.num_mel_frames(config.data.num_frames)
  if isinstance(audio.patch, bool) or not isinstance(audio.patch, int) or audio.patch <= 0:
    raise ValueError(f'config.audio.patch={audio.patch!r} must be a positive integer.')
  if frames % audio.patch:
    raise ValueError(f'config.audio.patch={audio.patch} must divide the {frames} mel frames '
                     f'of a clip (data.num_frames={config.data.num_frames} x '
                     f'{spec.mel_frames_per_frame} mel frames per video frame).')
  if audio.missing not in AUDIO_MISSING:
    raise ValueError(f'config.audio.missing={audio.missing!r} is not one of {AUDIO_MISSING}.')
  if audio.task not in av.TASKS:
    raise ValueError(f'config.audio.task={audio.task!r} is not one of {av.TASKS}.')
  av.check_task_probs(audio.task_probs)
  _in_range(config, 'audio.modality_dropout', 0.0, 1.0)
  _non_negative(config, 'audio.loss_weight')
  _positive(config, 'audio.griffin_lim_iters', 'audio.cfg_scale')
  # 0: the stream follows its own uncoupled prediction (it does not read the other)
  _non_negative(config, 'audio.modality_cfg_video', 'audio.modality_cfg_audio')
  if config.diffusion.objective != 'flow' or config.sample.sampler != 'euler':
    raise ValueError('config.audio.enabled=True samples both streams with flow Euler: set '
                     "diffusion.objective='flow' and sample.sampler='euler' (got "
                     f'{config.diffusion.objective!r}, {config.sample.sampler!r}).')
  if config.model.scan_layers:
    raise ValueError('config.audio.enabled=True unrolls the layers (model/av_dit.py): set '
                     'model.scan_layers=False.')
  refused = [(what, value) for what, value in (
      ('data.buckets', tuple(config.data.buckets)), ('data.latents', config.data.latents),
      ('lora.rank', config.lora.rank), ('train.init_from', config.train.init_from)) if value]
  if refused:
    raise ValueError(f'config.audio.enabled=True does not combine with {refused[0][0]}='
                     f'{refused[0][1]!r} yet (docs/limits.md, "Synchronised audio").')
  if config.data.channels != 3:
    raise ValueError(f'config.audio.enabled=True trains on RGB frames: data.channels='
                     f'{config.data.channels} must be 3.')
  return audio


def _check_train_speed(train, rules, sizes) -> None:
  """train.grad_accum_steps splits each device's clips evenly; the cache dir is a str."""
  k = train.get('grad_accum_steps', 1)
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ValueError(f'config.train.grad_accum_steps={k!r} must be a positive integer.')
  mesh_axes, ways = _ways(rules, axes.ACT_BATCH, sizes)
  per_device = train.batch_size // ways
  if per_device % k:
    raise ValueError(
        f'config.train.batch_size={train.batch_size} gives {per_device} clips per batch shard '
        f'(split {ways} ways over mesh axes {mesh_axes}), which is not divisible by '
        f'train.grad_accum_steps={k}: each micro-batch must take the same number of clips '
        f'from every shard; use a batch_size that is a multiple of {ways * k}.')
  cache_dir = train.get('compilation_cache_dir', '')
  if not isinstance(cache_dir, str):
    raise ValueError(f'config.train.compilation_cache_dir={cache_dir!r} must be a path or '
                     "'' (no persistent compilation cache).")


def _check_init_from(config, spec: spec_lib.ModelSpec) -> None:
  """train.init_from: '' or a local Wan 2.1 diffusers folder (or its transformer folder)
  whose config.json describes this config's model and data.channels (model/wan.py), so a
  mismatch stops here, naming the field, not when the weights load; never with LoRA, whose
  frozen base is lora.base_checkpoint. Reads the folder's config.json only."""
  path = config.train.get('init_from', '')
  if not isinstance(path, str):
    raise ValueError(f"config.train.init_from={path!r} must be a folder or '' (a fresh "
                     'init).')
  if not path.strip():
    return
  rank = config.lora.rank if config.get('lora') is not None else 0
  if rank > 0:
    raise ValueError(
        f'config.train.init_from={path!r} is set with lora.rank={rank}: a LoRA run trains '
        'adapters on a frozen base, which it reads from lora.base_checkpoint; set '
        f"config.lora.base_checkpoint={path!r} and train.init_from=''.")
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f'config.train.init_from={path!r} is not a directory: give a local Wan 2.1 diffusers '
        "folder (holding transformer/config.json), or '' to start from a fresh init.")
  where = f'config.train.init_from={path!r}'
  try:
    hf = wan.read_config(path)
  except ValueError as e:
    raise ValueError(f'{where}: {e}') from None
  wan.check_spec_matches(spec, hf, config.data.channels, where)


def _check_synthetic_options(data) -> None:
  """data.colours ('' or a comma list of synthetic.COLOURS; synthetic source only),
  data.shape_size (any source: like time_stride, it describes the synthetic clips, which
  configs/tiny.py sets, and the files and shards sources leave it unread) and data.bounce
  (a bool; the same: configs/tiny_text.py sets it, other sources leave it unread)."""
  colours = data.get('colours', '')
  if data.source != 'synthetic' and colours:
    raise ValueError(f'config.data.colours={colours!r} only applies to '
                     f"data.source='synthetic', not {data.source!r}.")
  try:
    if data.source == 'synthetic':
      synthetic.colour_subset(colours)
    synthetic.check_shape_size(data.get('shape_size', synthetic.SHAPE_SIZE))
    synthetic.check_shape_weights(data.get('shape_weights', None))
  except ValueError as e:
    raise ValueError(f'config.data.{e}') from None
  bounce = data.get('bounce', True)
  if not isinstance(bounce, bool):
    raise ValueError(f'config.data.bounce={bounce!r} must be True or False.')


def _check_optimizer(train) -> None:
  """The optimizer and learning-rate schedule names, and the wsd cooldown's share."""
  kind = train.get('lr_schedule', 'cosine')
  if kind not in defaults.LR_SCHEDULES:
    raise ValueError(f'train.lr_schedule={kind!r} must be one of {defaults.LR_SCHEDULES}.')
  fraction = train.get('decay_fraction', 0.2)
  if kind == 'wsd' and not 0.0 < fraction <= 1.0:
    raise ValueError(f'train.decay_fraction={fraction!r} must be in (0, 1]: the share of '
                     'the steps that the wsd cooldown takes.')
  optimizer = train.get('optimizer', 'adamw')
  if optimizer not in defaults.OPTIMIZERS:
    raise ValueError(f'config.train.optimizer={optimizer!r} must be '
                     f'{" or ".join(map(repr, defaults.OPTIMIZERS))}.')


def _check_nonfinite_policy(train) -> None:
  policy = train.get('nonfinite', 'skip')
  if policy not in ('skip', 'stop'):
    raise ValueError(f"config.train.nonfinite={policy!r} must be 'skip' or 'stop'.")
  limit = train.get('max_nonfinite_steps', 20)
  if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
    raise ValueError(f'config.train.max_nonfinite_steps={limit!r} must be an integer >= 1 '
                     '(skipped steps in a row before the run stops).')


def _check_checkpoint(ck) -> None:
  """config.checkpoint: resume is a known policy; keep_period is None or a positive
  multiple of every_steps."""
  if ck.get('resume', 'latest') not in ('latest', 'latest_good'):
    raise ValueError(f"config.checkpoint.resume={ck.resume!r} must be 'latest' or "
                     "'latest_good'.")
  period = ck.get('keep_period')
  if period is None:
    return
  if isinstance(period, bool) or not isinstance(period, int) or period <= 0:
    raise ValueError(f'config.checkpoint.keep_period={period!r} must be None or a positive '
                     'integer (keep every step that is a multiple of it).')
  if period % ck.every_steps:
    raise ValueError(
        f'config.checkpoint.keep_period={period} is not a multiple of '
        f'checkpoint.every_steps={ck.every_steps}: only steps that are multiples of both '
        f'would be saved and kept; use a multiple of {ck.every_steps}.')


def _check_rules(rules):
  """The logical axis rules as {logical name: tuple of mesh axes}, checked."""
  table = {}
  for rule in rules:
    if not isinstance(rule, (tuple, list)) or len(rule) != 2:
      raise ValueError(f'logical_axis_rules entry {rule!r} must be a pair '
                       '(logical name, mesh axis or tuple of mesh axes or None).')
    name, target = rule
    targets = () if target is None else (
        (target,) if isinstance(target, str) else tuple(target))
    unknown = [a for a in targets if a not in axes.MESH_AXES]
    if unknown:
      raise ValueError(f'logical_axis_rules entry {tuple(rule)!r} names mesh axes {unknown} '
                       f'that are not mesh axes {axes.MESH_AXES}.')
    table.setdefault(name, targets)  # flax uses the first rule for a name
  return table


def _ways(table, logical, sizes):
  mesh_axes = table.get(logical, ())
  ways = 1
  for a in mesh_axes:
    ways *= sizes[a]
  return mesh_axes, ways
