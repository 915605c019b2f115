"""CLIP's vision tower (transformers' `CLIPVisionModel`) in Flax Linen: Wan 2.1 I2V's image
encoder.

    spec = clip_vision.spec_from_hf_config(json.load(open('image_encoder/config.json')))
    tokens = clip_vision.ClipVisionEncoder(spec).apply({'params': params}, pixels)
    # pixels float32 [B, S, S, 3] (CLIPImageProcessor's output, channels last)
    # tokens float32 [B, 1 + (S / p)^2, D]: the hidden state after spec.output_layer layers

Weights come from a Hugging Face folder through `vdit_jax.convert.clip_vision.load_params`,
which also ports the folder's image preprocessing.

What Wan uses: diffusers' `WanImageToVideoPipeline.encode_image` takes
`image_encoder(pixels, output_hidden_states=True).hidden_states[-2]`. transformers'
`hidden_states` has num_hidden_layers + 1 entries: [0] is the embeddings after the
pre-layernorm, [i] the output of encoder layer i, so [-2] is the output of layer N - 1
(the penultimate layer); the last layer and the post-layernorm (which transformers
applies to the pooled class token only) never touch it. This module runs exactly
`output_layer` layers (`spec_from_hf_config(hf, hidden_state=-2)` gives N - 1), so the
unused last layer is neither loaded nor computed. For ViT-H/14 at 224 (Wan 2.1 I2V:
hidden_size 1280, 32 layers, 16 heads, hidden_act 'gelu') that is 257 tokens of 1280.

The layers (as transformers'):
  patches: a stride-p convolution without bias = tubelet-style patchify then one matmul;
  tokens: [class_embed; patches] + pos_embed (learned, 1 + (S/p)^2 rows; no interpolation:
    the image must be S x S); then `pre_norm` (CLIP's `pre_layrnorm`);
  each layer, pre-norm: x + attn(norm1(x)), x + mlp(norm2(x)); attention is plain
    multi-head (q, k, v, out projections with biases, logits scaled by Dh^-1/2, no mask);
    the MLP is fc1 -> hidden_act -> fc2, hidden_act 'gelu' (exact, erf), 'quick_gelu'
    (x sigmoid(1.702 x), the original OpenAI CLIP) or the tanh GELUs.
LayerNorms use a two-pass variance (as torch), in float32, with the config's eps.

Precision: matmuls run in `spec.dtype`; the residual stream, layer norms and softmax in
float32. With dtype = param_dtype = float32 the output equals transformers' on CPU to
~1e-6 (tests/clip_vision_test.py).

Parameters (shapes; logical axes from `vdit_jax.parallel.axes`):
  patch_embed/kernel               [(p p C), D]  (PATCH, EMBED)
  class_embed                      [D]           (EMBED,)
  pos_embed                        [N + 1, D]    (None, EMBED)
  pre_norm/{scale, bias}           [D]           (EMBED,)
  layers_{i}/norm{1,2}/{scale, bias} [D]         (EMBED,)
  layers_{i}/attn/{query,key,value}_kernel [D, K, Dh] (EMBED, HEADS, HEAD_DIM)
  layers_{i}/attn/{query,key,value}_bias   [K, Dh]    (HEADS, HEAD_DIM)
  layers_{i}/attn/out_kernel       [K, Dh, D]    (HEADS, HEAD_DIM, EMBED)
  layers_{i}/attn/out_bias         [D]           (EMBED,)
  layers_{i}/mlp/fc1/{kernel, bias} [D, F], [F]  (EMBED, MLP), (MLP,)
  layers_{i}/mlp/fc2/{kernel, bias} [F, D], [D]  (MLP, EMBED), (EMBED,)
so the encoder shards with the DiT's rules (fsdp over EMBED, tensor over HEADS / MLP).
"""

import dataclasses
from typing import Any, Mapping

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdit_jax.parallel import axes

TOKENS = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED)
HEADS = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_HEADS, axes.ACT_KV)
HIDDEN = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_MLP)

MODEL_TYPE = 'clip_vision_model'  # transformers' model_type of a CLIPVisionConfig
# transformers' ACT2FN names this port computes -> the function.
ACTIVATIONS = {
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
}
_REQUIRED = ('hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads',
             'image_size', 'patch_size')


@dataclasses.dataclass(frozen=True)
class ClipVisionSpec:
  """Architecture of a CLIP vision tower; field names are transformers' config keys, plus
  `output_layer`: how many encoder layers run (the index into transformers'
  `hidden_states` of the output; Wan: num_hidden_layers - 1, `hidden_states[-2]`).

  ViT-H/14 (Wan 2.1 I2V's image_encoder): hidden_size=1280, intermediate_size=5120,
  num_hidden_layers=32, num_attention_heads=16, image_size=224, patch_size=14,
  hidden_act='gelu', layer_norm_eps=1e-5, output_layer=31.
  """
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  image_size: int
  patch_size: int
  output_layer: int
  num_channels: int = 3
  hidden_act: str = 'quick_gelu'   # transformers' CLIPVisionConfig default
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32          # matmul dtype
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    check_spec(self)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_tokens(self) -> int:
    """Tokens of the output: the class token and one per patch (257 for ViT-H/14 at 224)."""
    return self.num_patches + 1


def _positive_int(value) -> bool:
  return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= 1


def check_spec(spec: ClipVisionSpec) -> None:
  """Raises ValueError naming the ClipVisionSpec field that breaks a rule."""
  for key in _REQUIRED + ('num_channels',):
    value = getattr(spec, key)
    if not _positive_int(value):
      raise ValueError(f'ClipVisionSpec.{key}={value!r} must be a positive integer.')
  if spec.hidden_size % spec.num_attention_heads:
    raise ValueError(f'ClipVisionSpec.hidden_size={spec.hidden_size} must be a multiple of '
                     f'num_attention_heads={spec.num_attention_heads} (the head width).')
  if spec.image_size % spec.patch_size:
    raise ValueError(f'ClipVisionSpec.image_size={spec.image_size} must be a multiple of '
                     f'patch_size={spec.patch_size}.')
  layer = spec.output_layer
  if (isinstance(layer, bool) or not isinstance(layer, (int, np.integer))
      or not 0 <= layer <= spec.num_hidden_layers):
    raise ValueError(f'ClipVisionSpec.output_layer={layer!r} must be an integer in '
                     f'[0, num_hidden_layers={spec.num_hidden_layers}] (0: the embeddings '
                     'after the pre-layernorm; i: the output of layer i).')
  if spec.hidden_act not in ACTIVATIONS:
    raise ValueError(f'ClipVisionSpec.hidden_act={spec.hidden_act!r} is not one of '
                     f'{sorted(ACTIVATIONS)}.')
  if not float(spec.layer_norm_eps) > 0:
    raise ValueError(f'ClipVisionSpec.layer_norm_eps={spec.layer_norm_eps!r} must be positive.')


def spec_from_hf_config(hf_json: Mapping[str, Any], hidden_state: int = -2,
                        dtype=jnp.float32, param_dtype=jnp.float32) -> ClipVisionSpec:
  """transformers' config.json (a dict) of a CLIPVisionModel -> ClipVisionSpec whose
  output is `hidden_states[hidden_state]` (-2: Wan's penultimate layer; python indexing
  over the num_hidden_layers + 1 hidden states). A full CLIPModel config (model_type
  'clip') gives its `vision_config`. Raises ValueError naming the key."""
  if not isinstance(hf_json, Mapping):
    raise ValueError(f'the config must be a dict (config.json), got {type(hf_json).__name__}.')
  model_type = hf_json.get('model_type')
  if model_type == 'clip' and isinstance(hf_json.get('vision_config'), Mapping):
    hf_json = dict(hf_json['vision_config'], model_type=MODEL_TYPE)
    model_type = MODEL_TYPE
  if model_type != MODEL_TYPE:
    raise ValueError(f'model_type={model_type!r} is not {MODEL_TYPE!r}: this is not the '
                     'config of a CLIPVisionModel (what a Wan I2V folder\'s image_encoder/ '
                     'holds).')
  missing = [k for k in _REQUIRED if k not in hf_json]
  if missing:
    raise ValueError(f'the config lacks {missing[0]!r} (needed: {list(_REQUIRED)}).')
  for key in _REQUIRED + ('num_channels',):
    if key in hf_json and not _positive_int(hf_json[key]):
      raise ValueError(f'{key}={hf_json[key]!r} is not a positive integer.')
  layers = int(hf_json['num_hidden_layers'])
  if (isinstance(hidden_state, bool) or not isinstance(hidden_state, (int, np.integer))
      or not -(layers + 1) <= hidden_state <= layers):
    raise ValueError(f'hidden_state={hidden_state!r} must index the {layers + 1} hidden '
                     f'states of a {layers}-layer encoder: an integer in [{-(layers + 1)}, '
                     f'{layers}] (-2: the penultimate layer, as Wan uses).')
  eps = hf_json.get('layer_norm_eps', 1e-5)
  if isinstance(eps, bool) or not isinstance(eps, (int, float)):
    raise ValueError(f'layer_norm_eps={eps!r} is not a number.')
  return ClipVisionSpec(
      **{k: int(hf_json[k]) for k in _REQUIRED},
      output_layer=int(hidden_state) % (layers + 1),
      num_channels=int(hf_json.get('num_channels', 3)),
      hidden_act=str(hf_json.get('hidden_act', 'quick_gelu')), layer_norm_eps=float(eps),
      dtype=dtype, param_dtype=param_dtype)


class LayerNorm(nn.Module):
  """torch's LayerNorm over the last axis in float32: (x - mean) / sqrt(var + eps) *
  scale + bias, the variance from the centred values (two passes). Returns float32."""
  eps: float = 1e-5
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, N, D]
    width = x.shape[-1]
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones,
                                                             (axes.EMBED,)),
                       (width,), self.param_dtype)  # [D]
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros,
                                                           (axes.EMBED,)),
                      (width,), self.param_dtype)  # [D]
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)  # [B, N, D]
    var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)  # [B, N, 1]
    out = centred * jax.lax.rsqrt(var + self.eps)
    return out * scale.astype(jnp.float32) + bias.astype(jnp.float32)  # [B, N, D]


class Attention(nn.Module):
  """Bidirectional multi-head self-attention: h [B, N, D] -> [B, N, D] in spec.dtype."""
  spec: ClipVisionSpec

  @nn.compact
  def __call__(self, h):
    spec = self.spec
    width, heads, head_dim = spec.hidden_size, spec.num_attention_heads, spec.head_dim
    dtype = spec.dtype

    def param(name, shape, names, init):
      return self.param(name, nn.with_logical_partitioning(init, names), shape,
                        spec.param_dtype).astype(dtype)

    in_names = (axes.EMBED, axes.HEADS, axes.HEAD_DIM)
    std = width ** -0.5
    projected = []
    for name in ('query', 'key', 'value'):
      kernel = param(f'{name}_kernel', (width, heads, head_dim), in_names,
                     nn.initializers.normal(std))  # [D, K, Dh]
      bias = param(f'{name}_bias', (heads, head_dim), (axes.HEADS, axes.HEAD_DIM),
                   nn.initializers.zeros)  # [K, Dh]
      x = jnp.einsum('bnd,dkh->bnkh', h.astype(dtype), kernel) + bias  # [B, N, K, Dh]
      projected.append(nn.with_logical_constraint(x, HEADS))
    q, k, v = projected
    logits = jnp.einsum('bnkh,bmkh->bknm', q, k,
                        preferred_element_type=jnp.float32)  # [B, K, N, N]
    weights = jax.nn.softmax(logits * head_dim ** -0.5, axis=-1)  # [B, K, N, N] float32
    out = jnp.einsum('bknm,bmkh->bnkh', weights.astype(dtype), v)  # [B, N, K, Dh]
    out = nn.with_logical_constraint(out, HEADS)
    kernel = param('out_kernel', (heads, head_dim, width),
                   (axes.HEADS, axes.HEAD_DIM, axes.EMBED),
                   nn.initializers.normal((heads * head_dim) ** -0.5))  # [K, Dh, D]
    bias = param('out_bias', (width,), (axes.EMBED,), nn.initializers.zeros)  # [D]
    return jnp.einsum('bnkh,khd->bnd', out, kernel) + bias  # [B, N, D]


class Mlp(nn.Module):
  """fc2(act(fc1(h))): [B, N, D] -> [B, N, D] in spec.dtype."""
  spec: ClipVisionSpec

  @nn.compact
  def __call__(self, h):
    spec = self.spec

    def dense(features, in_axis, out_axis, name):
      return nn.Dense(features, dtype=spec.dtype, param_dtype=spec.param_dtype, name=name,
                      kernel_init=nn.with_logical_partitioning(
                          nn.initializers.lecun_normal(), (in_axis, out_axis)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                             (out_axis,)))

    hidden = dense(spec.intermediate_size, axes.EMBED, axes.MLP, 'fc1')(h)  # [B, N, F]
    hidden = nn.with_logical_constraint(hidden, HIDDEN)
    hidden = ACTIVATIONS[spec.hidden_act](hidden.astype(jnp.float32)).astype(spec.dtype)
    return dense(spec.hidden_size, axes.MLP, axes.EMBED, 'fc2')(hidden)  # [B, N, D]


class EncoderLayer(nn.Module):
  """One pre-norm layer: x + attn(norm1(x)), then x + mlp(norm2(x)); x float32 [B, N, D]."""
  spec: ClipVisionSpec

  @nn.compact
  def __call__(self, x):
    spec = self.spec
    h = LayerNorm(spec.layer_norm_eps, spec.param_dtype, name='norm1')(x)
    x = x + Attention(spec, name='attn')(h).astype(jnp.float32)  # [B, N, D]
    h = LayerNorm(spec.layer_norm_eps, spec.param_dtype, name='norm2')(x)
    x = x + Mlp(spec, name='mlp')(h.astype(spec.dtype)).astype(jnp.float32)  # [B, N, D]
    return nn.with_logical_constraint(x, TOKENS)


class ClipVisionEncoder(nn.Module):
  """pixels [B, S, S, C] (normalised, channels last; S = spec.image_size) -> float32
  [B, 1 + (S / p)^2, D]: transformers' `hidden_states[spec.output_layer]`."""
  spec: ClipVisionSpec

  @nn.compact
  def __call__(self, pixels):
    spec = self.spec
    s, p, c, d = spec.image_size, spec.patch_size, spec.num_channels, spec.hidden_size
    if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (s, s, c):
      raise ValueError(f'pixels of shape {tuple(pixels.shape)} must be [B, {s}, {s}, {c}] '
                       f'(image_size={s}, num_channels={c}, channels last): preprocess the '
                       'images with the folder\'s image processor (convert/clip_vision.py).')
    patches = einops.rearrange(pixels, 'b (h ph) (w pw) c -> b (h w) (ph pw c)',
                               ph=p, pw=p)  # [B, N, (p p C)]
    kernel = self.param('patch_embed', nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), (axes.PATCH, axes.EMBED)),
        (p * p * c, d), spec.param_dtype)  # [(p p C), D]
    x = jnp.einsum('bnp,pd->bnd', patches.astype(spec.dtype),
                   kernel.astype(spec.dtype)).astype(jnp.float32)  # [B, N, D]
    cls = self.param('class_embed', nn.with_logical_partitioning(
        nn.initializers.normal(d ** -0.5), (axes.EMBED,)), (d,), spec.param_dtype)  # [D]
    cls = jnp.broadcast_to(cls.astype(jnp.float32), (x.shape[0], 1, d))  # [B, 1, D]
    x = jnp.concatenate([cls, x], axis=1)  # [B, N + 1, D]
    pos = self.param('pos_embed', nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, axes.EMBED)),
        (spec.num_tokens, d), spec.param_dtype)  # [N + 1, D]
    x = x + pos.astype(jnp.float32)[None]  # [B, N + 1, D]
    x = LayerNorm(spec.layer_norm_eps, spec.param_dtype, name='pre_norm')(x)
    x = nn.with_logical_constraint(x, TOKENS)
    for i in range(spec.output_layer):
      x = EncoderLayer(spec, name=f'layers_{i}')(x)  # [B, N + 1, D]
    return x
