r"""Does a trained model follow its prompt / continue the given motion? Measured with the
detector of tools/detect.py on generated clips.

python vdit_jax/eval/generation.py --task=text --config=configs/tiny_text.py \
    --workdir=runs/tiny_text [--num_prompts=84 --num_steps=25]
python vdit_jax/eval/generation.py --task=extend --config=configs/tiny_extend.py \
    --workdir=runs/tiny_extend [--num_clips=24 --total_frames=28]
python vdit_jax/eval/generation.py --task=image_to_video --config=configs/tiny_text.py \
    --config.model.context_frames_max=1 --workdir=runs/tiny_text_i2v [--num_clips=24]

text: samples one clip per prompt 'a {colour} {shape} moving {direction}' (the prompts
cycle through all colours x shapes x directions), detects each clip's colour, shape and
direction and prints the accuracies against the prompt, next to chance (1/7, 1/3, 1/4),
to the same model sampled with no caption (the null caption) in the same run, and to the
detector's own scores on held-out clips of the data. Direction is read two ways: from the
first two frame steps (right for clips that bounce) and from the whole path, first frame
to last (what clips with data.bounce=False show), with the path's speed in px/frame and
its signed part along the prompted direction, and where the path starts, from the frame
centre along the prompted direction (clips that do not bounce start behind the centre).
First, the denoising loss of held-out clips with their own caption, none, another clip's
caption, and their own caption with the direction word reversed (same t and noise):
whether the model reads the text at all, and its direction word in particular. Then, per
direction, the mean of the model's x0 estimate at the noisiest step (pure noise in, one
draw per prompt of that direction) against the mean of held-out clips of that direction:
how far the mean's centroid travels along the direction from the first frame to the last.
The data's mean travels (a clip's layout is picked at the noisiest steps, so a model
that follows the word must shift its mean there); a model that ignores the word gives ~0.
Last, by prompted shape: what the detector reads it as, the median fill ratio it reads
that from, and the object's size, the median height x width of its mask (and
height/width) for left/right and for up/down prompts, next to the same on the held-out
data clips.

A text model trained with the first frames given (model.context_frames_max >= 1) also
gets a row 'frame+clip': text to image to video, as Emu Video factorises it. The first
frame of each prompted sample is kept and the clip generated again from it and the same
prompt.

image_to_video (such a model): each of --num_clips held-out clips' first frame is given,
prompted with the clip's colour and shape and each of the four directions in turn. One
frame does not show which way the shape moves, so the direction of the generated motion
has to come from the words; it is scored against the prompt, overall and split by how the
prompted direction relates to the clip's own (own, reversed, perpendicular: where a shape
starts depends on its direction when clips do not bounce, so the first frame carries a
prior). A no-caption row, scored against each clip's own direction, shows that prior.
First, the denoising loss of the frames after the first with the first given, with the
own caption, none, another clip's and the direction reversed.

extend: renders --num_clips held-out synthetic clips of --total_frames frames (the
ground truth), gives the model their first k = sample.overlap frames, extends them to
--total_frames with the extension loop, and compares the detected centroid displacement per frame of
the generated frames with the true clip's (mean absolute error, px/frame), next to two
references computed in the same run: constant-velocity extrapolation of the given frames
(ignores bounces) and no motion. Also the share of clips whose generated frames keep the
given colour. First, the denoising loss of the frames after the first k with those k given
vs none given (same t and noise): whether the model reads the given frames at all.

A measurement, not a test: it never fails on a number. Ends with one JSON line.
"""

import json
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags


from vdit_jax import modes

from vdit_jax.eval import learning_curve
from vdit_jax.config import resolve
from vdit_jax.data import synthetic
from vdit_jax.diffusion import conditioning as cond_lib
from vdit_jax.model import text as text_lib
from vdit_jax.eval import detect
from vdit_jax.generate import conditional
from vdit_jax.train import loop

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'The config the model was trained with.')
flags.DEFINE_string('workdir', None, 'Workdir holding the trained checkpoints.')
flags.DEFINE_enum('task', 'text', ['text', 'extend', 'image_to_video'], 'What to measure.')
flags.DEFINE_integer('num_prompts', 84, 'text: prompts (= clips) to sample.')
flags.DEFINE_integer('num_clips', 24, 'extend, image_to_video: held-out clips used.')
flags.DEFINE_integer('total_frames', 28, 'extend: frames of each extended clip.')
flags.DEFINE_integer('num_steps', 25, 'Sampler steps.')
flags.DEFINE_integer('batch', 12, 'Clips sampled per call.')
flags.DEFINE_integer('seed', 1234, 'Sampling seed; extend: also the held-out clips\' source seed.')
flags.mark_flags_as_required(['config', 'workdir'])


def prompt_grid(n):
  """n (prompt, colour, shape, direction) cycling through every combination."""
  out = []
  for i in range(n):
    colour = list(synthetic.COLOURS)[i % len(synthetic.COLOURS)]
    direction = synthetic.DIRECTIONS[(i // len(synthetic.COLOURS)) % len(synthetic.DIRECTIONS)]
    shape = synthetic.SHAPES[(i // (len(synthetic.COLOURS) * len(synthetic.DIRECTIONS)))
                             % len(synthetic.SHAPES)]
    out.append((f'a {colour} {shape} moving {direction}', colour, shape, direction))
  return out


def whole_batches(rows):
  """`rows` cycled up to a multiple of --batch (each batch is one sampler call)."""
  n = -(-len(rows) // FLAGS.batch) * FLAGS.batch
  return [rows[i % len(rows)] for i in range(n)]


def sample_batches(s, params, conds, rng):
  cfg = s.config
  fn = jax.jit(conditional.make_sample_fn(s.model, s.diffusion, cfg, s.num_classes,
                                       conditional.sample_shape(cfg, FLAGS.batch)))
  return [np.asarray(fn(params, jax.random.fold_in(rng, i), c)) for i, c in enumerate(conds)]


def caption_losses(s, params, tok, given=0):
  """Denoising loss on held-out clips with their own caption, no caption, another clip's
  caption, and their own with the direction reversed, at the same (t, noise) draws: lower
  with the right caption = the model reads the text, whether or not its samples are clean
  yet. given > 0: the first `given` frames enter clean and the loss covers the others."""
  cfg = s.config
  n = FLAGS.num_prompts - FLAGS.num_prompts % FLAGS.batch or FLAGS.batch
  source = synthetic.from_data_config(cfg.data, num_examples=n, seed=FLAGS.seed,
                                      captions=True)
  clips = [source[i] for i in range(n)]  # each rendered once
  video = np.stack([c['video'] for c in clips]).astype(np.float32) / 127.5 - 1.0
  captions = [c['caption'] for c in clips]
  shuffled = captions[1:] + captions[:1]
  reversed_direction = [
      synthetic.caption(c['shape'], c['colour'], synthetic.opposite_direction(c['direction']))
      for c in clips]
  t_rng, noise_rng = jax.random.split(jax.random.key(FLAGS.seed))
  t = s.diffusion.sample_t(t_rng, n)
  noise = jax.random.normal(noise_rng, video.shape)

  num_frames = video.shape[1]
  given_mask = (None if not given
                else cond_lib.frame_mask(jnp.full((FLAGS.batch,), given), num_frames))

  @jax.jit
  def per_clip(video, t, noise, text):
    z = s.diffusion.model_input(s.diffusion.corrupt(video, noise, t), t)
    if given_mask is not None:  # the given frames enter clean, as in training
      z = cond_lib.impose(z, video, given_mask)
    pred = s.model.apply({'params': params}, z, s.diffusion.model_t(t), None, text=text,
                         frame_mask=given_mask)
    err = jnp.mean(jnp.square(pred - s.diffusion.output_target(video, noise, t)), axis=(2, 3, 4))
    return jnp.mean(err[:, given:], axis=1)  # [B]: the frames after the given ones

  out = {}
  for name, texts in (('own_caption', captions), ('no_caption', None),
                      ('other_caption', shuffled), ('direction_reversed', reversed_direction)):
    losses = []
    for b in range(0, n, FLAGS.batch):
      sl = slice(b, b + FLAGS.batch)
      if texts is None:
        text = text_lib.null_text(text_lib.spec_from_config(cfg.model.text), FLAGS.batch)
      else:
        ids, mask = tok.encode_batch(texts[sl])
        text = {'tokens': ids, 'mask': mask}
      losses.append(per_clip(video[sl], t[sl], noise[sl], text))
    out[name] = float(np.mean(np.concatenate(losses)))
  where = f', frames {given}.. with the first {given} given' if given else ''
  print(f'denoising loss on {n} held-out clips{where}: own caption {out["own_caption"]:.4f}, '
        f'no caption {out["no_caption"]:.4f}, another clip\'s caption '
        f'{out["other_caption"]:.4f}, own with the direction reversed '
        f'{out["direction_reversed"]:.4f}')
  return out


def _mean_travel(frames, direction):
  """Centroid travel (px) along `direction` from the first frame to the last of the mean
  brightness of clips frames [N, T, H, W, 3] in [-1, 1]."""
  weight = np.mean(frames, axis=(0, -1)) + 1.0  # [T, H, W] >= 0: dark background ~0.1
  _, h, w = weight.shape
  ys, xs = np.mgrid[0:h, 0:w] + 0.5
  total = weight.sum(axis=(1, 2))
  path = np.stack([(weight * xs).sum(axis=(1, 2)) / total,
                   (weight * ys).sum(axis=(1, 2)) / total], axis=-1)  # [T, 2]
  return float((path[-1] - path[0]) @ synthetic.direction_step(direction))


def noisiest_mean_travel(s, params, tok, clips):
  """Per direction: the centroid travel of the mean x0 estimate at the noisiest step (one
  pure-noise draw per prompt of that direction) and of the mean of held-out `clips`."""
  cfg = s.config
  d = s.diffusion
  t_max = 1.0 if d.is_flow else d.num_timesteps - 1
  grid = prompt_grid(len(synthetic.COLOURS) * len(synthetic.SHAPES) * len(synthetic.DIRECTIONS))

  @jax.jit
  def x0_at_noise(z, ids, mask):
    t = jnp.full((z.shape[0],), t_max, jnp.float32 if d.is_flow else jnp.int32)
    pred = s.model.apply({'params': params}, d.model_input(z, t), d.model_t(t), None,
                         text={'tokens': ids, 'mask': mask})
    return d.pred_to_x0_eps(z, pred, t)[0]

  out = {}
  for i, direction in enumerate(synthetic.DIRECTIONS):
    prompts = [g[0] for g in grid if g[3] == direction]
    ids, mask = tok.encode_batch(prompts)
    shape = (len(prompts), cfg.data.num_frames, cfg.data.height, cfg.data.width, 3)
    z = jax.random.normal(jax.random.fold_in(jax.random.key(FLAGS.seed), i), shape)
    model = _mean_travel(np.asarray(x0_at_noise(z, ids, mask)), direction)
    data = np.stack([c['video'] for c in clips if c['direction'] == i])
    out[direction] = {'model': model,
                      'data': _mean_travel(data.astype(np.float32) / 127.5 - 1.0, direction)}
  print('mean x0 at the noisiest step, centroid travel along the prompted direction, first '
        'to last frame (px): ' + ', '.join(
            f'{k} {v["model"]:.2f} (data {v["data"]:.2f})' for k, v in out.items()))
  return out


def _scores(found, truth, clips=None):
  """Accuracies of detections against (prompt, colour, shape, direction) tuples. `shape` is
  read from the detector's object mask; with the detected `clips` given, `shape_raw` is read
  from the raw foreground too (the reading before 2026-12-02, which stray pixels break;
  tools/detect.py). `direction`
  reads the first two frame steps (the detector's default, right for clips that bounce);
  `direction_path` the whole path, first found frame to last (what a clip that does not
  bounce shows); `speed` and `speed_along_prompt` (signed) are of that path, px/frame."""
  acc = {key: float(np.mean([getattr(d, key) == t[i + 1] for d, t in zip(found, truth)]))
         for i, key in enumerate(('colour', 'shape', 'direction'))}
  paths = [detect.velocity_of(d.centroids, d.found, lead=len(d.found) - 1) for d in found]
  if clips is not None:
    acc['shape_raw'] = float(np.mean([detect.detect(c, clean=False).shape == t[2]
                                      for c, t in zip(clips, truth)]))
  acc['direction_path'] = float(np.mean(
      [detect.direction_of(v) == t[3] for v, t in zip(paths, truth)]))
  acc['speed'] = float(np.nanmean([np.hypot(*v) for v in paths]))
  acc['speed_along_prompt'] = float(np.nanmean(
      [np.asarray(v) @ synthetic.direction_step(t[3]) for v, t in zip(paths, truth)]))
  # Where the path starts, from the frame centre, along the prompted direction: a clip of
  # data.bounce=False starts behind the centre (its whole path has to fit), so a model
  # that places the shape by the word gives a negative number too.
  centre = np.array([FLAGS.config.data.width, FLAGS.config.data.height]) / 2.0
  acc['start_along_prompt'] = float(np.nanmean(
      [(d.centroids[np.flatnonzero(d.found)[0]] - centre) @ synthetic.direction_step(t[3])
       for d, t in zip(found, truth) if d.found.any()] or [np.nan]))
  return acc


MOTION_AXES = {'left/right': ('left', 'right'), 'up/down': ('up', 'down')}


def box_sizes(boxes, truth):
  """{shape: {motion axis: [median height, median width, median height/width]}} of the
  detections' object-mask `boxes` (Detection.box) over clips whose (prompt, colour, shape,
  direction) `truth` has that shape and direction."""
  out = {}
  for shape in synthetic.SHAPES:
    out[shape] = {}
    for axis, directions in MOTION_AXES.items():
      hw = np.array([b for b, t in zip(boxes, truth) if t[2] == shape and t[3] in directions],
                    float).reshape(-1, 2)
      out[shape][axis] = [float(np.nanmedian(hw[:, 0])), float(np.nanmedian(hw[:, 1])),
                          float(np.nanmedian(hw[:, 0] / hw[:, 1]))] if len(hw) else [np.nan] * 3
  return out


def print_box_sizes(name, sizes):
  print(f'  {name} object box, median height x width px (height/width) by shape and motion '
        'axis: ' + '; '.join(
            f'{shape} ' + ', '.join(f'{axis} {h:.1f}x{w:.1f} ({r:.2f})'
                                    for axis, (h, w, r) in row.items())
            for shape, row in sizes.items()))


def shape_confusion(found, truth):
  """Printed and returned: {prompted shape: {detected shape: count}} and the median fill
  ratio (object mask area / bounding box, what the detector reads shape from) per prompted
  shape, and the object's box size by shape and motion axis."""
  names = synthetic.SHAPES + ('unknown',)
  out = {p: {d: sum(1 for f, t in zip(found, truth) if t[2] == p and f.shape == d)
             for d in names} for p in synthetic.SHAPES}
  fill = {p: float(np.nanmedian([f.fill for f, t in zip(found, truth) if t[2] == p] or [np.nan]))
          for p in synthetic.SHAPES}
  print('  detected shape by prompted shape: ' + '; '.join(
      f'{p} -> ' + ', '.join(f'{d} {n}' for d, n in row.items() if n)
      for p, row in out.items()))
  print('  median fill ratio (object mask area / box; data: square 0.98, circle 0.79, '
        'triangle 0.59) by '
        'prompted shape: ' + ', '.join(f'{p} {v:.2f}' for p, v in fill.items()))
  box = box_sizes([f.box for f in found], truth)
  print_box_sizes('prompted', box)
  return {'counts': out, 'median_fill': fill, 'box': box}


def judged(clips, found, truth):
  """The prompted clips judged as the main job's samples (vdit_jax/eval/learning_curve.py): one
  object per frame, empty frames, fit to the ideal shape, crisp clips, and colour, shape
  and direction (whole path) against the prompt, each a mean and its standard error over
  the clips. Printed and returned."""
  paths = [detect.velocity_of(d.centroids, d.found, lead=len(d.found) - 1) for d in found]
  shape_hits = [d.shape == t[2] for d, t in zip(found, truth)]
  out = learning_curve.judge(
      clips, colour=[d.colour == t[1] for d, t in zip(found, truth)], shape=shape_hits,
      direction_path=[detect.direction_of(p) == t[3] for p, t in zip(paths, truth)])
  for shape in synthetic.SHAPES:  # each shape of its own
    out[f'shape_{shape}'] = learning_curve.mean_and_error(
        [h for h, t in zip(shape_hits, truth) if t[2] == shape])
  print('  judged (mean +- standard error over the clips): ' + ', '.join(
      f'{k} {v["mean"]:.2f} +- {v["stderr"]:.2f}' for k, v in out.items()
      if v['mean'] is not None))
  return out


def _print_scores(name, acc, tail=''):
  raw = f' (raw foreground {acc["shape_raw"]:.3f})' if 'shape_raw' in acc else ''
  print(f'{name:>10}: colour {acc["colour"]:.3f}  shape {acc["shape"]:.3f}{raw}  direction '
        f'{acc["direction"]:.3f} (first 2 steps) {acc["direction_path"]:.3f} (whole path)  '
        f'speed {acc["speed"]:.2f} px/frame, {acc["speed_along_prompt"]:+.2f} along the '
        f'prompt, start {acc["start_along_prompt"]:+.1f} px from the centre along it{tail}')


def gives_first_frame(cfg) -> bool:
  """A text model trained with the first frames given (it can do image-to-video)."""
  return (conditional.is_text(cfg) and int(cfg.model.context_frames_max or 0) >= 1
          and cfg.model.given_frames == 'prefix')


def caption_conds(tok, prompts, use_caption=True, first=None, num_frames=None):
  """Condition dicts, one per batch of --batch: the captions `prompts` (the null caption
  where not use_caption) and, with `first` [N, 1, H, W, C], each clip's first frame given
  in a clip of num_frames (N = len(prompts), whole batches)."""
  conds = []
  for b in range(0, len(prompts), FLAGS.batch):
    ids, mask = tok.encode_batch(prompts[b:b + FLAGS.batch])
    cond = {'text': {'tokens': ids, 'mask': mask & use_caption}}
    if first is not None:
      cond['context'], cond['frame_mask'] = cond_lib.given_at(
          first[b:b + FLAGS.batch], (0,), num_frames)
    conds.append(cond)
  return conds


def eval_text(s, params):
  cfg = s.config
  spec = text_lib.spec_from_config(cfg.model.text)
  tok = text_lib.Tokenizer(spec.max_length)
  # Held-out clips of the data, rendered once: the noisiest-step reference and the
  # detector's own scores below.
  source = synthetic.from_data_config(cfg.data, num_examples=max(400, FLAGS.num_prompts),
                                      seed=FLAGS.seed + 1)
  held_out = [source[i] for i in range(len(source))]
  results = {'loss': caption_losses(s, params, tok),
             'noisiest_mean_travel': noisiest_mean_travel(s, params, tok, held_out[:400])}
  grid = whole_batches(prompt_grid(FLAGS.num_prompts))
  for name, use_caption in (('prompted', True), ('no_caption', False)):
    conds = caption_conds(tok, [g[0] for g in grid], use_caption)
    t0 = time.perf_counter()
    clips = np.concatenate(sample_batches(s, params, conds, jax.random.key(FLAGS.seed)))
    found = [detect.detect(c) for c in clips[:FLAGS.num_prompts]]
    truth = grid[:FLAGS.num_prompts]
    acc = _scores(found, truth, clips[:FLAGS.num_prompts])
    acc['sample_s'] = time.perf_counter() - t0
    results[name] = acc
    _print_scores(name, acc, f'  ({len(found)} clips, {acc["sample_s"]:.0f}s)')
    if use_caption:
      prompted = clips
      results['shape_confusion'] = shape_confusion(found, truth)
      results['judged'] = judged(clips[:FLAGS.num_prompts], found, truth)
  if gives_first_frame(cfg):
    # Text to image to video (Emu Video's factorisation): keep the first frame of each
    # prompted sample, then generate the clip again from it and the same prompt.
    t0 = time.perf_counter()
    conds = caption_conds(tok, [g[0] for g in grid], first=prompted[:, :1],
                          num_frames=cfg.data.num_frames)
    clips = np.concatenate(sample_batches(s, params, conds, jax.random.key(FLAGS.seed + 1)))
    acc = _scores([detect.detect(c) for c in clips[:FLAGS.num_prompts]],
                  grid[:FLAGS.num_prompts], clips[:FLAGS.num_prompts])
    acc['sample_s'] = time.perf_counter() - t0
    results['first_frame_then_video'] = acc
    _print_scores('frame+clip', acc, f'  (the first frame of each prompted clip given, '
                  f'{acc["sample_s"]:.0f}s)')
  # The detector on held-out clips of the data itself: what a perfect model would score.
  data_found = [detect.detect(c['video']) for c in held_out]
  clips = held_out[:FLAGS.num_prompts]
  results['data'] = _scores(
      data_found[:FLAGS.num_prompts],
      [(None, list(synthetic.COLOURS)[c['colour']], synthetic.SHAPES[c['shape']],
        synthetic.DIRECTIONS[c['direction']]) for c in clips], [c['video'] for c in clips])
  _print_scores('data', results['data'])
  truth = [(None, None, synthetic.SHAPES[c['shape']], synthetic.DIRECTIONS[c['direction']])
           for c in held_out]
  results['data_box'] = box_sizes([d.box for d in data_found], truth)
  print_box_sizes(f'data ({len(held_out)} clips)', results['data_box'])
  results['chance'] = {'colour': 1 / len(synthetic.COLOURS), 'shape': 1 / len(synthetic.SHAPES),
                       'direction': 1 / len(synthetic.DIRECTIONS)}
  print(f'{"chance":>10}: colour {1 / 7:.3f}  shape {1 / 3:.3f}  direction {1 / 4:.3f}')
  return results


def _relation(true, prompted) -> str:
  if prompted == true:
    return 'own'
  return 'reversed' if prompted == synthetic.opposite_direction(true) else 'perpendicular'


def feasible_directions(frame, num_frames):
  """The directions a shape in `frame` [H, W, 3] could move in for num_frames - 1 frames at
  the data's slowest speed (1 px per frame at 32 px) without its bounding box reaching the
  frame border: with data.bounce=False a clip only goes where its whole path fits."""
  mask = detect.foreground(frame[None])[0]  # [H, W]
  h, w = mask.shape
  rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
  if not len(rows):
    return set()
  room = {'right': w - 1 - cols[-1], 'left': cols[0], 'down': h - 1 - rows[-1], 'up': rows[0]}
  need = (num_frames - 1) * min(h, w) / 32.0
  return {d for d in synthetic.DIRECTIONS if room[d] >= need}


# Prompted directions against the clip's own: 'own'; another direction whose path fits
# from the first frame ('perpendicular', 'reversed', both: 'feasible_other'); one whose
# path would cross the border ('infeasible'; the data never does that).
RELATIONS = ('own', 'perpendicular', 'reversed', 'feasible_other', 'infeasible')


def _in_group(group, relation, feasible) -> bool:
  """Whether a prompt of `relation` to its clip's direction, `feasible` or not, is in a
  group of RELATIONS."""
  if group == 'infeasible':
    return not feasible
  if group == 'feasible_other':
    return feasible and relation != 'own'
  return feasible and relation == group


def eval_image_to_video(s, params):
  """Image-to-video with a prompt: each held-out clip's first frame is given, prompted with
  its colour and shape and each of the four directions in turn."""
  cfg = s.config
  if not gives_first_frame(cfg):
    raise ValueError(
        "--task=image_to_video needs a text model trained with the first frames given "
        "(model.conditioning='text', model.context_frames_max >= 1, model.given_frames="
        f"'prefix'); this config has conditioning={cfg.model.conditioning!r}, "
        f"context_frames_max={cfg.model.context_frames_max!r}, "
        f"given_frames={cfg.model.given_frames!r}.")
  tok = text_lib.Tokenizer(text_lib.spec_from_config(cfg.model.text).max_length)
  results = {'loss': caption_losses(s, params, tok, given=1)}
  n = FLAGS.num_clips
  source = synthetic.from_data_config(cfg.data, num_examples=n, seed=FLAGS.seed + 2,
                                      captions=True)
  clips = [source[i] for i in range(n)]
  T = cfg.data.num_frames
  # (prompt, colour, shape, direction, clip, relation to the clip's direction, feasible)
  rows = []
  for i, c in enumerate(clips):
    colour, shape = list(synthetic.COLOURS)[c['colour']], synthetic.SHAPES[c['shape']]
    true = synthetic.DIRECTIONS[c['direction']]
    feasible = feasible_directions(c['video'][0], T) | {true}
    for d in synthetic.DIRECTIONS:
      rows.append((synthetic.caption(shape, colour, d), colour, shape, d, i,
                   _relation(true, d), d in feasible))
  first = np.stack([c['video'][:1] for c in clips]).astype(np.float32) / 127.5 - 1.0
  for name, use_caption, chosen in (
      ('prompted', True, rows),
      ('no_caption', False, [r for r in rows if r[5] == 'own'])):
    padded = whole_batches(chosen)
    t0 = time.perf_counter()
    conds = caption_conds(tok, [r[0] for r in padded], use_caption,
                          first=first[[r[4] for r in padded]], num_frames=T)
    samples = np.concatenate(sample_batches(s, params, conds, jax.random.key(FLAGS.seed)))
    found = [detect.detect(c) for c in samples[:len(chosen)]]
    acc = _scores(found, chosen)
    # The generated frames alone (the first is the given one): does the model keep the
    # shape it is shown? Rendering, apart from reading the shape word.
    acc['shape_generated'] = float(np.mean([detect.detect(c[1:]).shape == r[2]
                                            for c, r in zip(samples, chosen)]))
    for rel in RELATIONS if use_caption else ():
      pick = [j for j, r in enumerate(chosen) if _in_group(rel, r[5], r[6])]
      acc[f'count_{rel}'] = len(pick)
      if not pick:
        acc[f'direction_path_{rel}'] = acc[f'speed_along_prompt_{rel}'] = float('nan')
        continue
      sub = _scores([found[j] for j in pick], [chosen[j] for j in pick])
      acc[f'direction_path_{rel}'] = sub['direction_path']
      acc[f'speed_along_prompt_{rel}'] = sub['speed_along_prompt']
    acc['sample_s'] = time.perf_counter() - t0
    results[name] = acc
    _print_scores(name, acc, f'  ({len(found)} clips, {acc["sample_s"]:.0f}s)')
    print(f'  shape of the generated frames 1.. (the given frame shows it): '
          f'{acc["shape_generated"]:.3f}')
    if use_caption:
      print('  direction (whole path) by the prompted direction against the clip\'s own '
            '(feasible: the path fits from the first frame):')
      for rel in RELATIONS:
        print(f'    {rel:>16}: {acc[f"direction_path_{rel}"]:.3f} of {acc[f"count_{rel}"]:3d}, '
              f'{acc[f"speed_along_prompt_{rel}"]:+.2f} px/frame along the prompt')
  print(f'{"chance":>10}: direction {1 / 4:.3f} (the no-caption row is scored against each '
        "clip's own direction: what the first frame alone implies)")
  return results


def displacement(centroids):
  return np.diff(centroids, axis=0)  # [T-1, 2] px/frame


def given_frame_losses(s, params, clips, k):
  """Denoising loss on the frames after the first k of held-out clips [N, T, H, W, 3]
  (float), with those k frames given clean vs none given, at the same (t, noise) draws:
  lower with given frames = the model reads them."""
  n = clips.shape[0]
  t_rng, noise_rng = jax.random.split(jax.random.key(FLAGS.seed))
  t = s.diffusion.sample_t(t_rng, n)
  noise = jax.random.normal(noise_rng, clips.shape)
  free = cond_lib.frame_mask(jnp.full((n,), k), clips.shape[1])  # scored: not in here

  @jax.jit
  def loss(video, t, noise, mask, free):
    def apply_fn(z, tm, frame_mask=None):
      return s.model.apply({'params': params}, z, tm, None, frame_mask=frame_mask)
    z = cond_lib.impose(s.diffusion.model_input(s.diffusion.corrupt(video, noise, t), t),
                        video, mask)
    pred = apply_fn(z, s.diffusion.model_t(t), frame_mask=mask)
    return cond_lib.masked_mse(s.diffusion.output_target(video, noise, t), pred, free)

  out = {}
  for name, mask in (('given', free), ('none_given', jnp.zeros_like(free))):
    out[name] = float(loss(clips, t, noise, mask, free))
  print(f'denoising loss on frames {k}.. of {n} held-out clips: {k} frames given '
        f'{out["given"]:.4f}, none given {out["none_given"]:.4f}')
  return out


def eval_extend(s, params):
  cfg = s.config
  k = int(cfg.sample.overlap or cfg.model.context_frames_max)
  total = FLAGS.total_frames
  source = synthetic.from_data_config(cfg.data, num_frames=total,
                                      num_examples=FLAGS.num_clips, seed=FLAGS.seed)
  truth = np.stack([source[i]['video'] for i in range(FLAGS.num_clips)])  # [N, F, H, W, 3]
  colours = [list(synthetic.COLOURS)[source[i]['colour']] for i in range(FLAGS.num_clips)]
  given = truth[:, :k].astype(np.float32) / 127.5 - 1.0
  losses = given_frame_losses(
      s, params, truth[:, :cfg.data.num_frames].astype(np.float32) / 127.5 - 1.0, k)
  t0 = time.perf_counter()
  clips = []
  for b in range(0, FLAGS.num_clips, FLAGS.batch):
    clip, _ = conditional.extend_clip(s.model, s.diffusion, cfg, params, given[b:b + FLAGS.batch],
                                   total, rng=jax.random.key(FLAGS.seed + b),
                                   num_classes=s.num_classes)
    clips.append(clip)
  clips = np.concatenate(clips)
  seconds = time.perf_counter() - t0
  errors = {'model': [], 'constant_velocity': [], 'no_motion': []}
  seam = []
  same_colour = []
  for gen, true, colour in zip(clips, truth, colours):
    d_gen, d_true = detect.detect(gen), detect.detect(true)
    true_steps = displacement(d_true.centroids)[k - 1:]  # steps into generated frames
    gen_steps = displacement(d_gen.centroids)[k - 1:]
    given_v = np.nanmean(displacement(d_true.centroids[:k]), axis=0) if k > 1 else np.zeros(2)
    ok = np.isfinite(gen_steps).all(axis=1)
    errors['model'].append(np.abs(gen_steps - true_steps)[ok].mean())
    errors['constant_velocity'].append(np.abs(given_v[None] - true_steps).mean())
    errors['no_motion'].append(np.abs(true_steps).mean())
    seam.append(np.abs(gen_steps[0] - true_steps[0]).mean() if ok[0] else np.nan)
    gen_part = detect.detect(gen[k:])
    same_colour.append(gen_part.colour == colour)
  out = {name: float(np.nanmean(v)) for name, v in errors.items()}
  for name, v in errors.items():  # over the clips: the goal is scored with its error
    out[name + '_stderr'] = learning_curve.mean_and_error(v)['stderr']
  out['loss'] = losses
  out['model_first_step_after_seam'] = float(np.nanmean(seam))
  out['colour_kept'] = float(np.mean(same_colour))
  out['given_frames'] = k
  out['total_frames'] = total
  out['extend_s'] = seconds
  print(f'velocity error, px/frame per axis (mean |generated - true| over the generated '
        f'frames, {FLAGS.num_clips} clips, {k} given, extended to {total}):')
  for name in ('model', 'constant_velocity', 'no_motion'):
    print(f'  {name:>18}: {out[name]:.3f} +- {out[name + "_stderr"]:.3f}')
  print(f'  first step after the seam (model): {out["model_first_step_after_seam"]:.3f}')
  print(f'  generated frames keep the given colour: {out["colour_kept"]:.3f} ({seconds:.0f}s)')
  return out


def main(argv):
  del argv
  config = resolve.complete(FLAGS.config)  # every default from config/defaults.py
  config.sample.num_steps = FLAGS.num_steps
  config.sample.num_samples = FLAGS.batch
  s = loop.build(config, FLAGS.workdir)
  try:
    # The params --mode=sample would use (newest checkpoint's EMA, else the newest export).
    params, step, _ = modes.params_to_sample(
        s, FLAGS.workdir, None)
  finally:
    s.checkpointer.close()
  print(f'{FLAGS.task}: step {step} of {FLAGS.workdir}, {FLAGS.num_steps} '
        f'{config.sample.sampler} steps, cfg {config.sample.cfg_scale} '
        '(shared, contended CPU: times are indicative only)')
  result = {'text': eval_text, 'extend': eval_extend,
            'image_to_video': eval_image_to_video}[FLAGS.task](s, params)
  print(json.dumps({'task': FLAGS.task, 'step': step, **result}))


if __name__ == '__main__':
  app.run(main)
