r"""Does the two-stage pipeline make a full-rate clip that follows the prompt, with the
frames between keyframes where they belong? Measured with tools/detect.py.

python vdit_jax/eval/multistage.py --keyframe_workdir=runs/key --interp_workdir=runs/interp \
    [--keyframe_config=configs/tiny_keyframes.py --interp_config=configs/tiny_interpolate.py
     --keyframe_config.data.height=16 ...] [--duration_s=3 --fps=8 --num_prompts=21]

pipeline: `multistage.generate(prompt, duration_s, fps)` for --num_prompts prompts
'a {colour} {shape} moving {direction}' (every colour, cycling shapes and directions).
Per clip: the frame count against round(duration_s * fps); the detected colour of the
clip, of its keyframes and of its interpolated frames against the prompt; the clip judged
as the main job's samples are (vdit_jax/eval/learning_curve.py): one object per frame, empty
frames, the object's fit to its ideal shape, crisp clips, and the detected shape and
direction against the prompt's, each with its standard error over the clips. For every
frame between two keyframes: the distance (px) of its detected centroid from the point
the linear interpolation of the two keyframes' centroids puts it at, and whether it lies
within the box the two centroids span (1 px slack). References in the same run: the
same numbers on true synthetic clips (the shapes bounce, so true motion is not linear
either) and for copying the nearest keyframe.

truth: held-out synthetic clips at the full rate; their every r-th frame is given to the
interpolation model (with each clip's caption) and the frames between are compared with
the true ones: centroid error (px) and pixel MSE, next to linear interpolation of the
true keyframes (centroids; a cross-fade for pixels) and to copying the nearest keyframe.

A measurement, not a test: it never fails on a number. Ends with one JSON line.
"""

import json
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np


from vdit_jax import modes

from vdit_jax.eval import learning_curve
from vdit_jax.config import resolve
from vdit_jax.data import synthetic
from vdit_jax.eval import detect
from vdit_jax.tools import generate_video
from vdit_jax.generate import multistage

FLAGS = flags.FLAGS
generate_video.define_stage_flags()  # --keyframe_config/--interp_config, the workdirs
flags.DEFINE_float('duration_s', 3.0, 'Clip length, seconds.')
flags.DEFINE_float('fps', None, "Frame rate (default: the interpolation model's).")
flags.DEFINE_integer('num_prompts', 21, 'pipeline: prompts (one clip each).')
flags.DEFINE_integer('num_clips', 24, 'truth: held-out synthetic clips.')
flags.DEFINE_integer('num_steps', 25, 'Sampler steps of both stages.')
flags.DEFINE_integer('window_batch', 16, 'Interpolation windows per sampler call.')
flags.DEFINE_integer('seed', 1234, 'Sampling seed; truth: also the clips\' source seed.')
flags.mark_flags_as_required(['keyframe_workdir', 'interp_workdir'])

SLACK_PX = 1.0


def prompts(n):
  out = []
  for i in range(n):
    colour = list(synthetic.COLOURS)[i % len(synthetic.COLOURS)]
    shape = synthetic.SHAPES[(i // len(synthetic.COLOURS)) % len(synthetic.SHAPES)]
    direction = synthetic.DIRECTIONS[i % len(synthetic.DIRECTIONS)]
    out.append((f'a {colour} {shape} moving {direction}', colour, shape, direction))
  return out


def between_keyframes(centroids, found, key_indices):
  """Per frame strictly between two keyframes with everything found: (distance from the
  linear interpolation of the keyframes' centroids, inside their box +- slack, distance
  of the nearest keyframe's centroid from that interpolation)."""
  dist, inside, nearest = [], [], []
  for i0, i1 in zip(key_indices, key_indices[1:]):
    if not (found[i0] and found[i1]):
      continue
    c0, c1 = centroids[i0], centroids[i1]
    lo, hi = np.minimum(c0, c1) - SLACK_PX, np.maximum(c0, c1) + SLACK_PX
    for t in range(i0 + 1, i1):
      if not found[t]:
        continue
      a = (t - i0) / (i1 - i0)
      line = (1 - a) * c0 + a * c1
      dist.append(float(np.linalg.norm(centroids[t] - line)))
      inside.append(bool(np.all((centroids[t] >= lo) & (centroids[t] <= hi))))
      nearest.append(float(np.linalg.norm((c0 if a <= 0.5 else c1) - line)))
  return dist, inside, nearest


def eval_pipeline(keyframe, interp, fps):
  grid = prompts(FLAGS.num_prompts)
  counts, colour, key_colour, mid_colour = [], [], [], []
  dist, inside, nearest = [], [], []
  clips, shape_hits, direction_hits = [], [], []
  plan = None
  t0 = time.perf_counter()
  for i, (prompt, want, shape, direction) in enumerate(grid):
    result = multistage.generate(prompt, FLAGS.duration_s, fps, keyframe, interp,
                                 rng=jax.random.fold_in(jax.random.key(FLAGS.seed), i),
                                 window_batch=FLAGS.window_batch)
    plan = result.plan
    clip = result.video[0]                                      # [N, H, W, 3]
    keys = list(plan.keyframe_indices())
    mids = [t for t in range(clip.shape[0]) if t not in keys]
    counts.append(clip.shape[0] == plan.num_frames == round(FLAGS.duration_s * plan.fps))
    d = detect.detect(clip)
    colour.append(d.colour == want)
    clips.append(clip)
    shape_hits.append(d.shape == shape)
    direction_hits.append(d.direction == direction)
    key_colour.append(detect.detect(clip[keys]).colour == want)
    mid_colour.append(detect.detect(clip[mids]).colour == want)
    a, b, c = between_keyframes(d.centroids, d.found, keys)
    dist += a
    inside += b
    nearest += c
  seconds = time.perf_counter() - t0
  # The same geometry on true clips of the interpolation model's rate.
  cfg = interp.config
  step = plan.ratio // plan.subsample
  source = synthetic.from_data_config(cfg.data, num_frames=plan.num_frames,
                                      num_examples=FLAGS.num_prompts, seed=FLAGS.seed,
                                      time_stride=cfg.data.time_stride * plan.subsample)
  true_dist, true_inside = [], []
  for i in range(FLAGS.num_prompts):
    d = detect.detect(source[i]['video'])
    a, b, _ = between_keyframes(d.centroids, d.found, list(range(0, plan.num_frames, step)))
    true_dist += a
    true_inside += b
  out = {
      'clips': len(grid), 'frames': plan.num_frames, 'fps': plan.fps,
      'frame_count_ok': float(np.mean(counts)),
      'colour_acc': float(np.mean(colour)), 'keyframe_colour_acc': float(np.mean(key_colour)),
      'interp_frames_colour_acc': float(np.mean(mid_colour)),
      'interp_frames_scored': len(dist),
      'interp_err_px': float(np.mean(dist)), 'interp_between_frac': float(np.mean(inside)),
      'nearest_keyframe_err_px': float(np.mean(nearest)),
      'true_clips_err_px': float(np.mean(true_dist)),
      'true_clips_between_frac': float(np.mean(true_inside)),
      'generate_s': seconds,
      'judged': learning_curve.judge(clips, shape_accuracy=shape_hits,
                                     direction_accuracy=direction_hits)}
  print(f'pipeline: {len(grid)} prompts -> {plan.num_frames} frames at {plan.fps:g} fps '
        f'({seconds:.0f}s); frame count right in {out["frame_count_ok"]:.3f}')
  print(f'  colour vs prompt: clip {out["colour_acc"]:.3f}, keyframes '
        f'{out["keyframe_colour_acc"]:.3f}, interpolated frames '
        f'{out["interp_frames_colour_acc"]:.3f} (chance {1 / len(synthetic.COLOURS):.3f})')
  print(f'  {len(dist)} interpolated frames: centroid {out["interp_err_px"]:.2f} px from the '
        f'keyframes\' line, between them {out["interp_between_frac"]:.3f}; nearest-keyframe '
        f'copy {out["nearest_keyframe_err_px"]:.2f} px; true clips '
        f'{out["true_clips_err_px"]:.2f} px, between {out["true_clips_between_frac"]:.3f}')
  print('  judged as the main job (mean +- standard error over the clips): ' + ', '.join(
      f'{k} {v["mean"]:.2f} +- {v["stderr"]:.2f}' for k, v in out['judged'].items()))
  return out


def eval_truth(keyframe, interp):
  cfg = interp.config
  r = multistage.check_stages(keyframe.config, interp.config)[1]
  m = int(keyframe.config.data.num_frames)
  total = (m - 1) * r + 1
  source = synthetic.from_data_config(cfg.data, num_frames=total,
                                      num_examples=FLAGS.num_clips, seed=FLAGS.seed + 1,
                                      captions=True)
  examples = [source[i] for i in range(FLAGS.num_clips)]
  truth = np.stack([e['video'] for e in examples]).astype(np.float32) / 127.5 - 1.0
  t0 = time.perf_counter()
  full, _ = multistage.interpolate(interp, truth[:, ::r], rng=jax.random.key(FLAGS.seed),
                                   prompt=[e['caption'] for e in examples],
                                   window_batch=FLAGS.window_batch)
  seconds = time.perf_counter() - t0
  keys = np.arange(0, total, r)
  mids = np.array([t for t in range(total) if t % r])
  a = (mids % r) / r                                       # position between its keyframes
  lo, hi = mids - mids % r, mids - mids % r + r
  blend = ((1 - a)[None, :, None, None, None] * truth[:, lo]
           + a[None, :, None, None, None] * truth[:, hi])  # cross-fade of the keyframes
  nearest_frames = truth[:, np.where(a <= 0.5, lo, hi)]
  mse = {'model': float(np.mean((full[:, mids] - truth[:, mids]) ** 2)),
         'cross_fade': float(np.mean((blend - truth[:, mids]) ** 2)),
         'nearest_keyframe': float(np.mean((nearest_frames - truth[:, mids]) ** 2))}
  err = {'model': [], 'linear': [], 'nearest_keyframe': []}
  colour_kept = []
  for gen, true, e in zip(full, truth, examples):
    dg, dt = detect.detect(gen), detect.detect(true)
    colour_kept.append(detect.detect(gen[mids]).colour == list(synthetic.COLOURS)[e['colour']])
    for t, w, t0_, t1_ in zip(mids, a, lo, hi):
      if not (dt.found[t] and dt.found[t0_] and dt.found[t1_]):
        continue
      line = (1 - w) * dt.centroids[t0_] + w * dt.centroids[t1_]
      near = dt.centroids[t0_] if w <= 0.5 else dt.centroids[t1_]
      err['linear'].append(np.linalg.norm(line - dt.centroids[t]))
      err['nearest_keyframe'].append(np.linalg.norm(near - dt.centroids[t]))
      if dg.found[t]:
        err['model'].append(np.linalg.norm(dg.centroids[t] - dt.centroids[t]))
  out = {'clips': FLAGS.num_clips, 'frames': total, 'keyframes_exact':
         bool(np.array_equal(full[:, keys], truth[:, keys])),
         'centroid_err_px': {k: float(np.mean(v)) for k, v in err.items()},
         'model_frames_found': len(err['model']), 'frames_scored': len(err['linear']),
         'pixel_mse': mse, 'colour_kept': float(np.mean(colour_kept)), 'interpolate_s': seconds}
  print(f'truth: {FLAGS.num_clips} held-out clips of {total} frames, every {r}th given '
        f'({seconds:.0f}s); keyframes returned exactly: {out["keyframes_exact"]}')
  print(f'  centroid error of the frames between, px: model '
        f'{out["centroid_err_px"]["model"]:.2f} ({len(err["model"])}/{len(err["linear"])} '
        f'found), linear {out["centroid_err_px"]["linear"]:.2f}, nearest keyframe '
        f'{out["centroid_err_px"]["nearest_keyframe"]:.2f}')
  print(f'  pixel MSE: model {mse["model"]:.4f}, cross-fade {mse["cross_fade"]:.4f}, nearest '
        f'keyframe {mse["nearest_keyframe"]:.4f}; colour kept {out["colour_kept"]:.3f}')
  return out


def main(argv):
  del argv
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
  # Every default from config/defaults.py.
  keyframe_config = resolve.complete(FLAGS.keyframe_config)
  interp_config = resolve.complete(FLAGS.interp_config)
  for config in (keyframe_config, interp_config):
    config.sample.num_steps = FLAGS.num_steps
  keyframe = modes.load_stage(keyframe_config, FLAGS.keyframe_workdir)
  interp = modes.load_stage(interp_config, FLAGS.interp_workdir)
  fps = FLAGS.fps or interp_config.sample.fps
  print(f'{FLAGS.num_steps} sampler steps per stage (shared, contended CPU: times are '
        'indicative only)')
  result = {'pipeline': eval_pipeline(keyframe, interp, fps),
            'truth': eval_truth(keyframe, interp)}
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
