"""Exports: the sampling params alone (no optimizer state, no data position) plus the config.

WORKDIR/export/<step>/
  params/        Orbax StandardCheckpointer tree of the params (EMA by default)
  config.json    the config of the run that trained them
  export.json    {"step", "params": "ema_params" | "params"}; written last, so an
                 export without it is unfinished and is never read
"""

import json
import os
from typing import Any, Optional, Tuple

import jax
import orbax.checkpoint as ocp

EXPORT_DIRNAME = 'export'
PARAMS_DIRNAME = 'params'
INFO_FILENAME = 'export.json'
CONFIG_FILENAME = 'config.json'


def export_dir(workdir: str, step: int) -> str:
  return os.path.join(os.path.abspath(workdir), EXPORT_DIRNAME, str(step))


def write(directory: str, params: Any, config, *, step: int, which: str) -> str:
  """Writes `params` (sharded jax.Arrays; every process calls this) to `directory`."""
  directory = os.path.abspath(directory)
  checkpointer = ocp.StandardCheckpointer()
  # force: an export of the same step again (e.g. an unfinished one) is replaced.
  checkpointer.save(os.path.join(directory, PARAMS_DIRNAME), params, force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()
  if jax.process_index() == 0:
    with open(os.path.join(directory, CONFIG_FILENAME), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
    with open(os.path.join(directory, INFO_FILENAME), 'w') as f:
      json.dump({'step': int(step), 'params': which}, f)
  return directory


def is_complete(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, INFO_FILENAME))


def latest(workdir: str) -> Optional[str]:
  """The complete export of the highest step under WORKDIR/export, or None."""
  root = os.path.join(os.path.abspath(workdir), EXPORT_DIRNAME)
  if not os.path.isdir(root):
    return None
  steps = sorted(int(name) for name in os.listdir(root)
                 if name.isdigit() and is_complete(os.path.join(root, name)))
  return os.path.join(root, str(steps[-1])) if steps else None


def read(directory: str, abstract_params: Any) -> Tuple[Any, dict]:
  """(params restored into `abstract_params`' shapes and shardings, export.json contents)."""
  directory = os.path.abspath(directory)
  if not is_complete(directory):
    found = sorted(os.listdir(directory)) if os.path.isdir(directory) else None
    raise FileNotFoundError(
        f'{directory} is not a complete export: it has no {INFO_FILENAME} '
        f'(contents: {found}). Write one with --mode=export, which creates '
        f'WORKDIR/{EXPORT_DIRNAME}/<step>/.')
  with open(os.path.join(directory, INFO_FILENAME)) as f:
    info = json.load(f)
  checkpointer = ocp.StandardCheckpointer()
  try:
    params = checkpointer.restore(os.path.join(directory, PARAMS_DIRNAME), abstract_params)
  except Exception as e:  # pylint: disable=broad-except  # Orbax/TensorStore raise many kinds
    raise ValueError(
        f'could not restore the params exported in {directory} ({type(e).__name__}: '
        f'{str(e).strip()[:400]}). The config must describe the model that was exported; '
        f'compare it with {os.path.join(directory, CONFIG_FILENAME)}.') from e
  finally:
    checkpointer.close()
  return params, info
