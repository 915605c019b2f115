"""Orbax checkpoints of the train state and the data iterator, in one manager."""

import os
from typing import Any, Optional

import grain
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  """Saves `state` (and `data_iter`, when given) every N steps, keeps the newest K.

  Orbax writes each step to a temporary directory and renames it when complete,
  so an interrupted save is never listed as a step to resume from.
  """

  def __init__(self, directory: str, *, keep: int, every_steps: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.every_steps = every_steps
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    return step % self.every_steps == 0

  def save(self, step: int, state: Any, data_iter: Any = None) -> bool:
    items = {'state': ocp.args.StandardSave(state)}
    if data_iter is not None:
      items['data_iter'] = grain.checkpoint.CheckpointSave(data_iter)
    saved = self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    if saved:
      logging.info('Saving checkpoint for step %d to %s', step, self.directory)
    return saved

  def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> Any:
    """Restores step `step` into `abstract_state`'s shapes and shardings.

    `data_iter`, when given, is set in place to the saved iterator position.
    """
    if step not in self.manager.all_steps():
      raise FileNotFoundError(
          f'no complete checkpoint for step {step} in {self.directory} '
          f'(complete steps: {sorted(self.manager.all_steps())}).')
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items['data_iter'] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored['state']

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
