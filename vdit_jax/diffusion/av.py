"""Audio and video diffused together: a timestep per stream, tasks, and modality guidance.

Training (`draw`, `loss`): each clip draws a task. joint: both streams noisy at one t (what
joint sampling walks); video->audio: the video clean (t = 0) and the audio noisy;
audio->video: the reverse; the rest of the clips draw a t per stream independently. A clip's
streams are hidden from each other with probability `modality_dropout` (the model's
`couple`), so the model also learns each stream on its own: the uncoupled pass of the
modality guidance. The loss is the objective's (weighted) error of each noisy stream, a
clean stream adding nothing, video + audio_weight * audio.

Sampling (`sample`): flow Euler over both streams from t = 1 to 0, a given stream held clean
at t = 0 (video->audio: the audio for a given clip; audio->video: the reverse). Guidance per
stream s, as LTX-2's modality CFG:
    pred_s = cond_s + (g_s - 1) (cond_s - null_s) + (m_s - 1) (cond_s - alone_s)
with cond the prediction for the clip's label with the streams coupled, null for the null
label, alone with the streams uncoupled; g_s is the stream's label guidance and m_s its
guidance toward the other stream (1: off). Only the flow objective is sampled here
(validate.py).
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from vdit_jax.diffusion import objectives
from vdit_jax.diffusion import samplers

TASKS = ('joint', 'v2a', 'a2v')  # audio.task: what a sample generates


def check_task_probs(task_probs) -> tuple:
  """(joint, video->audio, audio->video) probabilities, each >= 0, summing to <= 1."""
  try:
    probs = tuple(float(p) for p in task_probs)
  except (TypeError, ValueError):
    probs = ()
  if len(probs) != 3 or min(probs, default=-1) < 0 or sum(probs) > 1 + 1e-9:
    raise ValueError(f'audio.task_probs={task_probs!r} must be three probabilities >= 0 '
                     '(joint, video->audio, audio->video) summing to at most 1; the rest of '
                     'the clips draw a t per stream.')
  return probs


def draw(diffusion: objectives.Diffusion, rng, video, audio, task_probs,
         modality_dropout: float) -> dict:
  """The draws of one training batch: t, t_audio [B] (0 for a clean stream), noise like
  video and audio, and couple [B] float (0: the streams hidden from each other)."""
  b = video.shape[0]
  t_rng, ta_rng, n_rng, na_rng, task_rng, drop_rng = jax.random.split(rng, 6)
  t1, t2 = diffusion.sample_t(t_rng, b), diffusion.sample_t(ta_rng, b)  # [B] each
  joint, v2a, a2v = check_task_probs(task_probs)
  u = jax.random.uniform(task_rng, (b,))  # [B]
  is_joint = u < joint
  is_v2a = (u >= joint) & (u < joint + v2a)
  is_a2v = (u >= joint + v2a) & (u < joint + v2a + a2v)
  zero = jnp.zeros_like(t1)
  t = jnp.where(is_v2a, zero, t1)
  t_audio = jnp.where(is_joint, t1, jnp.where(is_a2v, zero, t2))
  couple = 1.0 - jax.random.bernoulli(drop_rng, modality_dropout, (b,)).astype(jnp.float32)
  return {'t': t, 't_audio': t_audio, 'couple': couple,
          'noise': jax.random.normal(n_rng, video.shape, video.dtype),
          'noise_audio': jax.random.normal(na_rng, audio.shape, audio.dtype)}


def _per_clip_mse(target, pred):
  """[B, ...] pair -> [B] mean squared error per clip (float32)."""
  err = jnp.square(target.astype(jnp.float32) - pred.astype(jnp.float32))
  return jnp.mean(err.reshape(err.shape[0], -1), axis=1)


def _masked_mean(per_clip, mask, log_variance=None):
  """Mean over the clips where mask [B] holds; with log_variance u [B] each clip's loss
  is L / e^u + u (EDM2's uncertainty weighting, model.loss_uncertainty)."""
  if log_variance is not None:
    u = log_variance.astype(jnp.float32)
    per_clip = per_clip * jnp.exp(-u) + u
  mask = mask.astype(jnp.float32)
  return jnp.sum(per_clip * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def loss(diffusion: objectives.Diffusion, pred_fn: Callable, inputs: dict,
         audio_weight: float, log_variances: Optional[Callable] = None):
  """(total, video loss, audio loss) for one batch's draws.

  pred_fn(z_video, t_model, z_audio, t_audio_model, couple) -> (video pred, audio pred);
  inputs: 'video' [B, T, H, W, C], 'audio' [B, F, M] and `draw`'s keys. log_variances
  (optional): () -> (u_video [B], u_audio [B]) read after pred_fn ran.
  """
  video, audio, t, t_a = inputs['video'], inputs['audio'], inputs['t'], inputs['t_audio']
  z_v = diffusion.corrupt(video, inputs['noise'], t)
  z_a = diffusion.corrupt(audio, inputs['noise_audio'], t_a)
  pred_v, pred_a = pred_fn(diffusion.model_input(z_v, t), diffusion.model_t(t),
                           diffusion.model_input(z_a, t_a), diffusion.model_t(t_a),
                           inputs['couple'])
  per_v = _per_clip_mse(*diffusion.weigh(diffusion.output_target(video, inputs['noise'], t),
                                         pred_v, t))
  per_a = _per_clip_mse(*diffusion.weigh(
      diffusion.output_target(audio, inputs['noise_audio'], t_a), pred_a, t_a))
  u_v = u_a = None
  if log_variances is not None:
    u_v, u_a = log_variances()
  loss_v = _masked_mean(per_v, t > 0, u_v)  # a clean stream is given, not learnt
  loss_a = _masked_mean(per_a, t_a > 0, u_a)
  return loss_v + audio_weight * loss_a, loss_v, loss_a


def guide(cond, null, alone, label_scale: float, modality_scale: float):
  """cond + (g - 1)(cond - null) + (m - 1)(cond - alone); a term with scale 1 is left out
  (its prediction may then be None)."""
  out = cond
  if label_scale != 1.0:
    out = out + (label_scale - 1.0) * (cond - null)
  if modality_scale != 1.0:
    out = out + (modality_scale - 1.0) * (cond - alone)
  return out


def _null(cond, null_label):
  """The unconditional version of a condition dict: the caption cleared (mask all False)
  or the null label (classifier-free guidance)."""
  out = dict(cond)
  if 'text' in cond:
    out['text'] = {**cond['text'], 'mask': jnp.zeros_like(cond['text']['mask'])}
  elif 'label' in cond:
    if null_label is None:
      raise ValueError('label guidance (sample.cfg_scale, audio.cfg_scale != 1) needs a '
                       'class-conditional model (the null label).')
    out['label'] = jnp.full_like(cond['label'], null_label)
  return out


def sample(diffusion: objectives.Diffusion, model_fn: Callable, rng, video_shape, audio_shape,
           cond, *, num_steps: int, task: str = 'joint', video=None, audio=None,
           cfg_video: float = 1.0, cfg_audio: float = 1.0, modality_video: float = 1.0,
           modality_audio: float = 1.0, null_label: Optional[int] = None):
  """Flow Euler over both streams; returns (video [B, T, H, W, C], audio [B, F, M]).

  model_fn(z_video, t_model, z_audio, t_audio_model, cond, couple) -> (video pred,
  audio pred), couple a Python bool; cond a dict of [B, ...] conditions ('label' int32
  [B] and / or 'text' {'tokens' | 'embed', 'mask'}), or labels int32 [B] alone. task
  'joint' generates both from noise; 'v2a' takes `video` (clean) and generates the audio;
  'a2v' takes `audio` and generates the video. Label / caption guidance compares with the
  null label or the cleared caption.
  """
  if task not in TASKS:
    raise ValueError(f'audio.task={task!r} is not one of {TASKS}.')
  if not diffusion.is_flow:
    raise ValueError(f'audio-video sampling walks the flow objective, not '
                     f'{diffusion.objective!r}: set diffusion.objective=\'flow\'.')
  for name, given, shape, needed in (('video', video, video_shape, task == 'v2a'),
                                     ('audio', audio, audio_shape, task == 'a2v')):
    if needed and (given is None or tuple(given.shape) != tuple(shape)):
      raise ValueError(f'audio.task={task!r} needs the clean {name} of shape {tuple(shape)}, '
                       f'got {None if given is None else tuple(given.shape)}.')
  if not isinstance(cond, dict):
    cond = {'label': cond}
  use_null = cfg_video != 1.0 or cfg_audio != 1.0
  null = _null(cond, null_label) if use_null else None
  use_alone = modality_video != 1.0 or modality_audio != 1.0
  b = video_shape[0]
  gen_v, gen_a = task != 'v2a', task != 'a2v'
  v_rng, a_rng = jax.random.split(rng)
  z_v = jax.random.normal(v_rng, video_shape, jnp.float32) if gen_v else video.astype(
      jnp.float32)
  z_a = jax.random.normal(a_rng, audio_shape, jnp.float32) if gen_a else audio.astype(
      jnp.float32)
  grid = jnp.asarray(samplers.flow_time_grid(num_steps, diffusion.shift))  # [S + 1]
  both_conds = (jax.tree.map(lambda c, n: jnp.concatenate([c, n], axis=0), cond, null)
                if use_null else None)

  def predict(z_v, z_a, t_v, t_a):
    args = (diffusion.model_input(z_v, t_v), diffusion.model_t(t_v),
            diffusion.model_input(z_a, t_a), diffusion.model_t(t_a))
    if use_null:  # [cond; null] in one call
      both = [jnp.concatenate([x, x], axis=0) for x in args]
      pv, pa = model_fn(*both, both_conds, True)
      with_cond, without = (pv[:b], pa[:b]), (pv[b:], pa[b:])
    else:
      with_cond, without = model_fn(*args, cond, True), (None, None)
    alone = model_fn(*args, cond, False) if use_alone else (None, None)
    return (guide(with_cond[0], without[0], alone[0], cfg_video, modality_video),
            guide(with_cond[1], without[1], alone[1], cfg_audio, modality_audio))

  def step(i, carry):
    z_v, z_a = carry
    t, t_next = grid[i], grid[i + 1]
    level = jnp.full((b,), t, jnp.float32)
    t_v = level if gen_v else jnp.zeros((b,), jnp.float32)
    t_a = level if gen_a else jnp.zeros((b,), jnp.float32)
    pv, pa = predict(z_v, z_a, t_v, t_a)
    if gen_v:
      z_v = z_v + (t_next - t) * diffusion.velocity(z_v, pv, t_v)
    if gen_a:
      z_a = z_a + (t_next - t) * diffusion.velocity(z_a, pa, t_a)
    return z_v, z_a

  z_v, z_a = jax.lax.fori_loop(0, num_steps, step, (z_v, z_a))
  return jnp.clip(z_v, -1.0, 1.0), z_a
