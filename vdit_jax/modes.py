"""The modes that run a trained workdir: --mode=sample, --mode=extend and --mode=export.

Each restores the params to sample from a run's workdir (a train checkpoint or an export;
`params_to_sample`) and hands them to generate/; `load_stage` does the same for a stage of
the multi-stage pipeline (generate/multistage.py), `load_audio_stage` for its audio stage.
"""

import json
from typing import Optional

import flax.linen as nn
import jax

from vdit_jax.config import resolve
from vdit_jax.generate import conditional
from vdit_jax.generate import export as export_lib
from vdit_jax.generate import multistage
from vdit_jax.parallel import paths
from vdit_jax.train import compile_cache
from vdit_jax.train import loop
from vdit_jax.train import metrics as metrics_lib
from vdit_jax.train import state as state_lib


def _restore_latest(s: loop.Setup, workdir: str):
  latest = s.checkpointer.latest_step()
  if latest is None:
    raise FileNotFoundError(
        f'no checkpoint in {s.checkpointer.directory}: train first '
        f'(--mode=train --workdir={workdir}).')
  return loop.restore_step(s, latest), latest


def params_to_sample(s: loop.Setup, workdir: str, checkpoint: Optional[str],
                     step: Optional[int] = None):
  """(params, step, sample file name) from the export `checkpoint`, else see `sample`."""
  if step is not None:
    if checkpoint is not None:
      raise ValueError(f'--checkpoint={checkpoint} is an export and step={step} a train '
                       'checkpoint: give one of them.')
    steps = sorted(s.checkpointer.all_steps())
    if step not in steps:
      raise FileNotFoundError(f'no checkpoint of step {step} in {s.checkpointer.directory}; '
                              f'it holds steps {steps}.')
    state = loop.restore_step(s, step)
    return loop.sample_params(state, s.config), step, f'sample_step_{step:07d}'
  if checkpoint is None and s.checkpointer.latest_step() is None:
    checkpoint = export_lib.latest(workdir)
    if checkpoint is None and s.config.train.init_from and s.lora is None:
      return pretrained_params(s), 0, 'sample_pretrained'
    if checkpoint is None:
      raise FileNotFoundError(
          f'no export in {paths.join(workdir, export_lib.EXPORT_DIRNAME)} '
          f'and no checkpoint in {s.checkpointer.directory}: train first '
          f'(--mode=train --workdir={workdir}).')
  if checkpoint is None:
    state, step = _restore_latest(s, workdir)
    return loop.sample_params(state, s.config), step, f'sample_step_{step:07d}'
  abstract = state_lib.abstract_with_shardings(s.abstract_state, s.state_shardings)
  params, info = export_lib.read(checkpoint, abstract.ema_params)  # same shapes as params
  metrics_lib.log_line(f'sampling from the {info["params"]} exported in {checkpoint}')
  return params, info['step'], f'sample_export_step_{info["step"]:07d}'


def pretrained_params(s: loop.Setup):
  """The params of the Wan 2.1 folder config.train.init_from in this run's param shardings
  (loop.pretrained_params): what a workdir with no checkpoint and no export samples from."""
  folder = s.config.train.init_from
  params, _ = loop.pretrained_params(s, folder)
  metrics_lib.log_line(f'sampling from the pretrained weights in {folder} '
                       f'({state_lib.param_count(params):,} params)')
  return params


def _restored(config, workdir: str, checkpoint: Optional[str], step: Optional[int] = None):
  """(Setup, params, step, sample file name) of `params_to_sample`, the checkpointer closed;
  the params are a LoRA run's adapters, unmerged."""
  s = loop.build(config, workdir)
  try:
    return (s, *params_to_sample(s, workdir, checkpoint, step))
  finally:
    s.checkpointer.close()


def _merged(s: loop.Setup, params):
  """A LoRA run's adapters merged into its base; other params as they are."""
  return params if s.lora is None else s.lora.merged(params)


def sample(config, workdir: str, checkpoint: Optional[str] = None,
           prompt: Optional[str] = None, step: Optional[int] = None):
  """Writes a sample video to WORKDIR/samples from the params of a checkpoint or export.

  `checkpoint` is an export directory (WORKDIR/export/<step>, from `export`); no
  optimizer state is read then. Without it: the train checkpoint of `step` in
  WORKDIR/checkpoints if given, else the newest one, else the newest export in
  WORKDIR/export (so a workdir that holds only an export samples too). `prompt` (text
  models): the caption of every sample ('a; b' cycles through several), instead of
  sample.prompts.
  """
  config = resolve.complete(config)
  conditional.check_prompt_flag(config, prompt)
  compile_cache.configure(config.train.compilation_cache_dir)
  workdir = paths.normalize(workdir)
  s, params, step, name = _restored(config, workdir, checkpoint, step)
  return loop.sample_and_write(s, params, step, workdir, name=name, prompts=prompt)


def extend(config, workdir: str, input_path: str, num_frames: int,
           checkpoint: Optional[str] = None, prompt: Optional[str] = None):
  """--mode=extend: continues the clip (or image) at `input_path` to `num_frames` frames
  with the params `sample` would use; writes WORKDIR/samples/extend_*.{mp4,gif}."""
  config = resolve.complete(config)
  conditional.check_prompt_flag(config, prompt)
  conditional.check_i2v_extend(config)  # I2V: its encoders named before any weight loads
  workdir = paths.normalize(workdir)
  s, params, step, _ = _restored(config, workdir, checkpoint)
  params = _merged(s, params)
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    clip, _, written = conditional.extend_and_write(s, params, input_path, num_frames, workdir,
                                                 conditional.extend_name(input_path, step), prompt)
  metrics_lib.log_line(f'extended {input_path} to {num_frames} frames: {written}')
  return clip, written


def export(config, workdir: str) -> str:
  """Writes the newest checkpoint's sampling params (EMA unless sample.use_ema=False)
  and the config to WORKDIR/export/<step>/; returns that directory."""
  workdir = paths.normalize(workdir)
  s = loop.build(config, workdir)
  try:
    state, step = _restore_latest(s, workdir)
  finally:
    s.checkpointer.close()
  config = s.config  # resolved: the complete config goes into the export
  which = 'ema_params' if config.sample.use_ema else 'params'
  path = export_lib.write(export_lib.export_dir(workdir, step), getattr(state, which), config,
                          step=step, which=which)
  metrics_lib.log_line(f'exported the {which} of step {step} to {path}')
  return path


def load_stage(config, workdir: str, checkpoint: Optional[str] = None) -> multistage.Stage:
  """The params `--mode=sample` would use (the export `checkpoint`, else the newest
  checkpoint's EMA params, else the newest export in `workdir`), LoRA adapters merged."""
  s, params, _, _ = _restored(config, workdir, checkpoint)
  return multistage.Stage(s.config, s.model, s.diffusion, _merged(s, params), s.num_classes,
                          s.mesh, s.rules)


def load_audio_stage(config, workdir: str, checkpoint: Optional[str] = None
                     ) -> multistage.Stage:
  """`load_stage` of the pipeline's audio stage: an audio-video model's workdir
  (configs/tiny_av.py trained). Refuses, before any model is built or weight read, a config
  whose model has no audio stream and a workdir whose config.json (the run that trained it)
  lacks audio.enabled=True: its checkpoints hold no audio weights."""
  config = resolve.complete(config)
  multistage.check_audio_stage(config)
  workdir = paths.normalize(workdir)
  saved_path = paths.join(workdir, export_lib.CONFIG_FILENAME)
  if paths.isfile(saved_path):
    try:
      saved = json.loads(paths.read_text(saved_path))
    except ValueError:
      saved = None  # unreadable: the restore says whether the weights fit
    audio = saved.get('audio') if isinstance(saved, dict) else {'enabled': True}
    if not (isinstance(audio, dict) and audio.get('enabled') is True):  # none: before audio
      raise ValueError(f"the audio stage's workdir {workdir} holds a model trained without "
                       f'audio ({saved_path} has no audio.enabled=True): the audio stage needs '
                       'an audio-video run (python -m vdit_jax.main '
                       '--config=configs/tiny_av.py).')
  return load_stage(config, workdir, checkpoint)
