"""tools/export.py + serving.py: the exported bf16 sampler matches the in-process sampler."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from tests.conftest import shrink
from tests.gcs_emulator import gcs  # pylint: disable=unused-import  # the fixture
from vdit_jax.generate import serving
from vdit_jax.data import video_io
from vdit_jax.diffusion import objectives
from vdit_jax.tools import export as export_tool
from vdit_jax.generate import export as export_lib
from vdit_jax.train import loop
from vdit_jax.generate import sampling
from vdit_jax.train import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = 7
LABELS = [1, 5, 11]  # 'square moving left', 'circle moving left', 'triangle moving up'
SEED = 3


def _config():
  return shrink(tiny.get_config(), small=('model', 'data'), model=dict(mlp_dim=64),
                data=dict(num_frames=3), checkpoint=dict(async_save=False),
                # use_ema: the checkpoint below perturbs the EMA params (tiny: raw)
                sample=dict(num_steps=3, num_samples=3, use_ema=True))


def _env():
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env['PYTHONPATH'] = os.pathsep.join([REPO] + [p for p in [env.get('PYTHONPATH')] if p])
  env.pop('XLA_FLAGS', None)
  return env


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """A workdir with a checkpoint (EMA params perturbed, so that the adaLN-zero model is
  not identically zero) and config.json, exported by the command line tool."""
  workdir = str(tmp_path_factory.mktemp('run'))
  config = _config()
  s = loop.build(config, workdir)
  state, _ = state_lib.create_state(s.init_fn, jax.random.key(0), s.mesh, s.rules)
  leaves, treedef = jax.tree.flatten(state.ema_params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  ema = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])
  s.checkpointer.save(STEP, state.replace(ema_params=ema))
  s.checkpointer.wait()
  s.checkpointer.close()
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))

  result = subprocess.run(
      [sys.executable, '-m', 'vdit_jax.tools.export', f'--workdir={workdir}'],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
  export_dir = export_lib.export_dir(workdir, STEP)
  return {'config': config, 'workdir': workdir, 'export_dir': export_dir,
          'sampler_dir': os.path.join(export_dir, export_tool.SAMPLER_DIRNAME),
          'stdout': result.stdout}


def _in_process_reference(config, export_dir):
  """The training code's own sampler (train/sampling.py) on the same bf16 weights."""
  num_classes = 12
  params, _ = export_tool.restore_params(export_dir, config, num_classes)
  model = export_tool.sampler_model(config, num_classes)  # bf16 params and compute
  diffusion = objectives.Diffusion.from_config(config.diffusion)
  sample_fn = sampling.make_sample_fn(model, diffusion, config.sample, config.data,
                                      num_classes, config.sample.num_samples)
  videos = jax.jit(sample_fn)(export_tool.to_bfloat16(params), jax.random.key(SEED),
                              jnp.asarray(LABELS, jnp.int32))
  return params, np.asarray(videos)


def test_tool_writes_params_export_then_sampler(exported):
  # The checkpoint had no export: the tool wrote one (--mode=export's layout), then the
  # sampler beside it.
  assert export_lib.latest(exported['workdir']) == exported['export_dir']
  assert sorted(os.listdir(exported['sampler_dir'])) == sorted(
      [serving.MANIFEST_FILENAME, serving.SAMPLER_FILENAME, serving.WEIGHTS_FILENAME])
  with open(os.path.join(exported['sampler_dir'], serving.MANIFEST_FILENAME)) as f:
    manifest = json.load(f)
  assert manifest['step'] == STEP and manifest['params'] == 'ema_params'
  assert manifest['platforms'] == ['cpu', 'cuda', 'tpu']
  assert manifest['video_shape'] == [3, 3, 16, 16, 3]
  assert manifest['label_names'][1] == 'square moving left'
  config = _config()
  assert manifest['sampler']['shift'] == (config.sample.shift or config.diffusion.shift)
  assert 'python -m vdit_jax.generate.serving' in exported['stdout']


def test_exported_sampler_reproduces_in_process_sampler(exported):
  config = exported['config']
  params, reference = _in_process_reference(config, exported['export_dir'])
  assert np.isfinite(reference).all() and reference.std() > 0.05

  sampler = serving.load(exported['sampler_dir'])
  # The weights are the bf16 cast of the exported EMA params, bit for bit.
  flat = jax.tree.leaves(export_tool.to_bfloat16(params))
  assert len(sampler.weights) == len(flat)
  for got, want in zip(sampler.weights, flat):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16),
                                  np.asarray(want).view(np.uint16))

  # A process that imports only the loader (jax + numpy: no flax, no training code).
  out = os.path.join(exported['workdir'], 'served.npy')
  gif = os.path.join(exported['workdir'], 'served.gif')
  script = f'''
import sys
import numpy as np
from vdit_jax.generate import serving
sampler = serving.load({exported['sampler_dir']!r})
videos = sampler.sample(['square moving left', 5, 'triangle moving up'], seed={SEED})
np.save({out!r}, videos)
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('flax', 'optax', 'orbax', 'grain')
               or m.startswith(('vdit_jax.train', 'vdit_jax.model', 'vdit_jax.diffusion')))
assert not heavy, heavy
serving.main(['--sampler', {exported['sampler_dir']!r}, '--labels', 'square moving left,5',
              '--seed', '{SEED}', '--out', {gif!r}])
'''
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
  served = np.load(out)
  assert served.shape == reference.shape == (3, 3, 16, 16, 3)
  np.testing.assert_allclose(served, reference, rtol=0, atol=1e-6)
  frames = video_io.read_video(gif)  # the command line's grid of the first two clips
  assert frames.shape[0] == 3 and frames.shape[-1] == 3


def test_loader_checks_its_inputs(exported):
  sampler = serving.load(exported['sampler_dir'])
  assert sampler.label_id('circle moving up') == 7
  assert sampler.label_id(11) == 11
  with pytest.raises(ValueError, match="'red square' is not a class name"):
    sampler.label_id('red square')
  with pytest.raises(ValueError, match=r'not in \[0, 12\)'):
    sampler.label_id(12)
  with pytest.raises(ValueError, match='exported for 1 to 3 clips'):
    sampler.sample([0, 1, 2, 3])
  with pytest.raises(ValueError, match='seed'):
    sampler.sample([0], seed=-1)
  with pytest.raises(ValueError, match='noise shape'):
    sampler.sample([0], noise=np.zeros((1, 3, 16, 16, 3), np.float32))
  with pytest.raises(FileNotFoundError, match='not an exported sampler'):
    serving.load(exported['export_dir'])


@pytest.mark.parametrize('name, expected', [
    (serving.WEIGHTS_FILENAME, r'not readable as the \.npz of the weights'),
    (serving.SAMPLER_FILENAME, 'not readable as a serialised jax.export sampler'),
    (serving.MANIFEST_FILENAME, 'not readable as the JSON manifest'),
])
def test_truncated_files_are_named_with_what_was_expected(exported, tmp_path, name, expected):
  copy = tmp_path / 'sampler'
  shutil.copytree(exported['sampler_dir'], copy)
  path = copy / name
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  with pytest.raises(ValueError, match=re.escape(str(path)) + ' is ' + expected +
                     r'.*truncated or damaged'):
    serving.load(str(copy))


def test_export_tool_names_a_folder_that_is_not_an_export(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'vdit_jax.tools.export', f'--export_dir={tmp_path}'],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode != 0
  last = (result.stdout + result.stderr).strip().splitlines()[-1]
  assert f'--export_dir={tmp_path} is not a complete export (it lacks export.json' in last, last


def test_text_conditioned_and_lora_runs_are_refused():
  config = _config()
  with config.unlocked():
    config.model.conditioning = 'text'
  with pytest.raises(ValueError, match="model.conditioning='text'"):
    export_tool.check_supported(config)
  config = _config()
  with config.unlocked():
    config.lora = {'rank': 4}
  with pytest.raises(ValueError, match='config.lora.rank=4'):
    export_tool.check_supported(config)


def test_sampler_written_to_a_bucket_is_served_from_it(exported, gcs):
  """tools.export --out=gs://... writes the sampler to a bucket (the GCS emulator of
  tests/gcs_emulator.py) and serving.load reads it from there: the same weights, bit for
  bit, as the local export."""
  out = f'gs://{gcs.new_bucket()}/sampler'
  result = subprocess.run(
      [sys.executable, '-m', 'vdit_jax.tools.export', f'--workdir={exported["workdir"]}',
       f'--out={out}', '--platforms=cpu'],
      cwd=REPO, env=dict(_env(), **gcs.env), capture_output=True, text=True, timeout=300,
      check=False)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  remote, local = serving.load(out), serving.load(exported['sampler_dir'])
  assert remote.video_shape == local.video_shape
  for got, want in zip(remote.weights, local.weights):
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16),
                                  np.asarray(want).view(np.uint16))
  videos = remote.sample([0, 1, 2], seed=0)
  assert videos.shape == tuple(local.video_shape) and np.isfinite(videos).all()
