r"""Two-stage generation from the command line: keyframes, then the frames between them.

python -m vdit_jax.tools.generate_video \
    --keyframe_workdir=/tmp/vdit_tiny_keyframes --interp_workdir=/tmp/vdit_tiny_interpolate \
    --prompt='a red square moving left' --duration_s=4 --fps=8 --out=/tmp/red_square.mp4

--keyframe_config / --interp_config (default configs/tiny_keyframes.py and
configs/tiny_interpolate.py, with --keyframe_config.data.height=16 style overrides) must be
the configs the two workdirs were trained with. Each stage samples with the params
--mode=sample would use (newest checkpoint's EMA params, else the newest export).
--num_steps overrides both stages' sample.num_steps. --out is a .mp4 or .gif: one clip,
or a grid of --num_samples clips, at --fps. Prints the plan, then one JSON line (frames,
fps, keyframe indices, path, seconds). Exit status 2 on bad input (the message says which,
e.g. a duration the keyframe clip cannot cover).
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


def _define_flags() -> None:
  """The command line's flags, defined only when run as a program: importing this
  module beside other tools (make_shards defines --out too) then clashes with nothing."""
  define_stage_flags()
  flags.DEFINE_string('prompt', None, "Caption, e.g. 'a red square moving left' (text models).")
  flags.DEFINE_float('duration_s', None, 'Length of the clip in seconds.')
  flags.DEFINE_float('fps', None, 'Frame rate of the clip (default: the interpolation '
                     "model's sample.fps, the full rate).")
  flags.DEFINE_string('out', None, 'Output video path (.mp4 or .gif).')
  flags.DEFINE_integer('num_samples', 1, 'Clips to generate (written as a grid).')
  flags.DEFINE_integer('num_steps', None, "Sampler steps of both stages (default: each "
                       "config's sample.num_steps).")
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  flags.mark_flags_as_required(['keyframe_workdir', 'interp_workdir', 'duration_s', 'out'])


def write(video, path: str, fps: float) -> str:
  """[B, N, H, W, 3] in [-1, 1] -> one video (a grid when B > 1) at `fps`; the path."""
  n, _, h = video.shape[:3]
  grid = video_io.make_grid(video_io.to_uint8(video), ncols=math.ceil(math.sqrt(n)),
                            pad=1 if n > 1 else 0, scale=max(1, 128 // h))
  return video_io.write_video(path, grid, fps=fps)


def run(keyframe_config, interp_config, *, keyframe_workdir, interp_workdir, prompt,
        duration_s, fps, out, num_samples=1, num_steps=None, seed=0) -> dict:
  """Loads both stages, generates, writes `out`; returns the summary printed as JSON."""
  if os.path.splitext(out)[1].lower() not in ('.mp4', '.gif'):
    raise ValueError(f'--out={out!r} must end in .mp4 or .gif.')
  # Every default from config/defaults.py, in new configs (the flags' stay as given).
  keyframe_config = resolve.complete(keyframe_config)
  interp_config = resolve.complete(interp_config)
  for name, config in (('keyframe', keyframe_config), ('interp', interp_config)):
    if config.data.channels != 3:
      raise ValueError(f'--{name}_config has data.channels={config.data.channels} '
                       '(latents): writing a video needs RGB stages.')
    if num_steps is not None:
      config.sample.num_steps = num_steps
  fps = interp_config.sample.fps if fps is None else fps
  plan = multistage.plan_for(keyframe_config, interp_config, duration_s, fps)  # fail fast
  for line in multistage.describe(plan):
    print(line)
  keyframe = modes.load_stage(keyframe_config, keyframe_workdir)
  interp = modes.load_stage(interp_config, interp_workdir)
  t0 = time.perf_counter()
  result = multistage.generate(prompt, duration_s, fps, keyframe, interp,
                               rng=jax.random.key(seed), num_samples=num_samples)
  seconds = time.perf_counter() - t0
  path = write(result.video, out, fps) if jax.process_index() == 0 else None
  return {'path': path, 'prompt': prompt, 'frames': int(result.video.shape[1]),
          'fps': plan.fps, 'duration_s': result.video.shape[1] / plan.fps,
          'keyframes': plan.num_keyframes, 'windows': plan.num_windows,
          'keyframe_indices': list(plan.keyframe_indices()), 'generate_s': round(seconds, 2)}


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
                  seed=FLAGS.seed)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(json.dumps(summary))


if __name__ == '__main__':
  _define_flags()
  fatal.run(main)
