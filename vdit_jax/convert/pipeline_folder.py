"""Where a component of a downloaded diffusers pipeline folder lies."""

import os


def component(folder, subfolder: str, marker: str) -> str:
  """`folder` itself if it holds `marker`, else folder/subfolder if that does: a component
  (text_encoder/, tokenizer/, image_encoder/, ...) given as the pipeline folder or as the
  component's own folder. Raises ValueError naming both places looked at."""
  folder = os.fspath(folder)
  for candidate in (folder, os.path.join(folder, subfolder)):
    if os.path.isfile(os.path.join(candidate, marker)):
      return candidate
  raise ValueError(f'neither {os.path.join(folder, marker)} nor '
                   f'{os.path.join(folder, subfolder, marker)} exists: give the Wan pipeline '
                   f'folder or its {subfolder}/ folder.')
