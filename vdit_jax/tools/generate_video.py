r"""Multi-stage generation from the command line: keyframes, the frames between them, and
optionally the finished clip's soundtrack.

python -m vdit_jax.tools.generate_video \
    --keyframe_workdir=/tmp/vdit_tiny_keyframes --interp_workdir=/tmp/vdit_tiny_interpolate \
    --prompt='a red square moving left' --duration_s=4 --fps=8 --out=/tmp/red_square.mp4 \
    [--audio_workdir=/tmp/vdit_tiny_av --audio_config=configs/tiny_av.py]

--keyframe_config / --interp_config (default configs/tiny_keyframes.py and
configs/tiny_interpolate.py, with --keyframe_config.data.height=16 style overrides) must be
the configs the two workdirs were trained with. Each stage samples with the params
--mode=sample would use (newest checkpoint's EMA params, else the newest export).
--num_steps overrides every stage's sample.num_steps. --out is a .mp4 or .gif: one clip,
or a grid of --num_samples clips, at --fps. Prints the plan, then one JSON line (frames,
fps, keyframe indices, path, seconds). Exit status 2 on bad input (the message says which,
e.g. a duration the keyframe clip cannot cover).

--audio_workdir adds the audio stage (generate/multistage.py): an audio-video model trained
with --audio_config (default configs/tiny_av.py) samples the soundtrack of the finished
frames (audio.task 'v2a', window by window of its clip; frames resized to its size). Its
audio.fps must equal --fps (else exit status 2, naming both): configs/tiny_av.py's 16 fps
does not match the tiny pipeline's 8, so train the audio model at the pipeline's rate
(--config.audio.fps=8 --config.sample.fps=8). --out must then be .mp4: it gets the sound as
an AAC track (a grid's: the clips' sounds mixed), and the same sound is written beside it
as <out without .mp4>.wav. Sampling options are the config's, set as overrides like the
stages' others: --audio_config.audio.modality_cfg_audio=2 (guidance toward the frames),
--audio_config.audio.griffin_lim_iters=64, --audio_config.audio.task='v2a' (the default
config's 'joint' is run as 'v2a' too, since the frames are given; 'a2v' is refused: joint
or a2v sampling is `python -m vdit_jax.main --mode=sample` on the audio workdir). The label
guidance (audio.cfg_scale) applies only with class labels, which this tool does not take:
every window is sampled with the null label.
"""

import json
import math
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from vdit_jax import modes

from vdit_jax.config import resolve
from vdit_jax.parallel import fatal
from vdit_jax.data import video_io
from vdit_jax.generate import multistage

FLAGS = flags.FLAGS


def define_stage_flags() -> None:
  """--keyframe_config/--interp_config and the two workdirs (also used by
  vdit_jax/eval/multistage.py)."""
  config_flags.DEFINE_config_file('keyframe_config', 'configs/tiny_keyframes.py',
                                  'Config the keyframe model was trained with.')
  config_flags.DEFINE_config_file('interp_config', 'configs/tiny_interpolate.py',
                                  'Config the interpolation model was trained with.')
  flags.DEFINE_string('keyframe_workdir', None, 'Workdir of the trained keyframe model.')
  flags.DEFINE_string('interp_workdir', None, 'Workdir of the trained interpolation model.')


def define_audio_flags() -> None:
  """--audio_config and --audio_workdir: the optional audio stage."""
  config_flags.DEFINE_config_file('audio_config', 'configs/tiny_av.py',
                                  'Config the audio-video model was trained with (read only '
                                  'with --audio_workdir).')
  flags.DEFINE_string('audio_workdir', None, 'Workdir of a trained audio-video model: the '
                      "finished clip's soundtrack (default: none, a silent clip).")


def _define_flags() -> None:
  """The command line's flags, defined only when run as a program: importing this
  module beside other tools (make_shards defines --out too) then clashes with nothing."""
  define_stage_flags()
  define_audio_flags()
  flags.DEFINE_string('prompt', None, "Caption, e.g. 'a red square moving left' (text models).")
  flags.DEFINE_float('duration_s', None, 'Length of the clip in seconds.')
  flags.DEFINE_float('fps', None, 'Frame rate of the clip (default: the interpolation '
                     "model's sample.fps, the full rate).")
  flags.DEFINE_string('out', None, 'Output video path (.mp4 or .gif).')
  flags.DEFINE_integer('num_samples', 1, 'Clips to generate (written as a grid).')
  flags.DEFINE_integer('num_steps', None, "Sampler steps of every stage (default: each "
                       "config's sample.num_steps).")
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  flags.mark_flags_as_required(['keyframe_workdir', 'interp_workdir', 'duration_s', 'out'])


def write(video, path: str, fps: float, waves=None, sample_rate=None) -> str:
  """[B, N, H, W, 3] in [-1, 1] -> one video (a grid when B > 1) at `fps`; the path. With
  `waves` [B, S] (an .mp4 only) its sound track is their mix (video_io.mix_audio)."""
  n, _, h = video.shape[:3]
  grid = video_io.make_grid(video_io.to_uint8(video), ncols=math.ceil(math.sqrt(n)),
                            pad=1 if n > 1 else 0, scale=max(1, 128 // h))
  if waves is None:
    return video_io.write_video(path, grid, fps=fps)
  return video_io.write_video(path, grid, fps=fps, audio=video_io.mix_audio(waves),
                              sample_rate=sample_rate)


def wav_path(out: str) -> str:
  """Where the soundtrack of `out` (.mp4) is written as wav: the same name, .wav."""
  return os.path.splitext(out)[0] + '.wav'


def run(keyframe_config, interp_config, *, keyframe_workdir, interp_workdir, prompt,
        duration_s, fps, out, num_samples=1, num_steps=None, seed=0, audio_config=None,
        audio_workdir=None) -> dict:
  """Loads the stages, generates, writes `out` (and its wav with an audio stage); returns
  the summary printed as JSON."""
  if os.path.splitext(out)[1].lower() not in ('.mp4', '.gif'):
    raise ValueError(f'--out={out!r} must end in .mp4 or .gif.')
  if audio_workdir is not None and os.path.splitext(out)[1].lower() != '.mp4':
    raise ValueError(f'--out={out!r} must end in .mp4 with --audio_workdir (a gif has no '
                     'sound track).')
  # Every default from config/defaults.py, in new configs (the flags' stay as given).
  keyframe_config = resolve.complete(keyframe_config)
  interp_config = resolve.complete(interp_config)
  stage_configs = [('keyframe', keyframe_config), ('interp', interp_config)]
  if audio_workdir is not None:
    if audio_config is None:
      raise ValueError('--audio_workdir needs --audio_config (the config it was trained '
                       'with).')
    audio_config = resolve.complete(audio_config)
    if audio_config.audio.task not in ('v2a', 'joint'):  # joint: the default, not asked for
      raise ValueError(f"--audio_config.audio.task={audio_config.audio.task!r}: the audio "
                       "stage generates the sound of the pipeline's frames, task 'v2a'. "
                       "'a2v' makes frames for a given sound: sample the audio workdir "
                       'alone for that (python -m vdit_jax.main --mode=sample).')
    stage_configs.append(('audio', audio_config))
  for name, config in stage_configs:
    if config.data.channels != 3:
      raise ValueError(f'--{name}_config has data.channels={config.data.channels} '
                       '(latents): writing a video needs RGB stages.')
    if num_steps is not None:
      config.sample.num_steps = num_steps
  fps = interp_config.sample.fps if fps is None else fps
  plan = multistage.plan_for(keyframe_config, interp_config, duration_s, fps)  # fail fast
  for line in multistage.describe(plan):
    print(line)
  if audio_workdir is not None:  # fail fast: the rates agree
    sound_plan = multistage.soundtrack_plan_for(audio_config, plan.num_frames, plan.fps)
    print(multistage.describe_soundtrack(sound_plan, int(audio_config.audio.sample_rate)))
  keyframe = modes.load_stage(keyframe_config, keyframe_workdir)
  interp = modes.load_stage(interp_config, interp_workdir)
  audio = (None if audio_workdir is None
           else modes.load_audio_stage(audio_config, audio_workdir))
  t0 = time.perf_counter()
  result = multistage.generate(prompt, duration_s, fps, keyframe, interp,
                               rng=jax.random.key(seed), num_samples=num_samples, audio=audio)
  seconds = time.perf_counter() - t0
  sound = result.soundtrack
  path = wav = None
  if jax.process_index() == 0:
    if sound is None:
      path = write(result.video, out, fps)
    else:
      path = write(result.video, out, fps, sound.waves, sound.sample_rate)
      wav = video_io.write_wav(wav_path(out), video_io.mix_audio(sound.waves),
                               sound.sample_rate)
  summary = {'path': path, 'prompt': prompt, 'frames': int(result.video.shape[1]),
             'fps': plan.fps, 'duration_s': result.video.shape[1] / plan.fps,
             'keyframes': plan.num_keyframes, 'windows': plan.num_windows,
             'keyframe_indices': list(plan.keyframe_indices()), 'generate_s': round(seconds, 2)}
  if sound is not None:
    summary['audio'] = {'wav': wav, 'sample_rate': sound.sample_rate,
                        'samples': int(sound.waves.shape[1]),
                        'windows': list(sound.plan.starts)}
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  try:
    summary = run(FLAGS.keyframe_config, FLAGS.interp_config,
                  keyframe_workdir=FLAGS.keyframe_workdir, interp_workdir=FLAGS.interp_workdir,
                  prompt=FLAGS.prompt, duration_s=FLAGS.duration_s, fps=FLAGS.fps,
                  out=FLAGS.out, num_samples=FLAGS.num_samples, num_steps=FLAGS.num_steps,
                  seed=FLAGS.seed, audio_config=FLAGS.audio_config,
                  audio_workdir=FLAGS.audio_workdir)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(json.dumps(summary))


if __name__ == '__main__':
  _define_flags()
  fatal.run(main)
