"""Spacetime patches (tubelets): video <-> tokens."""

from typing import Sequence, Tuple

import einops
import flax.linen as nn
import jax.numpy as jnp

from vdit_jax.parallel import axes


def check_patch(shape_thw: Sequence[int], patch: Sequence[int]) -> None:
  """Raises ValueError unless each of T, H, W is a positive multiple of its patch."""
  if len(patch) != 3:
    raise ValueError(f'patch_size={tuple(patch)} must have 3 entries (pt, ph, pw).')
  for name, size, p in zip('THW', shape_thw, patch):
    if p <= 0:
      raise ValueError(f'patch_size={tuple(patch)}: every entry must be positive.')
    if size <= 0 or size % p:
      raise ValueError(
          f'{name}={size} is not a positive multiple of its patch size {p} '
          f'(patch_size={tuple(patch)} must divide (T, H, W)={tuple(shape_thw)}).')


def token_grid(shape_thw: Sequence[int], patch: Sequence[int]) -> Tuple[int, int, int]:
  """(T/pt, H/ph, W/pw): the token grid of a clip."""
  check_patch(shape_thw, patch)
  return tuple(s // p for s, p in zip(shape_thw, patch))


def patchify(video: jnp.ndarray, patch: Sequence[int]) -> jnp.ndarray:
  """[B, T, H, W, C] -> [B, N, pt*ph*pw*C] with tokens in (t, h, w) order."""
  check_patch(video.shape[1:4], patch)
  pt, ph, pw = patch
  return einops.rearrange(
      video, 'b (t pt) (h ph) (w pw) c -> b (t h w) (pt ph pw c)',
      pt=pt, ph=ph, pw=pw)  # [B, N, P]


def unpatchify(tokens: jnp.ndarray, grid: Sequence[int], patch: Sequence[int],
               channels: int) -> jnp.ndarray:
  """[B, N, pt*ph*pw*C] -> [B, T, H, W, C]; the exact inverse of `patchify`."""
  t, h, w = grid
  pt, ph, pw = patch
  if tokens.shape[1] != t * h * w:
    raise ValueError(f'{tokens.shape[1]} tokens do not fill the grid {tuple(grid)}.')
  if tokens.shape[2] != pt * ph * pw * channels:
    raise ValueError(f'token width {tokens.shape[2]} != pt*ph*pw*C for '
                     f'patch {tuple(patch)} and C={channels}.')
  return einops.rearrange(
      tokens, 'b (t h w) (pt ph pw c) -> b (t pt) (h ph) (w pw) c',
      t=t, h=h, w=w, pt=pt, ph=ph, pw=pw, c=channels)  # [B, T, H, W, C]


class PatchEmbed(nn.Module):
  """Tubelet embedding: a linear map of each flattened (pt, ph, pw, C) patch.

  Equal to a Conv3D with kernel = stride = patch, written as a matmul so that
  its kernel carries logical axis names.
  """
  width: int
  patch: Tuple[int, int, int]
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, video):  # [B, T, H, W, C]
    x = patchify(video, self.patch)  # [B, N, P]
    return nn.Dense(
        self.width, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.xavier_uniform(), (axes.PATCH, axes.EMBED)),
        bias_init=nn.with_logical_partitioning(
            nn.initializers.zeros, (axes.EMBED,)),
        name='proj')(x)  # [B, N, D]


def check_audio_patch(num_mel_frames: int, patch: int) -> None:
  """Raises ValueError unless the mel frames are a positive multiple of the audio patch."""
  if patch <= 0:
    raise ValueError(f'audio.patch={patch} must be positive.')
  if num_mel_frames <= 0 or num_mel_frames % patch:
    raise ValueError(f'{num_mel_frames} mel frames are not a positive multiple of '
                     f'audio.patch={patch} (mel frames per audio token).')


def audio_patchify(audio: jnp.ndarray, patch: int) -> jnp.ndarray:
  """Log-mel frames [B, F, M] -> audio tokens [B, F / pa, pa * M] in time order."""
  check_audio_patch(audio.shape[1], patch)
  return einops.rearrange(audio, 'b (n pa) m -> b n (pa m)', pa=patch)  # [B, Na, pa M]


def audio_unpatchify(tokens: jnp.ndarray, patch: int, mel_bins: int) -> jnp.ndarray:
  """[B, Na, pa * M] -> [B, Na pa, M]; the exact inverse of `audio_patchify`."""
  if tokens.shape[2] != patch * mel_bins:
    raise ValueError(f'audio token width {tokens.shape[2]} != audio.patch * mel_bins = '
                     f'{patch} * {mel_bins}.')
  return einops.rearrange(tokens, 'b n (pa m) -> b (n pa) m', pa=patch, m=mel_bins)


class AudioEmbed(nn.Module):
  """Audio tokens: a linear map of each patch of `patch` log-mel frames [B, F, M] ->
  [B, F / pa, D] (the audio twin of PatchEmbed; its kernel carries logical names)."""
  width: int
  patch: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, audio):  # [B, F, M]
    x = audio_patchify(audio, self.patch)  # [B, Na, pa M]
    return nn.Dense(
        self.width, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.xavier_uniform(), (axes.PATCH, axes.EMBED)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes.EMBED,)),
        name='proj')(x)  # [B, Na, D]
