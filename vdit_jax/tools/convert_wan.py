r"""Convert a Wan 2.1 diffusers folder's transformer into a vdit_jax export (params + config).

python -m vdit_jax.tools.convert_wan --input=Wan2.1-T2V-1.3B-Diffusers --output=wan_export \
    [--overwrite]

The output is what `--mode=export` writes (generate/export.py): params/ (Orbax), config.json
(the DiT configured as Wan: model/wan.py's mapping of the folder's transformer/config.json,
flow matching with the folder's scheduler shift, UniPC with CFG 5) and export.json. Sample from
it with `--mode=sample --checkpoint=wan_export` (configs/wan.py), or fine-tune LoRA on it with
`--config.lora.base_checkpoint=wan_export`. The weights are read with safetensors (no torch,
no pickle), each tensor through model/wan.py's recipes onto this host's devices (an fsdp
mesh over all of them), so the host never holds a second copy of the model. Loading straight
from the folder at run time needs no conversion: --config.train.init_from=FOLDER.

Exit status: 0 done, 2 bad input (the message says which).
"""

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax

from vdit_jax.config import defaults
from vdit_jax.config import resolve
from vdit_jax.generate import export as export_lib
from vdit_jax.model import dit
from vdit_jax.model import spec as spec_lib
from vdit_jax.model import wan
from vdit_jax.parallel import fatal
from vdit_jax.parallel import mesh as mesh_lib
from vdit_jax.parallel import paths
from vdit_jax.train import state as state_lib

FLAGS = flags.FLAGS
DEFAULT_SHIFT = 3.0  # Wan 2.1 at 480p (5.0 at 720p)


def _define_flags() -> None:
  flags.DEFINE_string('input', None, 'A Wan 2.1 diffusers folder (or its transformer/).')
  flags.DEFINE_string('output', None, 'The export folder to write.')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing export in --output.')


def _scheduler_shift(path: str) -> float:
  """flow_shift of the folder's scheduler/scheduler_config.json, else DEFAULT_SHIFT."""
  file = os.path.join(path, 'scheduler', 'scheduler_config.json')
  if not os.path.isfile(file):
    return DEFAULT_SHIFT
  with open(file) as f:
    return float(json.load(f).get('flow_shift', DEFAULT_SHIFT))


def wan_config(path: str):
  """The complete config of the DiT configured as the Wan transformer in `path`."""
  hf = wan.read_config(path)
  config = defaults.base_config()
  wan.apply_overrides(config.model, hf)
  config.model.dtype = 'bfloat16'
  config.data.source = 'shards'
  config.data.latents = True
  config.data.channels = int(hf['out_channels'])
  config.data.num_frames, config.data.height, config.data.width = 21, 60, 104  # 480p x 81
  config.diffusion.objective = 'flow'
  config.diffusion.shift = _scheduler_shift(path)
  config.sample.sampler = 'unipc'
  config.sample.cfg_scale = 5.0
  config.sample.num_steps = 50
  config.sample.use_ema = False
  config.mesh.data = 1
  config.mesh.fsdp = -1
  return resolve.complete(config)


def convert(path: str, out: str, *, overwrite: bool = False) -> str:
  """Reads the transformer of `path` onto this host's devices and writes the export `out`."""
  out = paths.normalize(out)
  if export_lib.is_complete(out) and not overwrite:
    raise ValueError(f'--output={out!r} already holds an export; pass --overwrite to '
                     'replace it.')
  config = wan_config(path)
  spec = spec_lib.from_config(config.model)
  model = dit.build_model(spec, config.data.channels, 0)
  boxed = jax.eval_shape(model.init, jax.random.key(0),
                         *state_lib.model_inputs(config.data, 1))['params']
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.logical_axis_rules)
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
  params = wan.load_params(path, spec, nn.unbox(boxed), shardings)
  return export_lib.write(out, params, config, step=0, which='params')


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every step of a save at INFO
  for name in ('input', 'output'):
    if FLAGS[name].value is None:
      raise app.UsageError(f'--{name} is required.')
  try:
    out = convert(FLAGS.input, FLAGS.output, overwrite=FLAGS.overwrite)
  except (ValueError, FileNotFoundError) as e:
    print(f'convert_wan: error: {e}', file=sys.stderr)
    return 2
  print(f'convert_wan: wrote {out}', flush=True)
  return 0


if __name__ == '__main__':
  _define_flags()
  fatal.run(main)
