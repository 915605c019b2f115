r"""Showed: tiny_text's model reads the shape word, but knows 'square' only as "not a triangle".

Figures: docs/history/text-and-extension.md, "Where the square is lost" (2026-12-03).
It steps a discrete chain, so it needs a model of objective eps or v: configs/tiny_text.py
was v then and is flow now (train with --config.diffusion.objective=v
--config.diffusion.t_sampling=uniform --config.diffusion.shift=1 --config.sample.sampler=ddim).

Does a text model draw the shape its caption names? Two probes on held-out clips.

python experiments/shape_word.py --config=configs/tiny_text.py --workdir=runs/tiny_text \
    [--num_clips=24] [--t_starts=400,600,800,999] [--scales=1,10]

For a model trained on the built-in synthetic shapes with captions (model.conditioning=
'text', the built-in encoder). Held-out clips (synthetic source seed 777, not the training
source's data.source_seed) of each shape, with their own captions:

1. Word swap: the held-out loss at several t with the caption as it is and with its shape
   word replaced by each other shape word (the rest of the caption kept). Where the model
   uses the word, the clip's own word gives the lowest loss; where the three rows agree,
   the word does not reach the prediction at that t.
2. Re-denoising: each clip noised to t_start and taken back to t = 0 by DDIM (eta 0) over
   the steps of the config's sample.num_steps chain that lie below t_start (the sampler's
   respacing, x0 clipped), guided at each of --scales, with its own caption and with the
   shape word swapped; the vdit_jax/eval/detect.py reading of the results (shape counts, median
   fill and object box). t_start = 999 starts from pure noise: plain text-to-video.
   Clips that come back as their own shape whatever the word say the noisy input already
   fixes the shape at that t; clips that follow the word say the model uses it there.

A diagnostic, not a timing: it never fails on a number. The last line is a JSON summary.
"""

import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vdit_jax import modes

from vdit_jax.data import synthetic
from vdit_jax.diffusion import conditioning as cond_lib
from vdit_jax.diffusion import samplers
from vdit_jax.model import text as text_lib
from vdit_jax.eval import detect
from vdit_jax.train import loop

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'configs/*.py file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Workdir holding checkpoints/ (or export/).')
flags.DEFINE_integer('num_clips', 24, 'Held-out clips per shape.')
flags.DEFINE_list('loss_ts', ['100', '300', '500', '600', '700', '800', '900', '999'],
                  'Timesteps of the word-swap loss.')
flags.DEFINE_integer('loss_draws', 3, 'Noise draws per timestep of the word-swap loss.')
flags.DEFINE_list('t_starts', ['400', '600', '800', '999'], 'Re-denoising start timesteps.')
flags.DEFINE_list('scales', ['1', '10'], 'Guidance scales of the re-denoising.')
flags.DEFINE_list('shapes', list(synthetic.SHAPES), 'Shapes whose clips are probed.')

HELD_OUT_SEED = 777


def _check(config):
  if config.model.conditioning != 'text' or text_lib.spec_from_config(
      config.model.text).encoder != 'builtin':
    raise ValueError('experiments/shape_word.py needs a model with model.conditioning=\'text\' and '
                     f"model.text.encoder='builtin', got conditioning="
                     f'{config.model.conditioning!r}.')
  if config.diffusion.objective not in ('eps', 'v'):
    raise ValueError(f'experiments/shape_word.py steps a discrete DDIM chain: it needs '
                     f"diffusion.objective 'eps' or 'v', got {config.diffusion.objective!r} "
                     '(configs/tiny_text.py was v when it ran, flow since).')
  if config.data.source != 'synthetic':
    raise ValueError(f'experiments/shape_word.py needs data.source=\'synthetic\', got '
                     f'{config.data.source!r}.')
  for name in FLAGS.shapes:
    if name not in synthetic.SHAPES:
      raise ValueError(f'--shapes: {name!r} is not one of {synthetic.SHAPES}.')
  num_timesteps = int(config.diffusion.num_timesteps)
  for flag, values in (('loss_ts', FLAGS.loss_ts), ('t_starts', FLAGS.t_starts)):
    for v in values:
      if not v.strip().isdigit() or not 0 <= int(v) < num_timesteps:
        raise ValueError(f'--{flag}: {v!r} must be an integer timestep in [0, '
                         f'{num_timesteps}).')
  if FLAGS.num_clips < 1:
    raise ValueError(f'--num_clips={FLAGS.num_clips} must be at least 1.')


def held_out_clips(config, shape: str, n: int):
  """(x0 float32 [n, T, H, W, C] in [-1, 1], captions) of the first n held-out clips of
  `shape`."""
  want = synthetic.SHAPES.index(shape)
  src = synthetic.from_data_config(config.data, num_examples=200 * n, seed=HELD_OUT_SEED,
                                   captions=True)
  clips, captions = [], []
  for i in range(len(src)):
    ex = src[i]
    if int(ex['shape']) == want:
      clips.append(ex['video'])
      captions.append(ex['caption'])
      if len(clips) == n:
        break
  x0 = np.stack(clips).astype(np.float32) / 127.5 - 1.0
  return jnp.asarray(x0), captions


def swap_word(captions, shape: str, say: str):
  return [c.replace(f' {shape} ', f' {say} ') for c in captions]


def reading(clips) -> dict:
  dets = [detect.detect(np.asarray(c)) for c in clips]
  shapes = [d.shape for d in dets]
  found = [d for d in dets if d.shape in synthetic.SHAPES]  # 'unknown': no object found
  return {'read': {k: shapes.count(k) for k in (*synthetic.SHAPES, 'unknown')},
          'fill': round(float(np.median([d.fill for d in found])), 3) if found else None,
          'box': [round(float(v), 1) for v in np.median(np.array([d.box for d in found]),
                                                         axis=0)] if found else None}


def main(argv):
  del argv
  config = FLAGS.config
  _check(config)
  s = loop.build(config, FLAGS.workdir)
  params, step, _ = modes.params_to_sample(s, FLAGS.workdir, None)
  s.checkpointer.close()
  d = s.diffusion
  tokenizer = text_lib.Tokenizer(text_lib.spec_from_config(config.model.text).max_length)

  def encode(captions):
    ids, mask = tokenizer.encode_batch(captions)
    return {'text': {'tokens': jnp.asarray(ids), 'mask': jnp.asarray(mask)}}

  def apply_fn(z, t_model, label=None, text=None, frame_mask=None):
    return s.model.apply({'params': params}, z, t_model, label, text=text,
                         frame_mask=frame_mask)

  model_fn = cond_lib.model_fn_with_context(apply_fn)

  @jax.jit
  def loss_at(x0, cond, t, noise):
    def pred_fn(z, t_model):
      return model_fn(z, t_model, cond)
    return d.loss_at(pred_fn, x0, jnp.full((x0.shape[0],), t, jnp.int32), noise)

  ts, c_x0, c_eps, _ = samplers._discrete_step_tables(d, 'ddim', config.sample.num_steps, 0.0)
  ts = np.asarray(ts)

  @functools.partial(jax.jit, static_argnames='scale')
  def ddim_step(z, cond, t, c_x0_i, c_eps_i, scale):
    t_vec = jnp.full((z.shape[0],), t, jnp.int32)
    pred = samplers.guided_prediction(  # scale 1: the conditional prediction alone
        model_fn, d.model_input(z, t_vec), d.model_t(t_vec), cond, cfg_scale=scale,
        null_label=cond_lib.null_condition)
    x0_hat, _ = d.pred_to_x0_eps(z, pred, t_vec)
    x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
    return c_x0_i * x0_hat + c_eps_i * d.eps_from_x0(z, x0_hat, t_vec)

  def redenoise(x0, cond, t_start, scale):
    noise = jax.random.normal(jax.random.key(t_start), x0.shape, jnp.float32)
    z = d.corrupt(x0, noise, jnp.full((x0.shape[0],), t_start, jnp.int32))
    below = [i for i in range(len(ts)) if ts[i] <= t_start]
    for j, i in enumerate(below):  # the first step is taken at t_start itself
      t = t_start if j == 0 else int(ts[i])
      z = ddim_step(z, cond, t, c_x0[i], c_eps[i], scale)
    return z

  summary = {'step': int(step), 'word_swap_loss': {}, 'redenoise': {}}
  loss_ts = [int(v) for v in FLAGS.loss_ts]
  for shape in FLAGS.shapes:
    x0, captions = held_out_clips(config, shape, FLAGS.num_clips)
    print(f'step {step}: {len(captions)} held-out {shape} clips; data read as '
          f'{reading(x0)}', flush=True)
    rows = {}
    for say in synthetic.SHAPES:
      cond = encode(swap_word(captions, shape, say))
      rows[say] = [float(np.mean([
          loss_at(x0, cond, t, jax.random.normal(jax.random.key(1000 * r + t), x0.shape))
          for r in range(FLAGS.loss_draws)])) for t in loss_ts]
    print(f'  word-swap loss at t = {loss_ts}')
    for say, row in rows.items():
      own = ' (own)' if say == shape else ''
      print(f'    said {say:9s}' + ' '.join(f'{v:.4f}' for v in row) + own)
    summary['word_swap_loss'][shape] = {'t': loss_ts, **{k: [round(v, 5) for v in row]
                                                         for k, row in rows.items()}}
    out = {}
    for scale in (float(v) for v in FLAGS.scales):
      for t_start in (int(v) for v in FLAGS.t_starts):
        for say in synthetic.SHAPES:
          result = reading(redenoise(x0, encode(swap_word(captions, shape, say)), t_start,
                                     scale))
          out[f'g{scale:g}_t{t_start}_{say}'] = result
          print(f'  re-denoised from t={t_start}, guidance {scale:g}, said {say:9s}: '
                f'{result}', flush=True)
    summary['redenoise'][shape] = out
  print(json.dumps(summary))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
