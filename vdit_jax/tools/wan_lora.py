r"""A Wan LoRA run's adapters to and from the .safetensors LoRA format of diffusers / peft.

Export (the adapters `--mode=sample` would use: the newest checkpoint's EMA adapters, else
the newest export; `--step` picks a checkpoint):

  python -m vdit_jax.tools.wan_lora --workdir=runs/wan_lora --output=lora.safetensors \
      [--config=configs/....py] [--step=N]

  --workdir may also be an export of the run (WORKDIR/export/<step>). The config defaults
  to the run's (WORKDIR/config.json, else the export's). Then, in diffusers:
  pipe.load_lora_weights('.', weight_name='lora.safetensors').

Import (a diffusers / peft / original-Wan or kohya LoRA of the same Wan model, written as a
project export of a LoRA run that `--mode=sample --workdir=OUTPUT` reads):

  python -m vdit_jax.tools.wan_lora --config=configs/....py --import_file=x.safetensors \
      --output=runs/imported

  writes OUTPUT/export/0/ (the adapters as `ema_params`, and the config). With the config's
  lora.rank > 0 the adapters take its rank, alpha and targets (a module of another target is
  refused; a smaller rank in the file is zero-padded, its scale folded in); with rank 0 they
  take the file's, and config.json records them. model/wan_lora.py holds the format.
"""

import os
import tempfile
from typing import Optional

from absl import app
from absl import flags
import jax
from jax.experimental import multihost_utils
from ml_collections import config_flags

from vdit_jax import modes
from vdit_jax.config import resolve
from vdit_jax.generate import export as export_lib
from vdit_jax.model import spec as spec_lib
from vdit_jax.model import wan_lora
from vdit_jax.parallel import fatal
from vdit_jax.parallel import paths
from vdit_jax.tools import export as export_tool

IMPORT_STEP = 0  # the step an imported LoRA's export is filed under

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags, defined only when run as a program."""
  config_flags.DEFINE_config_file(
      'config', None, 'A configs/*.py file of the Wan LoRA run (export: default the run\'s '
      'config.json; import: required).', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Export: the LoRA run\'s workdir, or an export of it.')
  flags.DEFINE_integer('step', None, 'Export: the train checkpoint step (default: newest).')
  flags.DEFINE_string('import_file', None, 'Import: a diffusers-format LoRA .safetensors.')
  flags.DEFINE_string('output', None, 'Export: the .safetensors to write; import: the '
                      'directory to write OUTPUT/export/0 in.')


def _run_config(folder: str):
  """The config saved with a run: FOLDER/config.json, else its newest export's."""
  for where in (folder, export_lib.latest(folder) if paths.isdir(folder) else None):
    path = where and paths.join(where, export_lib.CONFIG_FILENAME)
    if path and paths.isfile(path):
      return export_tool.config_from_json(path)
  raise ValueError(f'{folder} holds no {export_lib.CONFIG_FILENAME} (nor an export with one): '
                   'pass --config, the config the LoRA run was trained with.')


def export_adapters(workdir: str, output: str, config=None, step: Optional[int] = None) -> str:
  """Writes the adapters of the LoRA run `workdir` (or of an export of it) to the
  diffusers .safetensors file `output` (process 0 writes); returns `output`."""
  workdir = paths.normalize(workdir)
  if not export_lib.is_complete(workdir):
    return _export(workdir, None, output, config or _run_config(workdir), step)
  parent = os.path.dirname(workdir.rstrip('/'))
  config = config or _run_config(workdir)
  if os.path.basename(parent) == export_lib.EXPORT_DIRNAME:  # WORKDIR/export/<step>
    return _export(os.path.dirname(parent), workdir, output, config, step)
  with tempfile.TemporaryDirectory(prefix='wan_lora_') as scratch:  # an export elsewhere
    return _export(scratch, workdir, output, config, step)


def _export(workdir: str, checkpoint: Optional[str], output: str, config,
            step: Optional[int]) -> str:
  config = resolve.complete(config)
  if config.lora.rank <= 0:
    raise ValueError(f'config.lora.rank={config.lora.rank}: {checkpoint or workdir} is not a '
                     'LoRA run (its params are a whole model, not adapters).')
  # The restore --mode=sample does (newest EMA adapters, else the newest export).
  restored = modes._restored  # pylint: disable=protected-access
  s, adapters, step, _ = restored(config, workdir, checkpoint, step)
  adapters = multihost_utils.process_allgather(adapters, tiled=True)  # host numpy
  if jax.process_index() == 0:
    wan_lora.save(output, adapters, s.model.spec, s.lora.alpha, s.lora.rank)
  print(f'wrote the rank-{s.lora.rank} (alpha {s.lora.alpha:g}) adapters of step {step} on '
        f'{",".join(s.lora.targets)} to {output}', flush=True)
  return output


def import_adapters(file: str, config, output: str) -> str:
  """Writes the LoRA in `file` as the export OUTPUT/export/0 of a LoRA run of `config`'s
  Wan model (see the module doc for rank, alpha and targets); returns the export's path."""
  config = resolve.complete(config)
  spec = spec_lib.from_config(config.model)
  state, metadata = wan_lora.read_file(file)
  lora_cfg = config.lora
  if lora_cfg.rank > 0:
    rank, alpha, targets = int(lora_cfg.rank), float(lora_cfg.alpha), lora_cfg.targets
  else:
    rank, alpha, targets = None, None, ','.join(wan_lora.targets_of(state))
  try:
    adapters, alpha, rank = wan_lora.from_diffusers(
        state, spec, rank, alpha=alpha, targets=targets, metadata=metadata,
        dtype=spec_lib.DTYPES[spec.param_dtype])
  except ValueError as e:
    raise ValueError(f'{file}: {e}') from e
  lora_cfg.rank, lora_cfg.alpha, lora_cfg.targets = rank, alpha, targets
  directory = export_lib.write(export_lib.export_dir(output, IMPORT_STEP), adapters, config,
                               step=IMPORT_STEP, which='ema_params')
  print(f'imported {file} as rank-{rank} (alpha {alpha:g}) adapters on {targets} into '
        f'{directory}; sample with --workdir={output} --config.lora.rank={rank} '
        f'--config.lora.alpha={alpha!r} --config.lora.targets={targets} and '
        '--config.lora.base_checkpoint=<the base model>.', flush=True)
  return directory


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS.output:
    raise app.UsageError('--output is required.')
  if (FLAGS.workdir is None) == (FLAGS.import_file is None):
    raise app.UsageError('give one of --workdir (export a run\'s adapters) and --import_file '
                         '(import a diffusers LoRA).')
  if FLAGS.import_file is not None:
    if FLAGS.config is None:
      raise app.UsageError('--import_file needs --config, the Wan LoRA run\'s config.')
    import_adapters(FLAGS.import_file, FLAGS.config, FLAGS.output)
  else:
    export_adapters(FLAGS.workdir, FLAGS.output, FLAGS.config, FLAGS.step)


if __name__ == '__main__':
  define_flags()
  fatal.run(main)
