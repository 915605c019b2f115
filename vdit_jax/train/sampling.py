"""Compiled sampling from a model's params, and writing the clips as video files."""

import math
import os
from typing import List

import jax
import jax.numpy as jnp
import numpy as np

from vdit_jax.data import video_io
from vdit_jax.diffusion import samplers


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

  def sample_fn(params, rng, labels):
    def model_fn(z, t, y):
      return model.apply({'params': params}, z, t, y)
    return samplers.sample(diffusion, model_fn, rng, shape, labels,
                           sampler=sample_cfg.sampler, num_steps=sample_cfg.num_steps,
                           eta=sample_cfg.eta, cfg_scale=cfg_scale, null_label=null_label)

  return sample_fn


def write_samples(videos, directory: str, name: str, formats: str, fps: int) -> List[str]:
  """Writes [n, T, H, W, C] clips in [-1, 1] as one grid video per format."""
  videos = np.asarray(jax.device_get(videos))
  n, _, h, _, _ = videos.shape
  ncols = math.ceil(math.sqrt(n))
  scale = max(1, 128 // h)
  grid = video_io.make_grid(video_io.to_uint8(videos), ncols=ncols, pad=1, scale=scale)
  paths = []
  for fmt in [f.strip() for f in formats.split(',') if f.strip()]:
    paths.append(video_io.write_video(os.path.join(directory, f'{name}.{fmt}'), grid, fps=fps))
  return paths
