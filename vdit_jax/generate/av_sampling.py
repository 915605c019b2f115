"""Sampling clips with their soundtracks, and writing them as mp4 with audio and wav.

The audio-video DiT (model/av_dit.py) samples frames and log-mel features together
(diffusion/av.py); the vocoder (data/audio.py's Griffin-Lim) turns the features into waves.
`sample` runs audio.task: 'joint' (both from noise), 'v2a' (the soundtrack of given
frames: the multi-stage pipeline's audio stage) or 'a2v' (frames for a given soundtrack).
"""

import math
from typing import List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vdit_jax.data import audio as audio_lib
from vdit_jax.data import video_io
from vdit_jax.diffusion import av
from vdit_jax.generate import conditional
from vdit_jax.generate import sampling
from vdit_jax.parallel import mesh as mesh_lib
from vdit_jax.parallel import paths


def shapes(config, num_samples: int):
  """(video shape [n, T, H, W, C], audio feature shape [n, F, M]) of a config's samples."""
  data, spec = config.data, audio_lib.AudioSpec.from_config(config.audio)
  return ((num_samples, data.num_frames, data.height, data.width, data.channels),
          (num_samples, spec.num_mel_frames(data.num_frames), spec.mel_bins))


def make_sample_fn(model, diffusion, config, num_classes: int, num_samples: int,
                   task: Optional[str] = None):
  """sample_fn(params, rng, cond, video=None, audio=None) -> (frames [n, T, H, W, C] in
  [-1, 1], log-mel features [n, F, M]); the caller jits it. cond: `condition`'s dict, or
  labels int32 [n]. `task` defaults to audio.task."""
  task = config.audio.task if task is None else task
  video_shape, audio_shape = shapes(config, num_samples)
  null_label = num_classes if num_classes > 0 else None
  guided = num_classes > 0 or config.model.conditioning == 'text'
  diffusion = diffusion.for_sampling(config.sample.shift)

  def sample_fn(params, rng, cond, video=None, audio=None):
    def model_fn(z_v, t_v, z_a, t_a, c, couple):
      return model.apply({'params': params}, z_v, t_v, c.get('label'), audio=z_a,
                         t_audio=t_a, couple=couple, text=c.get('text'))
    return av.sample(diffusion, model_fn, rng, video_shape, audio_shape, cond,
                     num_steps=config.sample.num_steps, task=task, video=video, audio=audio,
                     cfg_video=config.sample.cfg_scale if guided else 1.0,
                     cfg_audio=config.audio.cfg_scale if guided else 1.0,
                     modality_video=config.audio.modality_cfg_video,
                     modality_audio=config.audio.modality_cfg_audio, null_label=null_label)

  return sample_fn


def condition(config, num_classes: int, num_samples: int, prompts=None) -> dict:
  """The conditions of `num_samples` clips: captions (prompts cycled; none given:
  sample.prompts, else synthetic captions) for a text model, else labels cycling
  through the classes."""
  if config.model.conditioning == 'text':
    return {'text': conditional.sample_condition(config, num_classes, num_samples,
                                                 prompts)['text']}
  return {'label': sampling.sample_labels(num_samples, num_classes)}


def to_waves(features, config) -> np.ndarray:
  """Log-mel features [n, F, M] -> waves float32 [n, S] through Griffin-Lim."""
  spec = audio_lib.AudioSpec.from_config(config.audio)
  features = np.asarray(jax.device_get(features), np.float32)
  num_samples = spec.num_samples(config.data.num_frames)
  return np.stack([audio_lib.griffin_lim(f, spec, num_samples,
                                         iters=config.audio.griffin_lim_iters, seed=i)
                   for i, f in enumerate(features)])  # [n, S]


def sample(model, diffusion, config, num_classes: int, params, rng, cond=None, *,
           task: Optional[str] = None, video=None, audio=None, num_samples=None,
           mesh=None, prompts=None):
  """(frames float32 [n, T, H, W, C] in [-1, 1], waves float32 [n, S]) on the host.

  cond defaults to `condition` (captions from `prompts` for a text model, else every class
  in turn); `video` (frames in [-1, 1]) for task 'v2a', `audio` (log-mel features) for
  'a2v'. Call inside the run's mesh and logical axis rules."""
  n = num_samples or config.sample.num_samples
  if cond is None:
    cond = condition(config, num_classes, n, prompts)
  fn = make_sample_fn(model, diffusion, config, num_classes, n, task)
  out_shardings = None if mesh is None else mesh_lib.replicated(mesh)
  kwargs = {}
  if video is not None:
    kwargs['video'] = jnp.asarray(video, jnp.float32)
  if audio is not None:
    kwargs['audio'] = jnp.asarray(audio, jnp.float32)
  frames, features = jax.jit(fn, out_shardings=out_shardings)(params, rng, cond, **kwargs)
  frames = np.asarray(jax.device_get(frames), np.float32)
  return frames, to_waves(features, config)


def write_samples(videos, waves, directory: str, name: str, formats: str, fps: float,
                  sample_rate: int) -> List[str]:
  """Writes the clips with their soundtracks: <name>.mp4 (the grid, its audio the clips'
  sounds mixed), <name>.wav (that mix), and each clip alone as <name>_clips/<i>.mp4 and
  <i>.wav, whose audio is that clip's own (what a sync measurement reads). Formats other
  than mp4 (gif) are written as grids without sound."""
  videos = np.asarray(videos)
  waves = np.asarray(waves, np.float32)
  n, _, h, _, _ = videos.shape
  frames = video_io.to_uint8(videos)  # [n, T, H, W, C]
  scale = max(1, 128 // h)
  grid = video_io.make_grid(frames, ncols=math.ceil(math.sqrt(n)), pad=1, scale=scale)
  mix = video_io.mix_audio(waves)  # [S]
  written = []
  for fmt in [f.strip() for f in formats.split(',') if f.strip()]:
    path = paths.join(directory, f'{name}.{fmt}')
    if fmt == 'mp4':
      written.append(video_io.write_video(path, grid, fps=fps, audio=mix,
                                          sample_rate=sample_rate))
    else:
      written.append(video_io.write_video(path, grid, fps=fps))
  written.append(video_io.write_wav(paths.join(directory, f'{name}.wav'), mix, sample_rate))
  clips = paths.join(directory, f'{name}_clips')
  for i in range(n):
    clip = video_io.make_grid(frames[i:i + 1], ncols=1, pad=0, scale=scale)
    written.append(video_io.write_video(paths.join(clips, f'{i}.mp4'), clip, fps=fps,
                                        audio=waves[i], sample_rate=sample_rate))
    written.append(video_io.write_wav(paths.join(clips, f'{i}.wav'), waves[i], sample_rate))
  return written
