"""Layers of the causal video VAE: causal 3-D convolutions with a frame cache, RMS norm,
residual and attention blocks, and the space-time down/up-sampling of Wan 2.1's VAE.

All activations are channels-last, `# [B, T, H, W, C]`. Time is causal: output frame t
depends on input frames <= t only, and the first frame is treated on its own (it is a
still image: temporal down/up-sampling passes it through unchanged).

Chunked processing (bounded memory on long clips) uses Flax's `cache` collection, as
autoregressive decoding does for attention: when a module is applied with
`mutable=['cache']`, each layer that looks back in time keeps the last input frames it
needs, and a later call with `first_chunk=False` continues the clip where the previous
call stopped. Without a mutable `cache` (a whole clip in one call) nothing is stored.
The chunk that starts the clip is always called with `first_chunk=True`; it may be the
whole clip. Chunks after the first must hold a multiple of the layer's time stride.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from vdit_jax.parallel import axes

# Logical axis names of the VAE's weights. No default rule mentions them, so they stay
# replicated (a VAE is small; data parallelism is what it needs) unless a config's
# logical_axis_rules maps them.
CONV_IN = 'vae_conv_in'    # input channels of a convolution / projection
CONV_OUT = 'vae_conv_out'  # output channels
CHANNELS = 'vae_channels'  # per-channel vectors (norm scales)
# Activations: batch as everywhere; frames / height / width are named so that a rule can
# shard them (e.g. spatially parallel decoding of large frames); by default they are not.
ACT_FRAMES = 'activation_frames'
ACT_HEIGHT = 'activation_height'
ACT_WIDTH = 'activation_width'
VIDEO_AXES = (axes.ACT_BATCH, ACT_FRAMES, ACT_HEIGHT, ACT_WIDTH, axes.ACT_EMBED)

_NORM_EPS = 1e-12  # as torch.nn.functional.normalize
# Kernels [..., Ci, Co]: uniform with variance 1 / fan_in (fan_in = taps x Ci); biases 0,
# norm scales 1. `vae.checkpoint.init_params` draws the same distributions in one call.
KERNEL_INIT = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')


def constrain(x: jax.Array) -> jax.Array:
  """Sharding constraint of a `# [B, T, H, W, C]` activation (no-op outside a mesh)."""
  return nn.with_logical_constraint(x, VIDEO_AXES)


def _conv_params(module: nn.Module, kernel_size: Sequence[int], in_features: int,
                 features: int) -> Tuple[jax.Array, jax.Array]:
  """kernel `[*kernel_size, Ci, Co]` and bias `[Co]`, both with logical axis names."""
  names = (None,) * len(kernel_size) + (CONV_IN, CONV_OUT)
  kernel = module.param('kernel', nn.with_logical_partitioning(KERNEL_INIT, names),
                        (*kernel_size, in_features, features))
  bias = module.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, (CONV_OUT,)),
                      (features,))
  return kernel, bias


def _conv3d(x, kernel, bias, *, strides=(1, 1, 1), padding=((0, 0), (0, 0), (0, 0)),
            dtype=jnp.float32):
  """x [B, T, H, W, Ci] * kernel [kt, kh, kw, Ci, Co] -> [B, T', H', W', Co]."""
  y = lax.conv_general_dilated(
      x.astype(dtype), kernel.astype(dtype), window_strides=strides, padding=padding,
      dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'))
  return y + bias.astype(dtype)


def _frames(x: jax.Array, n: int) -> jax.Array:
  """The first `n` frames of x [B, T, H, W, C] (n may be 0)."""
  return lax.slice_in_dim(x, 0, n, axis=1)


class CausalConv3d(nn.Module):
  """3-D convolution, causal in time: `kt - 1` past frames (zeros before the clip) and
  `(kh // 2, kw // 2)` zero padding in space. Stride 1. T frames in, T frames out.

  With a mutable `cache` collection it keeps its last `kt - 1` input frames, and a call
  with `first_chunk=False` takes them as its past instead of zeros.
  """
  features: int
  kernel_size: Tuple[int, int, int] = (3, 3, 3)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, first_chunk: bool = True) -> jax.Array:
    kt, kh, kw = self.kernel_size
    b, t, h, w, c = x.shape  # [B, T, H, W, Ci]
    kernel, bias = _conv_params(self, self.kernel_size, c, self.features)
    x = x.astype(self.dtype)
    past = kt - 1
    if past:
      cached = _cached_frames(self, x, past, first_chunk)
      zeros = jnp.zeros((b, past, h, w, c), self.dtype)
      x = jnp.concatenate([zeros if cached is None else cached.value, x], axis=1)
      if cached is not None:
        cached.value = lax.slice_in_dim(x, x.shape[1] - past, x.shape[1], axis=1)
    if t == 0:  # nothing to compute (e.g. the first chunk's frames after the first)
      return jnp.zeros((b, 0, h, w, self.features), self.dtype)
    padding = ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2))
    return _conv3d(x, kernel, bias, padding=padding, dtype=self.dtype)  # [B, T, H, W, Co]


def _name(module: nn.Module) -> str:
  return '/'.join(module.path)


def _cached_frames(module: nn.Module, x: jax.Array, num_frames: int,
                   first_chunk: bool) -> Optional[nn.Variable]:
  """The module's cache of its last `num_frames` input frames, or None when not caching.

  Raises if a chunk after the first arrives without the cache of the chunks before it.
  """
  if not module.is_mutable_collection('cache'):
    if not first_chunk:
      raise ValueError(f'{_name(module)}: first_chunk=False needs the cache of the previous '
                       "chunks: apply with mutable=['cache'] and pass the returned cache.")
    return None
  if not first_chunk and not module.has_variable('cache', 'frames'):
    raise ValueError(f'{_name(module)}: first_chunk=False but there is no cache; run the '
                     'clip\'s first chunk first (first_chunk=True).')
  b, _, h, w, c = x.shape
  return module.variable('cache', 'frames', jnp.zeros, (b, num_frames, h, w, c), x.dtype)


class RMSNorm(nn.Module):
  """x / ||x|| * sqrt(C) * scale over channels, per position (Wan's RMS_norm), in float32."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, (CHANNELS,)),
                       (c,))
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
    y = x32 / jnp.maximum(norm, _NORM_EPS) * (math.sqrt(c) * scale)
    return y.astype(self.dtype)


class ResidualBlock(nn.Module):
  """norm -> silu -> causal conv, twice, plus a (1x1x1-projected) shortcut."""
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, first_chunk: bool = True) -> jax.Array:
    shortcut = x  # [B, T, H, W, Ci]
    if x.shape[-1] != self.features:
      shortcut = CausalConv3d(self.features, (1, 1, 1), self.dtype, name='conv_shortcut')(x)
    y = nn.silu(RMSNorm(self.dtype, name='norm1')(x))
    y = CausalConv3d(self.features, dtype=self.dtype, name='conv1')(y, first_chunk)
    y = nn.silu(RMSNorm(self.dtype, name='norm2')(y))
    y = CausalConv3d(self.features, dtype=self.dtype, name='conv2')(y, first_chunk)
    return constrain(y + shortcut.astype(self.dtype))  # [B, T, H, W, Co]


class _Dense(nn.Module):
  """x [..., Ci] @ kernel [Ci, Co] + bias (a 1x1 convolution)."""
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel, bias = _conv_params(self, (), x.shape[-1], self.features)
    y = jnp.einsum('...c,cd->...d', x.astype(self.dtype), kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)


class AttentionBlock(nn.Module):
  """Single-head self-attention over the H*W positions of each frame, plus the input."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, h, w, c = x.shape
    y = RMSNorm(self.dtype, name='norm')(x)
    qkv = _Dense(3 * c, self.dtype, name='to_qkv')(y)  # [B, T, H, W, 3C]
    qkv = einops.rearrange(qkv, 'b t h w (k c) -> k b t (h w) c', k=3)
    q, k, v = qkv[0], qkv[1], qkv[2]  # [B, T, N, C] each, N = H * W
    logits = jnp.einsum('btnc,btmc->btnm', q, k).astype(jnp.float32) / math.sqrt(c)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)  # [B, T, N, N]
    y = jnp.einsum('btnm,btmc->btnc', weights, v)  # [B, T, N, C]
    y = einops.rearrange(y, 'b t (h w) c -> b t h w c', h=h, w=w)
    y = _Dense(c, self.dtype, name='proj')(y)
    return constrain(y + x.astype(self.dtype))  # [B, T, H, W, C]


class MidBlock(nn.Module):
  """resnet, attention, resnet at the lowest resolution (names as diffusers' WanMidBlock)."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, first_chunk: bool = True) -> jax.Array:
    c = x.shape[-1]
    x = ResidualBlock(c, self.dtype, name='resnets_0')(x, first_chunk)
    x = AttentionBlock(self.dtype, name='attentions_0')(x)
    return ResidualBlock(c, self.dtype, name='resnets_1')(x, first_chunk)


class _FrameConv(nn.Module):
  """A 2-D convolution applied to every frame: [B, T, H, W, Ci] -> [B, T, H', W', Co]."""
  features: int
  strides: int = 1
  padding: Tuple[Tuple[int, int], Tuple[int, int]] = ((1, 1), (1, 1))
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, t = x.shape[:2]
    kernel, bias = _conv_params(self, (3, 3), x.shape[-1], self.features)
    frames = einops.rearrange(x.astype(self.dtype), 'b t h w c -> (b t) h w c')
    y = lax.conv_general_dilated(
        frames, kernel.astype(self.dtype), window_strides=(self.strides, self.strides),
        padding=self.padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    y = y + bias.astype(self.dtype)
    return einops.rearrange(y, '(b t) h w c -> b t h w c', b=b, t=t)


class Downsample(nn.Module):
  """Halves H and W (3x3 conv, stride 2, zero pad right/bottom); with `temporal`, then
  also halves time after the first frame: frames 0, (0 1 2) -> 1, (2 3 4) -> 2, ...

  Time: frame 0 passes through; output frame j >= 1 is a (3, 1, 1) conv of input frames
  2j - 2, 2j - 1, 2j. T = 1 + 2k frames -> 1 + k. A chunk after the first holds an even
  number of frames and uses the previous chunk's last frame as frame 2j - 2.
  """
  temporal: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, first_chunk: bool = True) -> jax.Array:
    c = x.shape[-1]
    x = _FrameConv(c, strides=2, padding=((0, 1), (0, 1)), dtype=self.dtype,
                   name='resample')(x)  # [B, T, H/2, W/2, C]
    if not self.temporal:
      return x
    t = x.shape[1]
    if (t % 2 == 0) if first_chunk else (t % 2 == 1):
      raise ValueError(f'{_name(self)}: a chunk of {t} frames at this level cannot be halved '
                       'in time (the first chunk needs 1 + 2k frames, later ones 2k).')
    time_conv = _TimeConv(c, strides=2, dtype=self.dtype, name='time_conv')
    cached = _cached_frames(self, x, 1, first_chunk)
    if first_chunk:
      head, window = _frames(x, 1), x  # frame 0 as it is; windows start at frame 0
    else:
      head, window = None, jnp.concatenate([cached.value, x], axis=1)
    if cached is not None:
      cached.value = lax.slice_in_dim(x, t - 1, t, axis=1)
    y = time_conv(window)  # [B, (len(window) - 1) / 2, H/2, W/2, C]
    return constrain(y if head is None else jnp.concatenate([head, y], axis=1))


class _TimeConv(nn.Module):
  """A (3, 1, 1) convolution over time, no padding: [B, T, H, W, Ci] -> [B, T', H, W, Co]."""
  features: int
  strides: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, h, w, c = x.shape
    kernel, bias = _conv_params(self, (3, 1, 1), c, self.features)
    if t < 3:
      return jnp.zeros((b, 0, h, w, self.features), self.dtype)
    return _conv3d(x, kernel, bias, strides=(self.strides, 1, 1), dtype=self.dtype)


class Upsample(nn.Module):
  """With `temporal`, first doubles time after the first frame (a causal (3, 1, 1) conv to
  2C channels, read as two frames of C); then doubles H and W (nearest) and applies a 3x3
  conv to `features` channels. T = 1 + k frames -> 1 + 2k.
  """
  features: int
  temporal: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, first_chunk: bool = True) -> jax.Array:
    c = x.shape[-1]
    if self.temporal:
      head = _frames(x, 1) if first_chunk else None
      rest = lax.slice_in_dim(x, 1, x.shape[1], axis=1) if first_chunk else x
      # Causal in the frames after the first: zeros before frame 1, not frame 0.
      y = CausalConv3d(2 * c, (3, 1, 1), self.dtype, name='time_conv')(rest, first_chunk)
      y = einops.rearrange(y, 'b t h w (two c) -> b (t two) h w c', two=2)  # [B, 2T, H, W, C]
      x = y if head is None else jnp.concatenate([head.astype(self.dtype), y], axis=1)
    x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # [B, T, 2H, 2W, C]
    x = _FrameConv(self.features, dtype=self.dtype, name='resample')(x)
    return constrain(x)  # [B, T, 2H, 2W, Co]
