"""Generation with captions and given frames: config checks, the sample grid of a text- or
frame-conditioned model, prompts (--mode=sample --prompt=...) and video extension
(--mode=extend --input=clip.mp4 --num_frames=N; a .png input is image-to-video).

The pure pieces (given-frame masks, re-imposition, the extension loop) live in
diffusion/conditioning.py; this module ties them to a config, a model and its params.
"""

import functools
import os
from typing import List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdit_jax.convert import clip_vision as clip_convert
from vdit_jax.convert import umt5 as umt5_convert
from vdit_jax.data import shards
from vdit_jax.data import synthetic
from vdit_jax.data import transforms
from vdit_jax.data import video_io
from vdit_jax.diffusion import conditioning as cond_lib
from vdit_jax.diffusion import samplers
from vdit_jax.parallel import axes
from vdit_jax.model import text as text_lib
from vdit_jax.parallel import paths
from vdit_jax.generate import sampling
from vdit_jax.generate import wan_i2v

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')
PROMPT_SEPARATOR = ';'


def conditioning(config) -> Optional[cond_lib.Conditioning]:
  """What the train step draws beyond labels (None: class conditioning only)."""
  return cond_lib.Conditioning.from_config(config)


def is_text(config) -> bool:
  return config.model.conditioning == 'text'


def needs_conditions(config) -> bool:
  """True when sampling needs a condition dict (captions or given frames), not labels."""
  return is_text(config) or int(config.model.context_frames_max) > 0


def parse_prompts(prompts) -> List[str]:
  """'a red square moving left; a blue circle moving up' (or a list) -> list of prompts."""
  if isinstance(prompts, str):
    prompts = prompts.split(PROMPT_SEPARATOR)
  return [p.strip() for p in prompts if p.strip()]


def default_prompts(num: int) -> List[str]:
  """Synthetic captions covering shapes, colours and directions, `num` of them."""
  out = []
  for i in range(num):
    out.append(synthetic.caption(i % len(synthetic.SHAPES), (i * 3) % len(synthetic.COLOURS),
                                 (i // len(synthetic.SHAPES)) % len(synthetic.DIRECTIONS)))
  return out


def check_config(config) -> None:
  """Rules of the text / given-frames keys against the data and sample config."""
  m, data = config.model, config.data
  text = is_text(config)
  if text:
    p = m.caption_dropout
    if not 0.0 <= p < 1.0:
      raise ValueError(f'config.model.caption_dropout={p} must be in [0, 1).')
    encoder = m.text.encoder
    if encoder == 'builtin' and data.source == 'files':
      raise ValueError("model.conditioning='text' with model.text.encoder='builtin' needs a "
                       "caption per clip; data.source='files' has none (use 'synthetic', or "
                       "'shards' written with captions).")
    encoder_path = m.text.encoder_path
    if encoder_path and encoder != 'precomputed':
      raise ValueError(f'model.text.encoder_path={encoder_path!r} is read only with '
                       f"model.text.encoder='precomputed' (its umT5 embeddings), not {encoder!r}.")
    if encoder_path and not paths.isdir(encoder_path):
      raise ValueError(f'model.text.encoder_path={encoder_path!r} is not a folder: give a Wan '
                       '2.1 diffusers folder (text_encoder/ and tokenizer/) or a umT5 folder.')
    if (encoder == 'precomputed' and data.source == 'shards' and data.path
        and paths.isfile(paths.join(data.path, shards.INDEX_NAME))):
      encoded = shards.read_index(data.path).get('text_encoder')  # tools.encode_latents
      if encoded and int(encoded['d_model']) != int(m.text.embed_dim):
        raise ValueError(f"the caption embeddings in data.path={data.path!r} are "
                         f"{encoded['d_model']} wide ({encoded['path']}), but "
                         f'model.text.embed_dim={m.text.embed_dim}.')
      if encoded and int(encoded['max_length']) > int(m.text.max_length):
        raise ValueError(f"the captions in data.path={data.path!r} were encoded up to "
                         f"{encoded['max_length']} tokens, more than model.text.max_length="
                         f'{m.text.max_length} rows: raise it (Wan: 512).')
    if encoder == 'precomputed' and data.source == 'synthetic':
      raise ValueError("model.text.encoder='precomputed' reads each clip's caption_embedding "
                       "from data.source='shards'; data.source='synthetic' has none (use "
                       "encoder='builtin').")
  image_path = m.image_encoder_path
  if image_path and not m.image_embed_dim:
    raise ValueError(f'model.image_encoder_path={image_path!r} encodes the image of a Wan I2V '
                     'model, but model.image_embed_dim=0: this model takes no image tokens; '
                     "leave it ''.")
  if image_path and not paths.isdir(image_path):
    raise ValueError(f'model.image_encoder_path={image_path!r} is not a folder: give a Wan 2.1 '
                     'I2V diffusers folder (image_encoder/ and image_processor/).')
  prompts = parse_prompts(config.sample.prompts)
  if prompts:
    if not text:
      raise ValueError(f'config.sample.prompts={config.sample.prompts!r} needs '
                       "model.conditioning='text'.")
    check_prompts(config, prompts)
  k_max = m.context_frames_max
  if isinstance(k_max, bool) or not isinstance(k_max, int) or k_max < 0:
    raise ValueError(f'config.model.context_frames_max={k_max!r} must be an integer >= 0.')
  if k_max >= data.num_frames:
    raise ValueError(f'config.model.context_frames_max={k_max} must be < data.num_frames='
                     f'{data.num_frames} (frames per clip; latent frames for latent data), '
                     'so that every clip keeps a frame to generate.')
  none_prob = m.context_none_prob
  if not 0.0 <= none_prob <= 1.0:
    raise ValueError(f'config.model.context_none_prob={none_prob} must be in [0, 1].')
  given, stride = m.given_frames, m.keyframe_stride
  cond_lib.check_given_frames(given, stride, data.num_frames, k_max)  # keyframes: interpolation
  for bucket in (data.buckets or ()) if given == 'keyframes' else ():
    try:
      cond_lib.keyframe_positions(int(bucket[0]), stride)
    except ValueError as e:
      raise ValueError(f'data.buckets entry {tuple(bucket)}: {e}') from None
  overlap = config.sample.overlap
  if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
    raise ValueError(f'config.sample.overlap={overlap!r} must be an integer >= 0 '
                     '(0: model.context_frames_max).')
  if k_max > 0 and overlap > k_max:
    raise ValueError(f'config.sample.overlap={overlap} exceeds model.context_frames_max='
                     f'{k_max}, the most given frames the model was trained with.')

  if config.lora.rank > 0 and k_max > 0:
    raise ValueError(f'config.lora.rank={config.lora.rank}: LoRA fine-tuning does not feed '
                     'given frames to the train step yet; use model.context_frames_max=0 '
                     'with LoRA.')


def check_prompts(config, prompts: Sequence[str]) -> None:
  """Each prompt tokenises (builtin encoder): raises naming an unknown word. A
  'precomputed' model takes prompts only with model.text.encoder_path (umT5)."""
  if config.model.text.encoder != 'builtin':
    if config.model.text.encoder_path:
      return
    raise ValueError("prompts need model.text.encoder='builtin', or with 'precomputed' "
                     'model.text.encoder_path: a umT5 folder (a Wan 2.1 diffusers folder) that '
                     'encodes them; without it the model takes embeddings from your own text '
                     'encoder, not words.')
  tokenizer = text_lib.Tokenizer(int(config.model.text.max_length))
  for prompt in prompts:
    tokenizer.encode(prompt)


def check_prompt_flag(config, prompt: Optional[str]) -> None:
  """--prompt: needs a text model with the builtin encoder and known words (fails fast)."""
  if prompt is None:
    return
  if not is_text(config):
    raise ValueError(f"--prompt={prompt!r} needs a text-conditioned model "
                     "(model.conditioning='text', e.g. configs/tiny_text.py).")
  check_prompts(config, parse_prompts(prompt) or [prompt])


def sharded_dims(spec: Optional[text_lib.TextSpec]):
  """(what, size, logical axis) of the text encoder's sharded dims (the model spec's
  `text`; None: no text encoder), for validate.py."""
  if spec is None:
    return []
  if spec.encoder == 'precomputed':
    return [(f'model.text.embed_dim={spec.embed_dim}', spec.embed_dim, axes.MLP)]
  return [(f'model.text.width={spec.width}', spec.width, axes.EMBED),
          (f'model.text.width={spec.width}', spec.width, axes.MLP),
          (f'model.text.num_heads={spec.num_heads}', spec.num_heads, axes.HEADS),
          (f'model.text.mlp_dim={spec.mlp_dim}', spec.mlp_dim, axes.MLP)]


def batch_ndims(config) -> dict:
  """Ranks of the caption arrays in a train batch ({} without text), for its shardings."""
  c = conditioning(config)
  if c is None or not c.text_encoder:
    return {}
  data_key, mask_key = c.batch_keys()
  return {data_key: 2 if data_key == 'tokens' else 3, mask_key: 2}


def _guidance(config, num_classes: int, cond) -> Tuple[float, Optional[int]]:
  """(cfg_scale, null label): guide toward captions or labels; nothing to guide: 1."""
  if 'text' in cond or ('label' in cond and num_classes > 0):
    return float(config.sample.cfg_scale), (num_classes if num_classes > 0 else None)
  return 1.0, None


def make_sample_fn(model, diffusion, config, num_classes: int, shape):
  """sample_fn(params, rng, cond) -> clips [*shape] (the caller jits it); cond from
  `sample_condition` (or with given frames, see conditioning.given_condition)."""
  shape = tuple(int(d) for d in shape)
  diffusion = diffusion.for_sampling(config.sample.shift)
  cfg_interval = samplers.cfg_interval_of(config.sample)

  def sample_fn(params, rng, cond):
    def apply_fn(z, t, label=None, text=None, frame_mask=None, cond=None, image=None):
      return model.apply({'params': params}, z, t, label, text=text, frame_mask=frame_mask,
                         cond=cond, image=image)
    cfg_scale, null_label = _guidance(config, num_classes, cond)
    return cond_lib.sample(diffusion, apply_fn, rng, shape, cond,
                           sampler=config.sample.sampler, num_steps=config.sample.num_steps,
                           eta=config.sample.eta, cfg_scale=cfg_scale, null_label=null_label,
                           cfg_interval=cfg_interval,
                           clip_x0=not config.data.latents)  # latents are not in [-1, 1]

  return sample_fn


def sample_shape(config, num_samples: int):
  d = config.data
  return (num_samples, d.num_frames, d.height, d.width, d.channels)


@functools.lru_cache(maxsize=2)
def _text_encoder(folder: str):
  """(tokenizer, spec, params) of the umT5 in `folder`, read once per process."""
  spec, params = umt5_convert.load_encoder(folder)
  return umt5_convert.load_tokenizer(folder), spec, params


def encode_text(config, prompts: Sequence[str]) -> dict:
  """Prompts -> {'embed' [B, L, E], 'mask' [B, L]} with model.text.encoder_path's umT5,
  as WanPipeline encodes them (rows past each prompt's length zero, L =
  model.text.max_length)."""
  folder = config.model.text.encoder_path
  if not folder:
    raise ValueError("encoding prompts needs model.text.encoder_path, a umT5 folder (a Wan "
                     '2.1 diffusers folder with text_encoder/ and tokenizer/).')
  tokenizer, spec, params = _text_encoder(paths.normalize(folder))
  length = int(config.model.text.max_length)
  if spec.d_model != int(config.model.text.embed_dim):
    raise ValueError(f'the umT5 in model.text.encoder_path={folder!r} gives {spec.d_model}-wide '
                     f'embeddings, but model.text.embed_dim={config.model.text.embed_dim}.')
  embed = umt5_convert.encode_prompts(tokenizer, spec, params, list(prompts), length)
  _, mask = umt5_convert.tokenize(tokenizer, [umt5_convert.prompt_clean(p) for p in prompts],
                                  length)
  return {'embed': jnp.asarray(embed), 'mask': jnp.asarray(mask)}


def encoded_prompts(config, prompts: Sequence[str]) -> dict:
  """The text condition of prompts for a 'precomputed' model with an encoder_path: 'text'
  and, for classifier-free guidance, 'negative_text' (sample.negative_prompt)."""
  prompts = list(prompts)
  return {'text': encode_text(config, prompts),
          'negative_text': encode_text(config, [config.sample.negative_prompt] * len(prompts))}


def sample_condition(config, num_classes: int, num_samples: int,
                     prompts: Optional[Sequence[str]] = None) -> dict:
  """The condition dict of a sample grid: captions (prompts cycled over the samples; no
  prompts: sample.prompts, else synthetic captions), or labels cycling through the
  classes; with given frames enabled, none given (k = 0). An interpolation model
  (model.given_frames='keyframes') on synthetic data is given the keyframes of held-out
  synthetic clips, with their captions (no prompts) or labels."""
  cond = {}
  clips = None
  if is_keyframes(config) and config.data.source == 'synthetic':
    clips, captions, labels = synthetic_clips(config, num_samples)
    prompts = prompts or config.sample.prompts or captions
  if is_text(config):
    spec = text_lib.spec_from_config(config.model.text)
    if spec.encoder == 'builtin':
      prompts = parse_prompts(prompts or config.sample.prompts) or default_prompts(
          num_samples)
      check_prompts(config, prompts)
      chosen = [prompts[i % len(prompts)] for i in range(num_samples)]
      ids, mask = text_lib.Tokenizer(spec.max_length).encode_batch(chosen)
      cond['text'] = {'tokens': jnp.asarray(ids), 'mask': jnp.asarray(mask)}
    elif config.model.text.encoder_path:  # umT5 (Wan): prompts encoded here
      # No prompt (--prompt, sample.prompts): the empty one, as WanPipeline encodes ''.
      prompts = parse_prompts(prompts or config.sample.prompts) or ['']
      cond.update(encoded_prompts(config, [prompts[i % len(prompts)]
                                           for i in range(num_samples)]))
    else:
      if prompts:
        check_prompts(config, prompts)  # raises: precomputed models take no words
      cond['text'] = text_lib.null_text(spec, num_samples)  # unconditional
  elif num_classes > 0:
    cond['label'] = (sampling.sample_labels(num_samples, num_classes) if clips is None
                     else jnp.asarray(labels))
  if int(config.model.context_frames_max) > 0:
    shape = sample_shape(config, num_samples)
    cond['context'] = jnp.zeros(shape, jnp.float32)
    cond['frame_mask'] = jnp.zeros(shape[:2], bool)
    if clips is not None:
      positions = cond_lib.keyframe_positions(shape[1], config.model.keyframe_stride)
      cond['context'], cond['frame_mask'] = cond_lib.given_at(
          clips[:, list(positions)], positions, shape[1])
  return cond


def is_keyframes(config) -> bool:
  """An interpolation model: trained with the keyframes given (model.given_frames)."""
  return (int(config.model.context_frames_max) > 0
          and config.model.given_frames == 'keyframes')


def synthetic_clips(config, num: int, seed: Optional[int] = None):
  """`num` synthetic clips of the config's data (seed: sample.seed + 1, apart from the
  training clips' data.source_seed by default) -> (float32 [num, T, H, W, 3] in [-1, 1],
  captions, labels int32 [num])."""
  source = synthetic.from_data_config(
      config.data, num_examples=num, captions=True,
      seed=int(config.sample.seed) + 1 if seed is None else seed)
  examples = [source[i] for i in range(num)]
  video = np.stack([e['video'] for e in examples]).astype(np.float32) / 127.5 - 1.0
  return (video, [e['caption'] for e in examples],
          np.array([e['label'] for e in examples], np.int32))


def read_input(path: str, height: int, width: int) -> np.ndarray:
  """An image or a video file -> float32 [F, height, width, 3] in [-1, 1] (short-side
  resize, centre crop); an image is one frame (image-to-video)."""
  path = os.fspath(path)
  if not paths.isfile(path):
    raise FileNotFoundError(f'--input={path!r}: no such file.')
  ext = os.path.splitext(path)[1].lower()
  if ext in IMAGE_EXTENSIONS:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with paths.local_copy(path) as local, Image.open(local) as image:
      frames = np.asarray(image.convert('RGB'))[None]  # [1, h, w, 3]
  elif ext in video_io.READ_EXTENSIONS:
    with paths.local_copy(path) as local:  # a bucket's video, downloaded once
      frames = video_io.read_frames(local, range(video_io.count_frames(local)))  # [F, h, w, 3]
  else:
    raise ValueError(f'--input={path!r}: the extension must be an image '
                     f'{IMAGE_EXTENSIONS} or a video {video_io.READ_EXTENSIONS}.')
  frames = transforms.resize_and_crop(frames, height, width, 'center')  # [F, H, W, 3]
  return frames.astype(np.float32) / 127.5 - 1.0


def check_num_frames(num_frames, given: int) -> None:
  """--num_frames of an extension: an integer larger than the `given` frames of the input."""
  if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames <= given:
    raise ValueError(f'--num_frames={num_frames!r} must be an integer larger than the '
                     f'{given} frame(s) of the input: the result holds the input '
                     'and its continuation.')


def extend_clip(model, diffusion, config, params, frames, num_frames: int, *, rng,
                num_classes: int = 0, prompt: Optional[str] = None):
  """Continues `frames` [B, F, H, W, C] to `num_frames` frames (the F given first).

  Windows of data.num_frames frames, each given the last sample.overlap (default
  model.context_frames_max) frames of the clip so far; a class model samples
  unconditionally (null label), a text model toward `prompt` (None: no caption).
  Returns (clip [B, num_frames, H, W, C], list of windows [B, T, H, W, C]).
  """
  k_max = int(config.model.context_frames_max)
  replace = k_max < 1  # no given-frames channel: the frames are imposed, noised, each step
  if replace and not (config.diffusion.objective == 'flow' and int(config.sample.overlap) > 0):
    raise ValueError('extending a clip needs a model trained with given frames '
                     '(model.context_frames_max > 0, see configs/tiny_extend.py), or a flow '
                     'model (e.g. Wan 2.1) with sample.overlap > 0 given frames per window, '
                     'imposed noised to each step\'s level (training-free).')
  if not replace and config.model.given_frames != 'prefix':
    raise ValueError(f"extending a clip needs a model trained with model.given_frames="
                     f"'prefix' (the first frames given), not "
                     f"{config.model.given_frames!r}; an interpolation model fills the "
                     'frames between keyframes (train/multistage.py).')
  frames = np.asarray(frames, np.float32)
  d = config.data
  if frames.ndim != 5 or frames.shape[2:] != (d.height, d.width, d.channels):
    raise ValueError(f'frames to extend must be [B, F, {d.height}, {d.width}, {d.channels}] '
                     f'(data.height, width, channels), got {frames.shape}.')
  check_num_frames(num_frames, frames.shape[1])
  overlap = int(config.sample.overlap) or k_max
  batch = frames.shape[0]
  cond = {}
  if is_text(config):
    spec = model.spec.text
    if spec.encoder == 'precomputed' and config.model.text.encoder_path:
      cond.update(encoded_prompts(config, [prompt or ''] * batch))
    elif prompt:
      check_prompts(config, [prompt])
      ids, mask = text_lib.Tokenizer(spec.max_length).encode_batch([prompt] * batch)
      cond['text'] = {'tokens': jnp.asarray(ids), 'mask': jnp.asarray(mask)}
    else:
      cond['text'] = text_lib.null_text(spec, batch)
  elif prompt:
    raise ValueError(f"--prompt={prompt!r} needs model.conditioning='text'.")
  # A class model gets no label: the null label, and no guidance (nothing to guide to).
  sample_fn = jax.jit(make_sample_fn(model, diffusion, config, num_classes,
                                     (batch, d.num_frames, d.height, d.width, d.channels)))

  def window_fn(context, mask, index):
    window_rng = jax.random.fold_in(rng, index)
    if replace:
      noise = jax.random.normal(jax.random.fold_in(window_rng, 1), context.shape, jnp.float32)
      return sample_fn(params, window_rng, {**cond, 'context': context, 'replace_mask': mask,
                                            'context_noise': noise})
    return sample_fn(params, window_rng, {**cond, 'context': context, 'frame_mask': mask})

  return cond_lib.extend(window_fn, frames, num_frames, d.num_frames, overlap)


def is_i2v(config) -> bool:
  """A Wan I2V model: the first frame's latents and mask enter as model.condition_channels
  more input channels, so a clip is continued from its last frame (`extend_i2v`)."""
  return int(config.model.condition_channels) > 0


def check_i2v_extend(config) -> None:
  """The keys --mode=extend reads with a Wan I2V model (no-op for other models); reads the
  config alone, so it can run before the weights load."""
  if not is_i2v(config):
    return
  m = config.model
  which = f'a Wan I2V model (model.condition_channels={m.condition_channels})'
  if not config.data.latents:
    raise ValueError(f'extending with {which} needs data.latents=True and its VAE '
                     '(data.vae): each window\'s first frame is VAE-encoded, and the window '
                     'decoded.')
  if m.image_embed_dim and not m.image_encoder_path:
    raise ValueError(f'extending with {which} and model.image_embed_dim={m.image_embed_dim} '
                     'needs model.image_encoder_path: a Wan 2.1 I2V diffusers folder whose '
                     'image_encoder/ (CLIP) and image_processor/ encode each window\'s first '
                     'frame.')
  if not m.text.encoder_path:
    raise ValueError(f'extending with {which} needs model.text.encoder_path: a umT5 folder '
                     '(the Wan 2.1 diffusers folder, text_encoder/ and tokenizer/) that encodes '
                     'the prompt and sample.negative_prompt.')


@functools.lru_cache(maxsize=2)
def _image_encoder(folder: str):
  """(spec, params, processing) of the CLIP in the Wan I2V folder `folder`, read once per
  process."""
  spec, params = clip_convert.load_params(folder)
  return spec, params, clip_convert.read_processor(folder)


def i2v_window_condition(config, decoder, images, num_frames: int) -> dict:
  """The image side of an I2V window whose first frame is `images` uint8 [B, H, W, 3]
  (one per sample) -> numpy {'condition' [B, T', H', W', tf + z], 'image' [B, Li, E]
  (only for a model with image tokens)}: `wan_i2v.image_condition` with the VAE of
  `decoder` (a LatentDecoder; its latent statistics) and the CLIP of
  model.image_encoder_path, run on one local device outside the DiT's mesh, as
  LatentDecoder.encode runs."""
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f'images {images.dtype} {images.shape} must be uint8 [B, H, W, 3].')
  mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()[:1]), ('image',))
  with jax.set_mesh(mesh), nn.logical_axis_rules(()):
    clip = {}
    if int(config.model.image_embed_dim):
      spec, params, processing = _image_encoder(
          paths.normalize(config.model.image_encoder_path))
      clip = dict(clip_spec=spec, clip_params=params, processing=processing)
    out = wan_i2v.image_condition(
        list(images), height=images.shape[1], width=images.shape[2], num_frames=num_frames,
        vae_cfg=decoder.cfg, vae_params=decoder.params, latents_mean=decoder.space.mean,
        latents_std=decoder.space.std, **clip)
  return {k: np.asarray(v) for k, v in out.items()}


def extend_i2v(s, params, frames, num_frames: int, *, rng, prompt: Optional[str] = None):
  """Continues `frames` [B, F, H, W, 3] in [-1, 1] (pixels, the F given first) to
  `num_frames` frames with a Wan 2.1 I2V model, window by window.

  Each window is data.num_frames latent frames (1 + 4 (T' - 1) frames), sampled as
  WanImageToVideoPipeline would from an image: the last frame of the clip so far (as the
  uint8 image a video file holds) gives the first-frame condition (s.decoder's VAE) and
  the CLIP tokens (model.image_encoder_path); the prompt (None: '') is guided against
  sample.negative_prompt, both umT5-encoded (model.text.encoder_path); window i draws its
  noise from fold_in(rng, i). The decoded window's frames after its first (which
  re-renders the given image) are appended. sample.overlap is not read: the image is the
  window's frame 0, so no earlier frame of the clip fits in the window.

  Returns (clip [B, num_frames, H, W, 3], the list of each window's latents
  [B, T', H', W', z]).
  """
  cfg, decoder = s.config, s.decoder
  check_i2v_extend(cfg)
  if decoder is None:
    raise ValueError('extend_i2v needs the run\'s VAE (s.decoder, built with a workdir and '
                     'data.latents=True).')
  d = cfg.data
  window_frames, height, width, _ = decoder.pixel_shape((d.num_frames, d.height, d.width))
  frames = np.asarray(frames, np.float32)
  if frames.ndim != 5 or frames.shape[2:] != (height, width, 3):
    raise ValueError(f'frames to extend must be [B, F, {height}, {width}, 3] (the VAE\'s '
                     f'pixels of data.height, width), got {frames.shape}.')
  check_num_frames(num_frames, frames.shape[1])
  batch = frames.shape[0]
  text = encoded_prompts(cfg, [prompt or ''] * batch)  # {'text', 'negative_text'}
  shape = (batch, d.num_frames, d.height, d.width, d.channels)
  sample_fn = jax.jit(wan_i2v.make_sample_fn(s.model, s.diffusion, cfg, shape))
  clip, windows = frames, []
  while clip.shape[1] < num_frames:
    images = video_io.to_uint8(clip[:, -1])  # [B, H, W, 3]
    cond = {**text, **i2v_window_condition(cfg, decoder, images, window_frames)}
    latents = sample_fn(params, jax.random.fold_in(rng, len(windows)), cond)
    latents = np.asarray(jax.device_get(latents), np.float32)  # [B, T', H', W', z]
    windows.append(latents)
    decoded = decoder(latents)  # [B, 1 + 4 (T' - 1), H, W, 3]
    clip = np.concatenate([clip, decoded[:, 1:]], axis=1)  # [B, F', H, W, 3]
  return clip[:, :num_frames], windows


def extend_name(input_path: str, step: int) -> str:
  """File name (no extension) of an extended clip: extend_<input stem>_step_<step>."""
  stem = os.path.splitext(os.path.basename(input_path))[0]
  return f'extend_{stem}_step_{step:07d}'


def extend_and_write(s, params, input_path: str, num_frames: int, workdir: str, name: str,
                     prompt: Optional[str] = None):
  """--mode=extend: reads `input_path`, extends it (sample.num_samples continuations),
  writes WORKDIR/samples/<name>.<formats>; returns (clips, windows, paths).

  A Wan I2V model (model.condition_channels > 0) continues from the last frame, window
  by window (`extend_i2v`; windows are latents); a latent model without it re-encodes
  the input's last sample.overlap latent frames and extends them (`extend_clip`).
  """
  cfg = s.config
  decoder = s.decoder
  check_i2v_extend(cfg)  # before the channels rule: an I2V model's keys named first
  if cfg.data.channels != 3 and decoder is None:
    raise ValueError(f'--mode=extend reads RGB frames, but data.channels={cfg.data.channels} '
                     'and no VAE (data.latents): encode the input with your VAE and call '
                     'extend_clip.')
  if is_i2v(cfg):  # Wan I2V: every window continues from the clip's last frame
    _, height, width, _ = decoder.pixel_shape((1, cfg.data.height, cfg.data.width))
    frames = read_input(input_path, height, width)  # [F, H, W, 3]
    frames = np.broadcast_to(frames[None], (cfg.sample.num_samples,) + frames.shape)
    clip, windows = extend_i2v(s, params, frames, num_frames,
                               rng=jax.random.key(cfg.sample.seed), prompt=prompt)
  elif decoder is None:
    frames = read_input(input_path, cfg.data.height, cfg.data.width)  # [F, H, W, 3]
    frames = np.broadcast_to(frames[None], (cfg.sample.num_samples,) + frames.shape)
    clip, windows = extend_clip(s.model, s.diffusion, cfg, params, frames, num_frames,
                                rng=jax.random.key(cfg.sample.seed),
                                num_classes=s.num_classes, prompt=prompt)
  else:  # latent model: encode the input's last frames, extend the latents, decode
    _, height, width, _ = decoder.pixel_shape((1, cfg.data.height, cfg.data.width))
    frames = read_input(input_path, height, width)  # [F, H, W, 3]
    factor = decoder.cfg.temporal_factor
    given = min(int(cfg.sample.overlap) or int(cfg.model.context_frames_max),
                1 + (frames.shape[0] - 1) // factor)  # latent frames to encode
    frames = frames[frames.shape[0] - (1 + factor * (given - 1)):]  # [1 + 4 (g - 1), ...]
    latents = decoder.encode(frames[None])  # [1, g, H', W', z]
    latents = np.broadcast_to(latents, (cfg.sample.num_samples,) + latents.shape[1:])
    total = 1 + -(-(num_frames - 1) // factor)  # latent frames covering num_frames frames
    latent_clip, windows = extend_clip(s.model, s.diffusion, cfg, params, latents, total,
                                       rng=jax.random.key(cfg.sample.seed),
                                       num_classes=s.num_classes, prompt=prompt)
    clip = decoder(latent_clip)[:, :num_frames]  # [n, num_frames, H, W, 3]
  written = []
  if jax.process_index() == 0:
    written = sampling.write_samples(clip, paths.join(workdir, 'samples'), name,
                                     cfg.sample.formats, cfg.sample.fps)
  return clip, windows, written
