"""Compiled samplers: DDPM (ancestral, respaced), DDIM and Euler (rectified flow), with CFG.

`sample` is a pure function whose step loop is a `jax.lax.fori_loop`. It is not jitted itself:
the caller jits it with `model_fn`, `shape`, `sampler`, `num_steps`, `eta`, `cfg_scale`,
`cfg_interval`, `null_label` and `clip_x0` static (Python values; `diffusion`, `rng`, `labels` and `init_noise`
may be traced), e.g.

  jitted = jax.jit(sample, static_argnums=(1, 3), static_argnames=(
      'sampler', 'num_steps', 'eta', 'cfg_scale', 'cfg_interval', 'null_label', 'clip_x0'))

or uses `make_sampler`, which closes over everything but (params, rng, labels).

Randomness: `rng` is split once into (init_rng, step_rng). The initial noise is
`jax.random.normal(init_rng, shape)` unless `init_noise` is given; step i's noise (DDPM, DDIM
with eta > 0) is drawn from `jax.random.fold_in(step_rng, i)`. DDIM with eta=0 and Euler use
no step noise, so with the same initial noise they give the same output for any rng.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vdit_jax.diffusion import flow_solvers
from vdit_jax.diffusion.objectives import FLOW_T_SCALE
from vdit_jax.diffusion.objectives import shift_t

# unipc (flow): Wan 2.1's sampler, UniPC bh2 multistep on diffusers' flow grid, the network
# seeing the integer timesteps int(1000 sigma) as diffusers does (diffusion/flow_solvers.py).
SAMPLERS = ('ddpm', 'ddim', 'euler', 'unipc')
_SAMPLER_OBJECTIVES = {'ddpm': ('eps', 'v'), 'ddim': ('eps', 'v'), 'euler': ('flow',),
                       'unipc': ('flow',)}


def validate_cfg_interval(cfg_interval, name='cfg_interval'):
  """None, or (lo, hi) with 0 <= lo < hi <= 1 as a tuple of Python floats."""
  if cfg_interval is None:
    return None
  try:
    lo, hi = (float(v) for v in cfg_interval)
  except (TypeError, ValueError):
    raise ValueError(f'{name}={cfg_interval!r} must be None or a pair (lo, hi) of noise '
                     'levels in [0, 1] (0 clean, 1 pure noise).') from None
  if not 0.0 <= lo < hi <= 1.0:
    raise ValueError(f'{name}={cfg_interval!r} must satisfy 0 <= lo < hi <= 1 (noise levels, '
                     '0 clean, 1 pure noise).')
  return (lo, hi)


def cfg_interval_of(sample_cfg):
  """config.sample.cfg_interval as `sample` takes it: () (every step) -> None, else (lo, hi)."""
  value = sample_cfg.cfg_interval
  if value is None or len(value) == 0:
    return None
  return validate_cfg_interval(value, name='sample.cfg_interval')


def _validate(diffusion, sampler, num_steps, shape, labels, eta, cfg_scale, null_label,
              check_labels=True, cfg_interval=None):
  if sampler not in SAMPLERS:
    raise ValueError(f'sampler={sampler!r} is not known; expected one of {SAMPLERS}.')
  allowed = _SAMPLER_OBJECTIVES[sampler]
  if diffusion.objective not in allowed:
    raise ValueError(
        f"sampler={sampler!r} cannot sample objective={diffusion.objective!r}; "
        f'{sampler!r} works with objectives {allowed}.')
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
    raise ValueError(f'num_steps={num_steps!r} must be a Python int (it is static).')
  if not 1 <= num_steps <= diffusion.num_timesteps:
    raise ValueError(
        f'num_steps={num_steps} must satisfy 1 <= num_steps <= num_timesteps='
        f'{diffusion.num_timesteps}.')
  if len(shape) < 1 or shape[0] < 1:
    raise ValueError(f'shape={tuple(shape)} must start with a positive batch size.')
  if labels is not None and hasattr(labels, 'shape') and tuple(labels.shape) != (shape[0],):
    raise ValueError(f'labels shape {tuple(labels.shape)} must be [B]=({shape[0]},).')
  if labels is not None and not hasattr(labels, 'shape'):  # a pytree of conditions [B, ...]
    bad = [tuple(x.shape) for x in jax.tree.leaves(labels) if tuple(x.shape[:1]) != shape[:1]]
    if bad:
      raise ValueError(f'condition arrays of shapes {bad} must all start with B={shape[0]}.')
  if not float(eta) >= 0:
    raise ValueError(f'eta={eta!r} must be >= 0.')
  if sampler != 'ddim' and eta != 0:
    raise ValueError(f'eta={eta!r} only applies to sampler \'ddim\', not {sampler!r}.')
  if cfg_scale != 1.0:
    if null_label is None:
      raise ValueError(
          f'cfg_scale={cfg_scale!r} != 1 needs null_label (the unconditional class id).')
    if check_labels and labels is None:
      raise ValueError(f'cfg_scale={cfg_scale!r} != 1 needs labels to guide toward.')
  validate_cfg_interval(cfg_interval)


def guided_prediction(model_fn, z, t_model, labels, cfg_scale=1.0, null_label=None):
  """Classifier-free guidance. z [B, ...], t_model [B], labels int32 [B] or None.

  `labels` may also be a pytree of [B, ...] conditions (diffusion/conditioning.py) with
  `null_label` a function from it to its unconditional version.

  cfg_scale == 1: one call model_fn(z, t_model, labels). Otherwise one call on the doubled batch
  [cond; null] and uncond + cfg_scale * (cond - uncond).
  """
  if cfg_scale == 1.0:
    return model_fn(z, t_model, labels)
  if null_label is None:
    raise ValueError(
        f'cfg_scale={cfg_scale!r} != 1 needs null_label (the unconditional class id).')
  if labels is None:
    raise ValueError(f'cfg_scale={cfg_scale!r} != 1 needs labels to guide toward.')
  b = z.shape[0]
  z2 = jnp.concatenate([z, z], axis=0)  # [2B, ...]
  t2 = jnp.concatenate([t_model, t_model], axis=0)  # [2B]
  if callable(null_label):  # a condition pytree and the function that nulls it
    labels2 = jax.tree.map(lambda c, n: jnp.concatenate([c, n], axis=0), labels,
                           null_label(labels))  # [2B, ...] leaves
  else:
    null = jnp.full_like(labels, null_label)  # [B]
    labels2 = jnp.concatenate([labels, null], axis=0)  # [2B]
  out = model_fn(z2, t2, labels2)  # [2B, ...]
  cond, uncond = out[:b], out[b:]  # [B, ...] each
  return uncond + cfg_scale * (cond - uncond)


def respaced_timesteps(num_timesteps, num_steps):
  """Descending int timesteps, num_steps of them evenly spaced over [T-1, 0] (T-1 first)."""
  return np.round(np.linspace(num_timesteps - 1, 0, num_steps)).astype(np.int32)  # [S]


def flow_time_grid(num_steps, shift):
  """Descending flow times [S + 1] from 1 to 0, shifted like training times."""
  return shift_t(np.linspace(1.0, 0.0, num_steps + 1), shift).astype(np.float32)


def _discrete_step_tables(diffusion, sampler, num_steps, eta):
  """Per-step coefficients of the respaced chain, computed in float64 from the static schedule.

  Returns int32 timesteps [S] and float32 tables [S] (names below), so that 1 - abar near t=0
  keeps its precision. With abar_i at the chosen timesteps and abar_prev the next one (1 after
  the last): beta'_i = 1 - abar_i / abar_prev.
    ddpm: z <- c_x0 * x0_hat + c_z * z + std * noise (posterior q(z_prev | z, x0_hat)).
    ddim: z <- c_x0 * x0_hat + c_eps * eps_hat + std * noise (Song et al., sigma = std).
  """
  ts = respaced_timesteps(diffusion.num_timesteps, num_steps)  # [S]
  abar = diffusion.alphas_cumprod_f64()[ts]  # [S]
  abar_prev = np.concatenate([abar[1:], [1.0]])  # [S]
  beta = 1.0 - abar / abar_prev  # [S]
  if sampler == 'ddpm':
    c_x0 = np.sqrt(abar_prev) * beta / (1.0 - abar)
    c_second = np.sqrt(1.0 - beta) * (1.0 - abar_prev) / (1.0 - abar)  # multiplies z
    std = np.sqrt(beta * (1.0 - abar_prev) / (1.0 - abar))  # 0 at the last step
  else:
    std = float(eta) * np.sqrt((1.0 - abar_prev) / (1.0 - abar) * beta)  # sigma, 0 at the end
    c_x0 = np.sqrt(abar_prev)
    c_second = np.sqrt(np.maximum(1.0 - abar_prev - std ** 2, 0.0))  # multiplies eps_hat
  as32 = lambda a: jnp.asarray(a, jnp.float32)
  return jnp.asarray(ts, jnp.int32), as32(c_x0), as32(c_second), as32(std)


def sample(diffusion, model_fn, rng, shape, labels, *, sampler, num_steps, eta=0.0,
           cfg_scale=1.0, null_label=None, clip_x0=True, init_noise=None,
           self_condition=False, cfg_interval=None):
  """Draw samples x0 of `shape` ([B, T, H, W, C]) by running `num_steps` model steps.

  model_fn(z [B, ...], t_model float32 [B], labels int32 [B] | None) -> prediction [B, ...] in
  the diffusion's objective (eps, v or velocity); it is given `diffusion.model_input(z, t)` (z
  itself unless diffusion.input_scale says otherwise). clip_x0 clips x0 estimates to [-1, 1] at each
  DDPM/DDIM step, and the final Euler sample. eta (DDIM only) and cfg_scale are Python floats.
  init_noise [*shape] replaces the initial noise drawn from rng. self_condition: model_fn
  also takes `x0_prev` [B, ...], the previous step's (guided, clipped) x0 estimate, zeros at
  the first step (model.self_condition).
  cfg_interval (lo, hi): guidance only at the steps whose noise level lies in [lo, hi] (flow
  t, or t / num_timesteps for DDPM/DDIM; 0 clean, 1 pure noise), the conditional prediction
  alone (one model call on B) elsewhere, as Kynkaanniemi et al. 2024 guide a limited
  interval; None guides every step. Returns float32 [*shape].
  """
  shape = tuple(int(d) for d in shape)
  _validate(diffusion, sampler, num_steps, shape, labels, eta, cfg_scale, null_label)
  cfg_interval = validate_cfg_interval(cfg_interval)
  init_rng, step_rng = jax.random.split(rng)
  if init_noise is None:
    z = jax.random.normal(init_rng, shape, jnp.float32)  # [B, T, H, W, C]
  else:
    if tuple(init_noise.shape) != shape:
      raise ValueError(f'init_noise shape {tuple(init_noise.shape)} must equal shape {shape}.')
    z = jnp.asarray(init_noise, jnp.float32)
  batch = shape[0]
  maybe_clip = (lambda x: jnp.clip(x, -1.0, 1.0)) if clip_x0 else (lambda x: x)
  guided = functools.partial(guided_prediction, labels=labels, cfg_scale=cfg_scale,
                             null_label=null_label)
  if cfg_interval is None or cfg_scale == 1.0:
    guide = lambda fn, z_in, t_model, level: guided(fn, z_in, t_model)
  else:
    lo, hi = cfg_interval

    def guide(fn, z_in, t_model, level):
      # level: this step's noise level, a traced scalar; one branch runs per step.
      inside = jnp.logical_and(level >= lo, level <= hi)
      return jax.lax.cond(inside, lambda: guided(fn, z_in, t_model),
                          lambda: fn(z_in, t_model, labels))
  if self_condition:
    # The estimate travels beside z as C more channels, so guidance doubles both together.
    channels = shape[-1]

    def packed_fn(zx, t_model, y):
      return model_fn(zx[..., :channels], t_model, y, x0_prev=zx[..., channels:])

    def predict(z_in, t_model, x0_prev, level):
      return guide(packed_fn, jnp.concatenate([z_in, x0_prev], axis=-1), t_model, level)
    x0_prev = jnp.zeros(shape, jnp.float32)  # [*shape]: no estimate before the first step
  else:
    predict = lambda z_in, t_model, _, level: guide(model_fn, z_in, t_model, level)
    x0_prev = None

  if sampler == 'unipc':
    if self_condition:
      raise ValueError("sampler='unipc' does not feed self-conditioning; use 'euler'.")
    sigmas, timesteps = flow_solvers.flow_sigmas(num_steps, diffusion.shift,
                                                 int(round(FLOW_T_SCALE)))
    tables = flow_solvers.unipc_tables(sigmas, timesteps)

    def velocity(z, t_int):  # t_int int [B]: what the network sees, int(1000 sigma)
      t_model = t_int.astype(jnp.float32)  # [B]
      t_vec = t_model / FLOW_T_SCALE  # the flow time of the input scaling and the level
      pred = predict(diffusion.model_input(z, t_vec), t_model, None, t_vec[0])
      return diffusion.velocity(z, pred, t_vec)

    return maybe_clip(flow_solvers.unipc_walk(velocity, z, tables))

  if sampler == 'euler':
    grid = jnp.asarray(flow_time_grid(num_steps, diffusion.shift))  # [S + 1]

    def euler_step(i, carry):
      z, x0_prev = carry
      t, t_next = grid[i], grid[i + 1]
      t_vec = jnp.full((batch,), t, jnp.float32)  # [B]
      pred = predict(diffusion.model_input(z, t_vec), diffusion.model_t(t_vec), x0_prev, t)
      if self_condition:
        x0_prev = jnp.clip(diffusion.pred_to_x0_eps(z, pred, t_vec)[0], -1.0, 1.0)
      return z + (t_next - t) * diffusion.velocity(z, pred, t_vec), x0_prev

    z, _ = jax.lax.fori_loop(0, num_steps, euler_step, (z, x0_prev))
    return maybe_clip(z)

  ts, c_x0, c_second, std = _discrete_step_tables(diffusion, sampler, num_steps, eta)
  stochastic = sampler == 'ddpm' or eta > 0

  def discrete_step(i, carry):
    z, x0_prev = carry
    t_vec = jnp.full((batch,), ts[i], jnp.int32)  # [B]
    level = ts[i].astype(jnp.float32) / diffusion.num_timesteps
    pred = predict(diffusion.model_input(z, t_vec), diffusion.model_t(t_vec), x0_prev, level)
    x0_hat, eps_hat = diffusion.pred_to_x0_eps(z, pred, t_vec)  # [B, ...] each
    x0_hat = maybe_clip(x0_hat)
    if self_condition:
      x0_prev = jnp.clip(x0_hat, -1.0, 1.0)
    if sampler == 'ddpm':
      z_next = c_x0[i] * x0_hat + c_second[i] * z
    else:
      # ddim: eps re-derived from the clipped x0 so that the pair stays consistent with z.
      if clip_x0:
        eps_hat = diffusion.eps_from_x0(z, x0_hat, t_vec)
      z_next = c_x0[i] * x0_hat + c_second[i] * eps_hat
    if not stochastic:  # DDIM with eta=0 draws no noise at all
      return z_next, x0_prev
    noise = jax.random.normal(jax.random.fold_in(step_rng, i), shape, jnp.float32)
    return z_next + std[i] * noise, x0_prev

  z, _ = jax.lax.fori_loop(0, num_steps, discrete_step, (z, x0_prev))
  return z


def make_sampler(diffusion, model_apply, shape, *, sampler, num_steps, eta=0.0, cfg_scale=1.0,
                 null_label=None, clip_x0=True, cfg_interval=None):
  """Jitted `fn(params, rng, labels) -> x0 [*shape]` with model_fn = model_apply(params, ...).

  model_apply(params, z, t_model, labels) -> prediction. Validation runs now, not at first call.
  """
  shape = tuple(int(d) for d in shape)
  _validate(diffusion, sampler, num_steps, shape, None, eta, cfg_scale, null_label,
            check_labels=False, cfg_interval=cfg_interval)

  @jax.jit
  def run(params, rng, labels):
    model_fn = functools.partial(model_apply, params)
    return sample(diffusion, model_fn, rng, shape, labels, sampler=sampler,
                  num_steps=num_steps, eta=eta, cfg_scale=cfg_scale, null_label=null_label,
                  clip_x0=clip_x0, cfg_interval=cfg_interval)

  return run
