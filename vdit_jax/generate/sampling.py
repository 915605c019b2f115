"""Compiled sampling from a model's params, and writing the clips as video files.

A DiT trained on VAE latents (config.data.latents=True) samples latents; `to_frames`
decodes them through the VAE (vae/latents.py) before they are written, and
`write_samples` also keeps the latents as <name>_latents.npy.
"""

import math
from typing import List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vdit_jax.data import video_io
from vdit_jax.diffusion import samplers
from vdit_jax.parallel import distributed
from vdit_jax.parallel import paths
from vdit_jax.vae import latents as latents_lib


def sample_labels(num_samples: int, num_classes: int) -> jnp.ndarray:
  """Cycles through the classes so a grid shows every class once before repeating."""
  if num_classes <= 0:
    return jnp.zeros((num_samples,), jnp.int32)
  return jnp.arange(num_samples, dtype=jnp.int32) % num_classes


def make_sample_fn(model, diffusion, sample_cfg, data_cfg, num_classes: int, num_samples: int):
  """Returns sample_fn(params, rng, labels) -> [n, T, H, W, C]; the caller jits it."""
  shape = (num_samples, data_cfg.num_frames, data_cfg.height, data_cfg.width, data_cfg.channels)
  null_label = num_classes if num_classes > 0 else None
  cfg_scale = sample_cfg.cfg_scale if num_classes > 0 else 1.0
  diffusion = diffusion.for_sampling(sample_cfg.shift)
  cfg_interval = samplers.cfg_interval_of(sample_cfg)

  def sample_fn(params, rng, labels):
    def model_fn(z, t, y, **kw):
      return model.apply({'params': params}, z, t, y, **kw)
    return samplers.sample(diffusion, model_fn, rng, shape, labels,
                           sampler=sample_cfg.sampler, num_steps=sample_cfg.num_steps,
                           eta=sample_cfg.eta, cfg_scale=cfg_scale, null_label=null_label,
                           self_condition=model.spec.self_condition,
                           cfg_interval=cfg_interval,
                           clip_x0=not data_cfg.latents)  # latents are not in [-1, 1]

  return sample_fn


def latent_decoder(config) -> Optional[latents_lib.LatentDecoder]:
  """The VAE that decodes samples of a latent DiT (params loaded now), else None."""
  if not latents_lib.enabled(config.data):
    return None
  decoder = latents_lib.LatentDecoder.load(config)
  cfg = decoder.cfg
  distributed.log_line(
      f'samples decode through the VAE in {decoder.space.vae_path} (z_dim {cfg.z_dim}, '
      f'{cfg.temporal_factor}x time, {cfg.spatial_factor}x space), un-normalised with the '
      f'statistics of {decoder.space.stats_from}')
  return decoder


def to_frames(videos, decoder: Optional[latents_lib.LatentDecoder]):
  """Sampled clips -> frames in [-1, 1]: latents [n, T', H', W', z] are un-normalised and
  decoded to [n, T, H, W, 3]; without a decoder the clips are frames already."""
  if decoder is None:
    return videos
  return decoder(jax.device_get(videos))


def write_samples(videos, directory: str, name: str, formats: str, fps: int,
                  latents=None) -> List[str]:
  """Writes [n, T, H, W, C] clips in [-1, 1] as one grid video per format; `latents`
  (the DiT's output before decoding) also go to <name>_latents.npy (listed last).

  Clips that are not frames (C not 1 or 3: VAE latents with no VAE to decode them, as
  configs/dit_xl_video.py and configs/bench.py train on) are written as that .npy alone,
  float32 [n, T, H, W, C], for decoding elsewhere.
  """
  videos = np.asarray(jax.device_get(videos))
  n, _, h, _, c = videos.shape
  if c not in (1, 3):
    distributed.log_line(
        f'samples have {c} channels (latents) and no VAE decodes them '
        '(config.data.latents=False): writing them as .npy, not video; decode them with '
        'their VAE (or train with data.latents=True on tools.encode_latents shards).')
    latents, formats = videos, ''
  written = []
  if formats.strip():
    ncols = math.ceil(math.sqrt(n))
    scale = max(1, 128 // h)
    grid = video_io.make_grid(video_io.to_uint8(videos), ncols=ncols, pad=1, scale=scale)
    for fmt in [f.strip() for f in formats.split(',') if f.strip()]:
      written.append(video_io.write_video(paths.join(directory, f'{name}.{fmt}'), grid,
                                          fps=fps))
  if latents is not None:
    path = paths.join(directory, f'{name}_latents.npy')
    with paths.local_file_for_write(path, suffix='.npy') as local:
      np.save(local, np.asarray(jax.device_get(latents), np.float32))
    written.append(path)
  return written
