"""The umT5 text encoder (Wan 2.1's; transformers' `UMT5EncoderModel`) in Flax Linen.

    spec = umt5.spec_from_hf_config(json.load(open('text_encoder/config.json')))
    out = umt5.UMT5Encoder(spec).apply({'params': params}, ids, mask)  # float32 [B, L, D]

Weights come from a Hugging Face folder through `vdit_jax.convert.umt5.load_encoder`, which
also reads the tokenizer and encodes prompts the way diffusers' WanPipeline does.

What makes it umT5 rather than a textbook transformer encoder:
  - pre-norm layers with T5's RMS LayerNorm (no mean subtraction, no bias), and a final one;
  - attention logits are q.k with NO 1/sqrt(Dh) scaling, plus a learned relative-position
    bias [K] per (query, key) bucket; umT5 gives EVERY layer its own bias table, T5 (v1.1,
    `relative_bias_per_layer=False`) only the first layer, whose bias all layers reuse;
  - a gated GELU-tanh MLP: wo(gelu_tanh(wi_0 x) * wi_1 x); no biases anywhere, no dropout.
A masked key gets the additive bias finfo(float32).min, as in transformers, so it has
weight 0 for every query; padded query positions are still computed (they attend to the
real tokens), which is what transformers returns there too.

Precision: matmuls run in `spec.dtype`; the residual stream, norms, softmax and the
MLP's output projection `wo` run in float32 (transformers keeps `wo` in float32 as well,
its `_keep_in_fp32_modules`). With dtype = param_dtype = float32 the output equals
transformers' on CPU to ~1e-6.

Parameters (shapes; logical axes from `vdit_jax.parallel.axes`):
  token_embed                  [V, D]       (CLASSES, EMBED)
  layers_{i}/attn_norm/scale   [D]          (EMBED,)
  layers_{i}/attn/{q,k,v}/kernel [D, K, Dh] (EMBED, HEADS, HEAD_DIM)
  layers_{i}/attn/o/kernel     [K, Dh, D]   (HEADS, HEAD_DIM, EMBED)
  layers_{i}/attn/rel_bias     [NB, K]      (None, HEADS)   every layer (umT5) or layer 0 (T5)
  layers_{i}/mlp_norm/scale    [D]          (EMBED,)
  layers_{i}/mlp/{wi_0,wi_1}/kernel [D, F]  (EMBED, MLP)
  layers_{i}/mlp/wo/kernel     [F, D]       (MLP, EMBED)
  final_norm/scale             [D]          (EMBED,)
so the encoder shards (fsdp over EMBED, tensor over HEADS/MLP) with the DiT's rules.
"""

import dataclasses
import math
from typing import Any, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdit_jax.parallel import axes

TOKENS = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED)
HEADS = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_HEADS, axes.ACT_KV)
HIDDEN = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_MLP)

# transformers' model_type -> whether each layer has its own relative-position bias table.
MODEL_TYPES = {'umt5': True, 't5': False}
# Activations of the gated MLP that are GELU with the tanh approximation.
GELU_TANH = ('gelu_new', 'gelu_pytorch_tanh')
_REQUIRED = ('vocab_size', 'd_model', 'd_kv', 'd_ff', 'num_layers', 'num_heads')


@dataclasses.dataclass(frozen=True)
class UMT5Spec:
  """Architecture of a umT5 (or T5 v1.1) encoder; field names are transformers' config keys.

  umT5-XXL (Wan 2.1): vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
  num_heads=64, relative_attention_num_buckets=32, relative_attention_max_distance=128.
  """
  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_layers: int
  num_heads: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dense_act_fn: str = 'gelu_new'        # the gate's activation: GELU, tanh approximation
  relative_bias_per_layer: bool = True  # umT5: True; T5 v1.1: False (one table, layer 0)
  dtype: Any = jnp.float32              # matmul dtype
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    check_spec(self)


def check_spec(spec: UMT5Spec) -> None:
  """Raises ValueError naming the UMT5Spec field that breaks a rule."""
  for key in _REQUIRED:
    value = getattr(spec, key)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f'UMT5Spec.{key}={value!r} must be a positive integer.')
  buckets = spec.relative_attention_num_buckets
  if isinstance(buckets, bool) or not isinstance(buckets, (int, np.integer)) or buckets < 4:
    raise ValueError(f'UMT5Spec.relative_attention_num_buckets={buckets!r} must be an integer '
                     '>= 4 (half for each direction, half of those exact offsets).')
  # Bidirectional: buckets // 2 per direction, of which buckets // 4 are exact offsets; the
  # logarithmic buckets span exact..max_distance, so max_distance must exceed `exact`.
  exact = buckets // 4
  distance = spec.relative_attention_max_distance
  if isinstance(distance, bool) or not isinstance(distance, (int, np.integer)) or distance <= exact:
    raise ValueError(f'UMT5Spec.relative_attention_max_distance={distance!r} must be an '
                     f'integer greater than relative_attention_num_buckets // 4 = {exact}.')
  if not spec.layer_norm_epsilon > 0:
    raise ValueError(f'UMT5Spec.layer_norm_epsilon={spec.layer_norm_epsilon!r} must be positive.')
  if spec.dense_act_fn not in GELU_TANH:
    raise ValueError(f'UMT5Spec.dense_act_fn={spec.dense_act_fn!r} is not one of {GELU_TANH}: '
                     'only the gated GELU-tanh MLP of umT5 / T5 v1.1 is implemented.')


def spec_from_hf_config(hf_json: Mapping[str, Any], dtype=jnp.float32,
                        param_dtype=jnp.float32) -> UMT5Spec:
  """transformers' config.json (as a dict, `hf_json`) of a umT5 / T5 v1.1 encoder -> UMT5Spec.

  Refuses, naming the key, a config of another model_type, of a decoder, or with an MLP
  other than gated GELU-tanh (`feed_forward_proj` 'gated-gelu', as umT5 and T5 v1.1 use;
  the original T5's 'relu' is not ported).
  """
  if not isinstance(hf_json, Mapping):
    raise ValueError(f'the config must be a dict (config.json), got {type(hf_json).__name__}.')
  model_type = hf_json.get('model_type')
  if model_type not in MODEL_TYPES:
    raise ValueError(f'model_type={model_type!r} is not one of {sorted(MODEL_TYPES)}: this is '
                     'not the config of a umT5 / T5 text encoder.')
  if hf_json.get('is_decoder', False):
    raise ValueError('is_decoder=True: the config describes a decoder stack, not an encoder.')
  # transformers' rule: 'gated-ACT' -> gated MLP with ACT; 'gated-gelu' means gelu_new.
  proj = hf_json.get('feed_forward_proj', 'gated-gelu' if model_type == 'umt5' else 'relu')
  parts = str(proj).split('-')
  act = 'gelu_new' if proj == 'gated-gelu' else parts[-1]
  if len(parts) != 2 or parts[0] != 'gated' or act not in GELU_TANH:
    raise ValueError(f'feed_forward_proj={proj!r}: only a gated GELU-tanh MLP (\'gated-gelu\', '
                     'as umT5 and T5 v1.1 use) is implemented.')
  missing = [k for k in _REQUIRED if k not in hf_json]
  if missing:
    raise ValueError(f'the config lacks {missing[0]!r} (needed: {list(_REQUIRED)}).')

  def integer(key, default=None):
    value = hf_json.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise ValueError(f'{key}={value!r} is not an integer.')
    return int(value)

  epsilon = hf_json.get('layer_norm_epsilon', 1e-6)
  if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)):
    raise ValueError(f'layer_norm_epsilon={epsilon!r} is not a number.')
  return UMT5Spec(
      **{k: integer(k) for k in _REQUIRED},
      relative_attention_num_buckets=integer('relative_attention_num_buckets', 32),
      relative_attention_max_distance=integer('relative_attention_max_distance', 128),
      layer_norm_epsilon=float(epsilon), dense_act_fn=act,
      relative_bias_per_layer=MODEL_TYPES[model_type], dtype=dtype, param_dtype=param_dtype)


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """Bidirectional T5 bucket of (key position - query position): int32 [N, M].

  Half the buckets are for keys after the query, half for keys at or before it; within a
  half, offsets below num_buckets // 4 get a bucket each, larger ones share logarithmically
  wider buckets up to max_distance, beyond which all share the last one. Computed in
  numpy float32 at trace time, the same float32 steps as transformers (an offset that
  lands exactly on a bucket edge, e.g. 16 with 32 buckets and distance 128, must round the
  same way), and a constant for XLA.
  """
  relative = (np.arange(key_length, dtype=np.int64)[None, :]
              - np.arange(query_length, dtype=np.int64)[:, None])  # [N, M]
  half = num_buckets // 2
  exact = half // 2
  distance = np.abs(relative)  # [N, M]
  ratio = (np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(exact))
           / np.float32(math.log(max_distance / exact)) * np.float32(half - exact))
  large = np.minimum(exact + ratio.astype(np.int64), half - 1)  # [N, M]
  buckets = (relative > 0) * half + np.where(distance < exact, distance, large)
  return buckets.astype(np.int32)  # [N, M]


class T5RMSNorm(nn.Module):
  """T5's LayerNorm: x / sqrt(mean(x^2) + eps) * scale over the last axis, in float32 (no
  mean subtraction, no bias). Returns float32."""
  eps: float = 1e-6
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, L, D]
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, (axes.EMBED,)),
                       (x.shape[-1],), self.param_dtype)  # [D]
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return x32 * inv * scale.astype(jnp.float32)  # [B, L, D]


class SelfAttention(nn.Module):
  """Unscaled multi-head self-attention with T5 relative-position bias.

  __call__(h [B, L, D], key_bias [B, 1, 1, L] float32, position_bias [1, K, L, L] or None)
  -> (out [B, L, D] in spec.dtype, the position bias used [1, K, L, L]). With
  `has_relative_bias` the module owns the bucket table and computes the bias itself (the
  one passed in must then be None); without, it uses the one passed in (T5's later layers).
  """
  spec: UMT5Spec
  has_relative_bias: bool = True

  @nn.compact
  def __call__(self, h, key_bias, position_bias=None):
    spec = self.spec
    width, heads, head_dim = spec.d_model, spec.num_heads, spec.d_kv
    length = h.shape[1]

    # Kernels declared at their full rank (flax's DenseGeneral initialises a flattened
    # kernel, which its 3 logical names would not fit inside a mesh).
    def proj(name, std):
      kernel = _Kernel((width, heads, head_dim), (axes.EMBED, axes.HEADS, axes.HEAD_DIM),
                       std, spec.param_dtype, name=name)()  # [D, K, Dh]
      return jnp.einsum('bld,dkh->blkh', h.astype(spec.dtype), kernel.astype(spec.dtype))

    q = proj('q', (width * head_dim) ** -0.5)  # [B, L, K, Dh]
    k = proj('k', width ** -0.5)  # [B, L, K, Dh]
    v = proj('v', width ** -0.5)  # [B, L, K, Dh]
    q = nn.with_logical_constraint(q, HEADS)
    k = nn.with_logical_constraint(k, HEADS)
    v = nn.with_logical_constraint(v, HEADS)

    if self.has_relative_bias:
      if position_bias is not None:
        raise ValueError('a layer with its own relative-bias table was also given a bias.')
      table = self.param('rel_bias', nn.with_logical_partitioning(
          nn.initializers.normal(width ** -0.5), (None, axes.HEADS)),
          (spec.relative_attention_num_buckets, heads), spec.param_dtype)  # [NB, K]
      buckets = relative_position_buckets(length, length, spec.relative_attention_num_buckets,
                                          spec.relative_attention_max_distance)  # [L, L]
      values = jnp.take(table.astype(jnp.float32), buckets, axis=0)  # [L, L, K]
      position_bias = jnp.transpose(values, (2, 0, 1))[None]  # [1, K, L, L]
    elif position_bias is None:
      raise ValueError('a layer without a relative-bias table needs the bias of layer 0.')

    logits = jnp.einsum('bnkh,bmkh->bknm', q, k,
                        preferred_element_type=jnp.float32)  # [B, K, L, L]
    logits = logits + position_bias + key_bias  # [B, K, L, L]
    weights = jax.nn.softmax(logits, axis=-1)  # [B, K, L, L] float32
    out = jnp.einsum('bknm,bmkh->bnkh', weights.astype(spec.dtype), v)  # [B, L, K, Dh]
    out = nn.with_logical_constraint(out, HEADS)
    kernel = _Kernel((heads, head_dim, width), (axes.HEADS, axes.HEAD_DIM, axes.EMBED),
                     (heads * head_dim) ** -0.5, spec.param_dtype, name='o')()  # [K, Dh, D]
    out = jnp.einsum('blkh,khd->bld', out, kernel.astype(spec.dtype))  # [B, L, D]
    return out, position_bias


class _Kernel(nn.Module):
  """One 'kernel' param of `shape` with logical `names` (normal(std) init)."""
  shape: Tuple[int, ...]
  names: Tuple[str, ...]
  std: float
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self):
    return self.param('kernel', nn.with_logical_partitioning(
        nn.initializers.normal(self.std), self.names), self.shape, self.param_dtype)


class GatedGeluMlp(nn.Module):
  """wo(gelu_tanh(wi_0 h) * wi_1 h): [B, L, D] -> float32 [B, L, D]. wi_0/wi_1 run in
  spec.dtype; the gate product and wo in float32 (as transformers keeps wo)."""
  spec: UMT5Spec

  @nn.compact
  def __call__(self, h):  # [B, L, D]
    spec = self.spec

    def dense(features, in_axis, out_axis, std, dtype, name):
      return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=spec.param_dtype,
                      name=name, kernel_init=nn.with_logical_partitioning(
                          nn.initializers.normal(std), (in_axis, out_axis)))

    gate = dense(spec.d_ff, axes.EMBED, axes.MLP, spec.d_model ** -0.5, spec.dtype, 'wi_0')(h)
    up = dense(spec.d_ff, axes.EMBED, axes.MLP, spec.d_model ** -0.5, spec.dtype, 'wi_1')(h)
    gate = nn.with_logical_constraint(gate, HIDDEN)  # [B, L, F]
    up = nn.with_logical_constraint(up, HIDDEN)  # [B, L, F]
    hidden = nn.gelu(gate.astype(jnp.float32), approximate=True) * up.astype(jnp.float32)
    hidden = nn.with_logical_constraint(hidden, HIDDEN)  # [B, L, F]
    return dense(spec.d_model, axes.MLP, axes.EMBED, spec.d_ff ** -0.5, jnp.float32,
                 'wo')(hidden)  # [B, L, D]


class UMT5Layer(nn.Module):
  """One pre-norm encoder layer: x + attn(norm(x)), then x + mlp(norm(x)); x float32."""
  spec: UMT5Spec
  has_relative_bias: bool = True

  @nn.compact
  def __call__(self, x, key_bias, position_bias=None):  # x [B, L, D] float32
    spec = self.spec
    h = T5RMSNorm(spec.layer_norm_epsilon, spec.param_dtype, name='attn_norm')(x)
    out, position_bias = SelfAttention(spec, self.has_relative_bias, name='attn')(
        h.astype(spec.dtype), key_bias, position_bias)  # [B, L, D]
    x = x + out.astype(jnp.float32)  # [B, L, D]
    h = T5RMSNorm(spec.layer_norm_epsilon, spec.param_dtype, name='mlp_norm')(x)
    x = x + GatedGeluMlp(spec, name='mlp')(h.astype(spec.dtype))  # [B, L, D]
    return nn.with_logical_constraint(x, TOKENS), position_bias


class UMT5Encoder(nn.Module):
  """umT5 encoder: ids int [B, L] and attention mask [B, L] (True / 1 = a real token;
  None = all real) -> last hidden state float32 [B, L, d_model], transformers'
  `UMT5EncoderModel(ids, mask).last_hidden_state`."""
  spec: UMT5Spec

  @nn.compact
  def __call__(self, ids, mask: Optional[jnp.ndarray] = None):
    spec = self.spec
    if ids.ndim != 2:
      raise ValueError(f'ids of shape {tuple(ids.shape)} must be [B, L] token ids.')
    if mask is None:
      mask = jnp.ones(ids.shape, bool)
    if tuple(mask.shape) != tuple(ids.shape):
      raise ValueError(f'the attention mask of shape {tuple(mask.shape)} must have the shape '
                       f'of the ids, {tuple(ids.shape)}.')
    table = self.param('token_embed', nn.with_logical_partitioning(
        nn.initializers.normal(1.0), (axes.CLASSES, axes.EMBED)),
        (spec.vocab_size, spec.d_model), spec.param_dtype)  # [V, D]
    x = jnp.take(table, ids.astype(jnp.int32), axis=0).astype(jnp.float32)  # [B, L, D]
    x = nn.with_logical_constraint(x, TOKENS)
    keep = mask.astype(bool)[:, None, None, :]  # [B, 1, 1, L]
    key_bias = jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min)  # [B, 1, 1, L]
    position_bias = None
    for i in range(spec.num_layers):
      own = spec.relative_bias_per_layer or i == 0
      x, bias = UMT5Layer(spec, own, name=f'layers_{i}')(
          x, key_bias, None if own else position_bias)  # [B, L, D]
      position_bias = position_bias if position_bias is not None else bias
    return T5RMSNorm(spec.layer_norm_epsilon, spec.param_dtype, name='final_norm')(x)
