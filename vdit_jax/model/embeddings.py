"""Embeddings: timesteps, class labels, and 3-D positions (sin-cos and RoPE).

Positions are computed from the token grid, never stored in a table, so one
set of weights serves any (T, H, W) that the patch divides.
"""

import math
from typing import Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vdit_jax.parallel import axes


def split_three(dim: int) -> Tuple[int, int, int]:
  """Splits an even `dim` into three even parts for the (t, h, w) axes."""
  if dim % 2 or dim < 6:
    raise ValueError(f'dimension {dim} must be even and >= 6 to split across (t, h, w).')
  part = 2 * (dim // 6)
  return part, part, dim - 2 * part


def sincos_1d(positions: jnp.ndarray, dim: int, max_period: float = 10_000.0) -> jnp.ndarray:
  """[N] -> [N, dim] of (sin, cos) features; `dim` even."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]  # [N, dim/2]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [N, dim]


def grid_positions(grid: Sequence[int]) -> jnp.ndarray:
  """[N, 3] integer (t, h, w) coordinates of a token grid in (t, h, w) order."""
  t, h, w = grid
  tt, hh, ww = jnp.meshgrid(jnp.arange(t), jnp.arange(h), jnp.arange(w), indexing='ij')
  return jnp.stack([tt.ravel(), hh.ravel(), ww.ravel()], axis=-1)  # [N, 3]


def sincos_3d(grid: Sequence[int], dim: int) -> jnp.ndarray:
  """Additive 3-D sin-cos position table [N, dim] for a (t, h, w) token grid."""
  pos = grid_positions(grid)  # [N, 3]
  parts = split_three(dim)
  return jnp.concatenate(
      [sincos_1d(pos[:, i], d) for i, d in enumerate(parts)], axis=-1)  # [N, D]


ROPE_STYLES = ('halves', 'wan')  # model.rope_style


def rope_3d(grid: Sequence[int], head_dim: int, max_period: float = 10_000.0,
            style: str = 'halves') -> Tuple[jnp.ndarray, jnp.ndarray]:
  """3-D rotary tables (cos, sin), each [N, head_dim // 2].

  The head dim is split across t, h and w; each part rotates pairs of
  features by angles proportional to that coordinate.

  style 'halves': t, h get 2 (Dh // 6) dims each and w the rest; `apply_rope` pairs
  feature i with i + Dh/2. style 'wan' (Wan 2.1): h, w get 2 (Dh // 6) each and t the
  rest (Dh 128: 44 / 42 / 42), angles computed in float64 as diffusers does, and
  `apply_rope(..., pairs=True)` pairs features 2i and 2i + 1.
  """
  cells = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in grid), indexing='ij')
  return rope_at(np.stack([c.ravel() for c in cells], axis=-1), head_dim, max_period,
                 style)  # positions [N, 3] in (t, h, w) order


def rope_at(positions, head_dim: int, max_period: float = 10_000.0,
            style: str = 'halves') -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Rotary tables (cos, sin), each [N, head_dim // 2], at (t, h, w) positions [N, 3] that
  may be fractional: `rope_3d` is this at a grid's points, so tokens on a grid and tokens
  placed between its points (audio tokens on the video's time axis, model/av_dit.py) share
  one coordinate system."""
  pos = np.asarray(positions, np.float64)  # [N, 3]
  if pos.ndim != 2 or pos.shape[1] != 3:
    raise ValueError(f'RoPE positions must be [N, 3] (t, h, w), got {pos.shape}.')
  if style == 'wan':
    side = 2 * (head_dim // 6)
    if head_dim % 2 or head_dim < 6:
      raise ValueError(f'head dim {head_dim} must be even and >= 6 for 3-D RoPE.')
    angles = []
    for i, d in enumerate((head_dim - 2 * side, side, side)):
      freqs = 1.0 / max_period ** (np.arange(0, d, 2, dtype=np.float64) / d)  # [d/2]
      angles.append(pos[:, i:i + 1] * freqs[None, :])  # [N, d/2]
    angles = np.concatenate(angles, axis=-1)  # [N, Dh/2]
    return (jnp.asarray(np.cos(angles), jnp.float32),
            jnp.asarray(np.sin(angles), jnp.float32))
  if style != 'halves':
    raise ValueError(f'model.rope_style={style!r} is not one of {ROPE_STYLES}.')
  pos = jnp.asarray(pos, jnp.float32)  # [N, 3]
  angles = []
  for i, d in enumerate(split_three(head_dim)):
    half = d // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles.append(pos[:, i:i + 1] * freqs[None, :])  # [N, d/2]
  angles = jnp.concatenate(angles, axis=-1)  # [N, Dh/2]
  return jnp.cos(angles), jnp.sin(angles)


def audio_token_times(num_tokens: int, audio_patch: int, mel_frames_per_frame: int,
                      video_patch_t: int) -> np.ndarray:
  """Time positions [Na] of audio tokens on the video token grid's time axis.

  The unit is one video token (pt frames): video token t' covers frames pt t' ..
  pt t' + pt - 1 and sits at t'. Mel frame j is centred at frame j / r (r mel frames per
  video frame, hop-aligned), so audio token j (mel frames pa j .. pa j + pa - 1) is centred
  at frame (pa j + (pa - 1) / 2) / r, i.e. at position
      ((pa j + (pa - 1) / 2) / r - (pt - 1) / 2) / pt.
  An audio token and a video token centred on the same instant get the same position, and
  so the same time phase under RoPE."""
  j = np.arange(num_tokens, dtype=np.float64)
  centre_frames = (audio_patch * j + (audio_patch - 1) / 2.0) / mel_frames_per_frame
  return (centre_frames - (video_patch_t - 1) / 2.0) / video_patch_t  # [Na]


def audio_positions(num_tokens: int, grid: Sequence[int], audio_patch: int,
                    mel_frames_per_frame: int, video_patch_t: int) -> np.ndarray:
  """[Na, 3] (t, h, w) positions of audio tokens beside a video token grid (T', H', W'):
  their time on the video's axis (`audio_token_times`), and the centre of the picture in
  h and w (a soundtrack belongs to the whole frame)."""
  times = audio_token_times(num_tokens, audio_patch, mel_frames_per_frame, video_patch_t)
  centre_h, centre_w = (grid[1] - 1) / 2.0, (grid[2] - 1) / 2.0
  return np.stack([times, np.full_like(times, centre_h), np.full_like(times, centre_w)],
                  axis=-1)  # [Na, 3]


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray,
               pairs: bool = False) -> jnp.ndarray:
  """Rotates [B, N, K, Dh] by tables [N, Dh/2]: halves layout (x1 = x[..., :Dh/2], x2 the
  rest), or with `pairs` interleaved (x1 = x[..., 0::2], x2 = x[..., 1::2]; Wan 2.1)."""
  if pairs:
    pair = x.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))  # [B, N, K, Dh/2, 2]
    x1, x2 = pair[..., 0], pair[..., 1]
    c = cos[None, :, None, :].astype(x.dtype)
    s = sin[None, :, None, :].astype(x.dtype)
    return jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1).reshape(x.shape)
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]  # [B, N, K, Dh/2]
  c = cos[None, :, None, :].astype(x.dtype)
  s = sin[None, :, None, :].astype(x.dtype)
  return jnp.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)  # [B, N, K, Dh]


def timestep_features(t: jnp.ndarray, dim: int, max_period: float = 10_000.0) -> jnp.ndarray:
  """Sinusoidal features of (possibly fractional) timesteps: [B] -> [B, dim]."""
  if dim % 2:
    raise ValueError(f'timestep feature dim {dim} must be even.')
  return sincos_1d(t, dim, max_period)  # [B, dim]


class TimestepEmbedder(nn.Module):
  """Sinusoidal features of t followed by a two-layer MLP: [B] -> [B, D]."""
  width: int
  freq_dim: int = 256
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, t):  # [B]
    init = nn.initializers.normal(0.02)
    x = timestep_features(t, self.freq_dim).astype(self.dtype)  # [B, F]
    x = nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=nn.with_logical_partitioning(init, (axes.FREQ, axes.EMBED)),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes.EMBED,)),
                 name='mlp_in')(x)
    x = nn.silu(x)
    return nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=nn.with_logical_partitioning(init, (axes.MLP, axes.EMBED)),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes.EMBED,)),
                    name='mlp_out')(x)  # [B, D]


class LossLogVariance(nn.Module):
  """EDM2's loss uncertainty (Karras et al. 2024): u(t) [B] float32, a linear map of the
  sinusoidal features of t, zero at init. The loss of a clip at t becomes
  L / exp(u(t)) + u(t), which the model minimises at u = log E[L | t]: each noise level's
  loss is weighed by the inverse of its own expected value, learnt along the way."""
  freq_dim: int = 256
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, t):  # [B]
    x = timestep_features(t, self.freq_dim).astype(jnp.float32)  # [B, F]
    u = nn.Dense(1, dtype=jnp.float32, param_dtype=self.param_dtype,
                 kernel_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                          (axes.FREQ, None)),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                 name='proj')(x)
    return u[:, 0]


class LabelEmbedder(nn.Module):
  """Class labels -> [B, D]; row `num_classes` is the null label used for CFG."""
  num_classes: int
  width: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, labels):  # [B] int, in [0, num_classes]
    table = nn.Embed(
        self.num_classes + 1, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (axes.CLASSES, axes.EMBED)),
        name='table')
    return table(labels)  # [B, D]


class LabelTokens(nn.Module):
  """Class labels -> (context [B, K, D], mask bool [B, K]): K learned tokens per class
  (row `num_classes` the null label's), which each block's cross-attention sub-layer
  reads (model.class_tokens; the text path's sub-layer, model/text.py). Beside the
  label's adaLN vector, which scales and shifts every token alike, the tokens give each
  video token its own read of the class through its query (the class 'beside
  cross-attention' of PixArt-style conditioning)."""
  num_classes: int
  num_tokens: int
  width: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, labels):  # [B] int, in [0, num_classes]
    table = self.param('table', nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (axes.CLASSES, None, axes.EMBED)),
        (self.num_classes + 1, self.num_tokens, self.width), self.param_dtype)
    context = jnp.take(table, labels, axis=0).astype(self.dtype)  # [B, K, D]
    return context, jnp.ones(context.shape[:2], bool)
