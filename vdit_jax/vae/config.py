"""The VAE's architecture config: Wan 2.1's video autoencoder and small versions of it.

    cfg = VAEConfig.from_diffusers(json.load(open('config.json')))  # a diffusers checkpoint
    cfg = VAEConfig(base_dim=8, num_res_blocks=1)                     # configs/vae_tiny.py

Fields (names as in diffusers' `AutoencoderKLWan` config where one exists):
  base_dim            encoder width at full resolution (Wan 2.1: 96)
  decoder_base_dim    decoder width at full resolution (default: base_dim)
  z_dim               latent channels (Wan 2.1: 16)
  dim_mult            width multiplier per resolution level; len(dim_mult) - 1 levels of 2x
                      spatial down/up-sampling (Wan 2.1: (1, 2, 4, 4) -> 8x)
  num_res_blocks      residual blocks per encoder level (the decoder has one more)
  temporal_downsample which of the len(dim_mult) - 1 downsamplings also halve time
                      (Wan 2.1: (False, True, True) -> 4x); the decoder mirrors it
  in_channels, out_channels   pixel channels (3)
  latents_mean, latents_std   per-channel statistics of the latents; the diffusion model
                      sees (z - mean) / std (`normalize_latents`); None for a VAE whose
                      statistics were not measured
  dtype               compute dtype ('float32' | 'bfloat16'); params stay float32

A clip of T = 1 + t_down * k frames (t_down = 2 ** sum(temporal_downsample)) encodes to
1 + k latent frames: the first frame alone, then every t_down frames (causal in time).
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from typing import Any, Optional, Tuple

import numpy as np

DTYPES = ('float32', 'bfloat16', 'float16')

# diffusers `AutoencoderKLWan` config keys this model reproduces, and the ones it reads but
# only accepts at Wan 2.1's value (with that value). Other keys ('_class_name', version
# stamps, scale factors derived from the architecture) are ignored.
_UNSUPPORTED_DIFFUSERS = {'is_residual': False, 'patch_size': None, 'attn_scales': [],
                          'dropout': 0.0}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture of a Wan-2.1-style causal video VAE (see the module docstring)."""
  base_dim: int = 96
  decoder_base_dim: Optional[int] = None
  z_dim: int = 16
  dim_mult: Tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  temporal_downsample: Tuple[bool, ...] = (False, True, True)
  in_channels: int = 3
  out_channels: int = 3
  latents_mean: Optional[Tuple[float, ...]] = None
  latents_std: Optional[Tuple[float, ...]] = None
  dtype: str = 'float32'

  def __post_init__(self):
    # Lists (from JSON) become tuples, so configs hash and compare as values.
    for name in ('dim_mult', 'temporal_downsample', 'latents_mean', 'latents_std'):
      value = getattr(self, name)
      if isinstance(value, (list, np.ndarray)):
        object.__setattr__(self, name, tuple(value.tolist() if isinstance(value, np.ndarray)
                                             else value))
    check_config(self)

  # Derived sizes.
  @property
  def decoder_dim(self) -> int:
    return self.base_dim if self.decoder_base_dim is None else self.decoder_base_dim

  @property
  def spatial_factor(self) -> int:
    return 2 ** (len(self.dim_mult) - 1)

  @property
  def temporal_factor(self) -> int:
    return 2 ** sum(bool(b) for b in self.temporal_downsample)

  @property
  def temporal_upsample(self) -> Tuple[bool, ...]:
    return tuple(reversed(self.temporal_downsample))

  def latent_shape(self, num_frames: int, height: int, width: int) -> Tuple[int, int, int, int]:
    """[T', H', W', z_dim] of the latents of a [T, H, W, C] clip (raises if it does not fit)."""
    check_clip_shape(self, num_frames, height, width)
    return (1 + (num_frames - 1) // self.temporal_factor, height // self.spatial_factor,
            width // self.spatial_factor, self.z_dim)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    for k, v in d.items():
      if isinstance(v, tuple):
        d[k] = list(v)
    return d

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2)

  @classmethod
  def from_dict(cls, d: dict) -> 'VAEConfig':
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f'unknown VAE config field(s) {unknown}; known: {sorted(known)}.')
    return cls(**d)

  @classmethod
  def from_diffusers(cls, d: dict, dtype: str = 'float32') -> 'VAEConfig':
    """From a diffusers `AutoencoderKLWan` config.json dict (Wan 2.1 layout only)."""
    for key, wanted in _UNSUPPORTED_DIFFUSERS.items():
      value = d.get(key, wanted)
      if key == 'attn_scales' and value is None:
        value = []
      if value != wanted:
        raise ValueError(
            f'diffusers config {key}={d[key]!r} is not supported: this VAE implements the '
            f'Wan 2.1 architecture, which has {key}={wanted!r} (Wan 2.2 uses is_residual=True '
            'and patch_size=2).')
    defaults = cls()
    return cls(
        base_dim=d.get('base_dim', defaults.base_dim),
        decoder_base_dim=d.get('decoder_base_dim'),
        z_dim=d.get('z_dim', defaults.z_dim),
        dim_mult=d.get('dim_mult', defaults.dim_mult),
        num_res_blocks=d.get('num_res_blocks', defaults.num_res_blocks),
        temporal_downsample=d.get('temperal_downsample', defaults.temporal_downsample),
        in_channels=d.get('in_channels', 3),
        out_channels=d.get('out_channels', 3),
        latents_mean=d.get('latents_mean'),
        latents_std=d.get('latents_std'),
        dtype=dtype,
    )


def _positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f'VAE config {name} must be a positive integer, got {value!r}.')


def check_config(cfg: VAEConfig) -> None:
  """Raises ValueError naming the field and the rule for an inconsistent architecture."""
  for name in ('base_dim', 'z_dim', 'num_res_blocks', 'in_channels', 'out_channels'):
    _positive_int(name, getattr(cfg, name))
  if cfg.decoder_base_dim is not None:
    _positive_int('decoder_base_dim', cfg.decoder_base_dim)
  if not cfg.dim_mult:
    raise ValueError('VAE config dim_mult must list at least one multiplier, got ().')
  for m in cfg.dim_mult:
    _positive_int('dim_mult entry', m)
  if len(cfg.temporal_downsample) != len(cfg.dim_mult) - 1:
    raise ValueError(
        f'VAE config temporal_downsample={list(cfg.temporal_downsample)} must have '
        f'len(dim_mult) - 1 = {len(cfg.dim_mult) - 1} entries (one per downsampling).')
  if any(not isinstance(b, (bool, np.bool_)) for b in cfg.temporal_downsample):
    raise ValueError(f'VAE config temporal_downsample={list(cfg.temporal_downsample)} must '
                     'hold booleans.')
  # Wan 2.1's upsampling convs halve the width: the decoder's levels after the first
  # take dim * dim_mult[i] // 2 channels, which must be a whole number.
  for m in cfg.dim_mult:
    if cfg.decoder_dim * m % 2:
      raise ValueError(f'VAE config decoder width {cfg.decoder_dim} x dim_mult entry {m} '
                       'must be even (the upsampling convolutions halve it).')
  for name in ('latents_mean', 'latents_std'):
    value = getattr(cfg, name)
    if value is not None and len(value) != cfg.z_dim:
      raise ValueError(f'VAE config {name} has {len(value)} entries, z_dim={cfg.z_dim} '
                       'needs one per latent channel.')
  if cfg.latents_std is not None and min(cfg.latents_std) <= 0:
    raise ValueError(f'VAE config latents_std must be positive, got {list(cfg.latents_std)}.')
  if (cfg.latents_mean is None) != (cfg.latents_std is None):
    raise ValueError('VAE config latents_mean and latents_std must both be set or both None.')
  if cfg.dtype not in DTYPES:
    raise ValueError(f'VAE config dtype={cfg.dtype!r} is not one of {DTYPES}.')


def check_clip_shape(cfg: VAEConfig, num_frames: int, height: int, width: int) -> None:
  """Raises unless a [T, H, W] clip fits: T = 1 + t_down * k, H and W multiples of 8-ish."""
  t, s = cfg.temporal_factor, cfg.spatial_factor
  for name, value in (('num_frames', num_frames), ('height', height), ('width', width)):
    _positive_int(name, value)
  if (num_frames - 1) % t:
    raise ValueError(
        f'num_frames={num_frames} does not fit the VAE: it encodes the first frame alone and '
        f'then groups of {t}, so num_frames must be 1 + {t} * k (e.g. '
        f'{1 + t * max(1, (num_frames - 1) // t)}).')
  if height % s or width % s:
    raise ValueError(f'height x width = {height} x {width} must both be multiples of the '
                     f'VAE\'s spatial factor {s}.')


def latent_stats(cfg: VAEConfig) -> Tuple[np.ndarray, np.ndarray]:
  """(mean, std) float32 [z_dim]: the config's, or (0, 1) when it has none."""
  if cfg.latents_mean is None:
    return np.zeros(cfg.z_dim, np.float32), np.ones(cfg.z_dim, np.float32)
  return (np.asarray(cfg.latents_mean, np.float32), np.asarray(cfg.latents_std, np.float32))


def normalize_latents(cfg: VAEConfig, z: Any) -> Any:
  """(z - mean) / std per channel: z [..., z_dim] -> the diffusion model's scale."""
  mean, std = latent_stats(cfg)
  return (z - mean) / std


def denormalize_latents(cfg: VAEConfig, z: Any) -> Any:
  """Inverse of `normalize_latents`, before decoding."""
  mean, std = latent_stats(cfg)
  return z * std + mean

