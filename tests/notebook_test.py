"""notebooks/quickstart.ipynb runs top to bottom in a Jupyter kernel (with a shrunk model)."""

import os

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'notebooks', 'quickstart.ipynb')

# Replaces the values of the notebook's 'parameters' cell (papermill's convention: a cell
# inserted right after it). A few steps of a one-block model on 4-frame 16x16 clips.
SMOKE_PARAMETERS = """
NUM_STEPS = 2
SAMPLE_STEPS = 2
WORKDIR = {workdir!r}
CONFIG_OVERRIDES = {{
    'model.depth': 1, 'model.width': 96, 'model.num_heads': 2, 'model.mlp_dim': 96,
    'data.num_frames': 4, 'data.height': 16, 'data.width': 16,
    'train.batch_size': 2, 'sample.num_samples': 2, 'checkpoint.async_save': False,
}}
"""


def _outputs(cell, output_type=None):
  return [o for o in cell.get('outputs', []) if output_type in (None, o['output_type'])]


def _text(cell):
  return ''.join(o.get('text', '') for o in _outputs(cell, 'stream'))


def test_quickstart_notebook_executes(tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  (index,) = [i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', [])]
  injected = nbformat.v4.new_code_cell(SMOKE_PARAMETERS.format(workdir=str(tmp_path / 'run')))
  injected.metadata['tags'] = ['injected-parameters']
  nb.cells.insert(index + 1, injected)

  # The kernel inherits this process's environment (JAX_PLATFORMS=cpu from conftest.py)
  # and starts in notebooks/, as Jupyter would.
  NotebookClient(nb, timeout=300, kernel_name='python3',
                 resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}}).execute()

  code = [c for c in nb.cells if c.cell_type == 'code']
  assert all(not _outputs(c, 'error') for c in code)  # execute() raises on one anyway
  all_text = ''.join(_text(c) for c in code)
  assert 'step 2/2' in all_text and 'wrote samples' in all_text

  def images(mime):
    return [c for c in code for o in _outputs(c, 'display_data') if mime in o['data']]

  # The loss curve as a PNG; the end-of-training samples and the by-label samples as GIFs.
  assert len(images('image/png')) == 1
  gifs = images('image/gif')
  assert len(gifs) == 2
  assert 'square moving left' in _text(gifs[1])
  assert os.path.isfile(tmp_path / 'run' / 'loss.png')
  assert os.path.isfile(tmp_path / 'run' / 'samples' / 'by_label_step_2.gif')
