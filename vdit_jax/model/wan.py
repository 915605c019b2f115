"""Wan 2.1 (the diffusers layout) as a configuration of the project's DiT, and its weights.

A downloaded `Wan2.1-T2V-1.3B-Diffusers` (or 14B, or I2V-14B) folder holds
`transformer/config.json` and `diffusion_pytorch_model*.safetensors` (+ an index). This
module turns that config into `config.model` values of `VideoDiT` (one model family: Wan
is the DiT with model.rope_style='wan', qk_norm_across_heads, modulation='shared',
cross_attn_norm_affine, the text MLP, and for I2V image tokens plus condition channels),
and the stored tensors into the DiT's params as `safetensors_load` recipes, so that each
process reads only the slices its devices hold (`load_params`).

Layout facts (diffusers 0.42, checked by tests/wan_test.py against WanTransformer3DModel):
- torch Linear weights are [out, in]; the DiT's kernels are [in, out], the attention
  ones [D, K, Dh] / [K, Dh, D]; Conv3d patch weights [D, C, pt, ph, pw] become the
  tubelet kernel [(pt ph pw C), D].
- Wan's timestep features are [cos | sin], the DiT's [sin | cos]: the rows of the first
  time-MLP kernel are swapped by halves, which is exact.
- Each block's `scale_shift_table` [1, 6, D] is its `modulation/table` [6, D]; the
  output's [1, 2, D] is `final/modulation/table`.
"""

import json
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from vdit_jax.model import spec as spec_lib
from vdit_jax.parallel import safetensors_load as st

TRANSFORMER_CLASS = 'WanTransformer3DModel'
TEXT_LENGTH = 512          # umT5 rows Wan's cross-attention reads (padding attended)
FREQ_DIM = 256             # the DiT's timestep features (embeddings.TimestepEmbedder)


def transformer_folder(path: str) -> str:
  """The folder holding the transformer's config.json: `path/transformer` of a pipeline
  folder, or `path` itself. Raises ValueError naming what is missing."""
  for candidate in (os.path.join(path, 'transformer'), path):
    if os.path.isfile(os.path.join(candidate, 'config.json')):
      return candidate
  raise ValueError(f'{path!r} is neither a Wan diffusers folder (with transformer/config.json) '
                   'nor a transformer folder (with config.json): no config.json found.')


def read_config(path: str) -> Dict[str, Any]:
  """The transformer's config.json (of `transformer_folder(path)`), checked to be a Wan 2.1
  transformer this DiT expresses; raises ValueError naming the file and the key."""
  file = os.path.join(transformer_folder(path), 'config.json')
  try:
    with open(file) as f:
      hf = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'{file}: cannot read a JSON config ({e}).') from e
  if hf.get('_class_name') != TRANSFORMER_CLASS:
    raise ValueError(f"{file}: _class_name={hf.get('_class_name')!r} is not "
                     f'{TRANSFORMER_CLASS!r}; this is not a Wan 2.1 transformer.')
  required = ('patch_size', 'num_attention_heads', 'attention_head_dim', 'in_channels',
              'out_channels', 'text_dim', 'freq_dim', 'ffn_dim', 'num_layers')
  missing = [k for k in required if k not in hf]
  if missing:
    raise ValueError(f'{file}: missing keys {missing} of a {TRANSFORMER_CLASS} config.')
  rules = (
      ('freq_dim', hf['freq_dim'] == FREQ_DIM, f'must be {FREQ_DIM}'),
      ('qk_norm', hf.get('qk_norm', 'rms_norm_across_heads') == 'rms_norm_across_heads',
       "must be 'rms_norm_across_heads'"),
      ('eps', abs(float(hf.get('eps', 1e-6)) - 1e-6) < 1e-12, 'must be 1e-6'),
      ('pos_embed_seq_len', hf.get('pos_embed_seq_len') is None,
       'must be null (Wan 2.1 FLF2V position tables are not supported)'),
      ('in_channels', hf['in_channels'] >= hf['out_channels'],
       'must be >= out_channels (the rest are condition channels)'),
      ('added_kv_proj_dim',
       (hf.get('image_dim') is None) == (hf.get('added_kv_proj_dim') is None)
       and hf.get('added_kv_proj_dim') in (None,
                                           hf['num_attention_heads'] * hf['attention_head_dim']),
       'must be null without image_dim and the model width with it'),
  )
  for key, ok, rule in rules:
    if not ok:
      raise ValueError(f'{file}: {key}={hf.get(key)!r} {rule}.')
  return hf


def model_overrides(hf: Dict[str, Any]) -> Dict[str, Any]:
  """config.model values that make the DiT Wan's: {'width': ..., 'text.embed_dim': ...}."""
  width = int(hf['num_attention_heads']) * int(hf['attention_head_dim'])
  return {
      'variant': '', 'width': width, 'depth': int(hf['num_layers']),
      'num_heads': int(hf['num_attention_heads']), 'mlp_dim': int(hf['ffn_dim']),
      'patch_size': tuple(int(p) for p in hf['patch_size']),
      'pos_embed': 'rope', 'rope_style': 'wan', 'qk_norm': True,
      'qk_norm_across_heads': True, 'modulation': 'shared',
      'cross_attn_norm_affine': bool(hf.get('cross_attn_norm', True)),
      'attention_pattern': 'full', 'mlp_conv': (), 'refiner_width': 0,
      'self_condition': False, 'loss_uncertainty': False, 'class_tokens': 0,
      'conditioning': 'text',
      'text.encoder': 'precomputed', 'text.embed_dim': int(hf['text_dim']),
      'text.max_length': TEXT_LENGTH, 'text.projection': 'gelu_mlp',
      'text.attend_padding': True, 'text.pooled': False,
      'image_embed_dim': int(hf.get('image_dim') or 0),
      'condition_channels': int(hf['in_channels']) - int(hf['out_channels']),
  }


def apply_overrides(model_cfg, hf: Dict[str, Any]) -> None:
  """Sets Wan's values (`model_overrides`) on a config.model section in place."""
  for key, value in model_overrides(hf).items():
    section = model_cfg
    *parents, leaf = key.split('.')
    for p in parents:
      section = section[p]
    section[leaf] = value


def check_spec_matches(spec: spec_lib.ModelSpec, hf: Dict[str, Any], channels: int,
                       where: str) -> None:
  """Raises ValueError naming the first model field that differs from the Wan config."""
  wanted = model_overrides(hf)
  got = {'width': spec.width, 'depth': spec.depth, 'num_heads': spec.num_heads,
         'mlp_dim': spec.mlp_dim, 'patch_size': tuple(spec.patch_size),
         'pos_embed': spec.pos_embed, 'rope_style': spec.rope_style,
         'qk_norm_across_heads': spec.qk_norm_across_heads, 'modulation': spec.modulation,
         'cross_attn_norm_affine': spec.cross_attn_norm_affine,
         'image_embed_dim': spec.image_embed_dim,
         'condition_channels': spec.condition_channels,
         'text.embed_dim': spec.text.embed_dim if spec.text else None,
         'text.projection': spec.text.projection if spec.text else None,
         'text.attend_padding': spec.text.attend_padding if spec.text else None}
  for key, value in got.items():
    if value != wanted[key]:
      raise ValueError(f'model.{key}={value!r} does not match the Wan transformer in {where} '
                       f'({wanted[key]!r}): start from model_overrides(read_config(...)).')
  if channels != int(hf['out_channels']):
    raise ValueError(f'data.channels={channels} does not match the Wan transformer in {where} '
                     f"(out_channels={hf['out_channels']}).")


# ----------------------------------------------------------------------- names

def _linear(folder, name: str) -> Tuple[st.Recipe, st.Recipe]:
  """torch Linear `name` -> (kernel [in, out], bias [out])."""
  return (st.source(folder, f'{name}.weight').transpose(1, 0),
          st.source(folder, f'{name}.bias'))


def _attention(folder, prefix: str, heads: int, image: bool) -> Dict[str, Any]:
  """A WanAttention's tensors -> the DiT's attention params ([D, K, Dh] kernels)."""
  out: Dict[str, Any] = {}
  projections = [('query', 'to_q'), ('key', 'to_k'), ('value', 'to_v')]
  if image:
    projections += [('added_key', 'add_k_proj'), ('added_value', 'add_v_proj')]
  for ours, theirs in projections:
    kernel, bias = _linear(folder, f'{prefix}.{theirs}')
    d_in = kernel.shape[0]
    out[f'{ours}_kernel'] = kernel.reshape(d_in, heads, -1)  # [D, K, Dh]
    out[f'{ours}_bias'] = bias.reshape(heads, -1)  # [K, Dh]
  norms = [('q_norm', 'norm_q'), ('k_norm', 'norm_k')]
  if image:
    norms.append(('added_k_norm', 'norm_added_k'))
  for ours, theirs in norms:
    out[ours] = {'scale': st.source(folder, f'{prefix}.{theirs}.weight').reshape(heads, -1)}
  kernel, bias = _linear(folder, f'{prefix}.to_out.0')
  out['out_kernel'] = kernel.reshape(heads, -1, kernel.shape[1])  # [K, Dh, D]
  out['out_bias'] = bias
  return out


def _dense(folder, name: str) -> Dict[str, st.Recipe]:
  kernel, bias = _linear(folder, name)
  return {'kernel': kernel, 'bias': bias}


def _layer_norm(folder, name: str) -> Dict[str, st.Recipe]:
  return {'scale': st.source(folder, f'{name}.weight'), 'bias': st.source(folder, f'{name}.bias')}


def _block(folder, i: int, heads: int, image: bool, cross_norm: bool) -> Dict[str, Any]:
  prefix = f'blocks.{i}'
  cross: Dict[str, Any] = {'attn': _attention(folder, f'{prefix}.attn2', heads, image)}
  if cross_norm:
    cross['norm'] = _layer_norm(folder, f'{prefix}.norm2')
  return {
      'modulation': {'table': st.source(folder, f'{prefix}.scale_shift_table').reshape(6, -1)},
      'attn': _attention(folder, f'{prefix}.attn1', heads, False),
      'cross_attn': cross,
      'mlp': {'fc1': _dense(folder, f'{prefix}.ffn.net.0.proj'),
              'fc2': _dense(folder, f'{prefix}.ffn.net.2')},
  }


def _stack_tree(trees: List[Any]) -> Any:
  first = trees[0]
  if isinstance(first, dict):
    return {k: _stack_tree([t[k] for t in trees]) for k in first}
  return st.stack(trees, axis=0)


def param_recipes(folder: st.SafetensorsFolder, spec: spec_lib.ModelSpec,
                  hf: Dict[str, Any]) -> Dict[str, Any]:
  """The DiT's params (the tree `VideoDiT(spec).init` makes) as recipes over `folder`."""
  heads = spec.num_heads
  image = bool(spec.image_embed_dim)
  patch = st.source(folder, 'patch_embedding.weight')  # [D, C, pt, ph, pw]
  d = patch.shape[0]
  time_in = st.source(folder, 'condition_embedder.time_embedder.linear_1.weight')  # [D, 256]
  half = FREQ_DIM // 2
  params: Dict[str, Any] = {
      'patch_embed': {'proj': {
          'kernel': patch.transpose(2, 3, 4, 1, 0).reshape(-1, d),  # [(pt ph pw C), D]
          'bias': st.source(folder, 'patch_embedding.bias')}},
      't_embed': {
          'mlp_in': {
              # [cos | sin] rows -> the DiT's [sin | cos]
              'kernel': time_in.transpose(1, 0).take(
                  0, list(range(half, FREQ_DIM)) + list(range(half))),
              'bias': st.source(folder, 'condition_embedder.time_embedder.linear_1.bias')},
          'mlp_out': _dense(folder, 'condition_embedder.time_embedder.linear_2')},
      'adaln': {'proj': _dense(folder, 'condition_embedder.time_proj')},
      'text': {'fc1': _dense(folder, 'condition_embedder.text_embedder.linear_1'),
               'fc2': _dense(folder, 'condition_embedder.text_embedder.linear_2')},
      'final': {'modulation': {'table': st.source(folder, 'scale_shift_table').reshape(2, -1)},
                'proj': _dense(folder, 'proj_out')},
  }
  if image:
    params['image_embed'] = {
        'ln_in': _layer_norm(folder, 'condition_embedder.image_embedder.norm1'),
        'fc1': _dense(folder, 'condition_embedder.image_embedder.ff.net.0.proj'),
        'fc2': _dense(folder, 'condition_embedder.image_embedder.ff.net.2'),
        'ln_out': _layer_norm(folder, 'condition_embedder.image_embedder.norm2')}
  cross_norm = bool(hf.get('cross_attn_norm', True))
  blocks = [_block(folder, i, heads, image, cross_norm) for i in range(spec.depth)]
  if spec.scan_layers:
    params['blocks'] = _stack_tree(blocks)
  else:
    for i, block in enumerate(blocks):
      params[f'blocks_{i}'] = block
  return params


def expected_names(hf: Dict[str, Any]) -> List[str]:
  """Every tensor name a Wan transformer of config `hf` stores."""
  names = ['patch_embedding.weight', 'patch_embedding.bias', 'scale_shift_table',
           'proj_out.weight', 'proj_out.bias']
  for m in ('time_embedder.linear_1', 'time_embedder.linear_2', 'time_proj',
            'text_embedder.linear_1', 'text_embedder.linear_2'):
    names += [f'condition_embedder.{m}.weight', f'condition_embedder.{m}.bias']
  image = hf.get('image_dim') is not None
  if image:
    for m in ('norm1', 'ff.net.0.proj', 'ff.net.2', 'norm2'):
      names += [f'condition_embedder.image_embedder.{m}.weight',
                f'condition_embedder.image_embedder.{m}.bias']
  for i in range(int(hf['num_layers'])):
    p = f'blocks.{i}'
    names.append(f'{p}.scale_shift_table')
    for attn, extra in (('attn1', False), ('attn2', image)):
      mods = ['to_q', 'to_k', 'to_v', 'to_out.0'] + (['add_k_proj', 'add_v_proj'] if extra else [])
      for m in mods:
        names += [f'{p}.{attn}.{m}.weight', f'{p}.{attn}.{m}.bias']
      names += [f'{p}.{attn}.norm_q.weight', f'{p}.{attn}.norm_k.weight']
      if extra:
        names.append(f'{p}.{attn}.norm_added_k.weight')
    if hf.get('cross_attn_norm', True):
      names += [f'{p}.norm2.weight', f'{p}.norm2.bias']
    for m in ('ffn.net.0.proj', 'ffn.net.2'):
      names += [f'{p}.{m}.weight', f'{p}.{m}.bias']
  return names


def open_folder(path: str, hf: Optional[Dict[str, Any]] = None) -> st.SafetensorsFolder:
  """The transformer's safetensors, checked to hold exactly the tensors a Wan transformer
  of its config stores (another model's weights stop here, naming a tensor)."""
  folder_path = transformer_folder(path)
  hf = hf or read_config(path)
  folder = st.SafetensorsFolder(folder_path)
  stored = set(folder.names())
  wanted = expected_names(hf)
  missing = [n for n in wanted if n not in stored]
  if missing:
    raise ValueError(f'{folder_path}: the weights lack {len(missing)} tensors of the '
                     f'{TRANSFORMER_CLASS} its config.json describes, e.g. {missing[0]!r}; '
                     'these are not this model\'s weights (or a shard is incomplete).')
  extra = sorted(stored - set(wanted) - {n for n in stored if n.endswith('norm_added_q.weight')})
  if extra:
    raise ValueError(f'{folder_path}: {len(extra)} stored tensors are not part of the '
                     f'{TRANSFORMER_CLASS} its config.json describes, e.g. {extra[0]!r}.')
  return folder


def check_shapes(recipes, expected) -> None:
  """Raises ValueError naming the param, its stored tensor and both shapes where the
  recipes' shapes differ from `expected` (a tree of ShapeDtypeStructs)."""
  flat_r = _flatten(recipes)
  flat_e = _flatten(expected)
  if set(flat_r) != set(flat_e):
    only_r = sorted(set(flat_r) - set(flat_e))
    only_e = sorted(set(flat_e) - set(flat_r))
    raise ValueError(f'the Wan weights map to params {only_r[:3]} the model lacks and miss '
                     f'{only_e[:3]} it has: the model config does not match the folder.')
  for path, recipe in flat_r.items():
    if tuple(recipe.shape) != tuple(flat_e[path].shape):
      raise ValueError(f"param {'/'.join(path)} (from {recipe.sources()[0]!r}) has the "
                       f'stored shape {tuple(recipe.shape)}, but the model expects '
                       f'{tuple(flat_e[path].shape)}.')


def _flatten(tree, prefix=()) -> Dict[Tuple[str, ...], Any]:
  if isinstance(tree, dict) or hasattr(tree, 'items'):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, prefix + (k,)))
    return out
  return {prefix: tree}


def load_params(path: str, spec: spec_lib.ModelSpec, expected, shardings=None,
                dtype=None):
  """The DiT's params from a Wan diffusers folder: jax.Arrays with `shardings` (a tree
  like `expected`; each process reads only its devices' slices), or numpy arrays on the
  host when `shardings` is None. `expected` is the params' abstract tree (unboxed
  ShapeDtypeStructs); dtype None keeps each param's expected dtype."""
  hf = read_config(path)
  folder = open_folder(path, hf)
  recipes = param_recipes(folder, spec, hf)
  check_shapes(recipes, expected)
  if shardings is None:
    out = st.load_on_host(recipes)
    return _cast_like(out, expected, dtype)
  return st.load(recipes, shardings, dtype=dtype, expected=expected)


def _cast_like(tree, expected, dtype):
  if isinstance(tree, dict):
    return {k: _cast_like(v, expected[k], dtype) for k, v in tree.items()}
  return np.asarray(tree).astype(dtype or expected.dtype)
