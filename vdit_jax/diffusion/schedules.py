"""Noise schedules for discrete-time diffusion (DDPM-style).

All functions return float64 numpy arrays of length `num_timesteps`; objectives cast them to
float32 device arrays once, at construction.
"""

import math

import numpy as np

SCHEDULES = ('linear', 'cosine')

# Linear schedule endpoints of DDPM (Ho et al. 2020) at 1000 steps.
_LINEAR_BETA_START = 1e-4
_LINEAR_BETA_END = 0.02
# Cosine schedule offset and beta ceiling (Nichol & Dhariwal 2021).
_COSINE_S = 0.008
_COSINE_MAX_BETA = 0.999


def _check_num_timesteps(num_timesteps):
  if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)):
    raise ValueError(
        f'num_timesteps={num_timesteps!r} must be a positive integer, '
        f'got type {type(num_timesteps).__name__}.')
  if num_timesteps < 1:
    raise ValueError(f'num_timesteps={num_timesteps} must be a positive integer (>= 1).')


def linear_betas(num_timesteps):
  """DDPM linear betas, rescaled by 1000 / num_timesteps as in improved-DDPM."""
  _check_num_timesteps(num_timesteps)
  scale = 1000.0 / num_timesteps
  start, end = scale * _LINEAR_BETA_START, scale * _LINEAR_BETA_END
  if end >= 1.0:
    raise ValueError(
        f"schedule 'linear' with num_timesteps={num_timesteps} gives a final beta of "
        f'{end:g}; betas must stay below 1, so num_timesteps must be > 20 '
        f"(or use 'cosine').")
  return np.linspace(start, end, num_timesteps, dtype=np.float64)  # [T]


def cosine_alpha_bar(t):
  """Closed-form abar(t) of the cosine schedule for continuous t in [0, 1], unnormalised."""
  t = np.asarray(t, dtype=np.float64)
  return np.cos((t + _COSINE_S) / (1.0 + _COSINE_S) * math.pi / 2) ** 2


def cosine_betas(num_timesteps):
  """Cosine betas: beta_i = 1 - abar((i+1)/T) / abar(i/T), clipped at 0.999."""
  _check_num_timesteps(num_timesteps)
  grid = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps  # [T + 1]
  abar = cosine_alpha_bar(grid)  # [T + 1]
  betas = 1.0 - abar[1:] / abar[:-1]  # [T]
  return np.minimum(betas, _COSINE_MAX_BETA)


def make_betas(name, num_timesteps):
  """Betas for schedule `name` ('linear' | 'cosine'): float64 numpy array [num_timesteps]."""
  if name == 'linear':
    return linear_betas(num_timesteps)
  if name == 'cosine':
    return cosine_betas(num_timesteps)
  raise ValueError(f'schedule={name!r} is not a known noise schedule; expected one of {SCHEDULES}.')


def check_shift(shift) -> float:
  """`shift` as a float; ValueError unless it is a finite real number > 0 (bools refused)."""
  if isinstance(shift, bool) or not isinstance(shift, (int, float, np.number)) \
      or not (math.isfinite(shift) and shift > 0):
    raise ValueError(f'shift={shift!r} must be a finite number > 0 (1.0 means no shift).')
  return float(shift)


def shift_alphas_cumprod(abar, shift):
  """abar of the schedule whose signal-to-noise ratio is SNR / shift^2 at every step.

  SNR = abar / (1 - abar), so abar' = abar / (abar + shift^2 (1 - abar)). shift > 1 makes
  every step noisier: the steps where a clip's layout is still undecided, few on an
  unshifted schedule for a large or redundant signal (many frames of one object), spread
  over more of the t range, for training draws and sampler steps alike (Hoogeboom et al.
  2023, "simple diffusion"; the same map as the flow time shift). shift = 1: unchanged.
  """
  abar = np.asarray(abar, dtype=np.float64)
  shift = check_shift(shift)
  if shift == 1.0:
    return abar
  return abar / (abar + shift * shift * (1.0 - abar))


def betas_from_alphas_cumprod(abar):
  """beta_i = 1 - abar_i / abar_{i-1} (abar_{-1} = 1): the inverse of `alphas_cumprod`."""
  abar = np.asarray(abar, dtype=np.float64)
  return 1.0 - abar / np.concatenate([[1.0], abar[:-1]])


def make_alphas_cumprod(name, num_timesteps, shift=1.0):
  """abar [num_timesteps] (float64) of schedule `name`, SNR-shifted by `shift`."""
  return shift_alphas_cumprod(alphas_cumprod(make_betas(name, num_timesteps)), shift)


def alphas_cumprod(betas):
  """abar_t = prod_{s <= t} (1 - beta_s): float64 numpy array of the same length as `betas`."""
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.size == 0:
    raise ValueError(f'betas must be a non-empty 1-D array, got shape {betas.shape}.')
  if not np.all((betas > 0) & (betas < 1)):
    raise ValueError(
        f'betas must lie in (0, 1); got min {betas.min():g}, max {betas.max():g}.')
  return np.cumprod(1.0 - betas)
