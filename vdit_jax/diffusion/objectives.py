"""Training objectives: eps- and v-prediction on a discrete schedule, and rectified flow.

`Diffusion` is a `flax.struct.PyTreeNode`: the schedule arrays are float32 leaves and the
settings are static fields, so it can be passed into (or closed over by) jitted functions.

Conventions
- discrete ('eps', 'v'): integer t in [0, T), z_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.
- flow: float t in [0, 1], z_t = (1 - t) x0 + t eps (t=0 data, t=1 noise), target eps - x0.
- the network always sees a float32 timestep `model_t(t)` on a 0..1000 scale.
"""

from typing import Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from vdit_jax.diffusion import schedules

OBJECTIVES = ('eps', 'v', 'flow')
DISCRETE_OBJECTIVES = ('eps', 'v')
T_SAMPLINGS = ('uniform', 'logit_normal')
# none: the plain MSE of the objective's target. x0: each clip's error counted as the error of
# the x0 estimate it implies (v: weight 1 - abar; flow: weight t^2), which moves the gradient
# from the nearly clean end toward the noisy end, where a sample's layout is decided. eps has
# no bounded x0 weight (1 / SNR grows without limit as t -> T), so it accepts only none.
# min_snr: the x0 error weighted by min(SNR(t), gamma) (Hang et al. 2023, "Efficient Diffusion
# Training via Min-SNR Weighting Strategy"): the plain v loss weighs it by 1 + SNR, so the
# nearly clean steps, where the model only has to hand back its input, carry hundreds of times
# the weight of the steps that decide a clip's outline; min-SNR caps that at gamma.
LOSS_WEIGHTINGS = ('none', 'x0', 'min_snr')
# What the network is given for z_t. none: z_t. signal: z_t times its signal coefficient
# (sqrt(abar_t); flow: 1 - t), so the input fades to zero as t -> T: at the noisy end the
# network sees its position, time and condition features (and any clean given frames) rather
# than noise of unit size that carries almost nothing about x0. The targets, the samplers'
# updates and the given frames (imposed clean after the scaling) are unchanged.
INPUT_SCALES = ('none', 'signal')
# What the network outputs. target: the objective's own regression target (eps, v, or the
# flow velocity). x0: the clean clip itself, turned into the objective's target for the loss
# (so the loss is the objective's, with 1 / sigma capped at 1 / X0_MIN_SIGMA) and into (x0,
# eps) for the samplers, as JiT ("Back to Basics: Let Denoising Generative Models Denoise",
# Li & He 2025) does: clean clips lie near a low-dimensional set, noise fills every
# dimension, so a small network that outputs x0 needs no capacity to carry the noise through.
PREDICTIONS = ('target', 'x0')
X0_MIN_SIGMA = 0.05  # x0 prediction: the loss divides x0 errors by max(sigma, this)
# Flow times in [0, 1] are fed to the network multiplied by this, matching discrete t in [0, 1000).
FLOW_T_SCALE = 1000.0


def shift_t(t, shift):
  """Time shift s: t -> s t / (1 + (s - 1) t); s > 1 moves mass toward t=1 (noise)."""
  if shift == 1.0:
    return t
  return shift * t / (1.0 + (shift - 1.0) * t)


def mse(target, pred):
  """Mean squared error over all elements, computed in float32."""
  if target.shape != pred.shape:
    raise ValueError(
        f'prediction shape {pred.shape} must equal target shape {target.shape}.')
  diff = target.astype(jnp.float32) - pred.astype(jnp.float32)
  return jnp.mean(jnp.square(diff))


def uncertainty_weighted_mse(target, pred, log_variance, keep=None):
  """EDM2's uncertainty-weighted loss: mean over clips of L_i / exp(u_i) + u_i, where L_i is
  clip i's mean squared error and u_i = log_variance [B] (model.loss_uncertainty). With
  u = 0 and no `keep` it is `mse`; for fixed errors it is least at u_i = log L_i.

  keep (optional, bool, broadcastable against target, e.g. [B, T, 1, 1, 1]): only these
  elements enter L_i, its mean over clip i's kept elements (the generated frames when some
  are given: conditioning.masked_mse's elements, averaged per clip)."""
  if target.shape != pred.shape:
    raise ValueError(
        f'prediction shape {pred.shape} must equal target shape {target.shape}.')
  if log_variance.shape != target.shape[:1]:
    raise ValueError(f'log_variance {log_variance.shape} must be [B]={target.shape[:1]}.')
  square = jnp.square(target.astype(jnp.float32) - pred.astype(jnp.float32))
  axes_ = tuple(range(1, square.ndim))
  if keep is None:
    per_clip = jnp.mean(square, axis=axes_)  # [B]
  else:
    keep = jnp.broadcast_to(keep, square.shape)
    per_clip = (jnp.sum(jnp.where(keep, square, 0.0), axis=axes_)
                / jnp.maximum(jnp.sum(keep.astype(jnp.float32), axis=axes_), 1.0))  # [B]
  u = log_variance.astype(jnp.float32)
  return jnp.mean(per_clip * jnp.exp(-u) + u)


def _bcast(coef, x):
  """Per-example coefficients [B] -> [B, 1, ..., 1] broadcastable against x [B, ...]."""
  if coef.ndim != 1 or coef.shape[0] != x.shape[0]:
    raise ValueError(
        f'per-example coefficients of shape {coef.shape} must be [B] with B={x.shape[0]} '
        f'matching the leading dim of x {x.shape}.')
  return coef.reshape(coef.shape + (1,) * (x.ndim - 1))


class Diffusion(flax.struct.PyTreeNode):
  """Forward process, targets and loss for one objective. Build with `create` / `from_config`."""

  betas: Optional[jax.Array]  # [T] float32, None for flow
  alphas_cumprod: Optional[jax.Array]  # [T] float32, None for flow
  # sqrt(abar), sqrt(1 - abar) computed in float64 before the cast: 1 - abar in float32 loses
  # about 3 digits near t=0, where abar is within 1e-4 of 1.
  sqrt_alphas_cumprod: Optional[jax.Array]  # [T] float32, None for flow
  sqrt_one_minus_alphas_cumprod: Optional[jax.Array]  # [T] float32, None for flow
  objective: str = flax.struct.field(pytree_node=False, default='eps')
  schedule: Optional[str] = flax.struct.field(pytree_node=False, default='linear')
  num_timesteps: int = flax.struct.field(pytree_node=False, default=1000)
  t_sampling: str = flax.struct.field(pytree_node=False, default='uniform')
  logit_mean: float = flax.struct.field(pytree_node=False, default=0.0)
  logit_std: float = flax.struct.field(pytree_node=False, default=1.0)
  shift: float = flax.struct.field(pytree_node=False, default=1.0)
  loss_weighting: str = flax.struct.field(pytree_node=False, default='none')
  input_scale: str = flax.struct.field(pytree_node=False, default='none')
  prediction: str = flax.struct.field(pytree_node=False, default='target')
  min_snr_gamma: float = flax.struct.field(pytree_node=False, default=5.0)

  # ---------------------------------------------------------------- construction

  @classmethod
  def create(cls, objective, *, schedule='linear', num_timesteps=1000, t_sampling='uniform',
             logit_mean=0.0, logit_std=1.0, shift=1.0, loss_weighting='none',
             input_scale='none', prediction='target', min_snr_gamma=5.0):
    """Validated constructor. Flow ignores `schedule` (stored as None)."""
    if objective not in OBJECTIVES:
      raise ValueError(f'objective={objective!r} is not known; expected one of {OBJECTIVES}.')
    if loss_weighting not in LOSS_WEIGHTINGS:
      raise ValueError(f'loss_weighting={loss_weighting!r} is not known; expected one of '
                       f'{LOSS_WEIGHTINGS}.')
    if input_scale not in INPUT_SCALES:
      raise ValueError(f'input_scale={input_scale!r} is not known; expected one of '
                       f'{INPUT_SCALES}.')
    if prediction not in PREDICTIONS:
      raise ValueError(f'prediction={prediction!r} is not known; expected one of '
                       f'{PREDICTIONS}.')
    if prediction == 'x0' and objective == 'eps':
      raise ValueError("prediction='x0' needs objective 'v' or 'flow': the eps loss weighs an "
                       'x0 error by SNR, unbounded at the clean end.')
    if (isinstance(min_snr_gamma, bool) or not isinstance(min_snr_gamma, (int, float))
        or not (np.isfinite(min_snr_gamma) and min_snr_gamma > 0)):
      raise ValueError(f'min_snr_gamma={min_snr_gamma!r} must be a finite number > 0.')
    if loss_weighting == 'x0' and objective == 'eps':
      raise ValueError("loss_weighting='x0' needs objective 'v' or 'flow': for eps the x0 "
                       'weight 1/SNR is unbounded at the noisy end.')
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)) \
        or num_timesteps < 1:
      raise ValueError(f'num_timesteps={num_timesteps!r} must be a positive integer.')
    num_timesteps = int(num_timesteps)
    shift = schedules.check_shift(shift)
    if objective in DISCRETE_OBJECTIVES:
      abar64 = schedules.make_alphas_cumprod(schedule, num_timesteps, shift)  # [T]
      betas64 = schedules.betas_from_alphas_cumprod(abar64)  # [T]
      betas = jnp.asarray(betas64, dtype=jnp.float32)
      abar = jnp.asarray(abar64, dtype=jnp.float32)
      sqrt_abar = jnp.asarray(np.sqrt(abar64), dtype=jnp.float32)
      sqrt_1m_abar = jnp.asarray(np.sqrt(1.0 - abar64), dtype=jnp.float32)
    else:
      schedule, betas, abar, sqrt_abar, sqrt_1m_abar = None, None, None, None, None
      if t_sampling not in T_SAMPLINGS:
        raise ValueError(
            f't_sampling={t_sampling!r} is not known; expected one of {T_SAMPLINGS}.')
      if not float(logit_std) > 0:
        raise ValueError(f'logit_std={logit_std!r} must be > 0.')
    return cls(betas=betas, alphas_cumprod=abar, sqrt_alphas_cumprod=sqrt_abar,
               sqrt_one_minus_alphas_cumprod=sqrt_1m_abar, objective=objective, schedule=schedule,
               num_timesteps=num_timesteps, t_sampling=t_sampling,
               logit_mean=float(logit_mean), logit_std=float(logit_std), shift=float(shift),
               loss_weighting=loss_weighting, input_scale=input_scale, prediction=prediction,
               min_snr_gamma=float(min_snr_gamma))

  @classmethod
  def from_config(cls, dcfg):
    """Build from a complete `config.diffusion` (every field; its defaults live in
    config/defaults.py)."""
    return cls.create(
        dcfg.objective,
        schedule=dcfg.schedule,
        num_timesteps=dcfg.num_timesteps,
        t_sampling=dcfg.t_sampling,
        logit_mean=dcfg.logit_mean,
        logit_std=dcfg.logit_std,
        shift=dcfg.shift,
        loss_weighting=dcfg.loss_weighting,
        input_scale=dcfg.input_scale,
        prediction=dcfg.prediction,
        min_snr_gamma=dcfg.min_snr_gamma)

  def for_sampling(self, shift=None):
    """The process a sampler walks: flow's Euler grid time-shifted by `shift` (None: the
    training shift). Flow's network takes continuous t, so its grid may be re-timed after
    training; a discrete schedule's timesteps index the schedule it was trained on, so there
    only its own shift is accepted."""
    if shift is None:
      return self
    shift = schedules.check_shift(shift)
    if shift == self.shift:
      return self
    if not self.is_flow:
      raise ValueError(f'sample.shift={shift!r} re-times only the flow objective\'s Euler grid; '
                       f'objective {self.objective!r} samples the schedule it was trained on '
                       f'(diffusion.shift={self.shift}): leave sample.shift unset.')
    return self.replace(shift=shift)

  def alphas_cumprod_f64(self):
    """abar as float64 numpy, rebuilt from the static fields (concrete even under jit)."""
    if self.is_flow:
      raise ValueError("objective='flow' has no discrete schedule (alphas_cumprod).")
    return schedules.make_alphas_cumprod(self.schedule, self.num_timesteps, self.shift)

  @property
  def is_flow(self):
    return self.objective == 'flow'

  # ---------------------------------------------------------------- forward process

  def _coefs(self, t):
    """(a, b) [B] float32 with z_t = a x0 + b eps."""
    if self.is_flow:
      t = jnp.asarray(t, jnp.float32)
      return 1.0 - t, t
    t = jnp.asarray(t, jnp.int32)
    return self.sqrt_alphas_cumprod[t], self.sqrt_one_minus_alphas_cumprod[t]  # [B] each

  def sample_t(self, rng, batch):
    """Training timesteps [batch]: int32 in [0, T) (discrete) or float32 in [0, 1] (flow)."""
    if not self.is_flow:
      return jax.random.randint(rng, (batch,), 0, self.num_timesteps, dtype=jnp.int32)
    if self.t_sampling == 'uniform':
      t = jax.random.uniform(rng, (batch,), dtype=jnp.float32)
    else:
      u = self.logit_mean + self.logit_std * jax.random.normal(rng, (batch,), jnp.float32)
      t = jax.nn.sigmoid(u)
    return shift_t(t, self.shift)

  def corrupt(self, x0, noise, t):
    """z_t from data x0 [B, ...], noise of the same shape and t [B]."""
    if noise.shape != x0.shape:
      raise ValueError(f'noise shape {noise.shape} must equal x0 shape {x0.shape}.')
    a, b = self._coefs(t)
    z = _bcast(a, x0) * x0 + _bcast(b, x0) * noise  # [B, ...]
    return z.astype(x0.dtype)

  def target(self, x0, noise, t):
    """Regression target: eps, v = sqrt(abar) eps - sqrt(1 - abar) x0, or velocity eps - x0."""
    if self.objective == 'eps':
      return noise
    if self.objective == 'flow':
      return noise - x0
    a, b = self._coefs(t)
    return (_bcast(a, x0) * noise - _bcast(b, x0) * x0).astype(x0.dtype)

  def output_target(self, x0, noise, t):
    """What the network's output is compared with: `target` (prediction='target') or x0."""
    return x0 if self.prediction == 'x0' else self.target(x0, noise, t)

  def weigh(self, target, pred, t):
    """(target, pred) scaled per clip by sqrt(loss weight at t), so that any (masked) MSE of
    the pair is the weighted loss; unchanged for loss_weighting='none'."""
    a, b = (c.astype(jnp.float32) for c in self._coefs(t))  # [B] each: z = a x0 + b eps
    # b is the x0 error per target error for v and flow (b / a for eps).
    if self.loss_weighting == 'min_snr':
      snr = self.snr(t)  # [B]
      capped = jnp.minimum(snr, self.min_snr_gamma)  # [B]: the x0 error's weight
      if self.prediction == 'x0':
        scale = jnp.sqrt(capped)
      elif self.objective == 'eps':  # min(SNR, gamma) (b / a)^2 = min(SNR, gamma) / SNR
        scale = jnp.sqrt(jnp.minimum(1.0, self.min_snr_gamma / jnp.maximum(snr, 1e-20)))
      else:
        scale = jnp.sqrt(capped) * b
    elif self.prediction == 'x0':  # (x0, x0_hat): the objective's error is the x0 error / b
      if self.loss_weighting == 'x0':
        return target, pred
      scale = 1.0 / jnp.maximum(b, X0_MIN_SIGMA)
    elif self.loss_weighting == 'none':
      return target, pred
    else:
      scale = b
    scale = _bcast(scale, target)
    return target.astype(jnp.float32) * scale, pred.astype(jnp.float32) * scale

  def snr(self, t):
    """Signal-to-noise ratio a^2 / b^2 of z_t = a x0 + b eps at t [B] (float32; inf at flow
    t = 0)."""
    a, b = (c.astype(jnp.float32) for c in self._coefs(t))
    return jnp.square(a) / jnp.square(b)

  def model_input(self, z_t, t):
    """What the network is given for z_t [B, ...] at t [B]: z_t itself, or (input_scale=
    'signal') z_t times its signal coefficient sqrt(abar_t) (1 - t for flow). Every model call
    on a noisy z goes through this: `loss_at` and the samplers."""
    if self.input_scale == 'none':
      return z_t
    a, _ = self._coefs(t)
    return (_bcast(a, z_t) * z_t).astype(z_t.dtype)

  def model_t(self, t):
    """Float32 timestep [B] for the network: discrete t as float, flow t * 1000."""
    t = jnp.asarray(t, jnp.float32)
    return t * FLOW_T_SCALE if self.is_flow else t

  def draw(self, rng, x0):
    """(t [B], noise like x0 [B, ...]): the training draws `loss` makes from `rng`."""
    t_rng, noise_rng = jax.random.split(rng)
    t = self.sample_t(t_rng, x0.shape[0])  # [B]
    noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)  # [B, ...]
    return t, noise

  def loss_at(self, pred_fn, x0, t, noise, reduce=mse, self_condition=None):
    """The (weighted) error of pred_fn(z_t, model_t(t)) against the target, for given draws.

    reduce(target, pred) -> scalar: `mse` by default; a masked MSE where only some frames
    count (diffusion/conditioning.py).

    self_condition (a bool scalar, traced or not; None = the model is not self-conditioned):
    pred_fn also takes `x0_prev`. When True, a first pass with x0_prev = 0 gives the x0
    estimate (clipped to [-1, 1], no gradient) that the second, trained pass is given, as
    the sampler gives it the previous step's; when False the trained pass gets zeros, as
    the sampler's first step does (Chen et al. 2022, "Analog Bits", with the first pass only
    run on the steps that use it).
    """
    z_t = self.corrupt(x0, noise, t)  # [B, ...]
    z_in, t_model = self.model_input(z_t, t), self.model_t(t)
    if self_condition is None:
      pred = pred_fn(z_in, t_model)  # [B, ...]
    else:
      zeros = jnp.zeros(z_t.shape, z_t.dtype)

      def estimate(_):
        x0_hat, _ = self.pred_to_x0_eps(z_t, pred_fn(z_in, t_model, x0_prev=zeros), t)
        return jax.lax.stop_gradient(jnp.clip(x0_hat, -1.0, 1.0).astype(z_t.dtype))

      x0_prev = jax.lax.cond(self_condition, estimate, lambda _: zeros, None)
      pred = pred_fn(z_in, t_model, x0_prev=x0_prev)  # [B, ...]
    return reduce(*self.weigh(self.output_target(x0, noise, t), pred, t))

  def loss(self, pred_fn, x0, rng):
    """`loss_at` for the draws `draw(rng, x0)`.

    pred_fn: (z_t [B, ...], t_model [B] float32) -> prediction [B, ...] (close over labels).
    Returns (scalar float32 loss, aux dict with 't', 'model_t').
    """
    t, noise = self.draw(rng, x0)
    return self.loss_at(pred_fn, x0, t, noise), {'t': t, 'model_t': self.model_t(t)}

  # ---------------------------------------------------------------- sampler conversions

  def pred_to_x0_eps(self, z_t, pred, t):
    """Invert a prediction at z_t to (x0_hat, eps_hat), each shaped like z_t.

    eps: x0 = (z - sqrt(1-abar) eps) / sqrt(abar)
    v:   x0 = sqrt(abar) z - sqrt(1-abar) v,  eps = sqrt(1-abar) z + sqrt(abar) v
    flow: x0 = z - t v,  eps = z + (1 - t) v
    """
    a, b = self._coefs(t)
    a, b = _bcast(a, z_t), _bcast(b, z_t)
    z_t = z_t.astype(jnp.float32)
    pred = pred.astype(jnp.float32)
    if self.prediction == 'x0':  # z = a x0 + b eps; b > 0 at every step a sampler takes
      return pred, (z_t - a * pred) / jnp.maximum(b, 1e-6)
    if self.objective == 'eps':
      return (z_t - b * pred) / a, pred
    if self.objective == 'v':
      return a * z_t - b * pred, b * z_t + a * pred
    return z_t - b * pred, z_t + a * pred

  def velocity(self, z_t, pred, t):
    """Flow: the velocity eps - x0 of a prediction at z_t (the prediction itself, or for
    prediction='x0' (z_t - x0) / t, t floored at 1e-6); what the Euler sampler steps by."""
    if self.prediction != 'x0':
      return pred.astype(jnp.float32)
    t = _bcast(jnp.asarray(t, jnp.float32), z_t)
    return (z_t.astype(jnp.float32) - pred.astype(jnp.float32)) / jnp.maximum(t, 1e-6)

  def eps_from_x0(self, z_t, x0, t):
    """eps implied by z_t and an x0 estimate (used after clipping x0)."""
    a, b = self._coefs(t)
    return (z_t - _bcast(a, z_t) * x0) / _bcast(b, z_t)
