r"""Does a trained model follow its prompt / continue the given motion? Measured with the
detector of tools/detect.py on generated clips.

python bench/generation_eval.py --task=text --config=configs/tiny_text.py \
    --workdir=runs/tiny_text [--num_prompts=84 --num_steps=25]
python bench/generation_eval.py --task=extend --config=configs/tiny_extend.py \
    --workdir=runs/tiny_extend [--num_clips=24 --total_frames=28]

text: samples one clip per prompt 'a {colour} {shape} moving {direction}' (the prompts
cycle through all colours x shapes x directions), detects each clip's colour, shape and
direction and prints the accuracies against the prompt, next to chance (1/7, 1/3, 1/4),
to the same model sampled with no caption (the null caption) in the same run, and to the
detector's own scores on held-out clips of the data. Direction is read two ways: from the
first two frame steps (right for clips that bounce) and from the whole path, first frame
to last (what clips with data.bounce=False show), with the path's speed in px/frame and
its signed part along the prompted direction.
First, the denoising loss of held-out clips with their own caption, none, another clip's
caption, and their own caption with the direction word reversed (same t and noise):
whether the model reads the text at all, and its direction word in particular. Then, per
direction, the mean of the model's x0 estimate at the noisiest step (pure noise in, one
draw per prompt of that direction) against the mean of held-out clips of that direction:
how far the mean's centroid travels along the direction from the first frame to the last.
The data's mean travels (a clip's layout is picked at the noisiest steps, so a model
that follows the word must shift its mean there); a model that ignores the word gives ~0.

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
import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vdit_jax.data import synthetic  # pylint: disable=g-import-not-at-top
from vdit_jax.diffusion import conditioning as cond_lib
from vdit_jax.model import text as text_lib
from vdit_jax.tools import detect
from vdit_jax.train import generate
from vdit_jax.train import loop

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'The config the model was trained with.')
flags.DEFINE_string('workdir', None, 'Workdir holding the trained checkpoints.')
flags.DEFINE_enum('task', 'text', ['text', 'extend'], 'What to measure.')
flags.DEFINE_integer('num_prompts', 84, 'text: prompts (= clips) to sample.')
flags.DEFINE_integer('num_clips', 24, 'extend: clips to extend.')
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


def sample_batches(s, params, conds, rng):
  cfg = s.config
  fn = jax.jit(generate.make_sample_fn(s.model, s.diffusion, cfg, s.num_classes,
                                       generate.sample_shape(cfg, FLAGS.batch)))
  return [np.asarray(fn(params, jax.random.fold_in(rng, i), c)) for i, c in enumerate(conds)]


def caption_losses(s, params, tok):
  """Denoising loss on held-out clips with their own caption, no caption, another clip's
  caption, and their own with the direction reversed, at the same (t, noise) draws: lower
  with the right caption = the model reads the text, whether or not its samples are clean
  yet."""
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

  @jax.jit
  def per_clip(video, t, noise, text):
    z = s.diffusion.model_input(s.diffusion.corrupt(video, noise, t), t)
    pred = s.model.apply({'params': params}, z, s.diffusion.model_t(t), None, text=text)
    return jnp.mean(jnp.square(pred - s.diffusion.target(video, noise, t)), axis=(1, 2, 3, 4))

  out = {}
  for name, texts in (('own_caption', captions), ('no_caption', None),
                      ('other_caption', shuffled), ('direction_reversed', reversed_direction)):
    losses = []
    for b in range(0, n, FLAGS.batch):
      sl = slice(b, b + FLAGS.batch)
      if texts is None:
        text = text_lib.null_text(text_lib.resolve_spec(cfg.model.text), FLAGS.batch)
      else:
        ids, mask = tok.encode_batch(texts[sl])
        text = {'tokens': ids, 'mask': mask}
      losses.append(per_clip(video[sl], t[sl], noise[sl], text))
    out[name] = float(np.mean(np.concatenate(losses)))
  print(f'denoising loss on {n} held-out clips: own caption {out["own_caption"]:.4f}, '
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


def _scores(found, truth):
  """Accuracies of detections against (prompt, colour, shape, direction) tuples. `direction`
  reads the first two frame steps (the detector's default, right for clips that bounce);
  `direction_path` the whole path, first found frame to last (what a clip that does not
  bounce shows); `speed` and `speed_along_prompt` (signed) are of that path, px/frame."""
  acc = {key: float(np.mean([getattr(d, key) == t[i + 1] for d, t in zip(found, truth)]))
         for i, key in enumerate(('colour', 'shape', 'direction'))}
  paths = [detect.velocity_of(d.centroids, d.found, lead=len(d.found) - 1) for d in found]
  acc['direction_path'] = float(np.mean(
      [detect.direction_of(v) == t[3] for v, t in zip(paths, truth)]))
  acc['speed'] = float(np.nanmean([np.hypot(*v) for v in paths]))
  acc['speed_along_prompt'] = float(np.nanmean(
      [np.asarray(v) @ synthetic.direction_step(t[3]) for v, t in zip(paths, truth)]))
  return acc


def _print_scores(name, acc, tail=''):
  print(f'{name:>10}: colour {acc["colour"]:.3f}  shape {acc["shape"]:.3f}  direction '
        f'{acc["direction"]:.3f} (first 2 steps) {acc["direction_path"]:.3f} (whole path)  '
        f'speed {acc["speed"]:.2f} px/frame, {acc["speed_along_prompt"]:+.2f} along the '
        f'prompt{tail}')


def eval_text(s, params):
  cfg = s.config
  spec = text_lib.resolve_spec(cfg.model.text)
  tok = text_lib.Tokenizer(spec.max_length)
  # Held-out clips of the data, rendered once: the noisiest-step reference and the
  # detector's own scores below.
  source = synthetic.from_data_config(cfg.data, num_examples=max(400, FLAGS.num_prompts),
                                      seed=FLAGS.seed + 1)
  held_out = [source[i] for i in range(len(source))]
  results = {'loss': caption_losses(s, params, tok),
             'noisiest_mean_travel': noisiest_mean_travel(s, params, tok, held_out[:400])}
  grid = prompt_grid(FLAGS.num_prompts)
  grid += grid[:(-len(grid)) % FLAGS.batch]  # whole batches
  for name, use_caption in (('prompted', True), ('no_caption', False)):
    conds = []
    for b in range(0, len(grid), FLAGS.batch):
      ids, mask = tok.encode_batch([g[0] for g in grid[b:b + FLAGS.batch]])
      conds.append({'text': {'tokens': ids, 'mask': mask & use_caption}})
    t0 = time.perf_counter()
    clips = np.concatenate(sample_batches(s, params, conds, jax.random.key(FLAGS.seed)))
    found = [detect.detect(c) for c in clips[:FLAGS.num_prompts]]
    truth = grid[:FLAGS.num_prompts]
    acc = _scores(found, truth)
    acc['sample_s'] = time.perf_counter() - t0
    results[name] = acc
    _print_scores(name, acc, f'  ({len(found)} clips, {acc["sample_s"]:.0f}s)')
  # The detector on held-out clips of the data itself: what a perfect model would score.
  clips = held_out[:FLAGS.num_prompts]
  results['data'] = _scores(
      [detect.detect(c['video']) for c in clips],
      [(None, list(synthetic.COLOURS)[c['colour']], synthetic.SHAPES[c['shape']],
        synthetic.DIRECTIONS[c['direction']]) for c in clips])
  _print_scores('data', results['data'])
  results['chance'] = {'colour': 1 / len(synthetic.COLOURS), 'shape': 1 / len(synthetic.SHAPES),
                       'direction': 1 / len(synthetic.DIRECTIONS)}
  print(f'{"chance":>10}: colour {1 / 7:.3f}  shape {1 / 3:.3f}  direction {1 / 4:.3f}')
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
    return cond_lib.masked_mse(s.diffusion.target(video, noise, t), pred, free)

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
    clip, _ = generate.extend_clip(s.model, s.diffusion, cfg, params, given[b:b + FLAGS.batch],
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
  out['loss'] = losses
  out['model_first_step_after_seam'] = float(np.nanmean(seam))
  out['colour_kept'] = float(np.mean(same_colour))
  out['given_frames'] = k
  out['total_frames'] = total
  out['extend_s'] = seconds
  print(f'velocity error, px/frame per axis (mean |generated - true| over the generated '
        f'frames, {FLAGS.num_clips} clips, {k} given, extended to {total}):')
  for name in ('model', 'constant_velocity', 'no_motion'):
    print(f'  {name:>18}: {out[name]:.3f}')
  print(f'  first step after the seam (model): {out["model_first_step_after_seam"]:.3f}')
  print(f'  generated frames keep the given colour: {out["colour_kept"]:.3f} ({seconds:.0f}s)')
  return out


def main(argv):
  del argv
  config = FLAGS.config
  config.sample.num_steps = FLAGS.num_steps
  config.sample.num_samples = FLAGS.batch
  s = loop.build(config, FLAGS.workdir)
  try:
    # The params --mode=sample would use (newest checkpoint's EMA, else the newest export).
    params, step, _ = loop._params_to_sample(  # pylint: disable=protected-access
        s, FLAGS.workdir, None)
  finally:
    s.checkpointer.close()
  print(f'{FLAGS.task}: step {step} of {FLAGS.workdir}, {FLAGS.num_steps} '
        f'{config.sample.sampler} steps, cfg {config.sample.cfg_scale} '
        '(shared, contended CPU: times are indicative only)')
  result = eval_text(s, params) if FLAGS.task == 'text' else eval_extend(s, params)
  print(json.dumps({'task': FLAGS.task, 'step': step, **result}))


if __name__ == '__main__':
  app.run(main)
