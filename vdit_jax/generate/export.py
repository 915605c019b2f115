"""Exports: the sampling params alone (no optimizer state, no data position) plus the config.

WORKDIR/export/<step>/
  params/        Orbax StandardCheckpointer tree of the params (EMA by default)
  config.json    the config of the run that trained them
  export.json    {"step", "params": "ema_params" | "params"}; written last, so an
                 export without it is unfinished and is never read
"""

import json
from typing import Any, Optional, Tuple

import jax
import orbax.checkpoint as ocp

from vdit_jax.parallel import paths

EXPORT_DIRNAME = 'export'
PARAMS_DIRNAME = 'params'
INFO_FILENAME = 'export.json'
CONFIG_FILENAME = 'config.json'


def export_dir(workdir: str, step: int) -> str:
  return paths.join(workdir, EXPORT_DIRNAME, str(step))


def write(directory: str, params: Any, config, *, step: int, which: str) -> str:
  """Writes `params` (sharded jax.Arrays; every process calls this) to `directory`."""
  directory = paths.normalize(directory)
  checkpointer = ocp.StandardCheckpointer()
  # force: an export of the same step again (e.g. an unfinished one) is replaced.
  checkpointer.save(paths.join(directory, PARAMS_DIRNAME), params, force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()
  if jax.process_index() == 0:
    paths.write_text(paths.join(directory, CONFIG_FILENAME),
                     config.to_json_best_effort(indent=2))
    paths.write_text(paths.join(directory, INFO_FILENAME),
                     json.dumps({'step': int(step), 'params': which}))
  return directory


def is_complete(directory: str) -> bool:
  return paths.isfile(paths.join(directory, INFO_FILENAME))


def latest(workdir: str) -> Optional[str]:
  """The complete export of the highest step under WORKDIR/export, or None."""
  root = paths.join(workdir, EXPORT_DIRNAME)
  steps = sorted(int(name) for name in paths.listdir(root)
                 if name.isdigit() and is_complete(paths.join(root, name)))
  return paths.join(root, str(steps[-1])) if steps else None


def read(directory: str, abstract_params: Any) -> Tuple[Any, dict]:
  """(params restored into `abstract_params`' shapes and shardings, export.json contents)."""
  directory = paths.normalize(directory)
  if not is_complete(directory):
    found = paths.listdir(directory) if paths.isdir(directory) else None
    raise FileNotFoundError(
        f'{directory} is not a complete export: it has no {INFO_FILENAME} '
        f'(contents: {found}). Write one with --mode=export, which creates '
        f'WORKDIR/{EXPORT_DIRNAME}/<step>/.')
  info = json.loads(paths.read_text(paths.join(directory, INFO_FILENAME)))
  checkpointer = ocp.StandardCheckpointer()
  try:
    params = checkpointer.restore(paths.join(directory, PARAMS_DIRNAME), abstract_params)
  except Exception as e:  # pylint: disable=broad-except  # Orbax/TensorStore raise many kinds
    raise ValueError(
        f'could not restore the params exported in {directory} ({type(e).__name__}: '
        f'{str(e).strip()[:400]}). The config must describe the model that was exported; '
        f'compare it with {paths.join(directory, CONFIG_FILENAME)}.') from e
  finally:
    checkpointer.close()
  return params, info
