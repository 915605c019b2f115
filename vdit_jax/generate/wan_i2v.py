"""Wan 2.1 image-to-video: the image side and the sampler that carries it to the DiT, as
diffusers' `WanImageToVideoPipeline` does (tests/wan_i2v_test.py: equal to it).

    cond = wan_i2v.image_condition(images, height=480, width=832, num_frames=81,
                                   clip_spec=..., clip_params=..., processing=...,
                                   vae_cfg=..., vae_params=...)
    cond.update(text=..., negative_text=...)       # umT5 rows, {'embed', 'mask'} [B, 512, ...]
    latents = wan_i2v.sample_i2v(model, params, diffusion, config, cond, rng)

What the transformer is given beside the noisy latents (prepare_latents, __call__):
  * `condition` [B, T', H', W', 4 + z]: the image as the first of num_frames frames, the
    other frames zeros, VAE-encoded (the posterior's mode: its mean), normalised with the
    VAE's latents_mean / latents_std; before it a 4-channel mask (the VAE's temporal
    factor): a pixel-frame mask, 1 on the first frame only, its first entry repeated 4
    times so that the 1 + 4 k frames fill k + 1 groups of 4, each group one latent frame's
    channels. So latent frame 0 has mask 1 in all 4 channels, every later one 0.
  * `image` [B, 257, 1280]: CLIP ViT-H/14's hidden_states[-2] of the image
    (convert/clip_vision.py), the same for the prompt and the negative prompt.
Channel order: diffusers feeds cat([latents, mask, image latents], channels) to the
patch embedding; VideoDiT concatenates [video, cond] on its last axis, so `cond` is
[mask, image latents] (channels 0..3 the mask) and the patch kernel's input rows line up
(model/wan.py maps the Conv3d's C_in in order).

Sampling: the project's UniPC (config.sample.sampler='unipc', Wan's flow grid and shift)
with classifier-free guidance toward 'text' against 'negative_text' (conditioning.
null_condition swaps them; 'condition' and 'image' stay in both halves, as in the
pipeline's two calls). `make_sample_fn` here calls `diffusion/samplers.sample` with a
model_fn that passes `cond=` and `image=`, checks the condition's keys and shapes first
(`check_condition`) and, like WanPipeline, runs the conditional call alone when
cfg_scale <= 1.

Video extension (--mode=extend, generate/conditional.extend_i2v) runs this sampler
window by window, each window given the last frame of the clip so far as its image.
"""

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vdit_jax.convert import clip_vision as clip_convert
from vdit_jax.diffusion import conditioning as cond_lib
from vdit_jax.diffusion import samplers
from vdit_jax.vae import chunked
from vdit_jax.vae import config as vae_config

# The condition dict `make_sample_fn` takes: text {'embed', 'mask'}, negative_text (same),
# condition [B, T', H', W', 4 + z], image [B, Li, E].
CONDITION_KEYS = ('text', 'negative_text', 'condition', 'image')


def vae_image(images, height: int, width: int) -> np.ndarray:
  """Images (PIL, uint8 [H, W, 3] or [B, H, W, 3]) -> float32 [B, height, width, 3] in
  [-1, 1], as the pipeline's VideoProcessor.preprocess makes them for the VAE: PIL's
  Lanczos resize to height x width (no crop: the aspect ratio is not kept), / 255, 2x - 1."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for name, value in (('height', height), ('width', width)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f'{name}={value!r} must be a positive integer (pixels).')
  out = []
  for image in clip_convert.as_uint8_images(images):
    resized = Image.fromarray(image).resize((width, height), resample=Image.Resampling.LANCZOS)
    out.append(np.asarray(resized).astype(np.float32) / 255.0)  # [H, W, 3]
  return 2.0 * np.stack(out) - 1.0  # [B, H, W, 3]


def first_frame_mask(num_frames: int, temporal_factor: int) -> np.ndarray:
  """float32 [T', temporal_factor]: the pipeline's mask of a clip whose first frame is
  given, latent frame by latent frame (T' = (num_frames - 1) / factor + 1)."""
  if (num_frames - 1) % temporal_factor:
    raise ValueError(f'num_frames={num_frames} must be 1 + {temporal_factor} k (the VAE '
                     f'encodes the first frame alone, then groups of {temporal_factor}).')
  pixel = np.zeros((num_frames,), np.float32)  # [F]
  pixel[0] = 1.0
  pixel = np.concatenate([np.repeat(pixel[:1], temporal_factor), pixel[1:]])  # [F + tf - 1]
  return pixel.reshape(-1, temporal_factor)  # [T', tf]


def i2v_condition(vae_cfg: vae_config.VAEConfig, vae_params, image, num_frames: int,
                  latents_mean: Optional[Sequence[float]] = None,
                  latents_std: Optional[Sequence[float]] = None, *,
                  frames_per_chunk: Optional[int] = None) -> np.ndarray:
  """image float [B, H, W, 3] in [-1, 1] -> the transformer's condition channels float32
  [B, T', H', W', tf + z] (tf = the VAE's temporal factor, 4): the first-frame mask, then
  the normalised latents of the clip [image, zeros x (num_frames - 1)] (the posterior's
  mean, as the pipeline's retrieve_latents(sample_mode='argmax')).

  latents_mean / latents_std (z values each): default the VAE config's (diffusers'
  vae.config.latents_mean / latents_std, which the converted VAE keeps).
  """
  image = np.asarray(image, np.float32)
  if image.ndim != 4 or image.shape[-1] != vae_cfg.in_channels:
    raise ValueError(f'image of shape {image.shape} must be [B, H, W, '
                     f'{vae_cfg.in_channels}] in [-1, 1] (see vae_image).')
  if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
    raise ValueError(f'num_frames={num_frames!r} must be a positive integer.')
  mask = first_frame_mask(num_frames, vae_cfg.temporal_factor)  # [T', tf]
  stats_mean, stats_std = vae_config.latent_stats(vae_cfg)
  for name, given in (('latents_mean', latents_mean), ('latents_std', latents_std)):
    if given is not None and np.shape(given) != (vae_cfg.z_dim,):
      raise ValueError(f'{name} of shape {np.shape(given)} must hold z_dim={vae_cfg.z_dim} '
                       'values, one per latent channel.')
  stats_mean = stats_mean if latents_mean is None else np.asarray(latents_mean, np.float32)
  stats_std = stats_std if latents_std is None else np.asarray(latents_std, np.float32)
  b, h, w, c = image.shape
  video = np.zeros((b, num_frames, h, w, c), np.float32)  # [B, F, H, W, 3]
  video[:, 0] = image
  mean, _ = chunked.encode_video(vae_cfg, vae_params, video,
                                 frames_per_chunk=frames_per_chunk)  # [B, T', H', W', z]
  # (z - mean) * (1 / std), in that order, as the pipeline computes it.
  latents = (mean.astype(np.float32) - stats_mean) * (np.float32(1.0) / stats_std)
  t_lat, h_lat, w_lat = latents.shape[1:4]
  if mask.shape[0] != t_lat:
    raise ValueError(f'the VAE gave {t_lat} latent frames for {num_frames} frames; the mask '
                     f'has {mask.shape[0]}.')
  mask = np.broadcast_to(mask[None, :, None, None, :],
                         (b, t_lat, h_lat, w_lat, mask.shape[1]))  # [B, T', H', W', tf]
  return np.concatenate([mask, latents], axis=-1).astype(np.float32)  # [B, T', H', W', tf+z]


def image_condition(images, *, height: int, width: int, num_frames: int, clip_spec=None,
                    clip_params=None, processing: Optional[clip_convert.ImageProcessing] = None,
                    vae_cfg: vae_config.VAEConfig, vae_params,
                    latents_mean: Optional[Sequence[float]] = None,
                    latents_std: Optional[Sequence[float]] = None) -> dict:
  """Images (PIL or uint8, one per sample) -> {'condition': [B, T', H', W', 4 + z],
  'image': [B, Li, E]}: the pipeline's prepare_latents condition and encode_image tokens.

  clip_spec None: no 'image' (a model with condition channels but no image tokens).
  latents_mean / latents_std: see i2v_condition (a LatentDecoder's space.mean / std).
  """
  if clip_spec is not None and (clip_params is None or processing is None):
    raise ValueError('clip_spec is given without clip_params and processing: give all three '
                     '(convert/clip_vision.load_params, read_processor) or none.')
  condition = i2v_condition(vae_cfg, vae_params, vae_image(images, height, width), num_frames,
                            latents_mean, latents_std)
  out = {'condition': jnp.asarray(condition)}
  if clip_spec is not None:
    tokens = clip_convert.encode_images(clip_spec, clip_params, processing, images)
    out['image'] = jnp.asarray(tokens, jnp.float32)
  return out


def check_condition(cond: dict, shape, spec, guided: bool) -> None:
  """Raises ValueError naming the key of `cond` that the model of `spec` cannot take for
  samples of `shape` [B, T', H', W', C]."""
  unknown = sorted(set(cond) - set(CONDITION_KEYS))
  if unknown:
    raise ValueError(f'condition keys {unknown} are not read; an I2V condition holds '
                     f'{CONDITION_KEYS}.')
  if 'text' not in cond:
    raise ValueError("an I2V condition needs 'text' (the prompt's umT5 rows, {'embed', "
                     "'mask'}).")
  if guided and 'negative_text' not in cond:
    raise ValueError("sample.cfg_scale > 1 needs 'negative_text' (the negative prompt's "
                     'umT5 rows; WanPipeline encodes "" when none is given).')
  wanted = tuple(shape[:4]) + (spec.condition_channels,)
  if spec.condition_channels:
    if 'condition' not in cond or tuple(cond['condition'].shape) != wanted:
      got = tuple(cond['condition'].shape) if 'condition' in cond else None
      raise ValueError(f"'condition' of shape {got} must be [B, T', H', W', "
                       f'model.condition_channels] = {wanted} (the mask, then the image '
                       'latents; see i2v_condition).')
  elif 'condition' in cond:
    raise ValueError("'condition' is given but model.condition_channels is 0 (not an I2V "
                     'model).')
  if spec.image_embed_dim:
    image = cond.get('image')
    if image is None or image.ndim != 3 or tuple(image.shape[::2]) != (shape[0],
                                                                      spec.image_embed_dim):
      raise ValueError(f"'image' of shape {None if image is None else tuple(image.shape)} "
                       f'must be [B={shape[0]}, Li, model.image_embed_dim='
                       f'{spec.image_embed_dim}] (CLIP hidden_states[-2]).')
  elif 'image' in cond:
    raise ValueError("'image' is given but model.image_embed_dim is 0.")


def make_sample_fn(model, diffusion, config, shape):
  """sample_fn(params, rng, cond, init_noise=None) -> latents float32 [*shape] (the caller
  jits it); cond holds CONDITION_KEYS (see `image_condition`). init_noise [*shape]
  replaces the noise drawn from rng (split(rng)[0], as samplers.sample draws it)."""
  shape = tuple(int(d) for d in shape)
  if len(shape) != 5 or shape[-1] != model.channels:
    raise ValueError(f'shape={shape} must be [B, T\', H\', W\', {model.channels}] (the '
                     "model's output channels).")
  diffusion = diffusion.for_sampling(config.sample.shift)
  cfg_scale = float(config.sample.cfg_scale)
  cfg_scale = cfg_scale if cfg_scale > 1.0 else 1.0  # WanPipeline: guidance only above 1
  null = functools.partial(cond_lib.null_condition, null_label=None)

  def sample_fn(params, rng, cond, init_noise=None):
    check_condition(cond, shape, model.spec, cfg_scale > 1.0)

    def model_fn(z, t_model, c):
      return model.apply({'params': params}, z, t_model, text=c['text'],
                         cond=c.get('condition'), image=c.get('image'))

    return samplers.sample(
        diffusion, model_fn, rng, shape, cond, sampler=config.sample.sampler,
        num_steps=int(config.sample.num_steps), cfg_scale=cfg_scale,
        null_label=null if cfg_scale > 1.0 else None, clip_x0=False, init_noise=init_noise,
        cfg_interval=samplers.cfg_interval_of(config.sample))

  return sample_fn


def sample_i2v(model, params, diffusion, config, cond: dict, rng,
               init_noise: Optional[Any] = None) -> np.ndarray:
  """Latents float32 [B, T', H', W', C] of the I2V model `model` (a VideoDiT with Wan's
  I2V overrides) for `cond` (CONDITION_KEYS), by config.sample's sampler, steps, shift
  and guidance. Compiles on every call: to sample repeatedly, jit make_sample_fn once."""
  condition = cond.get('condition')
  if condition is None:
    raise ValueError("sample_i2v needs cond['condition'] (i2v_condition); the sample's "
                     'shape is read from it.')
  shape = tuple(condition.shape[:4]) + (model.channels,)
  sample_fn = jax.jit(make_sample_fn(model, diffusion, config, shape))
  return np.asarray(sample_fn(params, rng, cond, init_noise))
