r"""Latent diffusion: the DiT trains on VAE latents and its samples decode back to frames.

    --config.data.latents=True --config.data.source=shards --config.data.path=LATENTS

LATENTS is a folder written by `python -m vdit_jax.tools.encode_latents`: its index.json
names the VAE folder and records the latents' per-channel statistics and whether they were
normalised ((z - mean) / std). Sampling un-normalises the DiT's output with those
statistics, decodes it with that VAE (`vae/chunked.py`: temporal chunks, so a long clip
holds one chunk's activations; optional spatial tiles) and writes the frames.

`data.vae=DIR` decodes with another VAE folder instead (the shards were moved, or a
fine-tuned decoder): its architecture must be the one that encoded the shards. Shards
with no 'vae' record (made by another tool) need `data.vae`; their latents are taken to
be normalised with that VAE's statistics when it has some (as `encode_latents` stores
them by default, and as diffusers' Wan pipelines un-normalise before decoding). Either
folder may be a bucket URL (gs://), read through `parallel.paths` and Orbax.

    space = resolve(config.data)                     # reads JSON only; raises on bad input
    decoder = LatentDecoder.load(config)             # params, once per run
    video = decoder(latents)                         # [B, T', H', W', z] -> [B, T, H, W, 3]
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np

from vdit_jax.data import shards
from vdit_jax.parallel import paths
from vdit_jax.vae import checkpoint
from vdit_jax.vae import chunked
from vdit_jax.vae.config import VAEConfig


def enabled(data_config) -> bool:
  return bool(data_config.latents)


@dataclasses.dataclass(frozen=True)
class LatentSpace:
  """Which VAE decodes the DiT's latents, and the statistics that un-normalise them."""
  vae_path: str
  cfg: VAEConfig           # the VAE folder's config (architecture + its own statistics)
  mean: np.ndarray         # [z] float32: DiT latents * std + mean = the VAE's latents
  std: np.ndarray          # [z] float32
  stats_from: str          # where mean / std come from, for logs and errors

  def denormalize(self, z) -> np.ndarray:
    """DiT latents [..., z] -> the VAE's latent scale (float32, on the host)."""
    return np.asarray(z, np.float32) * self.std + self.mean


def _architecture(cfg: VAEConfig) -> VAEConfig:
  """The fields that decide what the weights compute (statistics and dtype aside)."""
  return dataclasses.replace(cfg, latents_mean=None, latents_std=None, dtype='float32')


def _stats(cfg_dict: Optional[dict], cfg: VAEConfig, normalized: bool):
  z = cfg.z_dim
  if not normalized:
    return np.zeros(z, np.float32), np.ones(z, np.float32)
  source = cfg_dict if cfg_dict is not None else cfg.to_dict()
  mean, std = source.get('latents_mean'), source.get('latents_std')
  if mean is None:  # normalised with no statistics: (z - 0) / 1
    return np.zeros(z, np.float32), np.ones(z, np.float32)
  return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def resolve(data_config) -> Optional[LatentSpace]:
  """The latent space of `data.latents=True` (None when off); reads JSON files only.

  Raises ValueError (or FileNotFoundError for a missing folder) naming the value and
  the rule: latents need data.source='shards' holding float latents, a VAE (recorded in
  index.json or given as data.vae) whose z_dim is data.channels and whose architecture is
  the one that encoded them.
  """
  latents = data_config.latents
  vae = data_config.vae or ''
  if not isinstance(latents, bool):
    raise ValueError(f'config.data.latents={latents!r} must be True or False.')
  if not isinstance(vae, str):
    raise ValueError(f'config.data.vae={vae!r} must be a VAE folder path or \'\'.')
  if not latents:
    if vae:
      raise ValueError(f'config.data.vae={vae!r} is only read with data.latents=True (the '
                       'DiT trains on VAE latents and samples decode through the VAE).')
    path = data_config.path or ''
    if (data_config.source == 'shards' and path
        and paths.isfile(paths.join(path, shards.INDEX_NAME))):
      if shards.read_index(path).get('vae'):
        raise ValueError(
            f'data.path={path!r} holds VAE latents (its index.json records the VAE) but '
            'config.data.latents=False, so samples would be written as if latents were '
            'frames: set config.data.latents=True to decode them through the VAE.')
    return None
  if data_config.source != 'shards':
    raise ValueError(
        f'config.data.latents=True reads VAE latents from data.source=\'shards\' (written by '
        f'python -m vdit_jax.tools.encode_latents), not data.source={data_config.source!r}.')
  if not data_config.path and vae:  # sampling only: the VAE's own statistics
    index, record = {'dtype': 'float16'}, None
  else:
    index = shards.read_index(data_config.path)
    record = index.get('vae')
  if index['dtype'] == 'uint8':
    raise ValueError(
        f'config.data.latents=True but data.path={data_config.path!r} holds uint8 video '
        'clips, not latents: encode them with python -m vdit_jax.tools.encode_latents.')
  if not vae and not record:
    raise ValueError(
        f'config.data.latents=True but {paths.join(data_config.path, shards.INDEX_NAME)} '
        'records no VAE (no \'vae\' entry: the shards were not written by '
        'tools.encode_latents) and config.data.vae=\'\': set data.vae to the VAE folder '
        'that encoded them.')
  path = vae or record['path']
  where = 'config.data.vae' if vae else f'the VAE recorded in {data_config.path}/index.json'
  try:
    info = checkpoint.read_info(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'{where}={path!r}: {e}') from None
  cfg = VAEConfig.from_dict(info['config'])
  if cfg.z_dim != data_config.channels:
    raise ValueError(f'config.data.channels={data_config.channels} but the VAE in {path} has '
                     f'z_dim={cfg.z_dim} latent channels; they must be equal.')
  if record:
    encoded_with = VAEConfig.from_dict(record['config'])
    if _architecture(encoded_with) != _architecture(cfg):
      raise ValueError(
          f'{where}={path!r} has a different architecture from the VAE that encoded '
          f'{data_config.path} (index.json: {record["path"]}): {_architecture(cfg)} vs '
          f'{_architecture(encoded_with)}; decode with the VAE the latents came from.')
    mean, std = _stats(record['config'], cfg, bool(record.get('normalized', True)))
    stats_from = f'{data_config.path}/index.json (normalized={record.get("normalized", True)})'
  else:
    mean, std = _stats(None, cfg, True)
    stats_from = f'{path}/{checkpoint.INFO_NAME}'
  return LatentSpace(paths.normalize(path), cfg, mean, std, stats_from)


def _decode_settings(sample_config):
  """(latents_per_chunk, Tiling or None) from sample.vae_latents_per_chunk / vae_tile."""
  chunk = sample_config.vae_latents_per_chunk
  if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1:
    raise ValueError(f'config.sample.vae_latents_per_chunk={chunk!r} must be a positive '
                     'integer (latent frames per VAE decode call).')
  tile = tuple(sample_config.vae_tile or ())
  if not tile:
    return int(chunk), None
  if len(tile) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral)
                           for v in tile):
    raise ValueError(f'config.sample.vae_tile={tile!r} must be () or (SIZE, STRIDE) in '
                     'pixels.')
  return int(chunk), chunked.Tiling(tile[0], tile[0], tile[1], tile[1])


def check_config(config) -> None:
  """The rules of data.latents / data.vae / sample.vae_* (reads index.json and vae.json)."""
  space = resolve(config.data)
  _, tiling = _decode_settings(config.sample)
  if space is not None and tiling is not None:
    try:
      tiling.check(space.cfg)
    except ValueError as e:
      raise ValueError(f'config.sample.vae_tile={tuple(config.sample.vae_tile)}: {e}') from None


class LatentDecoder:
  """Un-normalises and decodes DiT latents with a VAE whose params are loaded once.

  Decoding runs through `chunked.decode_latents`: two jitted functions (first latent
  frame, then `latents_per_chunk` at a time) compiled once per shape and reused by
  every later call; results come back to the host as numpy. Each process decodes on its
  first local device, inside a one-device mesh of its own with no logical axis rules:
  jit's cache is keyed by the mesh in context, so the trainer's periodic samples (inside
  the DiT's mesh) and --mode=sample (outside it) share one compiled decode.
  """

  def __init__(self, space: LatentSpace, params: Any, *, latents_per_chunk: int = 1,
               tiling: Optional[chunked.Tiling] = None):
    self.space = space
    self.params = params
    self.latents_per_chunk = latents_per_chunk
    self.tiling = tiling
    self._mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()[:1]), ('vae',))

  @classmethod
  def load(cls, config) -> 'LatentDecoder':
    space = resolve(config.data)
    if space is None:
      raise ValueError('LatentDecoder.load needs config.data.latents=True.')
    chunk, tiling = _decode_settings(config.sample)
    cfg, params = checkpoint.load(space.vae_path)
    return cls(dataclasses.replace(space, cfg=cfg), params, latents_per_chunk=chunk,
               tiling=tiling)

  @property
  def cfg(self) -> VAEConfig:
    return self.space.cfg

  def pixel_shape(self, latent_shape: Sequence[int]):
    """[T', H', W'] latents -> [T, H, W, C] frames."""
    t, h, w = (int(d) for d in latent_shape[:3])
    return (1 + self.cfg.temporal_factor * (t - 1), h * self.cfg.spatial_factor,
            w * self.cfg.spatial_factor, self.cfg.out_channels)

  def encode(self, frames) -> np.ndarray:
    """Frames [B, 1 + 4 k, H, W, C] in [-1, 1] -> DiT latents [B, 1 + k, H/8, W/8, z]: the
    posterior means, normalised with this space's statistics (what `__call__` undoes)."""
    with jax.set_mesh(self._mesh), nn.logical_axis_rules(()):
      mean, _ = chunked.encode_video(self.cfg, self.params, np.asarray(frames, np.float32),
                                     tiling=self.tiling)
    return ((np.asarray(mean, np.float32) - self.space.mean) / self.space.std).astype(np.float32)

  def __call__(self, latents) -> np.ndarray:
    """DiT latents [B, T', H', W', z] -> frames [B, 1 + 4 (T' - 1), 8 H', 8 W', C] in
    [-1, 1] (Wan 2.1 factors), on the host."""
    z = self.space.denormalize(latents)  # [B, T', H', W', z]
    with jax.set_mesh(self._mesh), nn.logical_axis_rules(()):
      return chunked.decode_latents(self.cfg, self.params, z,
                                    latents_per_chunk=self.latents_per_chunk,
                                    tiling=self.tiling)
