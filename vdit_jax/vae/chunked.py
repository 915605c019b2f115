"""Encode and decode long or large clips in bounded memory: temporal chunks through the
causal frame caches, and optionally overlapping spatial tiles blended together.

    mean, logvar = encode_video(cfg, params, video)      # video [B, T, H, W, C] in [-1, 1]
    video = decode_latents(cfg, params, mean)            # [B, T, H, W, C] in [-1, 1]
    video = decode_latents(cfg, params, z, tiling=Tiling(256, 256, 192, 192))

Time: the clip is cut as diffusers' `AutoencoderKLWan` cuts it (encoding: the first frame
alone, then `frames_per_chunk` frames, default 4; decoding: the first latent frame alone,
then `latents_per_chunk`, default 1). Each chunk is one jitted call that carries the
layers' `cache` collection (the last frames each causal layer needs) to the next, so the
result equals a whole-clip `WanVAE.encode` / `decode` (up to float rounding; tested) while
device memory holds one chunk's activations. Results are gathered on the host (numpy).

Space (`tiling`, optional): frames larger than one tile are cut into tiles of
`min_height x min_width` pixels every `stride_height x stride_width` pixels; each tile is
encoded/decoded on its own (chunked in time) and the overlaps are blended linearly, the
tile above and the tile to the left into the current one, exactly as diffusers'
`tiled_encode` / `tiled_decode` do (tested against them). Tiles see less context than the
whole frame, so a tiled result differs a little from an untiled one.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Callable, Optional, Tuple

import jax
import numpy as np

from vdit_jax.vae import model as vae_model
from vdit_jax.vae.config import VAEConfig
from vdit_jax.vae.config import check_clip_shape


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Spatial tiles, in pixels (diffusers' names without `tile_sample_`, and its defaults)."""
  min_height: int = 256
  min_width: int = 256
  stride_height: int = 192
  stride_width: int = 192

  def check(self, cfg: VAEConfig) -> None:
    s = cfg.spatial_factor
    for name in ('min_height', 'min_width', 'stride_height', 'stride_width'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < s or (
          value % s):
        raise ValueError(f'tiling {name}={value!r} must be a positive multiple of the VAE\'s '
                         f'spatial factor {s}.')
    if self.stride_height > self.min_height or self.stride_width > self.min_width:
      raise ValueError(f'tiling strides ({self.stride_height}, {self.stride_width}) must not '
                       f'exceed the tile size ({self.min_height}, {self.min_width}): tiles must '
                       'cover the frame.')


def _chunk_fn(cfg: VAEConfig, method: str, first_chunk: bool, clip: bool = False) -> Callable:
  """jit((params, cache, x) -> (output, cache)) of one chunk of `WanVAE.<method>`."""
  # The latents' statistics do not change the network: VAEs that differ only there share
  # one compiled function per shape.
  return _jitted_chunk_fn(dataclasses.replace(cfg, latents_mean=None, latents_std=None),
                          method, first_chunk, clip)


@functools.lru_cache(maxsize=None)
def _jitted_chunk_fn(cfg: VAEConfig, method: str, first_chunk: bool, clip: bool) -> Callable:
  model = vae_model.WanVAE(cfg)
  kwargs = {'clip': clip} if method == 'decode' else {}

  def step(params, cache, x):
    variables = {'params': params}
    if cache is not None:
      variables['cache'] = cache
    out, state = model.apply(variables, x, first_chunk=first_chunk,
                             method=getattr(vae_model.WanVAE, method), mutable=['cache'],
                             **kwargs)
    return out, state['cache']

  return jax.jit(step)


def _positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f'{name} must be a positive integer, got {value!r}.')
  return int(value)


def _run_chunks(cfg: VAEConfig, method: str, params, x, chunk: int, clip: bool = False):
  """x[:, :1] with first_chunk=True, then x[:, 1 + k * chunk: ...]: outputs concatenated."""
  x = np.asarray(x)
  out, cache = _chunk_fn(cfg, method, True, clip)(params, None, x[:, :1])
  outs = [np.asarray(out)]
  for start in range(1, x.shape[1], chunk):
    out, cache = _chunk_fn(cfg, method, False, clip)(params, cache, x[:, start:start + chunk])
    outs.append(np.asarray(out))
  return np.concatenate(outs, axis=1)


def _encode_moments(cfg: VAEConfig, params, video, frames_per_chunk: int) -> np.ndarray:
  return _run_chunks(cfg, 'encode_moments', params, video, frames_per_chunk)


def _decode_unclipped(cfg: VAEConfig, params, z, latents_per_chunk: int) -> np.ndarray:
  return _run_chunks(cfg, 'decode', params, z, latents_per_chunk, clip=False)


def _blend(a: np.ndarray, b: np.ndarray, extent: int, axis: int) -> np.ndarray:
  """b with its first `extent` rows (axis 2) or columns (axis 3) faded in from a's last."""
  extent = min(a.shape[axis], b.shape[axis], extent)
  if extent <= 0:
    return b
  shape = [1] * b.ndim
  shape[axis] = extent
  w = (np.arange(extent, dtype=np.float32) / np.float32(extent)).reshape(shape)
  b = b.copy()
  head = [slice(None)] * b.ndim
  head[axis] = slice(0, extent)
  tail = [slice(None)] * a.ndim
  tail[axis] = slice(a.shape[axis] - extent, a.shape[axis])
  b[tuple(head)] = a[tuple(tail)] * (1 - w) + b[tuple(head)] * w
  return b


def _tiled(fn: Callable, x: np.ndarray, tile_in: Tuple[int, int], stride_in: Tuple[int, int],
           blend_out: Tuple[int, int], stride_out: Tuple[int, int],
           size_out: Tuple[int, int]) -> np.ndarray:
  """fn on overlapping tiles of x [B, T, H, W, C], blended and cut to `size_out` (H, W)."""
  rows = []
  for i in range(0, x.shape[2], stride_in[0]):
    row = []
    for j in range(0, x.shape[3], stride_in[1]):
      tile = fn(x[:, :, i:i + tile_in[0], j:j + tile_in[1]])
      if rows:
        tile = _blend(rows[-1][len(row)], tile, blend_out[0], axis=2)
      if row:
        tile = _blend(row[-1], tile, blend_out[1], axis=3)
      row.append(tile)
    rows.append(row)
  out = np.concatenate([
      np.concatenate([t[:, :, :stride_out[0], :stride_out[1]] for t in row], axis=3)
      for row in rows], axis=2)
  return out[:, :, :size_out[0], :size_out[1]]


def encode_video(cfg: VAEConfig, params, video, *, frames_per_chunk: Optional[int] = None,
                 tiling: Optional[Tiling] = None) -> Tuple[np.ndarray, np.ndarray]:
  """video [B, T, H, W, C] in [-1, 1] -> (mean, logvar) [B, T', H', W', z] on the host.

  `frames_per_chunk` (default: the temporal factor, 4) must be a multiple of it; T must be
  1 + 4k. With `tiling`, frames larger than one tile are encoded tile by tile.
  """
  video = np.asarray(video)
  if video.ndim != 5:
    raise ValueError(f'video must be [B, T, H, W, C], got shape {video.shape}.')
  b, t, h, w, _ = video.shape
  check_clip_shape(cfg, t, h, w)
  factor = cfg.temporal_factor
  chunk = _positive_int('frames_per_chunk', factor if frames_per_chunk is None
                        else frames_per_chunk)
  if chunk % factor:
    raise ValueError(f'frames_per_chunk={chunk} must be a multiple of the VAE\'s temporal '
                     f'factor {factor}.')
  encode = functools.partial(_encode_moments, cfg, params, frames_per_chunk=chunk)
  if tiling is not None:
    tiling.check(cfg)
  if tiling is None or (h <= tiling.min_height and w <= tiling.min_width):
    moments = encode(video)
  else:
    s = cfg.spatial_factor
    moments = _tiled(
        encode, video, tile_in=(tiling.min_height, tiling.min_width),
        stride_in=(tiling.stride_height, tiling.stride_width),
        blend_out=((tiling.min_height - tiling.stride_height) // s,
                   (tiling.min_width - tiling.stride_width) // s),
        stride_out=(tiling.stride_height // s, tiling.stride_width // s),
        size_out=(h // s, w // s))
  mean, logvar = vae_model.split_moments(moments)
  return np.asarray(mean), np.asarray(logvar)


def decode_latents(cfg: VAEConfig, params, z, *, latents_per_chunk: int = 1,
                   tiling: Optional[Tiling] = None, clip: bool = True) -> np.ndarray:
  """z [B, T', H', W', z_dim] -> video [B, 1 + 4 (T' - 1), 8 H', 8 W', C] on the host.

  Decodes the first latent frame, then `latents_per_chunk` at a time; with `tiling`,
  latents larger than one tile are decoded tile by tile and blended. Clipped to [-1, 1]
  unless clip=False.
  """
  z = np.asarray(z)
  if z.ndim != 5 or z.shape[-1] != cfg.z_dim:
    raise ValueError(f'latents must be [B, T\', H\', W\', z_dim={cfg.z_dim}], got shape '
                     f'{z.shape}.')
  chunk = _positive_int('latents_per_chunk', latents_per_chunk)
  decode = functools.partial(_decode_unclipped, cfg, params, latents_per_chunk=chunk)
  s = cfg.spatial_factor
  _, _, h, w, _ = z.shape
  if tiling is not None:
    tiling.check(cfg)
  if tiling is None or (h <= tiling.min_height // s and w <= tiling.min_width // s):
    video = decode(z)
  else:
    video = _tiled(
        decode, z, tile_in=(tiling.min_height // s, tiling.min_width // s),
        stride_in=(tiling.stride_height // s, tiling.stride_width // s),
        blend_out=(tiling.min_height - tiling.stride_height,
                   tiling.min_width - tiling.stride_width),
        stride_out=(tiling.stride_height, tiling.stride_width), size_out=(h * s, w * s))
  return np.clip(video, -1.0, 1.0) if clip else video
