"""Wan 2.1's causal video VAE in Flax Linen: encoder, decoder and the Gaussian posterior.

    model = WanVAE(VAEConfig(...))
    params = model.init(rng, video)['params']                 # video [B, T, H, W, 3] in [-1, 1]
    mean, logvar = model.apply({'params': params}, video, method=WanVAE.encode)
    video = model.apply({'params': params}, mean, method=WanVAE.decode)

A clip of T = 1 + 4k frames of H x W becomes latents [B, 1 + k, H/8, W/8, z_dim] (with
Wan 2.1's layout): the first frame is encoded on its own, then every 4 frames, causally.
Parameter names follow diffusers' `AutoencoderKLWan` (`encoder/down_blocks_3/conv1`,
`decoder/up_blocks_0/upsamplers_0/time_conv`, ...), so its weights map one to one
(`vdit_jax.convert.wan_vae`). Whole clips run in one call; `vae/chunked.py` runs long
clips in chunks through the layers' frame caches, with the same result.
"""

from __future__ import annotations

from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdit_jax.vae import layers
from vdit_jax.vae.config import VAEConfig

LOGVAR_RANGE = (-30.0, 20.0)  # the posterior's log-variance is clipped to this, as diffusers


class Encoder(nn.Module):
  """[B, T, H, W, C] pixels -> [B, T', H', W', out_features] (before quant_conv)."""
  config: VAEConfig
  out_features: int

  @nn.compact
  def __call__(self, x: jax.Array, first_chunk: bool = True) -> jax.Array:
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
    x = layers.CausalConv3d(dims[0], dtype=dtype, name='conv_in')(x, first_chunk)
    index = 0  # diffusers keeps resnets and resamplers in one flat list, down_blocks
    last = len(cfg.dim_mult) - 1
    for level, out_dim in enumerate(dims[1:]):
      for _ in range(cfg.num_res_blocks):
        x = layers.ResidualBlock(out_dim, dtype, name=f'down_blocks_{index}')(x, first_chunk)
        index += 1
      if level != last:
        x = layers.Downsample(cfg.temporal_downsample[level], dtype,
                              name=f'down_blocks_{index}')(x, first_chunk)
        index += 1
    x = layers.MidBlock(dtype, name='mid_block')(x, first_chunk)
    x = nn.silu(layers.RMSNorm(dtype, name='norm_out')(x))
    return layers.CausalConv3d(self.out_features, dtype=dtype, name='conv_out')(x, first_chunk)


class UpBlock(nn.Module):
  """num_res_blocks + 1 residual blocks, then (unless last) an upsampling to half width."""
  features: int
  num_blocks: int
  upsample: str  # 'none' | 'spatial' | 'spacetime'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, first_chunk: bool = True) -> jax.Array:
    for i in range(self.num_blocks):
      x = layers.ResidualBlock(self.features, self.dtype, name=f'resnets_{i}')(x, first_chunk)
    if self.upsample != 'none':
      # Wan 2.1: the upsampling conv halves the width (diffusers' upsample_out_dim=dim // 2).
      x = layers.Upsample(self.features // 2, temporal=self.upsample == 'spacetime',
                          dtype=self.dtype, name='upsamplers_0')(x, first_chunk)
    return x


class Decoder(nn.Module):
  """[B, T', H', W', z_dim] latents -> [B, T, H, W, out_channels] pixels (unclipped)."""
  config: VAEConfig

  @nn.compact
  def __call__(self, z: jax.Array, first_chunk: bool = True) -> jax.Array:
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    dims = [cfg.decoder_dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
    x = layers.CausalConv3d(dims[0], dtype=dtype, name='conv_in')(z, first_chunk)
    x = layers.MidBlock(dtype, name='mid_block')(x, first_chunk)
    last = len(cfg.dim_mult) - 1
    for level, out_dim in enumerate(dims[1:]):
      mode = 'none'
      if level != last:
        mode = 'spacetime' if cfg.temporal_upsample[level] else 'spatial'
      x = UpBlock(out_dim, cfg.num_res_blocks + 1, mode, dtype,
                  name=f'up_blocks_{level}')(x, first_chunk)
    x = nn.silu(layers.RMSNorm(dtype, name='norm_out')(x))
    return layers.CausalConv3d(cfg.out_channels, dtype=dtype, name='conv_out')(x, first_chunk)


def split_moments(moments: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """[..., 2 z] posterior parameters -> (mean, logvar) [..., z], logvar clipped."""
  mean, logvar = jnp.split(moments, 2, axis=-1)
  return mean, jnp.clip(logvar, *LOGVAR_RANGE)


def kl_to_standard_normal(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, 1)) of each latent value (float32, mean's shape)."""
  mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
  return 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


class WanVAE(nn.Module):
  """The autoencoder: encoder + quant_conv, post_quant_conv + decoder (diffusers' names)."""
  config: VAEConfig

  def setup(self):
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    self.encoder = Encoder(cfg, 2 * cfg.z_dim)
    self.quant_conv = layers.CausalConv3d(2 * cfg.z_dim, (1, 1, 1), dtype)
    self.post_quant_conv = layers.CausalConv3d(cfg.z_dim, (1, 1, 1), dtype)
    self.decoder = Decoder(cfg)

  def encode_moments(self, video: jax.Array, first_chunk: bool = True) -> jax.Array:
    """video [B, T, H, W, C] in [-1, 1] -> posterior parameters [B, T', H', W', 2 z]."""
    return self.quant_conv(self.encoder(video, first_chunk))

  def encode(self, video: jax.Array, first_chunk: bool = True) -> Tuple[jax.Array, jax.Array]:
    """video [B, T, H, W, C] -> (mean, logvar), each [B, T', H', W', z]."""
    return split_moments(self.encode_moments(video, first_chunk))

  def decode(self, z: jax.Array, first_chunk: bool = True, clip: bool = True) -> jax.Array:
    """z [B, T', H', W', z] -> video [B, T, H, W, C], clipped to [-1, 1] unless clip=False."""
    x = self.decoder(self.post_quant_conv(z), first_chunk)
    return jnp.clip(x, -1.0, 1.0) if clip else x

  def __call__(self, video: jax.Array, rng=None, clip: bool = False):
    """Reconstruction: (decoded video, mean, logvar); z ~ posterior with `rng`, else its mean.

    Unclipped by default: training wants gradients outside [-1, 1] too.
    """
    mean, logvar = self.encode(video)
    z = mean
    if rng is not None:
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return self.decode(z, clip=clip), mean, logvar
