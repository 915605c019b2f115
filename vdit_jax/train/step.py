"""The pure train step: (state, batch, rng) -> (state, metrics).

Gradient accumulation: with `grad_accum_steps=k` the step splits its batch into k
micro-batches, runs forward + backward on each inside one `lax.scan` (activations of
one micro-batch live at a time), sums the gradients in float32 and applies one
optimizer update with their mean. The random draws (label dropout, t, noise) are made
for the whole batch before the split, so a step with k micro-batches computes the
same loss and gradients as one with k=1 on the same batch (up to summation order).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vdit_jax.diffusion import av
from vdit_jax.diffusion import objectives
from vdit_jax.parallel import axes
from vdit_jax.model import av_dit
from vdit_jax.model import dit
from vdit_jax.train.state import TrainState


def drop_labels(rng, labels, null_label: int, p: float):
  """Replaces each label by the null label with probability p (for CFG)."""
  if p <= 0:
    return labels
  drop = jax.random.bernoulli(rng, p, labels.shape)
  return jnp.where(drop, jnp.asarray(null_label, labels.dtype), labels)


def ema_decay(step, decay: float):
  """EMA decay warmed up as min(decay, (1 + step) / (10 + step))."""
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def check_grad_accum(grad_accum_steps, batch_size=None) -> None:
  """k is a positive int and divides the batch (when given)."""
  if isinstance(grad_accum_steps, bool) or not isinstance(grad_accum_steps, int) \
      or grad_accum_steps < 1:
    raise ValueError(f'train.grad_accum_steps={grad_accum_steps!r} must be a positive integer.')
  if batch_size is not None and batch_size % grad_accum_steps:
    raise ValueError(f'the batch of {batch_size} clips is not divisible by '
                     f'train.grad_accum_steps={grad_accum_steps} micro-batches.')


def split_micro_batches(tree, k: int):
  """Leaves [B, ...] -> [k, B/k, ...]; micro-batch j holds rows j, j + k, j + 2k, ...

  Strided rather than contiguous: a batch sharded in contiguous blocks over the
  devices stays on its devices (each device's rows split k ways locally), provided
  each device's share divides by k (validate.py checks it).
  """
  def split(x):
    x = x.reshape((x.shape[0] // k, k) + x.shape[1:])  # [B/k, k, ...]
    x = jnp.swapaxes(x, 0, 1)  # [k, B/k, ...]
    return nn.with_logical_constraint(x, (None, axes.ACT_BATCH) + (None,) * (x.ndim - 2))
  return jax.tree.map(split, tree)


def accumulate_grads(loss_and_grad, params, inputs, k: int):
  """Mean loss and gradients of `loss_and_grad(params, micro_batch)` over k micro-batches.

  `inputs` leaves are [B, ...]; k=1 is one plain call. Sums run in float32; the mean
  gradients come back in the parameters' dtypes.
  """
  if k == 1:
    return loss_and_grad(params, inputs)

  def body(carry, micro):
    loss_sum, grad_sum = carry
    loss, grads = loss_and_grad(params, micro)
    grad_sum = jax.tree.map(lambda s, g: s + g.astype(jnp.float32), grad_sum, grads)
    return (loss_sum + loss.astype(jnp.float32), grad_sum), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  (loss_sum, grad_sum), _ = jax.lax.scan(
      body, (jnp.zeros((), jnp.float32), zeros), split_micro_batches(inputs, k))
  grads = jax.tree.map(lambda g, p: (g / k).astype(p.dtype), grad_sum, params)
  return loss_sum / k, grads


def make_train_step(model: nn.Module, diffusion, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, num_classes: int, label_dropout: float,
                    ema: float, grad_accum_steps: int = 1, param_transform=None,
                    conditioning=None, audio=None):
  """Builds train_step(state, batch, rng); jit it with shardings and donate_argnums=0.

  `param_transform` (optional) maps the trained params (state.params) to the model's
  params inside the loss, so only state.params are differentiated and updated: LoRA
  passes `lambda adapters: merge(frozen_base, adapters, ...)` (train/lora.py).

  batch: {'video': [B, T, H, W, C] float in [-1, 1], 'label': [B] int32}; B must
  divide by `grad_accum_steps`.

  `conditioning` (diffusion/conditioning.Conditioning, optional): captions (batch keys
  'tokens' or 'text_embed', and 'text_mask') with caption dropout, and/or given first
  frames drawn per clip, with the loss on the other frames only.

  `audio` (config.audio, for the audio-video DiT of model/av_dit.py): the batch also holds
  'audio' [B, F, M] log-mel features; each clip draws its task and a t per stream, and the
  loss is diffusion/av.py's (video + audio.loss_weight * audio).
  """
  check_grad_accum(grad_accum_steps)
  # model.self_condition: on a coin drawn per step, the loss's first pass feeds its x0
  # estimate to the trained pass (Diffusion.loss_at); class-conditional models only.
  self_condition = bool(getattr(getattr(model, 'spec', None), 'self_condition', False))

  # model.loss_uncertainty: the model sows u(t) [B]; the loss of each clip becomes
  # L / exp(u) + u (EDM2), read from the last (trained) model call.
  uncertainty = bool(getattr(getattr(model, 'spec', None), 'loss_uncertainty', False))

  def av_loss_fn(params, inputs):
    model_params = params if param_transform is None else param_transform(params)
    sown = {}

    def pred_fn(z_v, t_v, z_a, t_a, couple):
      kw = dict(audio=z_a, t_audio=t_a, couple=couple)
      if 'text' in inputs:  # captions (conditioning.draw: with caption dropout)
        kw['text'] = inputs['text']
      if not uncertainty:
        return model.apply({'params': model_params}, z_v, t_v, inputs['label'], **kw)
      out, state = model.apply({'params': model_params}, z_v, t_v, inputs['label'], **kw,
                               mutable=['intermediates'])
      sown['u'] = (state['intermediates'][dit.LOSS_LOG_VARIANCE][0],
                   state['intermediates'][av_dit.AUDIO_LOSS_LOG_VARIANCE][0])  # [B] each
      return out
    total, _, _ = av.loss(diffusion, pred_fn, inputs, audio.loss_weight,
                          log_variances=(lambda: sown['u']) if uncertainty else None)
    return total

  def loss_fn(params, inputs, use_estimate=None):
    if audio is not None:  # validate.py refuses self-conditioning with audio
      return av_loss_fn(params, inputs)
    model_params = params if param_transform is None else param_transform(params)
    sown = {}

    def pred_fn(z, t, **kw):
      if not uncertainty:
        return model.apply({'params': model_params}, z, t, inputs['label'], **kw)
      out, state = model.apply({'params': model_params}, z, t, inputs['label'], **kw,
                               mutable=['intermediates'])
      sown['u'] = state['intermediates'][dit.LOSS_LOG_VARIANCE][0]  # [B]
      return out
    if conditioning is not None:
      return conditioning.loss(diffusion, pred_fn, inputs,
                               log_variance=(lambda: sown['u']) if uncertainty else None)
    reduce = objectives.mse
    if uncertainty:
      reduce = lambda target, pred: objectives.uncertainty_weighted_mse(target, pred, sown['u'])
    return diffusion.loss_at(pred_fn, inputs['video'], inputs['t'], inputs['noise'],
                             reduce=reduce, self_condition=use_estimate)

  def train_step(state: TrainState, batch, rng):
    check_grad_accum(grad_accum_steps, batch['video'].shape[0])
    rng = jax.random.fold_in(rng, state.step)
    drop_rng, loss_rng = jax.random.split(rng)
    # Every draw covers the whole batch, before any micro-batch split.
    labels = drop_labels(drop_rng, batch['label'], num_classes, label_dropout)  # [B]
    if audio is not None:  # a task, a t per stream, noise for each, and the coupling
      inputs = {'video': batch['video'], 'audio': batch['audio'], 'label': labels}
      inputs.update(av.draw(diffusion, loss_rng, batch['video'], batch['audio'],
                            audio.task_probs, audio.modality_dropout))
      if conditioning is not None:  # captions with their dropout (no given frames: validate.py)
        inputs.update(conditioning.draw(jax.random.fold_in(rng, 1), batch))
    else:
      t, noise = diffusion.draw(loss_rng, batch['video'])
      inputs = {'video': batch['video'], 'label': labels, 't': t, 'noise': noise}
    if conditioning is not None and audio is None:  # captions (with dropout), given frames
      inputs.update(conditioning.draw(jax.random.fold_in(rng, 1), batch))
    use_estimate = (jax.random.bernoulli(jax.random.fold_in(rng, 2), 0.5)
                    if self_condition else None)  # one coin for the step's micro-batches
    loss_and_grad = jax.value_and_grad(functools.partial(loss_fn, use_estimate=use_estimate))
    loss, grads = accumulate_grads(loss_and_grad, state.params, inputs, grad_accum_steps)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    d = ema_decay(state.step, ema)
    ema_params = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, params)
    grad_norm = optax.tree.norm(grads)
    # A non-finite loss or gradient skips the update: params, optimizer state and EMA stay
    # those of the last good step (the step counter and the data still move on); the loop
    # counts the skips and applies train.nonfinite (train/loop.py).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state, ema_params = keep((params, opt_state, ema_params),
                                         (state.params, state.opt_state, state.ema_params))
    metrics = {
        'loss': loss,
        'grad_norm': grad_norm,
        'param_norm': optax.tree.norm(params),
        'update_norm': jnp.where(finite, optax.tree.norm(updates), 0.0),
        'learning_rate': schedule(state.step),
        'nonfinite': 1.0 - finite.astype(jnp.float32),
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema_params)
    return new_state, metrics

  return train_step
