"""Conditioning beyond class labels: text captions and given frames (video extension and
image-to-video), for the train step, the samplers and the extension loop.

Given frames. The first k frames of a clip are given clean; the rest are generated. The
model sees `impose(z_t, x, mask)` = the noisy clip with the given frames replaced by their
clean values, plus `frame_mask` [B, T] as one more input channel (VideoDiT appends it:
C + 1 channels in, C out). C + 1 rather than 2C + 1 (noisy clip, clean clip, mask): the
given frames are in the model's input exactly where they belong in the output, the
sampler's state can hold them as they are, and the patch embedding grows by one channel.
  * training draws k per clip in [1, model.context_frames_max], or 0 with probability
    model.context_none_prob (so one model also generates from nothing), and the loss
    covers only the frames that are not given (`masked_mse`);
  * sampling re-imposes the given frames on the model input at every step and on the
    result, so the sampler returns them exactly (`sample`);
  * `extend` grows a clip window by window: the last `overlap` frames of what exists are
    the given frames of the next window, so every window continues the motion it sees.
    Image-to-video is k = 1: one given frame.
  * model.given_frames='keyframes' (interpolation): the given frames are the keyframes
    at positions 0, s, 2s, ..., T-1 of every clip (s = model.keyframe_stride; 0: T-1,
    the first and last frame only), the loss covers the frames between them; the
    sampler takes them from `given_at` (any set of positions, same mask channel). The
    multi-stage pipeline (train/multistage.py) fills the gaps of a low-rate keyframe
    clip this way.

Text. Captions arrive as {'tokens' | 'embed', 'mask'} (model/text.py); training clears
the mask of a clip with probability model.caption_dropout (the learned null caption), and
classifier-free guidance's unconditional half clears it for every clip (`null_condition`).

A "condition" passed through the samplers is a dict of [B, ...] arrays with any of
  'label' int32 [B], 'text' {'tokens' | 'embed', 'mask'}, 'context' [B, T, H, W, C] (the
  given frames, zeros elsewhere) with 'frame_mask' bool [B, T].
"""

import dataclasses
import functools
import numbers
from typing import Callable, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from vdit_jax.diffusion import objectives
from vdit_jax.diffusion import samplers
from vdit_jax.diffusion.objectives import FLOW_T_SCALE

GIVEN_FRAMES = ('prefix', 'keyframes')  # model.given_frames: which frames are given
TEXT_KEYS = {'builtin': 'tokens', 'precomputed': 'embed'}  # model.text.encoder -> text key
# Batch keys of captions, from the pipeline (data/captions.py), by model.text.encoder.
BATCH_TEXT_KEYS = {'builtin': ('tokens', 'text_mask'), 'precomputed': ('text_embed', 'text_mask')}


def check_num_given(k, num_frames: int) -> int:
  """k given frames of a clip of num_frames: an integer in [0, num_frames)."""
  if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
    raise ValueError(f'the number of given frames k={k!r} must be an integer >= 0.')
  if k >= num_frames:
    raise ValueError(f'k={k} given frames leave nothing to generate in a clip of '
                     f'{num_frames} (latent) frames; k must be < {num_frames}.')
  return int(k)


def keyframe_positions(num_frames: int, stride: int = 0) -> Tuple[int, ...]:
  """Keyframe positions 0, s, 2s, ..., T-1 of a clip of T = num_frames frames, s = stride
  (0: T - 1, the first and last frame only). s must divide T - 1, so the last frame is a
  keyframe, and be >= 2, so there is a frame between two keyframes to generate."""
  for name, value, low in (('num_frames', num_frames, 3), ('keyframe_stride', stride, 0)):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
      raise ValueError(f'{name}={value!r} must be an integer >= {low} for keyframes '
                       '(two keyframes and a frame between them).')
  s = int(stride) or int(num_frames) - 1
  if s < 2 or (num_frames - 1) % s:
    raise ValueError(f'keyframe_stride={stride} must be >= 2 and divide num_frames - 1 = '
                     f'{num_frames - 1} (keyframes at 0, s, ..., {num_frames - 1}, a frame '
                     'to generate between each two); e.g. num_frames = s * n + 1.')
  return tuple(range(0, int(num_frames), s))


def check_positions(positions, num_frames: int) -> Tuple[int, ...]:
  """Given-frame positions: distinct integers in [0, num_frames), at least one left out."""
  out = []
  for p in positions:
    if isinstance(p, bool) or not isinstance(p, numbers.Integral) or not 0 <= p < num_frames:
      raise ValueError(f'given frame position {p!r} must be an integer in [0, {num_frames}) '
                       f'(frames per clip), in positions {tuple(positions)}.')
    out.append(int(p))
  if len(set(out)) != len(out):
    raise ValueError(f'given frame positions {tuple(out)} repeat a frame.')
  if len(out) >= num_frames:
    raise ValueError(f'given frame positions {tuple(out)} cover all {num_frames} frames; '
                     'leave at least one to generate.')
  return tuple(out)


def positions_mask(positions, num_frames: int) -> np.ndarray:
  """bool [T]: True at the given frame positions (checked by `check_positions`)."""
  mask = np.zeros((num_frames,), bool)
  mask[list(check_positions(positions, num_frames))] = True
  return mask


def frame_mask(num_given, num_frames: int):
  """num_given int [B] (or an int) -> bool [B, T]: True on the first num_given frames."""
  return jnp.arange(num_frames)[None, :] < jnp.asarray(num_given, jnp.int32).reshape(-1, 1)


def _frames(mask, x):
  """bool [B, T] -> [B, T, 1, ..., 1] broadcastable against x [B, T, H, W, C]."""
  if mask.shape != x.shape[:2]:
    raise ValueError(f'frame_mask {mask.shape} must be [B, T]={x.shape[:2]} of the clip '
                     f'{x.shape}.')
  return mask.reshape(mask.shape + (1,) * (x.ndim - 2))


def impose(z, given, mask):
  """z [B, T, ...] with the frames where mask [B, T] is True taken from `given` (exact)."""
  return jnp.where(_frames(mask, z), given.astype(z.dtype), z)


def draw_num_given(rng, batch: int, max_given: int, none_prob: float):
  """k [B] int32: 0 with probability none_prob, else uniform in [1, max_given]."""
  none_rng, k_rng = jax.random.split(rng)
  k = jax.random.randint(k_rng, (batch,), 1, max_given + 1, dtype=jnp.int32)  # [B]
  if none_prob > 0:
    k = jnp.where(jax.random.bernoulli(none_rng, none_prob, (batch,)), 0, k)
  return k


def masked_mse(target, pred, mask):
  """Mean squared error over the frames where mask [B, T] is False (the generated ones),
  in float32; the given frames' predictions do not enter it at all."""
  if target.shape != pred.shape:
    raise ValueError(f'prediction shape {pred.shape} must equal target shape {target.shape}.')
  keep = jnp.logical_not(_frames(mask, target))  # [B, T, 1, 1, 1]
  diff = target.astype(jnp.float32) - pred.astype(jnp.float32)
  total = jnp.sum(jnp.where(keep, jnp.square(diff), 0.0))
  per_frame = np.prod(target.shape[2:])
  count = jnp.sum(jnp.logical_not(mask).astype(jnp.float32)) * per_frame
  return total / jnp.maximum(count, 1.0)


def null_condition(cond, null_label: Optional[int] = None):
  """The unconditional version of a condition for classifier-free guidance: the negative
  prompt's text where the condition holds one ('negative_text', WanPipeline's negative
  prompt), else no caption (mask cleared), or the null label; given frames stay."""
  out = dict(cond)
  if 'negative_text' in cond:
    out['text'] = cond['negative_text']
  elif 'text' in cond:
    out['text'] = {**cond['text'], 'mask': jnp.zeros_like(cond['text']['mask'])}
  elif 'label' in cond and null_label is not None:
    out['label'] = jnp.full_like(cond['label'], null_label)
  return out


@dataclasses.dataclass(frozen=True)
class Conditioning:
  """What the train step draws and feeds beyond (video, label): captions with dropout,
  given frames. Build with `from_config`; None there means class conditioning only."""
  text_encoder: Optional[str] = None   # 'builtin' | 'precomputed' | None (no text)
  caption_dropout: float = 0.0
  context_frames_max: int = 0
  context_none_prob: float = 0.0        # prefix only
  given_frames: str = 'prefix'          # 'prefix' (first k) | 'keyframes' (interpolation)
  keyframe_stride: int = 0              # keyframes: 0, s, ..., T-1 (0: first and last)

  @classmethod
  def from_config(cls, config) -> Optional['Conditioning']:
    m = config.model
    text = m.conditioning == 'text'
    k_max = int(m.context_frames_max or 0)
    if not text and k_max == 0:
      return None
    keyframes = m.given_frames == 'keyframes'
    return cls(text_encoder=m.text.encoder if text else None,
               caption_dropout=float(m.caption_dropout) if text else 0.0,
               context_frames_max=k_max,
               context_none_prob=(float(m.context_none_prob)
                                  if k_max and not keyframes else 0.0),
               given_frames='keyframes' if keyframes else 'prefix',
               keyframe_stride=int(m.keyframe_stride or 0))

  def batch_keys(self) -> Tuple[str, ...]:
    """Keys the batch must hold besides 'video' and 'label'."""
    return BATCH_TEXT_KEYS[self.text_encoder] if self.text_encoder else ()

  def draw(self, rng, batch) -> dict:
    """Per-clip draws for the whole batch: {'text': ..., 'frame_mask': bool [B, T]}."""
    text_rng, frames_rng = jax.random.split(rng)
    b, t = batch['video'].shape[:2]
    out = {}
    if self.text_encoder:
      data_key, mask_key = BATCH_TEXT_KEYS[self.text_encoder]
      missing = [k for k in (data_key, mask_key) if k not in batch]
      if missing:
        raise ValueError(f'model.text.encoder={self.text_encoder!r} needs batch keys '
                         f'{[data_key, mask_key]}; missing {missing} (batch has {sorted(batch)}).')
      text = {TEXT_KEYS[self.text_encoder]: batch[data_key], 'mask': batch[mask_key]}
      if self.caption_dropout > 0:
        drop = jax.random.bernoulli(text_rng, self.caption_dropout, (b,))  # [B]
        text = {**text, 'mask': jnp.logical_and(text['mask'], jnp.logical_not(drop)[:, None])}
      out['text'] = text
    if self.context_frames_max > 0 and self.given_frames == 'keyframes':
      keys = positions_mask(keyframe_positions(t, self.keyframe_stride), t)  # [T]
      out['frame_mask'] = jnp.broadcast_to(jnp.asarray(keys), (b, t))  # [B, T]
    elif self.context_frames_max > 0:
      k = draw_num_given(frames_rng, b, self.context_frames_max, self.context_none_prob)
      out['frame_mask'] = frame_mask(k, t)  # [B, T]
    return out

  def loss(self, diffusion, apply_fn, inputs, log_variance=None):
    """The denoising loss with these conditions.

    apply_fn(z [B, T, H, W, C], t_model [B], **kwargs) -> prediction, kwargs being
    text= and/or frame_mask=; `inputs` holds 'video', 't', 'noise' and `draw`'s output.
    log_variance (optional): a function of no arguments that returns u [B] once apply_fn
    has run (model.loss_uncertainty: the model sows it); the loss is then
    objectives.uncertainty_weighted_mse over the same elements (per clip).
    """
    x0 = inputs['video']
    kwargs = {}
    if 'text' in inputs:
      kwargs['text'] = inputs['text']
    mask = inputs.get('frame_mask')
    if mask is None:
      pred_fn, reduce = functools.partial(apply_fn, **kwargs), objectives.mse
    else:
      def pred_fn(z_t, t_model):  # the given frames enter clean
        return apply_fn(impose(z_t, x0, mask), t_model, frame_mask=mask, **kwargs)
      reduce = functools.partial(masked_mse, mask=mask)
    if log_variance is not None:
      keep = None if mask is None else jnp.logical_not(_frames(mask, x0))  # [B, T, 1, 1, 1]
      reduce = lambda target, pred: objectives.uncertainty_weighted_mse(
          target, pred, log_variance(), keep=keep)
    return diffusion.loss_at(pred_fn, x0, inputs['t'], inputs['noise'], reduce=reduce)


def model_fn_with_context(apply_fn: Callable) -> Callable:
  """apply_fn(z, t_model, label=, text=, frame_mask=) -> the samplers' model_fn(z, t, cond):
  the given frames of `cond` are imposed on z before every model call."""

  def model_fn(z, t_model, cond):
    kwargs = {k: cond[k] for k in ('label', 'text', 'image') if k in cond}
    if 'condition' in cond:  # Wan I2V: the first frame's latents and mask, more channels
      kwargs['cond'] = cond['condition']
    if 'frame_mask' in cond:
      z = impose(z, cond['context'], cond['frame_mask'])
      kwargs['frame_mask'] = cond['frame_mask']
    if 'replace_mask' in cond:  # the given frames noised to this step's level (flow)
      sigma = t_model.astype(jnp.float32) / FLOW_T_SCALE  # [B]
      sigma = sigma.reshape((-1,) + (1,) * (z.ndim - 1))
      noised = (1 - sigma) * cond['context'] + sigma * cond['context_noise']
      z = impose(z, noised, cond['replace_mask'])
    return apply_fn(z, t_model, **kwargs)

  return model_fn


def sample(diffusion, apply_fn, rng, shape, cond, *, sampler, num_steps, eta=0.0,
           cfg_scale=1.0, null_label=None, clip_x0=True, cfg_interval=None):
  """`samplers.sample` with a condition dict (see the module docstring): given frames
  re-imposed before every model call and on the result, so they come back exactly;
  guidance toward the condition against `null_condition(cond, null_label)`.

  apply_fn(z, t_model, label=, text=, frame_mask=) -> prediction. Returns [*shape].
  """
  shape = tuple(int(d) for d in shape)
  if 'replace_mask' in cond:  # training-free: a model without a given-frames channel
    if not diffusion.is_flow:
      raise ValueError("given frames by replacement ('replace_mask') need a flow model: "
                       f'they are noised to each step\'s level, not objective='
                       f'{diffusion.objective!r}.')
    missing = [k for k in ('context', 'context_noise') if k not in cond]
    if missing or 'frame_mask' in cond:
      raise ValueError(f"a condition with 'replace_mask' needs 'context' and 'context_noise' "
                       f"and no 'frame_mask'; missing {missing}.")
  if 'frame_mask' in cond:
    if 'context' not in cond:
      raise ValueError("a condition with 'frame_mask' needs 'context', the given frames.")
    if tuple(cond['context'].shape) != shape:
      raise ValueError(f"given frames 'context' {tuple(cond['context'].shape)} must have the "
                       f'sample shape {shape} (zeros where not given).')
  out = samplers.sample(
      diffusion, model_fn_with_context(apply_fn), rng, shape, cond, sampler=sampler,
      num_steps=num_steps, eta=eta, cfg_scale=cfg_scale, clip_x0=clip_x0,
      cfg_interval=cfg_interval, null_label=functools.partial(null_condition, null_label=null_label))
  if 'frame_mask' in cond:
    out = impose(out, cond['context'], cond['frame_mask'])
  if 'replace_mask' in cond:
    out = impose(out, cond['context'], cond['replace_mask'])
  return out


def given_condition(frames, num_frames: int):
  """Given frames [B, k, H, W, C] -> ('context' [B, T, H, W, C] zero-padded, 'frame_mask'
  bool [B, T]) for a clip of num_frames frames; raises unless 0 <= k < num_frames."""
  if frames.ndim != 5:
    raise ValueError(f'given frames must be [B, k, H, W, C], got shape {frames.shape}.')
  k = check_num_given(frames.shape[1], num_frames)
  context = jnp.zeros(frames.shape[:1] + (num_frames,) + frames.shape[2:], jnp.float32)
  context = context.at[:, :k].set(jnp.asarray(frames, jnp.float32))
  mask = jnp.broadcast_to(frame_mask(k, num_frames), (frames.shape[0], num_frames))
  return context, mask


def given_at(frames, positions, num_frames: int):
  """Given frames [B, K, H, W, C] at `positions` (K of them, any order) -> ('context'
  [B, T, H, W, C], zeros elsewhere, 'frame_mask' bool [B, T]) for a clip of num_frames
  frames: `given_condition` for any set of frames, e.g. the keyframes to interpolate."""
  positions = check_positions(positions, num_frames)
  if frames.ndim != 5 or frames.shape[1] != len(positions):
    raise ValueError(f'given frames must be [B, K, H, W, C] with K = {len(positions)} '
                     f'(positions {positions}), got shape {frames.shape}.')
  context = jnp.zeros(frames.shape[:1] + (num_frames,) + frames.shape[2:], jnp.float32)
  context = context.at[:, np.asarray(positions, np.int32)].set(
      jnp.asarray(frames, jnp.float32))  # [B, T, H, W, C]
  mask = jnp.broadcast_to(jnp.asarray(positions_mask(positions, num_frames)),
                          (frames.shape[0], num_frames))  # [B, T]
  return context, mask


def check_given_frames(mode, stride, num_frames: int, k_max: int) -> None:
  """Rules of model.given_frames / keyframe_stride against data.num_frames and
  model.context_frames_max (the switch of the model's given-frame channel)."""
  if mode not in GIVEN_FRAMES:
    raise ValueError(f'config.model.given_frames={mode!r} is not one of {GIVEN_FRAMES} '
                     "('prefix': the first k frames, video extension; 'keyframes': frames "
                     '0, s, ..., T-1, interpolation).')
  if mode == 'prefix':
    if stride:
      raise ValueError(f'config.model.keyframe_stride={stride!r} is only read with '
                       "model.given_frames='keyframes', not 'prefix'.")
    return
  try:
    positions = keyframe_positions(num_frames, stride)
  except ValueError as e:
    raise ValueError(f"model.given_frames='keyframes' with data.num_frames={num_frames}, "
                     f'model.keyframe_stride={stride!r}: {e}') from None
  if k_max != len(positions):
    raise ValueError(f"model.given_frames='keyframes' gives {len(positions)} frames "
                     f'{positions} of data.num_frames={num_frames}; set '
                     f'model.context_frames_max={len(positions)} (it is {k_max!r}; it turns '
                     "on the model's given-frame channel and counts the given frames).")


def extend(window_fn: Callable, frames, total_frames: int, window: int, overlap: int
           ) -> Tuple[np.ndarray, List[np.ndarray]]:
  """Grows `frames` [B, F, H, W, C] to `total_frames` frames, window by window.

  Each window has `window` frames; its first g = min(overlap, frames so far) frames are
  the last g frames of the clip so far (given), the rest new. window_fn(context
  [B, window, H, W, C] (zeros past g), frame_mask bool [B, window], index) -> [B, window,
  H, W, C] must return the given frames unchanged (as `sample` does). Returns the clip
  [B, total_frames, ...] (the input frames first) and the list of windows.
  """
  frames = np.asarray(frames, np.float32)
  if frames.ndim != 5 or frames.shape[1] < 1:
    raise ValueError(f'frames to extend must be [B, F, H, W, C] with F >= 1, got '
                     f'{frames.shape}.')
  for name, value in (('total_frames', total_frames), ('window', window), ('overlap', overlap)):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
      raise ValueError(f'{name}={value!r} must be a positive integer.')
  check_num_given(overlap, window)
  if total_frames <= frames.shape[1]:
    raise ValueError(f'total_frames={total_frames} must exceed the {frames.shape[1]} frames '
                     'given, or there is nothing to generate.')
  clip, windows = frames, []
  while clip.shape[1] < total_frames:
    g = min(overlap, clip.shape[1])
    context, mask = given_condition(clip[:, -g:], window)
    out = np.asarray(jax.device_get(window_fn(context, mask, len(windows))), np.float32)
    if out.shape != context.shape:
      raise ValueError(f'window_fn returned {out.shape}, expected {context.shape}.')
    windows.append(out)
    clip = np.concatenate([clip, out[:, g:]], axis=1)  # [B, F', H, W, C]
  return clip[:, :total_frames], windows
