"""Wan 2.1's samplers in pure JAX: UniPC multistep (bh2) and flow-matching Euler.

Both reproduce diffusers' schedulers step for step (tests/flow_solvers_test.py compares them):
- `unipc_sample`: `UniPCMultistepScheduler(prediction_type='flow_prediction',
  use_flow_sigmas=True, flow_shift=shift)` with diffusers' defaults that Wan's folders keep
  (solver_order 2, predict_x0, solver_type 'bh2', lower_order_final, final_sigmas_type 'zero',
  no disabled corrector steps); flow_shift 3.0 at 480p, 5.0 at 720p. This is WanPipeline's sampler.
- `euler_sample`: `FlowMatchEulerDiscreteScheduler(shift=shift)`.
The schedule is static: it is computed in float64 numpy, rounded to float32 where diffusers
keeps float32, and every step's solver coefficients are folded into float32 tables, so a whole
run is one `jax.lax.fori_loop` whose carry has static shapes.

Wan's convention and the project's (objectives.py, samplers.py)
  Wan / diffusers: sigma in [0, 1], x_sigma = (1 - sigma) x0 + sigma noise; the network sees the
  timestep 1000 sigma and predicts the velocity v = noise - x0; sampling walks sigma from
  (almost) 1 down to 0 with dx/dsigma = v.
  Project (Diffusion(objective='flow')): t in [0, 1], z_t = (1 - t) x0 + t eps, target eps - x0,
  model_t = 1000 t (float32); samplers.sample('euler') walks flow_time_grid from 1 to 0 with
  z <- z + (t_next - t) v.
  So sigma == t and Wan's v == the project's velocity: same sign, same direction (noise at 1,
  data at 0), same 1000 scale, and objectives.shift_t is diffusers' shift formula. They differ
  only in the grid and in the timestep's type:
  - UniPC: sigma_i = shift_t(linspace(1, 1/T, S + 1)[:-1]) with the first sigma 1 - 1e-6 (log-SNR
    is -inf at 1), then 0; the network sees int(1000 sigma_i), truncated (500.999 -> 500).
  - Euler: shift_t(linspace(1, shift_t(1/T), S)) (diffusers shifts the smallest sigma twice:
    once in its training table, once here), then 0; the network sees float32 1000 sigma.
  - project Euler: shift_t(linspace(1, 0, S + 1)), float32 1000 t.
  Given the same grid, `euler_walk` and samplers.sample(sampler='euler', clip_x0=False) agree.

UniPC (Zhao et al. 2023) in diffusers' flow form, per step i with sigma_i -> sigma_{i+1}:
  alpha = 1 - sigma, lambda = log(alpha / sigma) (log-SNR), h = lambda_{i+1} - lambda_i,
  m_i = x_i - sigma_i v_i (the x0 estimate, "converted model output").
  Corrector (i >= 1, order q of the previous predictor): re-derives x_i from x_{i-1} and m_i.
  Predictor (order p_i = min(order, i + 1, S - i)): x_{i+1} from x_i and m_i, m_{i-1}, ...
  Both are x' = (sigma_t / sigma_s) x - alpha_t expm1(-h) m0 - alpha_t expm1(-h) sum_k rho_k D_k,
  D_k = (m_k - m0) / r_k, r_k = (lambda_k - lambda_s) / h; rho solves the B(h) ('bh2') order
  conditions (0.5 for a one-difference predictor or a first-order corrector). Each update is a
  fixed linear combination of x and the stored m's, so its coefficients are precomputed.
  The last step (sigma -> 0) is first order, whose update is exactly x' = m0.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vdit_jax.diffusion.objectives import shift_t

ORDERS = (1, 2, 3)
# diffusers moves a first sigma within this of 1 down by it: log-SNR log((1 - s) / s) is -inf at 1.
FIRST_SIGMA_EPS = 1e-6


# ------------------------------------------------------------------ validation


def _check_num_steps(num_steps):
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) \
      or num_steps < 1:
    raise ValueError(f'num_steps={num_steps!r} must be a Python int >= 1 (it is static).')
  return int(num_steps)


def _check_shift(shift):
  if isinstance(shift, bool) or not isinstance(shift, (int, float, np.floating, np.integer)) \
      or not (np.isfinite(shift) and shift > 0):
    raise ValueError(f'shift={shift!r} must be a finite number > 0 (diffusers flow_shift).')
  return float(shift)


def _check_num_train_timesteps(num_train_timesteps):
  if isinstance(num_train_timesteps, bool) \
      or not isinstance(num_train_timesteps, (int, np.integer)) or num_train_timesteps < 1:
    raise ValueError(f'num_train_timesteps={num_train_timesteps!r} must be a positive int.')
  return int(num_train_timesteps)


def _check_order(order):
  if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order not in ORDERS:
    raise ValueError(f'order={order!r} must be one of {ORDERS} (UniPC solver_order).')
  return int(order)


# ------------------------------------------------------------------ schedules


def flow_sigmas(num_steps, shift, num_train_timesteps=1000):
  """UniPC's flow schedule as diffusers' `set_timesteps(num_steps)` builds it for Wan.

  Returns (sigmas float32 [S + 1], timesteps int64 [S]):
    sigmas[:S] = shift_t(linspace(1, 1/T, S + 1)[:S], shift) in float64, the first moved from 1
    to 1 - 1e-6, then rounded to float32 (diffusers steps with float32 sigmas); sigmas[S] = 0.
    timesteps = int64(T * sigmas[:S]) from the float64 sigmas, truncated toward zero: what the
    network sees (first 999), while the updates use the float sigmas.
  """
  num_steps = _check_num_steps(num_steps)
  shift = _check_shift(shift)
  num_train_timesteps = _check_num_train_timesteps(num_train_timesteps)
  base = np.linspace(1.0, 1.0 / num_train_timesteps, num_steps + 1)[:-1]  # [S] float64
  sigmas = np.asarray(shift_t(base, shift), np.float64)  # [S]
  if abs(sigmas[0] - 1.0) < FIRST_SIGMA_EPS:
    sigmas[0] -= FIRST_SIGMA_EPS
  timesteps = (sigmas * num_train_timesteps).astype(np.int64)  # [S], truncated
  sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)  # [S + 1]
  return sigmas, timesteps


def euler_sigmas(num_steps, shift, num_train_timesteps=1000):
  """FlowMatchEulerDiscreteScheduler(shift=shift)'s schedule after `set_timesteps(num_steps)`.

  Returns (sigmas float32 [S + 1], timesteps float32 [S] = T * sigmas[:S]). diffusers first
  builds a float32 training table shift_t(k / T), k = T..1, spaces the S sigmas linearly between
  its ends shift_t(1) (1 up to float32 rounding) and s_min = shift_t(1 / T), then shifts them
  again (float64) before rounding to float32: the last nonzero sigma is shift_t(s_min).
  """
  num_steps = _check_num_steps(num_steps)
  shift = _check_shift(shift)
  num_train_timesteps = _check_num_train_timesteps(num_train_timesteps)
  # The training table's ends, with diffusers' float32 rounding at each operation.
  f32 = np.float32
  t_min = f32(1.0) / f32(num_train_timesteps)
  shift_f32 = lambda t: (f32(shift) * t) / (f32(1.0) + f32(shift - 1.0) * t)
  s_max, s_min = float(shift_f32(f32(1.0))), float(shift_f32(t_min))
  base = np.linspace(s_max * num_train_timesteps, s_min * num_train_timesteps,
                     num_steps) / num_train_timesteps  # [S] float64
  sigmas = np.asarray(shift_t(base, shift), np.float64).astype(np.float32)  # [S]
  timesteps = sigmas * np.float32(num_train_timesteps)  # [S] float32
  sigmas = np.concatenate([sigmas, np.zeros(1, np.float32)])  # [S + 1]
  return sigmas, timesteps


# ------------------------------------------------------------------ UniPC tables


class UniPCTables(NamedTuple):
  """Per-step constants of one UniPC run (K = order history slots, the newest last).

  Step i: corrector x <- corr_x[i] x_last + sum_k corr_m[i, k] hist[k] + corr_new[i] m_i (with
  hist before m_i is pushed; skipped at i = 0), then predictor
  x <- pred_x[i] x + sum_k pred_m[i, k] hist[k] (hist after the push).
  """
  sigmas: jax.Array  # [S + 1] float32
  timesteps: jax.Array  # [S] int32 (diffusers: int64; every value is < T), or float32
  pred_x: jax.Array  # [S] float32
  pred_m: jax.Array  # [S, K] float32
  corr_x: jax.Array  # [S] float32
  corr_m: jax.Array  # [S, K] float32
  corr_new: jax.Array  # [S] float32


class UniPCState(NamedTuple):
  """The loop carry: what diffusers' scheduler keeps between `step` calls."""
  x: jax.Array  # [B, ...] float32: the latents to evaluate the model at next
  last: jax.Array  # [B, ...] float32: x before the last predictor (the corrector's start)
  hist: jax.Array  # [K, B, ...] float32: x0 estimates m, oldest first, zeros before filled
  step: jax.Array  # int32 scalar: the step index i


def _log_snr(sigma):
  """lambda = log(alpha / sigma), alpha = 1 - sigma, float64 (sigma in (0, 1))."""
  return np.log(1.0 - sigma) - np.log(sigma)


def _bh2_weights(lam_t, lam_s, lam_older):
  """One B(h) update from log-SNR lam_s to lam_t using older points lam_older (newest first).

  Returns (h_phi_1 = expm1(-h), b [n + 1], rks [n + 1]) with n = len(lam_older): rks are
  (lam_k - lam_s) / h and a final 1; b_j = j! g_j / B(h) with B(h) = expm1(-h) ('bh2') and
  g_1 = expm1(-h) / (-h) - 1, g_{j+1} = g_j / (-h) - 1 / (j + 1)!.
  """
  h = lam_t - lam_s
  neg_h = -h
  h_phi_1 = np.expm1(neg_h)
  b_of_h = np.expm1(neg_h)
  rks = np.array([(lam - lam_s) / h for lam in lam_older] + [1.0])  # [n + 1]
  b = []
  g = h_phi_1 / neg_h - 1.0
  fact = 1.0
  for j in range(1, len(rks) + 1):
    b.append(g * fact / b_of_h)
    fact *= j + 1
    g = g / neg_h - 1.0 / fact
  return h_phi_1, np.array(b), rks  # scalar, [n + 1], [n + 1]


def _solve_rho(rks, b):
  """rho with sum_j rks_j^(i) rho_j = b_i for i = 0..n-1 (the Vandermonde order conditions)."""
  mat = np.stack([rks ** i for i in range(len(rks))])  # [n, n]
  return np.linalg.solve(mat, b)


def _step_orders(num_steps, order):
  """Predictor order per step: warm-up (i + 1 outputs known) and lower_order_final (S - i)."""
  return [min(order, i + 1, num_steps - i) for i in range(num_steps)]


def unipc_tables(sigmas, timesteps, order=2):
  """Fold every UniPC step's coefficients into float32 tables (float64 arithmetic).

  sigmas [S + 1]: strictly decreasing, sigmas[0] < 1, sigmas[S] = 0, the others > 0 (as
  `flow_sigmas` gives; the coefficients use them as float32, like diffusers). timesteps [S]: what
  the network sees, kept int32 if integers (Wan), else float32 (e.g. the project's 1000 t).
  The last step is first order (lower_order_final): with sigma 0 at the end, h is infinite, and
  a higher order would divide by it.
  """
  order = _check_order(order)
  sig = np.asarray(sigmas, np.float32).astype(np.float64)  # [S + 1]
  timesteps = np.asarray(timesteps)
  if sig.ndim != 1 or sig.shape[0] < 2:
    raise ValueError(f'sigmas of shape {sig.shape} must be [S + 1] with S >= 1.')
  num_steps = sig.shape[0] - 1
  if timesteps.shape != (num_steps,):
    raise ValueError(f'timesteps shape {timesteps.shape} must be [S]=({num_steps},) for '
                     f'{num_steps + 1} sigmas.')
  if sig[-1] != 0.0 or not np.all(sig[:-1] > 0) or not sig[0] < 1.0 \
      or not np.all(np.diff(sig) < 0):
    raise ValueError(f'sigmas={sig.tolist()} must decrease strictly from below 1 to a final 0 '
                     '(float32 values; log-SNR is infinite at 1).')
  t_dtype = jnp.int32 if np.issubdtype(timesteps.dtype, np.integer) else jnp.float32
  lam = _log_snr(sig[:-1])  # [S]; lambda at sigma = 0 is +inf, never formed
  orders = _step_orders(num_steps, order)
  k_slots = order
  pred_x = np.zeros(num_steps)
  pred_m = np.zeros((num_steps, k_slots))  # slot K-1 = m_i, K-1-k = m_{i-k}
  corr_x = np.zeros(num_steps)
  corr_m = np.zeros((num_steps, k_slots))  # before the push: slot K-1 = m_{i-1}
  corr_new = np.zeros(num_steps)
  for i in range(num_steps):
    p = orders[i]
    s, t = sig[i], sig[i + 1]
    # Predictor sigma_i -> sigma_{i+1}, from m_i, m_{i-1}, ..., m_{i-p+1}.
    if t == 0.0:  # the last step: p = 1, expm1(-inf) = -1, sigma_t / sigma_s = 0
      pred_m[i, -1] = 1.0
    else:
      h_phi_1, b, rks = _bh2_weights(_log_snr(t), lam[i], [lam[i - k] for k in range(1, p)])
      if p == 1:
        rho = np.zeros(0)
      elif p == 2:
        rho = np.array([0.5])
      else:
        rho = _solve_rho(rks[:-1], b[:-1])  # [p - 1]
      alpha_t = 1.0 - t
      scale = -alpha_t * h_phi_1  # B(h) = h_phi_1 for bh2
      pred_x[i] = t / s
      pred_m[i, -1] = scale
      for k in range(1, p):  # rho_k (m_{i-k} - m_i) / r_k
        w = scale * rho[k - 1] / rks[k - 1]
        pred_m[i, -1 - k] += w
        pred_m[i, -1] -= w
    # Corrector sigma_{i-1} -> sigma_i with the previous predictor's order q, now that m_i is known.
    if i == 0:
      continue
    q = orders[i - 1]
    h_phi_1, b, rks = _bh2_weights(lam[i], lam[i - 1], [lam[i - 1 - k] for k in range(1, q)])
    rho = np.array([0.5]) if q == 1 else _solve_rho(rks, b)  # [q]
    alpha_t = 1.0 - s
    scale = -alpha_t * h_phi_1
    corr_x[i] = s / sig[i - 1]
    corr_m[i, -1] = scale
    for k in range(1, q):  # rho_k (m_{i-1-k} - m_{i-1}) / r_k
      w = scale * rho[k - 1] / rks[k - 1]
      corr_m[i, -1 - k] += w
      corr_m[i, -1] -= w
    corr_new[i] = scale * rho[-1]  # rho_q (m_i - m_{i-1})
    corr_m[i, -1] -= scale * rho[-1]
  as32 = lambda a: jnp.asarray(a, jnp.float32)
  return UniPCTables(
      sigmas=as32(sig), timesteps=jnp.asarray(timesteps, t_dtype), pred_x=as32(pred_x),
      pred_m=as32(pred_m), corr_x=as32(corr_x), corr_m=as32(corr_m), corr_new=as32(corr_new))


# ------------------------------------------------------------------ UniPC steps


def unipc_init(x_T, order=2):
  """The state before step 0 for noise x_T [B, ...] (cast to float32)."""
  order = _check_order(order)
  x = jnp.asarray(x_T, jnp.float32)  # [B, ...]
  return UniPCState(x=x, last=jnp.zeros_like(x), hist=jnp.zeros((order,) + x.shape, x.dtype),
                    step=jnp.zeros((), jnp.int32))


def _combine(coefs, hist):
  """sum_k coefs[k] hist[k]: coefs [K], hist [K, B, ...] -> [B, ...] (elementwise products, so
  no matmul runs at reduced precision on accelerators)."""
  out = coefs[0] * hist[0]
  for k in range(1, hist.shape[0]):
    out = out + coefs[k] * hist[k]
  return out


def unipc_step(state, velocity, tables):
  """One `UniPCMultistepScheduler.step`: velocity [B, ...] = model(state.x, timesteps[i]).

  Converts the velocity to the x0 estimate m = x - sigma_i v, corrects state.x (i >= 1), pushes
  m into the history and predicts the latents at sigma_{i+1}. Returns the next UniPCState; its
  x is diffusers' `prev_sample` (after the last step: the sample).
  """
  i = state.step
  if velocity.shape != state.x.shape:
    raise ValueError(f'velocity shape {velocity.shape} must equal the latents shape '
                     f'{state.x.shape}.')
  m = state.x - tables.sigmas[i] * velocity.astype(jnp.float32)  # [B, ...]: x0 estimate
  corrected = (tables.corr_x[i] * state.last + _combine(tables.corr_m[i], state.hist)
               + tables.corr_new[i] * m)  # [B, ...]
  x = jnp.where(i > 0, corrected, state.x)  # [B, ...]; step 0 has nothing to correct
  hist = jnp.concatenate([state.hist[1:], m[None]], axis=0)  # [K, B, ...]
  x_next = tables.pred_x[i] * x + _combine(tables.pred_m[i], hist)  # [B, ...]
  return UniPCState(x=x_next, last=x, hist=hist, step=i + 1)


def unipc_walk(model_fn, x_T, tables):
  """Run every step of `tables` from noise x_T [B, ...] in one `fori_loop`; returns [B, ...].

  model_fn(x [B, ...], t [B] of tables.timesteps' dtype) -> velocity [B, ...].
  """
  x_T = jnp.asarray(x_T, jnp.float32)
  batch = x_T.shape[0]
  num_steps = tables.timesteps.shape[0]

  def body(i, state):
    t = jnp.full((batch,), tables.timesteps[i], tables.timesteps.dtype)  # [B]
    return unipc_step(state, model_fn(state.x, t), tables)

  state = jax.lax.fori_loop(0, num_steps, body, unipc_init(x_T, tables.pred_m.shape[1]))
  return state.x


def unipc_sample(model_fn, x_T, *, num_steps, shift, order=2, num_train_timesteps=1000):
  """WanPipeline's sampler: UniPC bh2 on `flow_sigmas(num_steps, shift)` from noise x_T.

  model_fn(x [B, ...] float32, t [B] int32) -> velocity noise - x0 [B, ...] (close over the
  condition, or use `cfg_model_fn`); t = int(1000 sigma). order: UniPC solver_order (Wan: 2).
  Not jitted itself (jit the caller; every argument but model_fn's arrays and x_T is static).
  Returns the sample x0 float32 [B, ...].
  """
  order = _check_order(order)
  sigmas, timesteps = flow_sigmas(num_steps, shift, num_train_timesteps)
  return unipc_walk(model_fn, x_T, unipc_tables(sigmas, timesteps, order))


# ------------------------------------------------------------------ Euler


def euler_step(x, velocity, sigma, sigma_next):
  """One flow Euler step x + (sigma_next - sigma) v, in float32 (FlowMatchEulerDiscrete.step)."""
  return (jnp.asarray(x, jnp.float32)
          + (sigma_next - sigma) * jnp.asarray(velocity, jnp.float32))


def euler_walk(model_fn, x_T, sigmas, timesteps):
  """Euler over any grid: sigmas [S + 1] (descending to 0), timesteps [S] given to model_fn
  (float32 [B] each step). Returns x [B, ...] float32."""
  sigmas = jnp.asarray(sigmas, jnp.float32)  # [S + 1]
  timesteps = jnp.asarray(timesteps, jnp.float32)  # [S]
  if sigmas.ndim != 1 or timesteps.shape != (sigmas.shape[0] - 1,) or timesteps.shape[0] < 1:
    raise ValueError(f'sigmas {sigmas.shape} and timesteps {timesteps.shape} must be [S + 1] '
                     'and [S] with S >= 1.')
  x_T = jnp.asarray(x_T, jnp.float32)
  batch = x_T.shape[0]

  def body(i, x):
    t = jnp.full((batch,), timesteps[i], jnp.float32)  # [B]
    return euler_step(x, model_fn(x, t), sigmas[i], sigmas[i + 1])

  return jax.lax.fori_loop(0, timesteps.shape[0], body, x_T)


def euler_sample(model_fn, x_T, *, num_steps, shift, num_train_timesteps=1000):
  """FlowMatchEulerDiscreteScheduler(shift) sampling from noise x_T [B, ...].

  model_fn(x [B, ...] float32, t [B] float32 = 1000 sigma) -> velocity [B, ...].
  Returns x0 float32 [B, ...].
  """
  sigmas, timesteps = euler_sigmas(num_steps, shift, num_train_timesteps)
  return euler_walk(model_fn, x_T, sigmas, timesteps)


# ------------------------------------------------------------------ guidance


def cfg_model_fn(apply, cond, uncond, guidance_scale, *, batched=False):
  """Classifier-free guidance as WanPipeline does it, as a `model_fn(x, t)`.

  apply(x [B, ...], t [B], context) -> velocity [B, ...]; cond / uncond: the prompt's and the
  negative prompt's context (arrays or pytrees of [B, ...]). Returns
  uncond_v + guidance_scale (cond_v - uncond_v), with two calls per step; batched=True makes one
  call on [x; x] with [cond; uncond] (their shapes must then match: Wan pads both to 512
  tokens). Like WanPipeline, guidance_scale <= 1 runs the conditional call alone.
  """
  if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
      or not np.isfinite(guidance_scale):
    raise ValueError(f'guidance_scale={guidance_scale!r} must be a finite Python number.')
  scale = float(guidance_scale)
  if scale <= 1.0:
    return lambda x, t: apply(x, t, cond)

  def guided(x, t):
    if batched:
      b = x.shape[0]
      both = jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)
      out = apply(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0),
                  both)  # [2B, ...]
      v_cond, v_uncond = out[:b], out[b:]  # [B, ...] each
    else:
      v_cond, v_uncond = apply(x, t, cond), apply(x, t, uncond)  # [B, ...] each
    return v_uncond + scale * (v_cond - v_uncond)

  return guided
