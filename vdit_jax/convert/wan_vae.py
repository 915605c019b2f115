r"""Convert diffusers' Wan 2.1 VAE weights (safetensors) into a vdit_jax VAE folder (Orbax).

python -m vdit_jax.convert.wan_vae \
    --safetensors=Wan2.1-T2V-1.3B-Diffusers/vae/diffusion_pytorch_model.safetensors \
    [--config=Wan2.1-T2V-1.3B-Diffusers/vae/config.json] --out=checkpoints/wan21_vae [--overwrite]

--config defaults to the config.json next to the safetensors file (diffusers' layout).
The output folder (`vae/checkpoint.py`) holds the params and the architecture config,
including the latents' per-channel mean and std; load it with `vae.checkpoint.load(DIR)`.

Tensors are read with safetensors' numpy API: no pickle and no torch. The original
Wan2.1_VAE.pth (a pickle) is not read; use the diffusers repackaging. bfloat16/float16
weights are widened to float32. Every parameter of the Flax model must be filled by exactly
one tensor of the file and every tensor used, with the shape the config implies, else the
conversion stops naming the first mismatch.

Exit status: 0 done, 2 bad input (the message says which).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, Tuple

from absl import app
from absl import flags
from absl import logging
import jax
import ml_dtypes  # noqa: F401  # pylint: disable=unused-import  # registers numpy bfloat16
import numpy as np

from vdit_jax.parallel import fatal
from vdit_jax.vae import checkpoint
from vdit_jax.vae.config import VAEConfig

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command line's flags (defined only when run as a program, so that importing
  this module next to other tools defines no clashing flag names)."""
  flags.DEFINE_string('safetensors', None, 'diffusers AutoencoderKLWan weights (.safetensors).')
  flags.DEFINE_string('config', None, 'diffusers config.json (default: next to --safetensors).')
  flags.DEFINE_string('out', None, 'Output folder for the converted VAE.')
  flags.DEFINE_boolean('overwrite', False, 'Replace a VAE already in --out.')


# torch leaf name -> Flax leaf name.
_LEAVES = {'weight': 'kernel', 'bias': 'bias', 'gamma': 'scale'}


def flax_path(key: str) -> Tuple[str, ...]:
  """diffusers state-dict key -> path in the Flax param tree.

  'encoder.down_blocks.3.conv1.weight' -> ('encoder', 'down_blocks_3', 'conv1', 'kernel');
  'decoder.up_blocks.0.upsamplers.0.resample.1.weight'
      -> ('decoder', 'up_blocks_0', 'upsamplers_0', 'resample', 'kernel')
  (`resample` is an nn.Sequential of [pad or upsample, Conv2d]; only the conv has weights).
  """
  parts = key.split('.')
  path = []
  i = 0
  while i < len(parts):
    name = parts[i]
    index = parts[i + 1] if i + 1 < len(parts) and parts[i + 1].isdigit() else None
    if index is None:
      path.append(name)
      i += 1
    elif name == 'resample':
      if index != '1':
        raise ValueError(f'{key!r}: resample.{index} holds no weights in Wan 2.1\'s VAE.')
      path.append('resample')
      i += 2
    else:
      path.append(f'{name}_{index}')
      i += 2
  if path[-1] not in _LEAVES:
    raise ValueError(f'{key!r}: unknown parameter kind {path[-1]!r} (expected one of '
                     f'{sorted(_LEAVES)}).')
  path[-1] = _LEAVES[path[-1]]
  return tuple(path)


def _to_flax_layout(key: str, value: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
  """A torch tensor in the layout of the Flax param of shape `shape` (float32)."""
  value = np.asarray(value).astype(np.float32)
  if key.endswith('.weight'):
    if value.ndim == 5:  # Conv3d [Co, Ci, kt, kh, kw] -> [kt, kh, kw, Ci, Co]
      value = value.transpose(2, 3, 4, 1, 0)
    elif value.ndim == 4:  # Conv2d [Co, Ci, kh, kw] -> [kh, kw, Ci, Co]
      value = value.transpose(2, 3, 1, 0)
    if len(shape) == 2 and value.shape[:2] == (1, 1):  # 1x1 Conv2d -> Dense [Ci, Co]
      value = value.reshape(value.shape[2:])
  elif key.endswith('.gamma'):  # RMS norm scale [C, 1, 1(, 1)] -> [C]
    value = value.reshape(-1)
  if value.shape != tuple(shape):
    raise ValueError(f'{key}: tensor of shape {list(value.shape)} (in Flax layout) does not fit '
                     f'the parameter of shape {list(shape)} that the config implies.')
  return value


def convert_state_dict(state_dict: Dict[str, np.ndarray], cfg: VAEConfig) -> Any:
  """diffusers AutoencoderKLWan state dict (numpy) -> Flax param tree (nested dicts)."""
  abstract = checkpoint.abstract_params(cfg)
  targets = {tuple(k.key for k in path): leaf.shape
             for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  params: Dict[str, Any] = {}
  filled = set()
  for key in sorted(state_dict):
    path = flax_path(key)
    if path not in targets:
      raise ValueError(f'{key} (-> {"/".join(path)}) is not a parameter of the VAE the config '
                       'describes: the weights and config.json do not belong together.')
    if path in filled:
      raise ValueError(f'{key}: two tensors map to {"/".join(path)}.')
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = _to_flax_layout(key, state_dict[key], targets[path])
    filled.add(path)
  missing = sorted('/'.join(p) for p in set(targets) - filled)
  if missing:
    raise ValueError(f'the weights lack {len(missing)} parameter(s) of the configured VAE, '
                     f'e.g. {missing[:5]}.')
  return params


def read_safetensors(path) -> Dict[str, np.ndarray]:
  """All tensors of a .safetensors file as numpy arrays (no pickle, no torch)."""
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  try:
    return safetensors_numpy.load_file(os.fspath(path))
  except Exception as e:  # pylint: disable=broad-except  # SafetensorError names no file
    raise ValueError(f'{os.fspath(path)} is not a readable .safetensors file '
                     f'({type(e).__name__}: {str(e).strip()[:300]}): expected the VAE weights '
                     "of a diffusers Wan 2.1 folder (vae/diffusion_pytorch_model.safetensors); "
                     'the file is cut short (an unfinished download?) or foreign.') from e


def convert(safetensors_path, config_path, out, *, overwrite: bool = False) -> str:
  """Reads the weights and config, writes the VAE folder `out`; returns its path."""
  for name, path in (('--safetensors', safetensors_path), ('--config', config_path)):
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{name}={path!r} is not a file.')
  if os.path.exists(os.path.join(out, checkpoint.INFO_NAME)) and not overwrite:
    raise ValueError(f'--out={out!r} already holds a VAE; pass --overwrite to replace it.')
  try:
    with open(config_path) as f:
      diffusers_config = json.load(f)
  except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
    raise ValueError(f'{config_path} is not a JSON file ({e}): expected the config.json of '
                     "a diffusers Wan 2.1 VAE (vae/config.json).") from None
  cfg = VAEConfig.from_diffusers(diffusers_config)
  params = convert_state_dict(read_safetensors(safetensors_path), cfg)
  return checkpoint.save(out, cfg, params, source=os.path.abspath(safetensors_path),
                         diffusers_config=diffusers_config)


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every step of a save at INFO
  for name in ('safetensors', 'out'):
    if FLAGS[name].value is None:
      raise app.UsageError(f'--{name} is required.')
  config_path = FLAGS.config or os.path.join(os.path.dirname(FLAGS.safetensors), 'config.json')
  try:
    out = convert(FLAGS.safetensors, config_path, FLAGS.out, overwrite=FLAGS.overwrite)
  except (ValueError, FileNotFoundError) as e:
    print(f'convert_wan_vae: error: {e}', file=sys.stderr)
    return 2
  cfg, _ = checkpoint.load(out)
  print(f'convert_wan_vae: wrote {out} (z_dim={cfg.z_dim}, {cfg.spatial_factor}x spatial, '
        f'{cfg.temporal_factor}x temporal compression)', flush=True)
  return 0


if __name__ == '__main__':
  _define_flags()
  fatal.run(main)
