"""LoRA adapters of a Wan model (model/wan.py) in the format diffusers and peft read.

    state_dict, metadata = to_diffusers(adapters, spec, alpha=8.0, rank=8)
    save('lora.safetensors', adapters, spec, alpha=8.0, rank=8)   # the same, as a file
    # diffusers: pipe.load_lora_weights('.', weight_name='lora.safetensors')
    adapters, alpha, rank = load('pytorch_lora_weights.safetensors', spec)

Keys (diffusers 0.42 `WanPipeline.save_lora_weights`, checked by tests/wan_lora_test.py):
`transformer.blocks.<i>.<module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r],
a torch Linear's W [out, in] running as W + (alpha / r) * B @ A. The project's adapter
of the same kernel (model/lora.py) is a [*I, r], b [r, *O] with kernel [*I, *O] = W^T, so
lora_A = a^T and lora_B = b^T, the attention's (K, Dh) axes flattened row-major as
model/wan.py does for the kernels themselves. The modules (inside `blocks.<i>`):

    attn/{query,key,value,out}_kernel             attn1.{to_q,to_k,to_v,to_out.0}
    cross_attn/attn/{query,key,value,out}_kernel  attn2.{to_q,to_k,to_v,to_out.0}
    mlp/fc1/kernel, mlp/fc2/kernel                ffn.net.0.proj, ffn.net.2

Alpha: written as peft's `lora_alpha` (with `r` and the target modules) in the file's
`lora_adapter_metadata`, the JSON that diffusers' save writes and its loader passes to
`LoraConfig`; the factors are stored unscaled, so a file written here reads back
bit-identical. Without that metadata diffusers takes alpha = r (scale 1); `from_diffusers`
does the same. Also read: peft's `alpha_pattern` and `use_rslora`, modules of different
ranks (zero-padded to the largest, their scale folded into b), and the original Wan /
kohya / musubi layout (`diffusion_model.blocks.0.self_attn.q.lora_down.weight`,
`lora_unet_blocks_0_ffn_0.lora_up.weight`, with a `<module>.alpha` tensor each).

Refused with a ValueError naming the key: a module that is not one of the project's
targets (the I2V image projections `add_k_proj` / `add_v_proj`, anything outside the
blocks), LoRA biases, DoRA, a block past the model's depth, a factor of the wrong shape.
"""

import collections
import json
import math
import numbers
import re
import struct
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import flax.linen as nn
import ml_dtypes
import numpy as np
import safetensors.numpy
from flax import traverse_util

from vdit_jax.model import lora
from vdit_jax.model import spec as spec_lib
from vdit_jax.parallel import paths

PREFIX = 'transformer'                      # WanLoraLoaderMixin.transformer_name
METADATA_KEY = 'lora_adapter_metadata'      # diffusers' LORA_ADAPTER_METADATA_KEY

# (param path inside a block, lora target, diffusers module, original Wan module)
MODULES = (
    (('attn', 'query_kernel'), 'query', 'attn1.to_q', 'self_attn.q'),
    (('attn', 'key_kernel'), 'key', 'attn1.to_k', 'self_attn.k'),
    (('attn', 'value_kernel'), 'value', 'attn1.to_v', 'self_attn.v'),
    (('attn', 'out_kernel'), 'out', 'attn1.to_out.0', 'self_attn.o'),
    (('cross_attn', 'attn', 'query_kernel'), 'query', 'attn2.to_q', 'cross_attn.q'),
    (('cross_attn', 'attn', 'key_kernel'), 'key', 'attn2.to_k', 'cross_attn.k'),
    (('cross_attn', 'attn', 'value_kernel'), 'value', 'attn2.to_v', 'cross_attn.v'),
    (('cross_attn', 'attn', 'out_kernel'), 'out', 'attn2.to_out.0', 'cross_attn.o'),
    (('mlp', 'fc1', 'kernel'), 'fc1', 'ffn.net.0.proj', 'ffn.0'),
    (('mlp', 'fc2', 'kernel'), 'fc2', 'ffn.net.2', 'ffn.2'),
)
_TO_DIFFUSERS = {path: module for path, _, module, _ in MODULES}
_TARGET_OF = {path: target for path, target, _, _ in MODULES}
# Every module name a file may use -> the param path: diffusers', the original Wan
# checkpoint's (kohya / ComfyUI files) and musubi's (the same with underscores).
_FROM_NAME = {name: path for path, _, module, original in MODULES
              for name in (module, original, original.replace('.', '_'))}
_KEY_PREFIXES = ('transformer.', 'diffusion_model.', 'base_model.model.', 'lora_unet_')
_FACTOR_SUFFIXES = (('.lora_A.weight', 'a'), ('.lora_B.weight', 'b'),
                    ('.lora_down.weight', 'a'), ('.lora_up.weight', 'b'), ('.alpha', 'alpha'))
_DTYPES = {'F64': np.dtype(np.float64), 'F32': np.dtype(np.float32),
           'F16': np.dtype(np.float16), 'BF16': np.dtype(ml_dtypes.bfloat16)}
_SUPPORTED = ('attn1 / attn2 .to_q .to_k .to_v .to_out.0 and ffn.net.0.proj, ffn.net.2 '
              'of blocks.<i> (the DiT\'s query, key, value, out, fc1, fc2 kernels)')


def check_wan(spec: spec_lib.ModelSpec) -> None:
  """Raises ValueError unless `spec` is the DiT configured as Wan (model/wan.py)."""
  if spec.rope_style != 'wan' or spec.modulation != 'shared' or not spec.qk_norm_across_heads:
    raise ValueError(
        f'model.rope_style={spec.rope_style!r}, modulation={spec.modulation!r}, '
        f'qk_norm_across_heads={spec.qk_norm_across_heads!r}: the diffusers LoRA layout is '
        "Wan's; set the model with wan.apply_overrides(config.model, wan.read_config(...)).")


def kernel_dims(path: Tuple[str, ...], spec: spec_lib.ModelSpec):
  """(input dims, output dims) of the kernel at `path` inside a block."""
  d, k, f = spec.width, spec.num_heads, spec.mlp_dim
  heads = (k, d // k)
  return {'query': ((d,), heads), 'key': ((d,), heads), 'value': ((d,), heads),
          'out': (heads, (d,)), 'fc1': ((d,), (f,)), 'fc2': ((f,), (d,))}[_TARGET_OF[path]]


def _check_alpha_rank(alpha, rank) -> None:
  if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
    raise ValueError(f'rank={rank!r} must be an integer >= 1.')
  if (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real)
      or not math.isfinite(alpha) or alpha <= 0):
    raise ValueError(f'alpha={alpha!r} must be a finite number > 0 (scale alpha / rank).')


def _factor_pairs(adapters) -> Dict[Tuple[str, ...], Dict[str, np.ndarray]]:
  """{kernel path: {'a', 'b'} as host numpy arrays} of an adapter tree (boxed or not)."""
  pairs: Dict[Tuple[str, ...], Dict[str, np.ndarray]] = {}
  for path, leaf in traverse_util.flatten_dict(nn.meta.unbox(adapters)).items():
    if path[-1] not in ('a', 'b'):
      raise ValueError(f'adapter leaf {"/".join(path)} is neither an a nor a b factor.')
    pairs.setdefault(tuple(path[:-1]), {})[path[-1]] = np.asarray(leaf)
  for path, pair in pairs.items():
    if set(pair) != {'a', 'b'}:
      raise ValueError(f'adapter {"/".join(path)} has factors {sorted(pair)}, not a and b.')
  return pairs


def _block_layers(path: Tuple[str, ...], depth: int):
  """(layer indices, stacked?) of an adapter path `blocks/...` or `blocks_<i>/...`."""
  if path[0] == 'blocks':
    return list(range(depth)), True
  m = re.fullmatch(r'blocks_(\d+)', path[0])
  if m and int(m.group(1)) < depth:
    return [int(m.group(1))], False
  raise ValueError(f'adapter {"/".join(path)}: {path[0]!r} is not a block of this model '
                   f"('blocks' scanned over {depth} layers, or blocks_0 .. blocks_{depth - 1}).")


def to_diffusers(adapters, spec: spec_lib.ModelSpec, alpha: float, rank: int,
                 dtype=None) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
  """The project's adapters -> (diffusers state dict, safetensors metadata).

  `adapters` as model/lora.py lays them out (scanned `blocks` with a leading layer axis,
  or unrolled `blocks_<i>`; boxed or not; jax or numpy arrays) of a Wan model `spec`.
  The state dict maps `transformer.blocks.<i>.<module>.lora_A.weight` to [r, in] and
  `...lora_B.weight` to [out, r] (contiguous numpy, the adapters' dtype unless `dtype`);
  the metadata holds peft's r, lora_alpha and target modules under `lora_adapter_metadata`,
  as diffusers' `save_lora_weights` writes it. Raises ValueError naming an adapter path
  that is not a Wan target, or whose shape does not fit `spec` and `rank`.
  """
  check_wan(spec)
  _check_alpha_rank(alpha, rank)
  state: Dict[str, np.ndarray] = {}
  for path, pair in sorted(_factor_pairs(adapters).items()):
    layers, stacked = _block_layers(path, spec.depth)
    inner = path[1:]
    if inner not in _TO_DIFFUSERS:
      raise ValueError(f'adapter {"/".join(path)} adapts no Wan module; the diffusers layout '
                       f'holds {sorted("/".join(p) for p in _TO_DIFFUSERS)} of a block.')
    ins, outs = kernel_dims(inner, spec)
    lead = (spec.depth,) if stacked else ()
    want_a, want_b = lead + ins + (rank,), lead + (rank,) + outs
    if pair['a'].shape != want_a or pair['b'].shape != want_b:
      raise ValueError(f'adapter {"/".join(path)} has factors a {pair["a"].shape}, b '
                       f'{pair["b"].shape}; rank {rank} on this model needs a {want_a}, '
                       f'b {want_b}.')
    module = _TO_DIFFUSERS[inner]
    for j, layer in enumerate(layers):
      a = pair['a'][j] if stacked else pair['a']  # [*I, r]
      b = pair['b'][j] if stacked else pair['b']  # [r, *O]
      key = f'{PREFIX}.blocks.{layer}.{module}'
      if f'{key}.lora_A.weight' in state:
        raise ValueError(f'adapters hold {key} twice (both scanned blocks and blocks_{layer}).')
      factors = {'lora_A': a.reshape(-1, rank).T,  # [r, in]
                 'lora_B': b.reshape(rank, -1).T}  # [out, r]
      for name, value in factors.items():
        value = value if dtype is None else value.astype(dtype)
        state[f'{key}.{name}.weight'] = np.ascontiguousarray(value)
  if not state:
    raise ValueError('the adapter tree is empty: nothing to write.')
  modules = sorted({k[len(PREFIX) + 1:].rsplit('.lora_', 1)[0] for k in state})
  peft_kwargs = {'r': int(rank), 'lora_alpha': float(alpha), 'target_modules': modules,
                 'peft_type': 'LORA', 'bias': 'none', 'lora_bias': False, 'use_dora': False,
                 'use_rslora': False, 'rank_pattern': {}, 'alpha_pattern': {}}
  adapter_metadata = {f'{PREFIX}.{k}': v for k, v in peft_kwargs.items()}
  return state, {'format': 'pt',
                 METADATA_KEY: json.dumps(adapter_metadata, indent=2, sort_keys=True)}


def peft_kwargs_of(metadata: Optional[Dict[str, Any]]) -> Dict[str, Any]:
  """peft LoraConfig values from `metadata`: a file's safetensors metadata (JSON under
  `lora_adapter_metadata`), or that JSON parsed, its keys with or without `transformer.`."""
  if not metadata:
    return {}
  if METADATA_KEY in metadata:
    raw = metadata[METADATA_KEY]
    try:
      metadata = json.loads(raw) if isinstance(raw, str) else dict(raw)
    except (TypeError, ValueError) as e:
      raise ValueError(f'metadata {METADATA_KEY} is not a JSON object ({e}).') from e
  if not isinstance(metadata, dict):
    raise ValueError(f'LoRA metadata {metadata!r} is not a dict of peft LoraConfig values.')
  ours = {k[len(PREFIX) + 1:]: v for k, v in metadata.items() if k.startswith(PREFIX + '.')}
  if not ours and any('.' in k for k in metadata):
    return {}  # another component's metadata (a text encoder's): nothing of the transformer
  return ours or dict(metadata)


def _parse_key(key: str, depth: int) -> Tuple[int, Tuple[str, ...], str]:
  """(block, param path inside it, 'a' | 'b' | 'alpha') of a file's tensor name."""
  name = key
  for prefix in _KEY_PREFIXES:
    if name.startswith(prefix):
      name = name[len(prefix):]
      break
  for suffix, part in _FACTOR_SUFFIXES:
    if name.endswith(suffix):
      name = name[:-len(suffix)]
      break
  else:
    raise ValueError(f'{key!r} is not a LoRA factor this project reads (<module>.lora_A / '
                     'lora_B .weight, lora_down / lora_up .weight, or <module>.alpha); LoRA '
                     'biases, DoRA magnitudes and full-weight diffs are not supported.')
  m = re.fullmatch(r'blocks[._](\d+)[._](.+)', name)
  inner = _FROM_NAME.get(m.group(2)) if m else None
  if inner is None:
    raise ValueError(f'{key!r}: module {name!r} is not a LoRA target the project supports '
                     f'for Wan; it adapts {_SUPPORTED}.')
  block = int(m.group(1))
  if block >= depth:
    raise ValueError(f'{key!r}: block {block} is past the model\'s {depth} blocks.')
  return block, inner, part


def _alpha_for(module: str, rank: int, alpha_tensor, peft_kwargs: Dict[str, Any]) -> float:
  """A module's alpha: its own `.alpha` tensor, else peft's alpha_pattern (matched as
  peft matches it: the pattern is the end of the module name), else lora_alpha, else r."""
  if alpha_tensor is not None:
    return float(np.asarray(alpha_tensor, np.float64).reshape(()))
  for pattern, value in (peft_kwargs.get('alpha_pattern') or {}).items():
    if re.match(rf'(.*\.)?({pattern})$', module):
      return float(value)
  return float(peft_kwargs.get('lora_alpha', rank))


def _as_numpy(key: str, value) -> np.ndarray:
  try:
    return np.asarray(value)
  except (TypeError, RuntimeError) as e:
    raise ValueError(f'{key!r}: cannot read the tensor as a numpy array ({e}).') from e


def from_diffusers(state_dict: Dict[str, Any], spec: spec_lib.ModelSpec,
                   rank: Optional[int] = None, *, alpha: Optional[float] = None,
                   targets=None, metadata: Optional[Dict[str, Any]] = None,
                   dtype=np.float32) -> Tuple[Dict[str, Any], float, int]:
  """A diffusers / peft (or original-Wan / kohya) LoRA state dict -> (adapters, alpha, rank).

  `state_dict`: {name: numpy array}, the keys with or without `transformer.`. `metadata`:
  the file's safetensors metadata (or its peft values, see `peft_kwargs_of`), the source
  of lora_alpha; without it and without `.alpha` tensors alpha = r, as diffusers reads it.
  `rank`: the adapters' rank (None: the largest in the file; more zero-pads every
  module). `alpha`: the adapters' alpha (None: the file's when all modules share one
  rank and alpha, so a file of `to_diffusers` reads back bit-identical; otherwise a
  module's scale is folded into its b). `targets` (model/lora.py names, e.g. 'attn,mlp'):
  when given, every kernel of those targets gets an adapter (zeros where the file has
  none), the tree `init_adapters` makes, and a module of another target is refused.
  Adapters come scanned (`blocks`, a leading layer axis, zeros for absent layers) or
  unrolled (`blocks_<i>`) as `spec.scan_layers` says, as numpy arrays of `dtype`.
  """
  check_wan(spec)
  if not state_dict:
    raise ValueError('the LoRA state dict is empty.')
  peft_kwargs = peft_kwargs_of(metadata)
  for flag in ('use_dora', 'lora_bias'):
    if peft_kwargs.get(flag):
      raise ValueError(f'LoRA metadata {flag}={peft_kwargs[flag]!r}: only plain LoRA '
                       f'(W + scale * B @ A) is supported, {flag} must be false.')
  rslora = bool(peft_kwargs.get('use_rslora', False))
  chosen = None if targets is None else set(lora.parse_targets(targets))

  found: Dict[Tuple[int, Tuple[str, ...]], Dict[str, Tuple[str, np.ndarray]]] = {}
  for key, value in state_dict.items():
    block, inner, part = _parse_key(key, spec.depth)
    if chosen is not None and _TARGET_OF[inner] not in chosen:
      raise ValueError(f'{key!r} adapts a {_TARGET_OF[inner]} kernel, not one of the targets '
                       f'{sorted(chosen)}.')
    entry = found.setdefault((block, inner), {})
    if part in entry:
      raise ValueError(f'{key!r} and {entry[part][0]!r} are the same factor of one module.')
    entry[part] = (key, _as_numpy(key, value))

  modules = {}  # (block, inner) -> (a [in, r], b [r, out], module rank, module alpha)
  for (block, inner), entry in sorted(found.items()):
    module = f'blocks.{block}.{_TO_DIFFUSERS[inner]}'
    missing = [p for p in ('a', 'b') if p not in entry]
    if missing:
      present = next(iter(entry.values()))[0]
      raise ValueError(f'{present!r}: module {module} has no '
                       f'{" / ".join("lora_A" if p == "a" else "lora_B" for p in missing)} '
                       'factor in the file.')
    (key_a, a), (key_b, b) = entry['a'], entry['b']
    ins, outs = kernel_dims(inner, spec)
    fan_in, fan_out = math.prod(ins), math.prod(outs)
    r = a.shape[0] if a.ndim == 2 else -1
    if a.ndim != 2 or a.shape[1] != fan_in or r < 1:
      raise ValueError(f'{key_a!r} has shape {a.shape}; {module} of this model takes '
                       f'[r, {fan_in}] (lora_A is [rank, in]).')
    if b.shape != (fan_out, r):
      raise ValueError(f'{key_b!r} has shape {b.shape}; {module} of this model with the rank '
                       f'{r} of its lora_A takes [{fan_out}, {r}] (lora_B is [out, rank]).')
    alpha_tensor = entry.get('alpha', (None, None))[1]
    if alpha_tensor is not None and alpha_tensor.size != 1:
      raise ValueError(f'{entry["alpha"][0]!r} has shape {alpha_tensor.shape}, not a scalar.')
    m_alpha = _alpha_for(module, r, alpha_tensor, peft_kwargs)
    if not math.isfinite(m_alpha) or m_alpha <= 0:
      raise ValueError(f'{module}: alpha {m_alpha!r} must be a finite number > 0.')
    modules[(block, inner)] = (a.T, b.T, r, m_alpha)  # a [in, r], b [r, out]

  largest = max(modules.items(), key=lambda kv: kv[1][2])
  out_rank = largest[1][2] if rank is None else rank
  if isinstance(out_rank, bool) or not isinstance(out_rank, numbers.Integral) or (
      out_rank < largest[1][2]):
    raise ValueError(f'rank={rank!r} must be an integer >= {largest[1][2]}, the rank of '
                     f'blocks.{largest[0][0]}.{_TO_DIFFUSERS[largest[0][1]]} in the file.')
  out_rank = int(out_rank)
  scales = [m_alpha / (math.sqrt(r) if rslora else r) for _, _, r, m_alpha in modules.values()]
  if alpha is None:
    pairs = {(r, m_alpha) for _, _, r, m_alpha in modules.values()}
    if not rslora and len(pairs) == 1 and next(iter(pairs))[0] == out_rank:
      alpha = next(iter(pairs))[1]
    else:
      alpha = collections.Counter(scales).most_common(1)[0][0] * out_rank
  _check_alpha_rank(alpha, out_rank)
  alpha = float(alpha)

  flat = {}
  for ((block, inner), (a, b, r, m_alpha)), scale in zip(modules.items(), scales):
    ins, outs = kernel_dims(inner, spec)
    if rslora or r != out_rank or m_alpha != alpha:
      b = b.astype(np.float64) * (scale * out_rank / alpha)  # this module's scale, ours
    a = np.pad(a.astype(dtype), ((0, 0), (0, out_rank - r)))  # [in, R]
    b = np.pad(b.astype(dtype), ((0, out_rank - r), (0, 0)))  # [R, out]
    flat[(block, inner)] = (a.reshape(ins + (out_rank,)),    # [*I, R]
                            b.reshape((out_rank,) + outs))   # [R, *O]
  return _assemble(flat, spec, out_rank, chosen, dtype), alpha, out_rank


def _assemble(flat, spec: spec_lib.ModelSpec, rank: int, chosen, dtype) -> Dict[str, Any]:
  """The adapter tree of {(block, inner): (a, b)}, scanned or unrolled as the spec says."""
  inners = {inner for _, inner in flat}
  blocks = {block for block, _ in flat}
  if chosen is not None:
    inners = {inner for inner, target in _TARGET_OF.items() if target in chosen}
    blocks = set(range(spec.depth))
  tree = {}

  def factors(block, inner):
    if (block, inner) in flat:
      return flat[(block, inner)]
    ins, outs = kernel_dims(inner, spec)
    return np.zeros(ins + (rank,), dtype), np.zeros((rank,) + outs, dtype)

  for inner in sorted(inners):
    if spec.scan_layers:
      pairs = [factors(block, inner) for block in range(spec.depth)]
      tree[('blocks',) + inner + ('a',)] = np.stack([a for a, _ in pairs])  # [L, *I, R]
      tree[('blocks',) + inner + ('b',)] = np.stack([b for _, b in pairs])  # [L, R, *O]
    else:
      for block in sorted(blocks):
        if chosen is None and (block, inner) not in flat:
          continue
        a, b = factors(block, inner)
        tree[(f'blocks_{block}',) + inner + ('a',)] = a
        tree[(f'blocks_{block}',) + inner + ('b',)] = b
  return traverse_util.unflatten_dict(tree)


def targets_of(state_dict: Iterable[str]) -> Tuple[str, ...]:
  """The model/lora.py target names (TARGETS order) that a file's keys adapt."""
  names = {_TARGET_OF[_parse_key(key, 1 << 30)[1]] for key in state_dict}
  return tuple(n for n in lora.TARGETS if n in names)


# ------------------------------------------------------------------------------ files

def write_file(path: str, state_dict: Dict[str, np.ndarray],
               metadata: Optional[Dict[str, str]] = None) -> str:
  """Writes a safetensors file (local or a bucket; no torch) with string `metadata`."""
  data = safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in state_dict.items()},
                                metadata=metadata)
  return paths.write_bytes(path, data)


def read_file(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
  """(tensors as numpy arrays, the header's `__metadata__`) of a safetensors file (local
  or a bucket; no torch). BF16 comes as ml_dtypes.bfloat16, which safetensors' numpy
  `load` of bytes does not know, so the header is read here."""
  data = paths.read_bytes(path)
  try:
    (size,) = struct.unpack('<Q', data[:8])
    header = json.loads(data[8:8 + size])
  except (struct.error, ValueError) as e:
    raise ValueError(f'{path}: not a safetensors file ({e}).') from e
  tensors = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    dtype = _DTYPES.get(info.get('dtype'))
    if dtype is None:
      raise ValueError(f'{path}: tensor {name!r} has dtype {info.get("dtype")!r}; LoRA '
                       f'factors are one of {sorted(_DTYPES)}.')
    start, stop = info['data_offsets']
    count = math.prod(info['shape'])
    if stop - start != count * dtype.itemsize or 8 + size + stop > len(data):
      raise ValueError(f'{path}: tensor {name!r} ({info}) does not fit the file\'s bytes.')
    tensors[name] = np.frombuffer(data, dtype, count, 8 + size + start).reshape(info['shape'])
  return tensors, dict(header.get('__metadata__') or {})


def save(path: str, adapters, spec: spec_lib.ModelSpec, alpha: float, rank: int,
         dtype=None) -> str:
  """`to_diffusers` written to the .safetensors file `path`; returns `path`."""
  state, metadata = to_diffusers(adapters, spec, alpha, rank, dtype)
  return write_file(path, state, metadata)


def load(path: str, spec: spec_lib.ModelSpec, rank: Optional[int] = None, *,
         alpha: Optional[float] = None, targets: Optional[Sequence[str]] = None,
         dtype=np.float32) -> Tuple[Dict[str, Any], float, int]:
  """`from_diffusers` of the .safetensors file `path` and its metadata; a ValueError
  names the file."""
  state, metadata = read_file(path)
  try:
    return from_diffusers(state, spec, rank, alpha=alpha, targets=targets, metadata=metadata,
                          dtype=dtype)
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from e
