"""A VAE on disk: its architecture config and its params, loadable without the code that made it.

DIR/
  params/     Orbax StandardCheckpointer tree of the float32 params (as `WanVAE.init` makes)
  vae.json    {"format": "vdit_jax.vae.v1", "config": VAEConfig fields, ...info}; written
              last, so a folder without it is unfinished and is never read

Both `tools/convert_wan_vae.py` (published weights) and `vae/train.py` (a VAE trained here)
write this, and `load` reads either. DIR may be local or a bucket URL (gs://): the params go
through Orbax (tensorstore), vae.json through `parallel.paths`.
"""

from __future__ import annotations

import json
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from vdit_jax.parallel import paths
from vdit_jax.vae.config import VAEConfig
from vdit_jax.vae.model import WanVAE

FORMAT = 'vdit_jax.vae.v1'
INFO_NAME = 'vae.json'
PARAMS_NAME = 'params'


def abstract_params(cfg: VAEConfig) -> Any:
  """The params' shapes and dtypes (jax.ShapeDtypeStruct tree), computed without FLOPs."""
  t, s = cfg.temporal_factor, cfg.spatial_factor
  video = jax.ShapeDtypeStruct((1, 1 + t, s, s, cfg.in_channels), jnp.float32)
  variables = jax.eval_shape(WanVAE(cfg).init, jax.random.PRNGKey(0), video)
  return nn.unbox(variables['params'])


def init_params(cfg: VAEConfig, rng: jax.Array) -> Any:
  """Freshly initialised float32 params, distributed as the layers' initializers say.

  Kernels `[..., Ci, Co]` are uniform with variance 1 / fan_in (`layers.KERNEL_INIT`),
  biases 0, norm scales 1, like `WanVAE(cfg).init` but with ONE random draw for all
  kernels: XLA:CPU compiles each of init's ~100 separate threefry draws for about a second
  (measured: 70 s of CPU time for jit(WanVAE.init) of a 4-level VAE on this project's
  2-core machine, against a few seconds here).
  """
  abstract = abstract_params(cfg)
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  kernels = [leaf for path, leaf in flat if path[-1].key == 'kernel']
  sizes = [int(np.prod(leaf.shape)) for leaf in kernels]
  total = sum(sizes)
  noise = np.asarray(jax.jit(lambda key: jax.random.uniform(
      key, (total,), jnp.float32, -1.0, 1.0))(rng))  # [N], sliced on the host
  offsets = np.cumsum([0] + sizes)
  values, k = [], 0
  for path, leaf in flat:
    name = path[-1].key
    if name == 'kernel':
      fan_in = int(np.prod(leaf.shape[:-1]))
      draw = noise[offsets[k]:offsets[k + 1]].reshape(leaf.shape)
      values.append(draw * np.float32(np.sqrt(3.0 / fan_in)))
      k += 1
    elif name == 'scale':
      values.append(np.ones(leaf.shape, leaf.dtype))
    elif name == 'bias':
      values.append(np.zeros(leaf.shape, leaf.dtype))
    else:
      raise ValueError(f'init_params: no initializer for parameter {jax.tree_util.keystr(path)}.')
  return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(v) for v in values])


def save(directory, cfg: VAEConfig, params: Any, **info) -> str:
  """Writes `params` and `cfg` (plus JSON-able `info`) to `directory`; returns its path
  (`paths.normalize`d: absolute, or the bucket URL)."""
  directory = paths.normalize(directory)
  want = jax.tree_util.tree_map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype).name),
                                abstract_params(cfg))
  got = jax.tree_util.tree_map(lambda a: (tuple(np.shape(a)), jnp.dtype(a.dtype).name), params)
  if got != want:
    raise ValueError(f'params do not match the VAE config {cfg}: '
                     f'{_first_difference(want, got)}.')
  paths.makedirs(directory)
  info_path = paths.join(directory, INFO_NAME)
  paths.remove(info_path)  # first: a half-replaced folder must not look complete
  checkpointer = ocp.StandardCheckpointer()
  try:
    checkpointer.save(paths.join(directory, PARAMS_NAME), params, force=True)
    checkpointer.wait_until_finished()
  finally:
    checkpointer.close()
  record = {'format': FORMAT, 'config': cfg.to_dict(), **info}
  paths.write_text(info_path, json.dumps(record, indent=2) + '\n')  # whole, last
  return directory


def _first_difference(want, got) -> str:
  want_flat = dict(jax.tree_util.tree_flatten_with_path(want)[0])
  got_flat = dict(jax.tree_util.tree_flatten_with_path(got)[0])
  for path in sorted(set(want_flat) | set(got_flat), key=str):
    name = jax.tree_util.keystr(path)
    if path not in got_flat:
      return f'{name} is missing'
    if path not in want_flat:
      return f'{name} is not a parameter of this architecture'
    if want_flat[path] != got_flat[path]:
      return f'{name} is {got_flat[path]}, the config needs {want_flat[path]}'
  return 'the tree structures differ'


def read_info(directory) -> dict:
  """The parsed vae.json of a VAE folder; raises naming the folder if it is not one."""
  directory = paths.normalize(directory)
  path = paths.join(directory, INFO_NAME)
  if not paths.isfile(path):
    found = paths.listdir(directory) if paths.isdir(directory) else None
    raise FileNotFoundError(
        f'{directory} is not a VAE folder: it has no {INFO_NAME} (contents: {found}). Make '
        'one with python -m vdit_jax.convert.wan_vae or python -m vdit_jax.train.vae.')
  info = json.loads(paths.read_text(path))
  if info.get('format') != FORMAT:
    raise ValueError(f'{path}: format={info.get("format")!r}, expected {FORMAT!r}.')
  return info


def load(directory, dtype: str | None = None) -> Tuple[VAEConfig, Any]:
  """(config, float32 params) of the VAE in `directory`; `dtype` overrides the compute dtype."""
  info = read_info(directory)
  config = dict(info['config'])
  if dtype is not None:
    config['dtype'] = dtype
  cfg = VAEConfig.from_dict(config)
  directory = paths.normalize(directory)
  # Every process reads the whole VAE onto its own first device (it decodes its samples
  # there): without a target sharding Orbax would put each array on the device that saved
  # it, which another process of a multi-host run does not have.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                        abstract_params(cfg))
  checkpointer = ocp.StandardCheckpointer()
  try:
    params = checkpointer.restore(paths.join(directory, PARAMS_NAME), target)
  except Exception as e:  # pylint: disable=broad-except  # Orbax/TensorStore raise many kinds
    raise ValueError(f'could not restore the VAE params in {directory} ({type(e).__name__}: '
                     f'{str(e).strip()[:400]}).') from e
  finally:
    checkpointer.close()
  return cfg, params
