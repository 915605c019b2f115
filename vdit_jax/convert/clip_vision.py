r"""Wan 2.1 I2V's CLIP image encoder from a Hugging Face folder, and its image preprocessing.

    from vdit_jax.convert import clip_vision
    spec, params = clip_vision.load_params('Wan2.1-I2V-14B-480P-Diffusers')  # image_encoder/
    processing = clip_vision.read_processor('Wan2.1-I2V-14B-480P-Diffusers')  # image_processor/
    tokens = clip_vision.encode_images(spec, params, processing, [pil_image])  # [1, 257, 1280]

`tokens` is what diffusers' `WanImageToVideoPipeline.encode_image` gives the transformer:
`CLIPVisionModel(**CLIPImageProcessor(images), output_hidden_states=True).hidden_states[-2]`
(model/clip_vision.py explains the index).

Folders: the pipeline's top folder with `image_encoder/` (config.json and model.safetensors,
or an index and its shards) and `image_processor/` (preprocessor_config.json), or those
subfolders themselves.

Weights are read through `parallel/safetensors_load` (numpy, no torch, no pickle; bf16
through ml_dtypes); `load_params(..., shardings=...)` reads only each process's slices.
Tensor names are transformers 5's (`embeddings.*`, `pre_layrnorm.*`, `encoder.layers.*`)
or, as checkpoints saved by transformers 4 (Wan's) store them, the same under
`vision_model.`. Every param must come from one tensor of the shape the config implies,
and every layer the config names must be stored (so that a config deeper than its weights
does not silently run a shallower model); the layers past the output layer,
`post_layernorm.*` and `visual_projection.weight` (a CLIPVisionModelWithProjection) are
not read; any other stored tensor stops the load, named (another model's weights, or a
config that does not match them).

Preprocessing (`preprocess`) is transformers' CLIPImageProcessor as its PIL backend runs
it (transformers 5 without torchvision; before 5, the only one): RGB, resize (shortest edge
to `size`, the other int(size * long / short); or to height x width) with PIL's filter
`resample` (3: bicubic) on the uint8 image, centre crop (top = (h - crop) // 2), rescale
(float64 x rescale_factor, to float32), normalise ((x - mean) / std in float32). Measured
bit-identical to `CLIPImageProcessorPil` (tests/clip_vision_test.py). With torchvision
installed, transformers 5 picks its torchvision backend instead, which resizes with
torchvision's antialiased bicubic on uint8 tensors: not PIL's arithmetic, so its pixels
may differ by rounding (a grey level here and there); not measured here (no torchvision).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdit_jax.convert import pipeline_folder
from vdit_jax.model import clip_vision
from vdit_jax.parallel import safetensors_load as st

CONFIG = 'config.json'
PREPROCESSOR = 'preprocessor_config.json'
ENCODER_DIR = 'image_encoder'
PROCESSOR_DIR = 'image_processor'
LEGACY_PREFIX = 'vision_model.'  # transformers 4's CLIPVisionModel held a `vision_model`
# Stored but never read: the pooled output's norm, CLIPVisionModelWithProjection's head.
_UNUSED = ('post_layernorm.weight', 'post_layernorm.bias', 'visual_projection.weight')
PROCESSOR_TYPES = ('CLIPImageProcessor', 'CLIPImageProcessorFast', 'CLIPImageProcessorPil',
                   'CLIPFeatureExtractor')


def _read_json(path: str) -> Dict[str, Any]:
  try:
    with open(path, encoding='utf-8') as f:
      out = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'{path} is not a readable JSON file: {e}.') from e
  if not isinstance(out, dict):
    raise ValueError(f'{path} holds a {type(out).__name__}, not a JSON object.')
  return out


# ---------------------------------------------------------------------------------------------
# Weights.


def read_spec(folder, hidden_state: int = -2, dtype=jnp.float32,
              param_dtype=jnp.float32) -> clip_vision.ClipVisionSpec:
  """The image encoder's config.json (top folder or image_encoder/) -> ClipVisionSpec
  whose output is hidden_states[hidden_state]; errors name the file."""
  path = os.path.join(pipeline_folder.component(folder, ENCODER_DIR, CONFIG), CONFIG)
  try:
    return clip_vision.spec_from_hf_config(_read_json(path), hidden_state, dtype, param_dtype)
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from e


def _linear(src, name: str) -> Tuple[st.Recipe, st.Recipe]:
  """torch Linear `name` -> (kernel [in, out], bias [out])."""
  return src(f'{name}.weight').transpose(1, 0), src(f'{name}.bias')


def _layer_norm(src, name: str) -> Dict[str, st.Recipe]:
  return {'scale': src(f'{name}.weight'), 'bias': src(f'{name}.bias')}


def _layer(src, i: int, heads: int) -> Dict[str, Any]:
  prefix = f'encoder.layers.{i}'
  attn: Dict[str, Any] = {}
  for ours, theirs in (('query', 'q_proj'), ('key', 'k_proj'), ('value', 'v_proj')):
    kernel, bias = _linear(src, f'{prefix}.self_attn.{theirs}')
    attn[f'{ours}_kernel'] = kernel.reshape(kernel.shape[0], heads, -1)  # [D, K, Dh]
    attn[f'{ours}_bias'] = bias.reshape(heads, -1)  # [K, Dh]
  kernel, bias = _linear(src, f'{prefix}.self_attn.out_proj')
  attn['out_kernel'] = kernel.reshape(heads, -1, kernel.shape[1])  # [K, Dh, D]
  attn['out_bias'] = bias
  fc1, fc1_bias = _linear(src, f'{prefix}.mlp.fc1')
  fc2, fc2_bias = _linear(src, f'{prefix}.mlp.fc2')
  return {'norm1': _layer_norm(src, f'{prefix}.layer_norm1'), 'attn': attn,
          'norm2': _layer_norm(src, f'{prefix}.layer_norm2'),
          'mlp': {'fc1': {'kernel': fc1, 'bias': fc1_bias},
                  'fc2': {'kernel': fc2, 'bias': fc2_bias}}}


def expected_names(spec: clip_vision.ClipVisionSpec) -> List[str]:
  """The tensors (transformers 5 names) the encoder of `spec` reads: the embeddings and
  its output_layer layers."""
  names = ['embeddings.class_embedding', 'embeddings.patch_embedding.weight',
           'embeddings.position_embedding.weight', 'pre_layrnorm.weight', 'pre_layrnorm.bias']
  for i in range(spec.output_layer):
    p = f'encoder.layers.{i}'
    for m in ('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.out_proj',
              'layer_norm1', 'mlp.fc1', 'mlp.fc2', 'layer_norm2'):
      names += [f'{p}.{m}.weight', f'{p}.{m}.bias']
  return names


def open_folder(folder, spec: clip_vision.ClipVisionSpec) -> Tuple[st.SafetensorsFolder, str]:
  """The image encoder's safetensors and its name prefix ('' or 'vision_model.'), checked
  to hold every tensor `spec` reads and nothing a CLIPVisionModel of its config would not
  store; raises ValueError naming the folder and a tensor."""
  path = pipeline_folder.component(folder, ENCODER_DIR, CONFIG)
  weights = st.SafetensorsFolder(path)
  stored = set(weights.names())
  prefix = LEGACY_PREFIX if any(n.startswith(LEGACY_PREFIX) for n in stored) else ''
  bare = {n[len(prefix):] if n.startswith(prefix) else n for n in stored}
  # Every layer the config names must be stored, read or not: a config with more layers
  # than the weights would otherwise run a shallower model and call it hidden_states[-2].
  full = expected_names(dataclasses.replace(spec, output_layer=spec.num_hidden_layers))
  missing = [n for n in full if n not in bare]
  if missing:
    raise ValueError(f'{weights.index_path}: no tensor {prefix + missing[0]!r} ({len(missing)} '
                     f'missing), which the {spec.num_hidden_layers}-layer CLIPVisionModel of '
                     f'{os.path.join(path, CONFIG)} needs: not this model\'s weights, or a '
                     'shard is incomplete.')
  known = set(full) | set(_UNUSED)
  foreign = sorted(n for n in stored if not n.startswith(prefix) or n[len(prefix):] not in known)
  if foreign:
    raise ValueError(f'{weights.index_path} holds {foreign[0]!r} ({len(foreign)} such), which '
                     f'is no tensor of the CLIPVisionModel that {os.path.join(path, CONFIG)} '
                     'describes: the weights and config.json do not belong together.')
  return weights, prefix


def param_recipes(weights: st.SafetensorsFolder, spec: clip_vision.ClipVisionSpec,
                  prefix: str = '') -> Dict[str, Any]:
  """The encoder's params (the tree ClipVisionEncoder(spec).init makes) as recipes."""
  src = lambda name: st.source(weights, prefix + name)
  patch = src('embeddings.patch_embedding.weight')  # [D, C, p, p]
  params: Dict[str, Any] = {
      'patch_embed': patch.transpose(2, 3, 1, 0).reshape(-1, patch.shape[0]),  # [(p p C), D]
      'class_embed': src('embeddings.class_embedding'),
      'pos_embed': src('embeddings.position_embedding.weight'),
      'pre_norm': _layer_norm(src, 'pre_layrnorm'),
  }
  for i in range(spec.output_layer):
    params[f'layers_{i}'] = _layer(src, i, spec.num_attention_heads)
  return params


def abstract_params(spec: clip_vision.ClipVisionSpec):
  """The encoder's params as boxed ShapeDtypeStructs (nn.get_partition_spec gives their
  logical PartitionSpecs), without allocating them."""
  pixels = jnp.zeros((1, spec.image_size, spec.image_size, spec.num_channels), jnp.float32)
  return jax.eval_shape(
      lambda: clip_vision.ClipVisionEncoder(spec).init(jax.random.key(0), pixels))['params']


def _flat(tree, prefix=()) -> Dict[Tuple[str, ...], Any]:
  if hasattr(tree, 'items'):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, prefix + (k,)))
    return out
  return {prefix: tree}


def check_shapes(recipes, expected) -> None:
  """Raises ValueError naming the param, its stored tensor and both shapes where a
  recipe's shape differs from `expected` (unboxed ShapeDtypeStructs)."""
  want = _flat(expected)
  for path, recipe in _flat(recipes).items():
    if tuple(recipe.shape) != tuple(want[path].shape):
      raise ValueError(f"param {'/'.join(path)} (from tensor {recipe.sources()[0]!r}) has "
                       f'the stored shape {tuple(recipe.shape)}, but the config implies '
                       f'{tuple(want[path].shape)}.')


def load_params(folder, hidden_state: int = -2, dtype=jnp.float32, param_dtype=jnp.float32,
                shardings=None) -> Tuple[clip_vision.ClipVisionSpec, Any]:
  """A CLIPVisionModel folder (the Wan I2V pipeline folder or its image_encoder/) ->
  (ClipVisionSpec, params) for hidden_states[hidden_state].

  `shardings` None: host numpy arrays in param_dtype; else a tree like the params (or one
  Sharding) and the params are jax.Arrays read slice by slice (`safetensors_load.load`).
  `dtype` is the encoder's matmul dtype (ClipVisionSpec.dtype).
  """
  spec = read_spec(folder, hidden_state, dtype, param_dtype)
  weights, prefix = open_folder(folder, spec)
  recipes = param_recipes(weights, spec, prefix)
  expected = nn.meta.unbox(abstract_params(spec))
  check_shapes(recipes, expected)
  if shardings is None:
    params = jax.tree.map(lambda a: np.ascontiguousarray(a.astype(param_dtype)),
                          st.load_on_host(recipes))
  else:
    params = st.load(recipes, shardings, dtype=param_dtype, expected=expected)
  return spec, params


# ---------------------------------------------------------------------------------------------
# Preprocessing.


@dataclasses.dataclass(frozen=True)
class ImageProcessing:
  """CLIPImageProcessor's settings (preprocessor_config.json). Wan 2.1 I2V: shortest edge
  224, bicubic (resample=3), centre crop 224 x 224, rescale 1/255, OpenAI CLIP mean/std."""
  do_resize: bool = True
  shortest_edge: Optional[int] = 224        # resize the short side to this, or ...
  resize_to: Optional[Tuple[int, int]] = None  # ... to exactly (height, width)
  resample: int = 3                         # PIL filter code (3: bicubic)
  do_center_crop: bool = True
  crop: Tuple[int, int] = (224, 224)        # (height, width)
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  mean: Tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
  std: Tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)


def _size(value, key: str, path: str, allow_shortest: bool):
  """preprocessor_config's size / crop_size -> ('shortest', n) or ('exact', (h, w))."""
  if _is_size(value):
    return ('shortest', int(value)) if allow_shortest else ('exact', (int(value), int(value)))
  if isinstance(value, dict):
    if allow_shortest and set(value) == {'shortest_edge'} and _is_size(value['shortest_edge']):
      return 'shortest', int(value['shortest_edge'])
    if set(value) == {'height', 'width'} and all(_is_size(v) for v in value.values()):
      return 'exact', (int(value['height']), int(value['width']))
  forms = ('an integer, {"shortest_edge": n} or {"height": h, "width": w}' if allow_shortest
           else 'an integer or {"height": h, "width": w}')
  raise ValueError(f'{path}: {key}={value!r} must be {forms} (positive integers).')


def _is_size(value) -> bool:
  return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def read_processor(folder) -> ImageProcessing:
  """The folder's image_processor/preprocessor_config.json (or the folder's own) ->
  ImageProcessing; a key of another processor's, or a value this port does not do, is
  refused naming the file and the key."""
  path = os.path.join(pipeline_folder.component(folder, PROCESSOR_DIR, PREPROCESSOR),
                      PREPROCESSOR)
  hf = _read_json(path)
  kind = hf.get('image_processor_type', hf.get('feature_extractor_type'))
  if kind not in PROCESSOR_TYPES:
    raise ValueError(f'{path}: image_processor_type={kind!r} is not one of {PROCESSOR_TYPES}; '
                     'only CLIP\'s image preprocessing is ported.')
  defaults = ImageProcessing()
  shortest, resize_to = defaults.shortest_edge, None
  if 'size' in hf:
    how, value = _size(hf['size'], 'size', path, allow_shortest=True)
    shortest, resize_to = (value, None) if how == 'shortest' else (None, value)
  crop = defaults.crop
  if 'crop_size' in hf:
    crop = _size(hf['crop_size'], 'crop_size', path, allow_shortest=False)[1]
  resample = hf.get('resample', defaults.resample)
  if resample not in (0, 1, 2, 3, 4, 5):
    raise ValueError(f'{path}: resample={resample!r} must be a PIL filter code 0..5 '
                     '(3: bicubic).')
  stats = {}
  for key, default in (('image_mean', defaults.mean), ('image_std', defaults.std)):
    value = hf.get(key, default)
    value = [value] * 3 if isinstance(value, (int, float)) else value
    if (not isinstance(value, (list, tuple)) or len(value) != 3
        or not all(isinstance(v, (int, float)) for v in value)):
      raise ValueError(f'{path}: {key}={hf.get(key)!r} must be 3 numbers (one per RGB '
                       'channel).')
    stats[key] = tuple(float(v) for v in value)
  if not all(s > 0 for s in stats['image_std']):
    raise ValueError(f"{path}: image_std={hf.get('image_std')!r} must be positive.")
  factor = hf.get('rescale_factor', defaults.rescale_factor)
  if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
    raise ValueError(f'{path}: rescale_factor={factor!r} must be a positive number.')
  flags = {}
  for key in ('do_resize', 'do_center_crop', 'do_rescale', 'do_normalize'):
    value = hf.get(key, getattr(defaults, key))
    if not isinstance(value, bool):
      raise ValueError(f'{path}: {key}={value!r} must be true or false.')
    flags[key] = value
  if hf.get('do_pad'):
    raise ValueError(f"{path}: do_pad={hf['do_pad']!r}: padding is not part of CLIP's "
                     'preprocessing and is not ported.')
  return ImageProcessing(shortest_edge=shortest, resize_to=resize_to, resample=int(resample),
                         crop=tuple(crop), rescale_factor=float(factor),
                         mean=stats['image_mean'], std=stats['image_std'], **flags)


def as_uint8_images(images) -> List[np.ndarray]:
  """PIL images, uint8 [H, W, 3] arrays, or one uint8 [B, H, W, 3] array -> RGB uint8
  [H, W, 3] arrays (sizes may differ between images)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if isinstance(images, np.ndarray) and images.ndim == 4:
    images = list(images)
  elif isinstance(images, (np.ndarray, Image.Image)):
    images = [images]
  out = []
  for i, image in enumerate(images):
    if isinstance(image, Image.Image):
      image = np.asarray(image.convert('RGB'))
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f'image {i}: {image.dtype} {image.shape} must be uint8 [H, W, 3] RGB (or '
                       'a PIL image), as a decoded image file is; CLIP resizes 8-bit pixels.')
    out.append(image)
  if not out:
    raise ValueError('no images to preprocess.')
  return out


def _resized_size(height: int, width: int, processing: ImageProcessing) -> Tuple[int, int]:
  """(height, width) after the resize (transformers' get_resize_output_image_size)."""
  if processing.resize_to is not None:
    return processing.resize_to
  size = processing.shortest_edge
  short, long = min(height, width), max(height, width)
  new_long = int(size * long / short)
  return (new_long, size) if width <= height else (size, new_long)


def preprocess(images, processing: ImageProcessing) -> np.ndarray:
  """Images (PIL, uint8 [H, W, 3], or uint8 [B, H, W, 3]) -> pixel values float32
  [B, h, w, 3] (channels last; h x w the crop), as CLIPImageProcessor computes them."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = []
  for image in as_uint8_images(images):
    if processing.do_resize:
      h, w = _resized_size(image.shape[0], image.shape[1], processing)
      image = np.asarray(Image.fromarray(image).resize(
          (w, h), resample=Image.Resampling(processing.resample)))  # [h, w, 3]
    if processing.do_center_crop:
      ch, cw = processing.crop
      h, w = image.shape[:2]
      if ch > h or cw > w:
        raise ValueError(f'crop {ch} x {cw} is larger than the {h} x {w} image after the '
                         'resize; CLIP\'s processor would pad it with zeros, which this port '
                         'refuses (check size and crop_size).')
      top, left = (h - ch) // 2, (w - cw) // 2
      image = image[top:top + ch, left:left + cw]  # [ch, cw, 3]
    pixels = image
    if processing.do_rescale:
      pixels = (pixels.astype(np.float64) * processing.rescale_factor).astype(np.float32)
    pixels = pixels.astype(np.float32)
    if processing.do_normalize:
      pixels = ((pixels - np.asarray(processing.mean, np.float32))
                / np.asarray(processing.std, np.float32))
    out.append(pixels)
  shapes = {p.shape for p in out}
  if len(shapes) > 1:
    raise ValueError(f'the images preprocess to different sizes {sorted(shapes)}: without a '
                     'centre crop every image must have the same size.')
  return np.stack(out)  # [B, h, w, 3]


def encode_images(spec: clip_vision.ClipVisionSpec, params, processing: ImageProcessing,
                  images: Sequence[Any]) -> jax.Array:
  """Images -> the encoder's tokens float32 [B, spec.num_tokens, hidden_size] (Wan:
  `WanImageToVideoPipeline.encode_image`, hidden_states[-2])."""
  pixels = preprocess(images, processing)  # [B, S, S, 3]
  return _apply(spec)(params, jnp.asarray(pixels))


@functools.lru_cache(maxsize=4)
def _apply(spec: clip_vision.ClipVisionSpec):
  """A jitted apply of the encoder of `spec` (one per spec per process)."""
  model = clip_vision.ClipVisionEncoder(spec)
  return jax.jit(lambda params, pixels: model.apply({'params': params}, pixels))
