r"""Wan 2.1's umT5 text encoder and tokenizer from a Hugging Face folder, and prompt encoding.

    from vdit_jax.convert import umt5
    spec, params = umt5.load_encoder('Wan2.1-T2V-1.3B-Diffusers')      # or .../text_encoder
    tokenizer = umt5.load_tokenizer('Wan2.1-T2V-1.3B-Diffusers')       # or .../tokenizer
    embeds = umt5.encode_prompts(tokenizer, spec, params, ['a cat'])   # float32 [1, 512, 4096]

Folders: either the pipeline's top folder with `text_encoder/` (config.json and
model.safetensors, or model.safetensors.index.json and its shards) and `tokenizer/`
(tokenizer.json), or those subfolders themselves.

Weights are read with safetensors' numpy API (no torch, no pickle); bfloat16 tensors through
ml_dtypes. Every parameter of the Flax encoder must be filled by one tensor of the shape the
config implies, and every `encoder.*` tensor used (a seq2seq checkpoint's decoder.* and
lm_head.* are skipped), else a ValueError names the file and the tensor; nothing is
returned half-loaded. The params are host numpy arrays in `param_dtype` (place or shard
them with jax.device_put).

The tokenizer is `tokenizers.Tokenizer.from_file('tokenizer.json')` (no download, no
transformers), the pipeline transformers' PreTrainedTokenizerFast runs on that file.
(transformers 5's T5Tokenizer rebuilds it from the file's vocabulary: it keeps only a
Precompiled normalizer, splits on whitespace before Metaspace and always appends </s>; on
cleaned prompts, single-spaced, that gives the same ids.) `encode_prompts` does what
diffusers' `WanPipeline._get_t5_prompt_embeds` does: clean each prompt (ftfy.fix_text when
ftfy is installed, as diffusers does, then html.unescape twice and whitespace collapsed),
tokenize padded to max_length with truncation and the appended </s>, encode with the
mask, and zero every row past the prompt's length.
"""

from __future__ import annotations

import functools
import html
import json
import os
import re
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  # pylint: disable=unused-import  # numpy bfloat16 for safetensors
import numpy as np

from vdit_jax.convert import pipeline_folder
from vdit_jax.model import umt5

CONFIG = 'config.json'
WEIGHTS = 'model.safetensors'
INDEX = 'model.safetensors.index.json'
TOKENIZER = 'tokenizer.json'
ENCODER_DIR = 'text_encoder'
TOKENIZER_DIR = 'tokenizer'
# Unicode White_Space: what the `regex` module's \s matches in diffusers' whitespace_clean
# (Python's re \s would also match \x1c-\x1f).
_WHITESPACE = re.compile('[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f'
                         '\u205f\u3000]+')


# ---------------------------------------------------------------------------------------------
# Weights.


def hf_tensors(spec: umt5.UMT5Spec) -> Dict[str, Tuple[Tuple[str, ...], Tuple[int, ...]]]:
  """transformers tensor name -> (Flax param path, the tensor's shape in the file), for
  every parameter but the token table (stored as 'shared.weight' and / or
  'encoder.embed_tokens.weight')."""
  d, k, dh, f, nb = (spec.d_model, spec.num_heads, spec.d_kv, spec.d_ff,
                     spec.relative_attention_num_buckets)
  out = {'encoder.final_layer_norm.weight': (('final_norm', 'scale'), (d,))}
  for i in range(spec.num_layers):
    hf = f'encoder.block.{i}.layer'
    ours = f'layers_{i}'
    for name in ('q', 'k', 'v'):
      out[f'{hf}.0.SelfAttention.{name}.weight'] = ((ours, 'attn', name, 'kernel'), (k * dh, d))
    out[f'{hf}.0.SelfAttention.o.weight'] = ((ours, 'attn', 'o', 'kernel'), (d, k * dh))
    if spec.relative_bias_per_layer or i == 0:
      out[f'{hf}.0.SelfAttention.relative_attention_bias.weight'] = (
          (ours, 'attn', 'rel_bias'), (nb, k))
    out[f'{hf}.0.layer_norm.weight'] = ((ours, 'attn_norm', 'scale'), (d,))
    out[f'{hf}.1.DenseReluDense.wi_0.weight'] = ((ours, 'mlp', 'wi_0', 'kernel'), (f, d))
    out[f'{hf}.1.DenseReluDense.wi_1.weight'] = ((ours, 'mlp', 'wi_1', 'kernel'), (f, d))
    out[f'{hf}.1.DenseReluDense.wo.weight'] = ((ours, 'mlp', 'wo', 'kernel'), (d, f))
    out[f'{hf}.1.layer_norm.weight'] = ((ours, 'mlp_norm', 'scale'), (d,))
  return out


def _to_flax(path: Tuple[str, ...], value: np.ndarray, spec: umt5.UMT5Spec) -> np.ndarray:
  """A torch-layout tensor -> the Flax param at `path` (Linear [out, in] -> [in, out])."""
  k, dh, d = spec.num_heads, spec.d_kv, spec.d_model
  if len(path) < 2:  # token_embed [V, D]
    return value
  if path[-2] in ('q', 'k', 'v'):
    return value.T.reshape(d, k, dh)  # [D, K, Dh]
  if path[-2] == 'o':
    return value.T.reshape(k, dh, d)  # [K, Dh, D]
  if path[-1] == 'kernel':
    return value.T  # [in, out]
  return value


class _Reader:
  """Tensors of a folder's model.safetensors or sharded model.safetensors.index.json."""

  def __init__(self, folder: str):
    single = os.path.join(folder, WEIGHTS)
    index = os.path.join(folder, INDEX)
    if os.path.isfile(single):
      self.source = single
      self.files = {name: single for name in self._keys(single)}
    elif os.path.isfile(index):
      self.source = index
      try:
        with open(index, encoding='utf-8') as f:
          weight_map = json.load(f)['weight_map']
        self.files = {name: os.path.join(folder, shard) for name, shard in weight_map.items()}
      except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f'{index} is not a safetensors index (a JSON object with a '
                         f'"weight_map" of tensor name -> shard file): {e}.') from e
    else:
      raise ValueError(f'{folder} has neither {WEIGHTS} nor {INDEX}: expected the '
                       'safetensors weights of a transformers UMT5EncoderModel.')

  @staticmethod
  def _open(path: str, tensor: Optional[str] = None):
    """safe_open(path) with numpy, or a ValueError naming the file (and `tensor`, which it
    should hold)."""
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    if not os.path.isfile(path):
      raise ValueError(f'{path} does not exist' + (f' (it should hold {tensor})' if tensor else '')
                       + ': the checkpoint is incomplete.')
    try:
      return safe_open(path, framework='np')
    except Exception as e:  # pylint: disable=broad-except  # SafetensorError names no file
      raise ValueError(f'{path} is not a readable .safetensors file ({type(e).__name__}: '
                       f'{str(e).strip()[:300]}): cut short or foreign.') from e

  def _keys(self, path: str):
    with self._open(path) as f:
      return list(f.keys())

  def names(self):
    return set(self.files)

  def read(self, wanted: Dict[str, Tuple[int, ...]], transform) -> Dict[str, np.ndarray]:
    """{tensor name: expected shape} -> {tensor name: transform(name, numpy array)}, one
    pass per shard; each tensor is transformed as soon as it is read, so that the peak
    memory is the result plus one tensor."""
    by_file: Dict[str, list] = {}
    for name in sorted(wanted):
      if name not in self.files:
        raise ValueError(f'{self.source} has no tensor {name}, which the encoder that '
                         f'{CONFIG} describes needs.')
      by_file.setdefault(self.files[name], []).append(name)
    out = {}
    for path in sorted(by_file):
      with self._open(path, by_file[path][0]) as f:
        present = set(f.keys())
        for name in by_file[path]:
          if name not in present:
            raise ValueError(f'{path} has no tensor {name} (the index {self.source} says it '
                             'does).')
          shape = tuple(f.get_slice(name).get_shape())
          if shape != tuple(wanted[name]):
            raise ValueError(f'{path}: tensor {name} has shape {list(shape)}, but the encoder '
                             f'that {CONFIG} describes needs {list(wanted[name])}.')
          out[name] = transform(name, f.get_tensor(name))
    return out


def read_config(folder) -> Dict[str, Any]:
  """The text encoder's config.json (top folder or text_encoder/) as a dict."""
  path = os.path.join(pipeline_folder.component(folder, ENCODER_DIR, CONFIG), CONFIG)
  try:
    with open(path, encoding='utf-8') as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'{path} is not a readable JSON file: {e}.') from e
  if not isinstance(config, dict):
    raise ValueError(f'{path} holds a {type(config).__name__}, not a JSON object.')
  return config


def load_encoder(folder, dtype=jnp.float32,
                 param_dtype=jnp.float32) -> Tuple[umt5.UMT5Spec, Dict[str, Any]]:
  """A transformers UMT5EncoderModel folder -> (UMT5Spec, Flax params as numpy arrays).

  `folder`: the Wan pipeline folder (with text_encoder/) or the text_encoder folder.
  `dtype`: the encoder's matmul dtype (UMT5Spec.dtype); `param_dtype`: the params' dtype.
  """
  folder = pipeline_folder.component(folder, ENCODER_DIR, CONFIG)
  config_path = os.path.join(folder, CONFIG)
  try:
    spec = umt5.spec_from_hf_config(read_config(folder), dtype, param_dtype)
  except ValueError as e:
    raise ValueError(f'{config_path}: {e}') from e

  reader = _Reader(folder)
  targets = hf_tensors(spec)
  names = reader.names()
  table_names = [n for n in ('shared.weight', 'encoder.embed_tokens.weight') if n in names]
  if not table_names:
    raise ValueError(f'{reader.source} has neither shared.weight nor encoder.embed_tokens.weight '
                     '(the token embedding table).')
  unknown = sorted(n for n in names
                   if n.startswith('encoder.') and n not in targets and n not in table_names)
  if unknown:
    raise ValueError(f'{reader.source} holds {unknown[0]}, which is no parameter of the '
                     f'{"umT5" if spec.relative_bias_per_layer else "T5"} encoder that '
                     f'{config_path} describes: the weights and config.json do not belong '
                     'together.')
  wanted = {name: shape for name, (_, shape) in targets.items()}
  wanted.update({name: (spec.vocab_size, spec.d_model) for name in table_names})
  paths = {name: path for name, (path, _) in targets.items()}
  paths.update({name: ('token_embed',) for name in table_names})

  def transform(name, value):
    value = _to_flax(paths[name], value, spec)
    return np.ascontiguousarray(value.astype(param_dtype))

  tensors = reader.read(wanted, transform)
  if len(table_names) == 2 and not np.array_equal(tensors['shared.weight'],
                                                  tensors['encoder.embed_tokens.weight']):
    raise ValueError(f'{reader.source}: shared.weight and encoder.embed_tokens.weight differ; '
                     'a umT5 encoder has one token table.')
  params: Dict[str, Any] = {}
  for name in sorted(targets) + table_names[:1]:
    node = params
    for key in paths[name][:-1]:
      node = node.setdefault(key, {})
    node[paths[name][-1]] = tensors[name]
  return spec, params


def abstract_params(spec: umt5.UMT5Spec):
  """The encoder's params as boxed ShapeDtypeStructs (nn.get_partition_spec gives their
  logical PartitionSpecs), without allocating them."""
  ids = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda: umt5.UMT5Encoder(spec).init(jax.random.PRNGKey(0), ids))['params']


# ---------------------------------------------------------------------------------------------
# Tokenizer and prompts.


def _special(folder: str, key: str, default: str) -> str:
  """A special token's text from tokenizer_config.json / special_tokens_map.json."""
  for name in ('tokenizer_config.json', 'special_tokens_map.json'):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      continue
    try:
      with open(path, encoding='utf-8') as f:
        value = json.load(f).get(key)
    except (OSError, ValueError, AttributeError) as e:
      raise ValueError(f'{path} is not a readable JSON object: {e}.') from e
    if isinstance(value, dict):
      value = value.get('content')
    if isinstance(value, str):
      return value
  return default


def load_tokenizer(folder):
  """The folder's tokenizer.json (Wan pipeline folder or its tokenizer/) ->
  `tokenizers.Tokenizer`, set to pad with the pad token (from tokenizer_config.json, else
  '<pad>') and, where tokenizer.json has no post-processor, to append '</s>' as T5 does.
  Padding length and truncation are set per call by `tokenize`."""
  from tokenizers import Tokenizer, processors  # pylint: disable=g-import-not-at-top
  folder = pipeline_folder.component(folder, TOKENIZER_DIR, TOKENIZER)
  path = os.path.join(folder, TOKENIZER)
  try:
    tokenizer = Tokenizer.from_file(path)
  except Exception as e:  # pylint: disable=broad-except  # tokenizers raises its own Exception
    raise ValueError(f'{path} is not a readable tokenizers file ({type(e).__name__}: '
                     f'{str(e).strip()[:300]}).') from e
  pad = _special(folder, 'pad_token', '<pad>')
  pad_id = tokenizer.token_to_id(pad)
  if pad_id is None:
    raise ValueError(f'{path}: the pad token {pad!r} is not in the vocabulary.')
  if tokenizer.post_processor is None:
    eos = _special(folder, 'eos_token', '</s>')
    eos_id = tokenizer.token_to_id(eos)
    if eos_id is None:
      raise ValueError(f'{path}: the end-of-sequence token {eos!r} is not in the vocabulary.')
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f'$A {eos}', pair=f'$A {eos} $B {eos}', special_tokens=[(eos, eos_id)])
  tokenizer.no_truncation()
  tokenizer.enable_padding(direction='right', pad_id=pad_id, pad_token=pad)
  return tokenizer


def _check_prompts(prompts) -> list:
  """A prompt or prompts -> a non-empty list of strings, else ValueError."""
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  if not prompts:
    raise ValueError('no prompts given: pass a string or a non-empty list of strings.')
  bad = [p for p in prompts if not isinstance(p, str)]
  if bad:
    raise ValueError(f'prompt {bad[0]!r} is not a string.')
  return prompts


def _check_length(max_length) -> int:
  """max_length as an int >= 2, else ValueError."""
  if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) \
      or max_length < 2:
    raise ValueError(f'max_length={max_length!r} must be an integer >= 2 (a token and </s>).')
  return int(max_length)


def tokenize(tokenizer, prompts: Union[str, Sequence[str]],
             max_length: int) -> Tuple[np.ndarray, np.ndarray]:
  """prompts -> (ids int32 [B, max_length], mask bool [B, max_length]): transformers'
  tokenizer(prompts, padding='max_length', max_length=max_length, truncation=True,
  add_special_tokens=True). `tokenizer` from `load_tokenizer` (sets its padding length and
  truncation for the call and clears them after: not for concurrent use); prompts are not
  cleaned (see `prompt_clean`)."""
  prompts = _check_prompts(prompts)
  max_length = _check_length(max_length)
  pad = tokenizer.padding
  if pad is None:
    raise ValueError('the tokenizer has no pad token set: load it with load_tokenizer(folder).')
  try:
    tokenizer.enable_truncation(max_length, strategy='longest_first', direction='right')
    tokenizer.enable_padding(length=max_length, direction='right', pad_id=pad['pad_id'],
                             pad_token=pad['pad_token'])
    encodings = tokenizer.encode_batch(prompts, add_special_tokens=True)
  finally:
    tokenizer.no_truncation()
    tokenizer.enable_padding(direction='right', pad_id=pad['pad_id'], pad_token=pad['pad_token'])
  ids = np.asarray([e.ids for e in encodings], np.int32)  # [B, L]
  mask = np.asarray([e.attention_mask for e in encodings], np.int32) > 0  # [B, L]
  return ids, mask


def prompt_clean(text: str) -> str:
  """diffusers' Wan prompt_clean: ftfy.fix_text (when ftfy is installed), html.unescape
  twice, strip, Unicode whitespace runs -> one space, strip."""
  try:
    import ftfy  # pylint: disable=g-import-not-at-top
  except ImportError:
    ftfy = None
  if ftfy is not None:
    text = ftfy.fix_text(text)
  text = html.unescape(html.unescape(text)).strip()
  return _WHITESPACE.sub(' ', text).strip()


@functools.lru_cache(maxsize=8)
def _encoder_fn(spec: umt5.UMT5Spec):
  """A jitted (params, ids, mask) -> float32 [B, L, D] for one spec."""
  model = umt5.UMT5Encoder(spec)
  return jax.jit(lambda params, ids, mask: model.apply({'params': params}, ids, mask))


def encode_prompts(tokenizer, spec: umt5.UMT5Spec, params, prompts: Union[str, Sequence[str]],
                   max_length: int = 512) -> np.ndarray:
  """prompts -> embeddings float32 [B, max_length, d_model], diffusers'
  WanPipeline._get_t5_prompt_embeds: cleaned, tokenized (padded, truncated, </s>), encoded
  with the mask, rows at and past each prompt's token count (mask sum) set to 0."""
  prompts = [prompt_clean(p) for p in _check_prompts(prompts)]
  ids, mask = tokenize(tokenizer, prompts, max_length)  # [B, L], [B, L]
  if ids.max() >= spec.vocab_size:
    raise ValueError(f'the tokenizer gave token id {int(ids.max())}, beyond the encoder\'s '
                     f'vocab_size={spec.vocab_size}: the tokenizer and the encoder do not '
                     'belong together.')
  embeds = np.asarray(_encoder_fn(spec)(params, ids, mask), np.float32)  # [B, L, D]
  lengths = mask.sum(axis=1)  # [B]
  keep = np.arange(max_length)[None, :] < lengths[:, None]  # [B, L]
  return np.where(keep[..., None], embeds, np.float32(0))  # [B, L, D]
