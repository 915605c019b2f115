"""train_and_evaluate(config, workdir), sample(config, workdir) and export(config, workdir)."""

import contextlib
import dataclasses
import json
import time
from typing import Any, Optional, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdit_jax.config import resolve
from vdit_jax.data import buckets as buckets_lib
from vdit_jax.data import captions as captions_lib
from vdit_jax.data import pipeline
from vdit_jax.diffusion import objectives
from vdit_jax.model import spec as spec_lib
from vdit_jax.model import av_dit
from vdit_jax.model import dit
from vdit_jax.model import patching
from vdit_jax.model import wan
from vdit_jax.parallel import mesh as mesh_lib
from vdit_jax.parallel import paths
from vdit_jax.train import checkpoint as ckpt_lib
from vdit_jax.train import compile_cache
from vdit_jax.generate import export as export_lib
from vdit_jax.generate import av_sampling
from vdit_jax.generate import conditional
from vdit_jax.train import lora as lora_lib
from vdit_jax.train import metrics as metrics_lib
from vdit_jax.train import mfu as mfu_lib
from vdit_jax.train import preemption
from vdit_jax.generate import sampling
from vdit_jax.train import state as state_lib
from vdit_jax.train import step as step_lib
from vdit_jax.train import tensorboard


CHECKPOINTS_DIRNAME = 'checkpoints'
SAMPLES_DIRNAME = 'samples'


@dataclasses.dataclass
class Setup:
  """Everything built from the config before the first step."""
  config: Any
  mesh: Any
  rules: Any
  model: dit.VideoDiT
  diffusion: Any
  tx: Any
  schedule: Any
  num_classes: int
  init_fn: Any
  abstract_state: Any
  state_shardings: Any
  checkpointer: Optional[ckpt_lib.Checkpointer]  # None when built without a workdir
  # config.lora.rank > 0: the state holds the adapters only; the frozen base is here.
  lora: Optional[lora_lib.LoraSetup] = None
  # config.data.latents: the VAE that decodes samples (loaded once, with a workdir).
  decoder: Optional[Any] = None


def build(config, workdir: Optional[str], *, devices: Optional[Sequence[Any]] = None,
          process_count: Optional[int] = None, num_classes: Optional[int] = None) -> Setup:
  """Resolves the config (config/resolve.py: every default filled in, validated) and
  builds mesh, model, optimizer, checkpointer (no compile); `Setup.config` is the result.

  The keywords let `tools.plan` build the same setup for abstract devices (a TPU
  topology) without the data pipeline: `devices` defaults to `jax.devices()`,
  `process_count` to `jax.process_count()`, `num_classes` to what the configured data
  source produces; `workdir=None` builds no checkpointer.
  """
  devices = list(jax.devices() if devices is None else devices)
  resolved = resolve.resolve(config, devices=devices, process_count=process_count)
  config = resolved.config
  mesh = mesh_lib.make_mesh(config.mesh, devices=devices)
  rules = tuple(tuple(r) for r in config.logical_axis_rules)
  if num_classes is None:
    num_classes = pipeline.num_classes(config.data)
  builder = av_dit.build_model if resolved.model.audio is not None else dit.build_model
  model = builder(resolved.model, config.data.channels, num_classes)
  diffusion = objectives.Diffusion.from_config(config.diffusion)
  schedule = state_lib.learning_rate_schedule(config.train)
  tx = state_lib.make_optimizer(config.train)
  init_fn = state_lib.make_init_fn(model, tx, config.data)
  lora = None
  if lora_lib.enabled(config):  # the state becomes the adapters'
    lora = lora_lib.make_setup(model, tx, config, mesh, rules)
    init_fn = lora.init_fn
  abstract, shardings = state_lib.state_shardings(init_fn, mesh, rules)
  checkpointer = None
  decoder = None
  if workdir is not None:
    # Before anything compiles: a bucket that does not exist or cannot be written (or a
    # read-only folder) stops the run here, naming it, not at the first checkpoint.
    workdir = paths.check_writable(workdir, '--workdir',
                                   probe_name=f'.write_probe.{jax.process_index()}')
    decoder = sampling.latent_decoder(config)  # None unless data.latents
    checkpointer = ckpt_lib.Checkpointer(
        paths.join(workdir, CHECKPOINTS_DIRNAME), keep=config.checkpoint.keep,
        every_steps=config.checkpoint.every_steps, async_save=config.checkpoint.async_save,
        keep_period=config.checkpoint.keep_period)
  return Setup(config, mesh, rules, model, diffusion, tx, schedule, num_classes, init_fn,
               abstract, shardings, checkpointer, lora, decoder)


def batch_shardings(mesh, rules, extra_ndims=None, audio: bool = False):
  """Shardings of the train step's batch {'video': [B, T, H, W, C], 'label': [B]} (and
  'audio' [B, F, M] log-mel features with `audio`)."""
  shardings = {'video': mesh_lib.batch_sharding(mesh, rules, 5),
               'label': mesh_lib.batch_sharding(mesh, rules, 1)}
  if audio:
    shardings['audio'] = mesh_lib.batch_sharding(mesh, rules, 3)
  for key, ndim in (extra_ndims or {}).items():  # captions: conditional.batch_ndims
    shardings[key] = mesh_lib.batch_sharding(mesh, rules, ndim)
  return shardings


def jit_train_step(s: Setup):
  """The jitted train step with explicit in/out shardings and the state donated.

  Call (and lower) it inside `jax.set_mesh(s.mesh)` and `nn.logical_axis_rules(s.rules)`;
  the trainer and `tools.plan` both compile this one function.
  """
  replicated = mesh_lib.replicated(s.mesh)

  def make_step(param_transform=None):
    return step_lib.make_train_step(s.model, s.diffusion, s.tx, s.schedule,
                                    num_classes=s.num_classes,
                                    label_dropout=s.config.model.label_dropout,
                                    ema=s.config.train.ema_decay,
                                    grad_accum_steps=s.config.train.grad_accum_steps,
                                    conditioning=conditional.conditioning(s.config),
                                    param_transform=param_transform,
                                    audio=s.config.audio if s.config.audio.enabled else None)

  batch = batch_shardings(s.mesh, s.rules, conditional.batch_ndims(s.config),
                          audio=s.config.audio.enabled)
  if s.lora is not None:  # trains the adapters; the frozen base is the step's 2nd input
    return s.lora.jit_train_step(make_step, s.state_shardings, batch)
  return jax.jit(
      make_step(),
      in_shardings=(s.state_shardings, batch, replicated),
      out_shardings=(s.state_shardings, replicated),
      donate_argnums=0)


def tokens_per_clip(config, spec: spec_lib.ModelSpec) -> int:
  """Tokens the model sees per clip: the video's, and with audio its soundtrack's."""
  grid = patching.token_grid((config.data.num_frames, config.data.height, config.data.width),
                             spec.patch_size)
  audio = 0
  if spec.audio is not None:
    audio = config.data.num_frames * spec.audio.mel_frames_per_frame // spec.audio.patch
  return int(np.prod(grid)) + audio


def global_batch(local_batch, mesh, rules):
  """Per-process numpy batch -> global jax.Arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(
      mesh_lib.batch_sharding(mesh, rules, v.ndim), v) for k, v in local_batch.items()}


def _rate_meter(config, spec) -> metrics_lib.RateMeter:
  """Times the logged steps: tokens/s, model TFLOP/s per device and MFU."""
  peak = mfu_lib.device_peak()
  metrics_lib.log_line(
      f'MFU against {peak.source}' if peak is not None else
      f'no peak FLOP/s known for device kind {jax.devices()[0].device_kind!r}: '
      'logging model TFLOP/s per device without MFU')
  return metrics_lib.RateMeter(
      config.train.batch_size * tokens_per_clip(config, spec),
      flops_per_step=mfu_lib.model_flops_per_step(config, spec),
      num_devices=jax.device_count(), peak=peak)


def _compile_step(train_step, state, batch, rng) -> None:
  """Compiles the jitted step for these inputs ahead of time; its calls reuse it."""
  t0 = time.perf_counter()
  with compile_cache.count_cache_events() as events:
    train_step.lower(state, batch, rng).compile()
  metrics_lib.log_line(f'compiled the train step in {time.perf_counter() - t0:.1f}s '
                       f'({events.describe()})')


def _save_config(config, workdir):
  if jax.process_index() == 0:
    paths.write_text(paths.join(workdir, export_lib.CONFIG_FILENAME),
                     config.to_json_best_effort(indent=2))


def jit_sampler(s: Setup, prompts: Optional[str] = None):
  """(jitted sample_fn(params, rng, condition) -> clips, the condition): what the trainer's
  samples run, sample.num_samples clips of the first bucket's shape; the clips come back
  replicated. Call (and lower) it inside the mesh and rules, as `jit_train_step`."""
  cfg = buckets_lib.sample_config(s.config)  # data.buckets: the first bucket's shape
  if conditional.needs_conditions(cfg):  # captions (prompts) and / or given frames
    sample_fn = conditional.make_sample_fn(s.model, s.diffusion, cfg, s.num_classes,
                                        conditional.sample_shape(cfg, cfg.sample.num_samples))
    condition = conditional.sample_condition(cfg, s.num_classes, cfg.sample.num_samples, prompts)
  else:
    sample_fn = sampling.make_sample_fn(s.model, s.diffusion, cfg.sample, cfg.data,
                                        s.num_classes, cfg.sample.num_samples)
    condition = sampling.sample_labels(cfg.sample.num_samples, s.num_classes)
  return jax.jit(sample_fn, out_shardings=mesh_lib.replicated(s.mesh)), condition


def sample_params(state, config):
  """The params that sample: the EMA params unless sample.use_ema=False."""
  return state.ema_params if config.sample.use_ema else state.params


def sample_and_write(s: Setup, params, step: int, workdir: str, name: Optional[str] = None,
                      prompts: Optional[str] = None):
  cfg = buckets_lib.sample_config(s.config)
  if s.lora is not None:  # params are the adapters
    params = s.lora.merged(params)
  rng = jax.random.key(cfg.sample.seed)
  t0 = time.perf_counter()
  if cfg.audio.enabled:  # the clips with their soundtracks: mp4 with audio, and wav
    with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
      videos, waves = av_sampling.sample(s.model, s.diffusion, cfg, s.num_classes, params, rng,
                                         mesh=s.mesh, prompts=prompts)
    written = []
    if jax.process_index() == 0:
      written = av_sampling.write_samples(
          videos, waves, paths.join(workdir, SAMPLES_DIRNAME), name or f'step_{step:07d}',
          cfg.sample.formats, cfg.audio.fps, cfg.audio.sample_rate)
      metrics_lib.log_line(f'wrote samples with audio {written} (audio.task='
                           f'{cfg.audio.task}, {cfg.sample.num_steps} steps) in '
                           f'{time.perf_counter() - t0:.1f}s')
    return videos, written
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    sample_fn, condition = jit_sampler(s, prompts)
    videos = jax.block_until_ready(sample_fn(params, rng, condition))
  latents = None
  if s.decoder is not None:  # data.latents: VAE latents -> frames (every process)
    latents, videos = videos, sampling.to_frames(videos, s.decoder)
  written = []
  if jax.process_index() == 0:
    directory = paths.join(workdir, SAMPLES_DIRNAME)
    written = sampling.write_samples(videos, directory, name or f'step_{step:07d}',
                                     cfg.sample.formats, cfg.sample.fps, latents=latents)
    metrics_lib.log_line(f'wrote samples {written} ({cfg.sample.sampler}, '
                         f'{cfg.sample.num_steps} steps, cfg {cfg.sample.cfg_scale}) in '
                         f'{time.perf_counter() - t0:.1f}s')
  return videos, written


def restore_or_init(s: Setup, data_iter=None):
  """(state, restored step or None): the newest complete checkpoint, else a fresh init.

  The state is restored straight into `s.state_shardings`, i.e. onto this run's
  mesh, whatever mesh saved it; `data_iter` is moved to the saved position. A fresh
  init with config.train.init_from starts its params (and EMA params) from that Wan 2.1
  folder (`init_from_wan`); a workdir with checkpoints resumes from them and ignores it.
  """
  latest = s.checkpointer.latest_step()
  init_from = s.config.train.init_from
  if latest is None:
    state, _ = state_lib.create_state(s.init_fn, jax.random.key(s.config.seed), s.mesh, s.rules)
    if init_from:
      state = init_from_wan(s, state, init_from)
    return state, None
  if init_from:
    metrics_lib.log_line(f'train.init_from={init_from!r} ignored: resuming from the '
                         f'checkpoints in {s.checkpointer.directory}')
  if s.config.checkpoint.resume == 'latest':
    return _restore(s, latest, data_iter), latest
  # 'latest_good': the newest step that restores and verifies; the damaged ones are named
  # and left in place (retention removes them as newer steps are saved).
  for step in sorted(s.checkpointer.all_steps(), reverse=True):
    try:
      return _restore(s, step, data_iter), step
    except ckpt_lib.CheckpointRestoreError as e:
      metrics_lib.log_line(f'checkpoint.resume=latest_good: skipping step {step}: {e}')
  raise ckpt_lib.CheckpointRestoreError(
      f'checkpoint.resume=latest_good: no step in {s.checkpointer.directory} restores '
      f'({s.checkpointer.all_steps()}; the reasons are printed above). Move the folder aside '
      'to start afresh.')


def pretrained_params(s: Setup, path: str):
  """(params, their shardings): the Wan 2.1 diffusers folder `path`'s transformer read
  straight into this run's param shardings (each process reads only its devices' slices)."""
  abstract = state_lib.abstract_with_shardings(s.abstract_state, s.state_shardings).params
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  return wan.load_params(path, s.model.spec, abstract, shardings), shardings


def init_from_wan(s: Setup, state, path: str):
  """`state` with params and EMA params read from the Wan 2.1 diffusers folder `path`
  (model/wan.py) straight into the state's param shardings: each process reads only its
  devices' slices. The optimizer state stays the fresh one; the fresh params are deleted
  first (peak memory), so `state` is consumed. validate.py checked the folder's
  config.json against the model when the config was resolved."""
  if s.lora is not None:  # validate.py refuses init_from with LoRA; the state is adapters
    raise ValueError(f'train.init_from={path!r} does not apply to a LoRA run; set '
                     'lora.base_checkpoint to the Wan folder instead.')
  t0 = time.perf_counter()
  for leaf in jax.tree.leaves((state.params, state.ema_params)):
    leaf.delete()
  params, shardings = pretrained_params(s, path)
  # The EMA params start equal but in buffers of their own: the step donates the state.
  copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)
  with jax.set_mesh(s.mesh):
    ema_params = copy(params)
  metrics_lib.log_line(f'train.init_from: {state_lib.param_count(params):,} params (and the '
                       f'EMA params) from the Wan transformer in {path} in '
                       f'{time.perf_counter() - t0:.1f}s')
  return state.replace(params=params, ema_params=ema_params)


def _restore(s: Setup, step: int, data_iter=None):
  """Checkpoint `step` onto this run's shardings. When it cannot be read and the
  workdir's config.json (the run that saved it) describes another model, the error says
  so and names the differences, rather than calling the checkpoint damaged."""
  try:
    return s.checkpointer.restore(
        step, state_lib.abstract_with_shardings(s.abstract_state, s.state_shardings), data_iter)
  except ckpt_lib.CheckpointRestoreError as e:
    path = paths.join(s.checkpointer.workdir, export_lib.CONFIG_FILENAME)
    diffs = _saved_model_differences(path, s.config)
    if not diffs:
      raise
    reason = (str(e.__cause__ or '').strip().splitlines() or [''])[0][:400]
    raise ckpt_lib.CheckpointRestoreError(
        f'checkpoint step {step} in {s.checkpointer.directory} was saved by a model that '
        f'differs from this config\'s: {"; ".join(diffs)} ({path} holds the config that '
        'saved it). Set the model section back to those values (e.g. '
        '--config.model.FIELD=VALUE flags) to resume or sample from this workdir, or use '
        f'another --workdir for the new model. Orbax said: {reason}') from e


def restore_step(s: Setup, step: int):
  """The train state of checkpoint `step` onto this run's shardings (see `_restore`)."""
  return _restore(s, step)


def _saved_model_differences(path: str, config) -> list:
  """resolve.model_differences between the model of the config.json at `path` and `config`'s;
  [] when there is no such file or it cannot be read as a model section."""
  try:
    if not paths.isfile(path):
      return []
    saved = json.loads(paths.read_text(path))['model']
    return resolve.model_differences(saved, config)
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return []  # not a model section this version reads: the plain restore error stands


@contextlib.contextmanager
def _closing(thing):
  """`contextlib.closing`, except that when the body raised, a failing `close()` (the
  metrics file flushed to a bucket that now refuses writes) is logged, not raised: the
  body's error, which names the cause, stays the one that ends the run."""
  try:
    yield thing
  except BaseException:
    try:
      thing.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('closing %s also failed: %s: %s', type(thing).__name__,
                      type(e).__name__, str(e).strip().splitlines()[0] if str(e).strip() else '')
    raise
  thing.close()


def train_and_evaluate(config, workdir: str, *, stop_at: Optional[int] = None):
  """Trains from scratch, or resumes from the newest checkpoint in `workdir`.

  `stop_at` ends the run early after that step, with a checkpoint, as a
  preemption would (tests use it; the schedule still follows num_steps).
  A SIGTERM during the steps saves a checkpoint at the end of the current step
  (all processes agree on which, see train/preemption.py) and returns without
  the final sample.
  """
  workdir = paths.normalize(workdir)
  config = resolve.complete(config)
  compile_cache.configure(config.train.compilation_cache_dir)  # before any compile
  s = build(config, workdir)
  config = s.config  # resolved: complete, validated, locked
  spec = s.model.spec
  plan = None  # data.buckets: bucket-pure batches of several shapes (data/buckets.py)
  if buckets_lib.enabled(config.data):
    data_iter, plan = buckets_lib.make_dataset(config.data, seed=config.seed,
                                               captions=captions_lib.from_config(config))
  else:
    local_batch = config.train.batch_size // jax.process_count()
    data_iter = pipeline.make_dataset(config.data, local_batch, seed=config.seed,
                                      captions=captions_lib.from_config(config),
                                      audio=pipeline.audio_spec(config),
                                      missing_audio=config.audio.missing)

  state, latest = restore_or_init(s, data_iter)
  if latest is not None:
    metrics_lib.log_line(f'resumed from step {latest} in {s.checkpointer.directory}')
  _save_config(config, workdir)
  metrics_lib.log_line(
      f'model {spec.width}w x {spec.depth}d x {spec.num_heads}h patch {spec.patch_size}: '
      f'{state_lib.param_count(state.params):,} params, '
      f'{tokens_per_clip(config, spec)} tokens/clip; mesh {dict(s.mesh.shape)}; '
      f'{jax.device_count()} device(s), {jax.process_count()} process(es)')

  train_step = jit_train_step(s)

  writer = metrics_lib.MetricsWriter(workdir)
  if latest is not None:
    writer.resumed(latest)
  board = tensorboard.TrainBoard(workdir, config.train.tensorboard)
  board.start(config, int(jax.device_get(state.step)), resumed=latest is not None)
  # Closed however the run ends: in a bucket they hold the lines not yet uploaded.
  with _closing(writer), _closing(board):
    meter = _rate_meter(config, spec)
    if plan is not None:  # rates from the schedule's average step
      metrics_lib.log_line(plan.describe())
      meter.tokens_per_step, meter.flops_per_step = plan.mean_step_cost(
          spec, config.data.channels)
    compiled_shapes = set()
    guard = NonFiniteGuard(config.train)
    rng = jax.random.key(config.seed + 1)
    step = int(jax.device_get(state.step))
    num_steps = config.train.num_steps
    t_start = time.perf_counter()
    preempted = False
    with (jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules),
          preemption.PreemptionWatcher() as watcher):
      last = num_steps if stop_at is None else min(stop_at, num_steps)
      try:
        while step < last:
          batch = global_batch(next(data_iter), s.mesh, s.rules)
          new_shape_at = None
          if batch['video'].shape not in compiled_shapes:  # once per (bucket) shape
            if meter.started:  # a later bucket: its compile and first step stay out of rates
              jax.block_until_ready(state)
              new_shape_at = time.perf_counter()
            _compile_step(train_step, state, batch, rng)  # compile outside the timed steps
            compiled_shapes.add(batch['video'].shape)
            if not meter.started:
              meter.start(step)
          state, metrics = train_step(state, batch, rng)
          guard.add(metrics)
          if new_shape_at is not None:
            jax.block_until_ready(metrics)
            meter.skip(1, time.perf_counter() - new_shape_at)
          step += 1
          if step == 1 or step % config.train.log_every == 0 or step == num_steps:
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            values['skipped_steps'] = guard.check(step, latest)
            values.update(meter.rates(step))
            if plan is not None:
              values.update(plan.batch_counts(step))
            values['wall_s'] = time.perf_counter() - t_start
            writer.write(step, values)
            board.scalars(step, values)
            metrics_lib.log_line(metrics_lib.format_line(step, num_steps, values))
          preempted = watcher.should_stop(step)
          if s.checkpointer.should_save(step) or step == last or preempted:
            guard.check(step, latest)
            s.checkpointer.save(step, state, data_iter)  # refuses a non-finite state
          if preempted:
            break
          if config.sample.every_steps and step % config.sample.every_steps == 0:
            board.samples(step, sample_and_write(s, sample_params(state, config), step,
                                                  workdir)[0])
      except (NonFiniteError, ckpt_lib.NonFiniteStateError):
        s.checkpointer.close()  # the saves under way complete; nothing more is written
        raise
      # Inside the watcher: a SIGTERM while the last save finishes is not fatal, and
      # one after the last step still skips the final sample.
      s.checkpointer.wait()
      preempted = preempted or watcher.received_at is not None
    if preempted:
      s.checkpointer.close()
      metrics_lib.log_line(f'SIGTERM: saved the checkpoint of step {step} in '
                           f'{s.checkpointer.step_dir(step)}; stopping (run again to resume).')
      return state
    if not (config.sample.every_steps and step % config.sample.every_steps == 0):
      board.samples(step, sample_and_write(s, sample_params(state, config), step, workdir)[0])
    s.checkpointer.close()
    return state


class NonFiniteError(RuntimeError):
  """The run met non-finite losses or gradients beyond what train.nonfinite allows."""


class NonFiniteGuard:
  """Counts the train steps whose loss or gradient was non-finite (their updates were
  skipped by the step, train/step.py) without a host sync per step, and applies
  train.nonfinite at each check: 'stop' ends the run at the first such step, 'skip' when
  train.max_nonfinite_steps of them come in a row."""

  def __init__(self, train_cfg):
    self.policy = train_cfg.nonfinite
    self.limit = int(train_cfg.max_nonfinite_steps)
    self.learning_rate = train_cfg.learning_rate
    self.total = 0            # skipped steps so far, as of the last check
    self._count = None        # device scalar: skipped steps since the last check
    self._streak = None       # device scalar: skipped steps in a row, up to the newest

  def add(self, metrics) -> None:
    bad = metrics['nonfinite']
    if self._count is None:
      self._count = bad
    else:
      self._count = self._count + bad
    # The streak restarts at every finite step.
    self._streak = bad if self._streak is None else (self._streak + bad) * bad

  def check(self, step: int, resumed_from: Optional[int]) -> int:
    """Raises NonFiniteError when the policy says stop; returns the skipped total."""
    if self._count is None:
      return self.total
    count, streak = (int(round(float(x))) for x in jax.device_get((self._count, self._streak)))
    self._count = None
    self.total += count
    if count and (self.policy == 'stop' or streak >= self.limit):
      rule = ("train.nonfinite='stop'" if self.policy == 'stop' else
              f'{streak} in a row, train.max_nonfinite_steps={self.limit}')
      since = (f'restored from checkpoint step {resumed_from}'
               if resumed_from is not None else 'started')
      raise NonFiniteError(
          f'step {step}: {count} step(s) since the last check had a non-finite loss or '
          f'gradient ({rule}); their updates were skipped, so the params are those of the '
          f'last finite step, and no non-finite state was saved. The run {since}. Likely '
          f'causes: train.learning_rate={self.learning_rate} too high for this model, NaN '
          'or inf in the data, or a damaged checkpoint. Lower the learning rate, check the '
          "data, or resume from an earlier checkpoint; train.nonfinite='skip' with a larger "
          'train.max_nonfinite_steps rides over rare bad batches.')
    return self.total
