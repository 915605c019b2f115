"""The pure train step: (state, batch, rng) -> (state, metrics)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

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


def make_train_step(model: nn.Module, diffusion, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, num_classes: int, label_dropout: float,
                    ema: float):
  """Builds train_step(state, batch, rng); jit it with shardings and donate_argnums=0.

  batch: {'video': [B, T, H, W, C] float in [-1, 1], 'label': [B] int32}.
  """

  def train_step(state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    drop_rng, loss_rng = jax.random.split(rng)
    labels = drop_labels(drop_rng, batch['label'], num_classes, label_dropout)

    def loss_fn(params):
      def pred_fn(z, t):
        return model.apply({'params': params}, z, t, labels)
      loss, _ = diffusion.loss(pred_fn, batch['video'], loss_rng)
      return loss

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    d = ema_decay(state.step, ema)
    ema_params = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, params)
    metrics = {
        'loss': loss,
        'grad_norm': optax.global_norm(grads),
        'param_norm': optax.global_norm(params),
        'update_norm': optax.global_norm(updates),
        'learning_rate': schedule(state.step),
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema_params)
    return new_state, metrics

  return train_step
