"""The shipped configs: each one loads, validates and builds its model (the smoke tests, a
few seconds, over every file in configs/ and every variant it names), and on the meshes
README.md shows each mesh's losses equal one device's.

configs_multidevice.py trains every config a few steps with its own defaults (it lists the
few departures) in a fresh process, once with 1 CPU device and once with 8 fake ones on
each mesh, and samples fewer clips than the batch axes split. The suite runs CI_MATRIX
on the data x fsdp x tensor mesh that the default attention once broke (splash traced at
init on a batch of 1); VDIT_FULL_CONFIG_MATRIX=1 runs
every config on every mesh and through the 2-process launcher (docs/results.md, "Every
config on every mesh", has the last run and its time).
"""

import concurrent.futures
import glob
import importlib
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from array_record.python import array_record_module

from configs import tiny_latent
from configs import vae_tiny
from tests import configs_multidevice as matrix
from tests import multidevice
from vdit_jax.config import validate
from vdit_jax.data import pipeline
from vdit_jax.data import shards
from vdit_jax.model import dit
from vdit_jax.model import spec as spec_lib
from vdit_jax.tools import encode_latents
from vdit_jax.train import metrics as metrics_lib
from vdit_jax.train import state as state_lib
from vdit_jax.vae import checkpoint as vae_checkpoint
from vdit_jax.vae.config import VAEConfig
from vdit_jax.train import vae as vae_train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL = os.environ.get('VDIT_FULL_CONFIG_MATRIX') == '1'
# The suite's share: the bucket model (two shapes; 512 tokens, blockwise attention on CPU,
# no token convolution: the shape that deadlocked XLA:CPU, see vdit_jax/runtime.py) on
# data x fsdp x tensor; configs/tiny.py is cli_test's. The rest takes ~35 min here.
CI_MATRIX = (('tiny_buckets',), ('data2_fsdp2_tensor2',))
CONFIGS, MESHES = ((matrix.CONFIGS, tuple(m for m in matrix.MESHES if m != 'one'))
                   if FULL else CI_MATRIX)
# Losses of the same batches on another mesh: the same sums in another order (fp32;
# measured differences are below 1e-6, bf16 configs included).
RTOL = 1e-4


# Smoke tests: every configs/*.py (found by glob, so a new file is covered) and every variant
# its VARIANTS tuple names loads, passes the checks a run makes before compiling, and builds
# its model's params abstractly (jax.eval_shape: no FLOPs). Nothing trains here; the
# matrix below and tests/cli_test.py train them.
CONFIG_NAMES = tuple(sorted(
    os.path.basename(path)[:-3] for path in glob.glob(os.path.join(REPO, 'configs', '*.py'))
    if not os.path.basename(path).startswith('_')))
CONFIG_CASES = tuple(
    (name, variant) for name in CONFIG_NAMES
    for variant in getattr(importlib.import_module(f'configs.{name}'), 'VARIANTS', ('',)))


def _fewest_devices(mesh_cfg) -> int:
  """The smallest device count the config's mesh takes (-1 axes take what is left)."""
  sizes = [mesh_cfg[axis] * mesh_cfg.get(f'dcn_{axis}', 1)
           for axis in ('data', 'fsdp', 'tensor', 'sequence')]
  return math.prod(abs(size) for size in sizes)


def _latent_folder(directory):
  """What configs/tiny_latent.py's argument names, as validation reads it: latent shards
  [3, 4, 4, 16] whose index.json records the VAE folder, and that folder's vae.json for
  configs/vae_tiny.py's architecture (no params: nothing here decodes)."""
  cfg = vae_train.vae_config(vae_tiny.get_config())
  vae_dir = os.path.join(directory, 'vae')
  os.makedirs(vae_dir)
  with open(os.path.join(vae_dir, vae_checkpoint.INFO_NAME), 'w') as f:
    json.dump({'format': vae_checkpoint.FORMAT, 'config': cfg.to_dict()}, f)
  latents = os.path.join(directory, 'latents')
  _write_latent_shards(latents, (3, 4, 4), cfg.z_dim, count=2)
  index = shards.read_index(latents)
  index['vae'] = {'path': vae_dir, 'config': cfg.to_dict(), 'normalized': True}
  shards.write_index(latents, index)
  return latents


def _wan_latent_folder(directory, data):
  """Latent shards of Wan's shape [T', H', W', 16] whose records carry caption_embedding
  [L, 4096], and an index naming a folder with the Wan 2.1 VAE's vae.json (no params)."""
  cfg = VAEConfig()  # the defaults are Wan 2.1's architecture
  vae_dir = os.path.join(directory, 'wan_vae')
  os.makedirs(vae_dir)
  with open(os.path.join(vae_dir, vae_checkpoint.INFO_NAME), 'w') as f:
    json.dump({'format': vae_checkpoint.FORMAT, 'config': cfg.to_dict()}, f)
  latents = os.path.join(directory, 'wan_latents')
  _write_latent_shards(latents, (data.num_frames, data.height, data.width), data.channels,
                       count=2, caption_embedding=(5, 4096))
  index = shards.read_index(latents)
  index['vae'] = {'path': vae_dir, 'config': cfg.to_dict(), 'normalized': True}
  shards.write_index(latents, index)
  return latents


def _smoke_config(name, variant, tmp_path):
  """configs/NAME.py:VARIANT as the command line loads it, with what its run needs on
  disk: tiny_latent's argument is a latent folder, lora_finetune needs a base run, and a
  latent-shaped config on the synthetic (RGB) source (bench, dit_xl_video) trains on the
  shards its docstring's command names."""
  module = importlib.import_module(f'configs.{name}')
  if name == 'wan':  # Wan's latents with umT5 caption embeddings, its VAE's vae.json
    config = module.get_config(variant or None)
    config.data.path = _wan_latent_folder(str(tmp_path), config.data)
    if config.lora.rank:
      config.lora.base_checkpoint = str(tmp_path / 'Wan2.1-T2V-1.3B-Diffusers')  # read later
    return config
  if name == 'tiny_latent':
    assert not variant
    return module.get_config(_latent_folder(str(tmp_path)))
  config = module.get_config(variant or None)
  if name == 'lora_finetune':
    config.lora.base_checkpoint = str(tmp_path / 'base_run')  # read when training starts
  data = config.get('data')
  if data is not None and data.source == 'synthetic' and data.channels != 3:
    path = str(tmp_path / 'latent_shards')
    _write_latent_shards(path, (data.num_frames, data.height, data.width), data.channels,
                         count=2)
    data.source, data.path = 'shards', path
  return config


def test_smoke_cases_cover_every_config_file():
  assert CONFIG_NAMES, 'no configs/*.py found'
  assert {name for name, _ in CONFIG_CASES} == set(CONFIG_NAMES)
  assert ('tiny', 'c1') in CONFIG_CASES  # a named variant is a case of its own


@pytest.mark.parametrize('name,variant', CONFIG_CASES,
                         ids=[f'{n}:{v}' if v else n for n, v in CONFIG_CASES])
def test_config_loads_validates_and_builds_its_model(name, variant, tmp_path):
  config = _smoke_config(name, variant, tmp_path)
  if 'vae' in config:  # the VAE trainer's config (vdit_jax.train.vae)
    cfg = vae_train.check_config(config)
    params = vae_checkpoint.abstract_params(cfg)
  else:
    validate.validate_config(config, num_devices=_fewest_devices(config.mesh),
                             process_count=1)
    spec = spec_lib.from_config(config.model)
    model = dit.build_model(spec, config.data.channels, pipeline.num_classes(config.data))
    params = jax.eval_shape(model.init, jax.random.key(0),
                            *state_lib.model_inputs(config.data, 1))['params']
  assert sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)) > 0


def _write_latent_shards(directory, shape, channels, count=16, seed=0, caption_embedding=None):
  """`count` float16 latent clips [T, H, W, C] of N(0, 1) values, one shard, labels 0..3;
  with caption_embedding=(L, E), each record also holds a float16 [L, E] embedding."""
  rng = np.random.default_rng(seed)
  clips = rng.normal(size=(count, *shape, channels)).astype(np.float16)
  os.makedirs(directory)
  name = shards.shard_name(0, 1)
  writer = array_record_module.ArrayRecordWriter(os.path.join(directory, name),
                                                 shards.WRITER_OPTIONS)
  for i, clip in enumerate(clips):
    embedding = (None if caption_embedding is None
                 else rng.normal(size=caption_embedding).astype(np.float16))
    writer.write(shards.encode_record(clip, label=i % 4, caption_embedding=embedding))
  writer.close()
  shards.write_index(directory, {
      'format': shards.FORMAT, 'shards': [{'name': name, 'num_records': count}],
      'num_records': count, 'clip_shape': list(clips.shape[1:]), 'dtype': 'float16',
      'num_classes': 4})


def make_data(data_dir, names):
  """The data on disk that the configs in `names` read (see configs_multidevice.py)."""
  if 'tiny_latent' in names:  # configs/vae_tiny.py's VAE (random weights) encodes clips
    cfg = vae_train.vae_config(vae_tiny.get_config())
    vae_dir = vae_checkpoint.save(os.path.join(data_dir, 'vae'), cfg,
                                  vae_checkpoint.init_params(cfg, jax.random.PRNGKey(0)))
    latent = tiny_latent.get_config()
    encode_latents.encode_latents(
        'synthetic', vae_dir, os.path.join(data_dir, matrix.LATENT_SHARDS['tiny_latent']),
        batch_size=8, num_frames=9, height=32, width=32, num_examples=16, progress=None)
    assert latent.data.channels == cfg.z_dim
  if 'bench' in names:
    _write_latent_shards(os.path.join(data_dir, matrix.LATENT_SHARDS['bench']),
                         (8, 32, 32), 4)
  if 'dit_xl_video' in names:
    s = matrix.SHRINK['dit_xl_video']
    _write_latent_shards(os.path.join(data_dir, matrix.LATENT_SHARDS['dit_xl_video']),
                         (s['data.num_frames'], s['data.height'], s['data.width']), 16)
  if 'wan' in names:
    s = matrix.SHRINK['wan']
    _write_latent_shards(os.path.join(data_dir, matrix.LATENT_SHARDS['wan']),
                         (s['data.num_frames'], s['data.height'], s['data.width']), 16,
                         caption_embedding=(5, 4096))


def _run(out_dir, data_dir, names, meshes, num_devices):
  return multidevice.run_checks_with_args(
      'configs_multidevice.py', [str(out_dir), str(data_dir), ','.join(names), ','.join(meshes)],
      num_devices=num_devices, timeout=3600 if FULL else 900)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp('configs')
  data_dir = root / 'data'
  os.makedirs(data_dir)
  make_data(str(data_dir), CONFIGS)
  return root, data_dir


@pytest.fixture(scope='module')
def results(data):
  root, data_dir = data
  # The two processes side by side: compiles are mostly one thread, and there are 2 cores.
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    one = pool.submit(_run, root / 'one', data_dir, CONFIGS, ('one',), 1)
    many = pool.submit(_run, root / 'eight', data_dir, CONFIGS, MESHES, 8)
  return one.result(), many.result()


@pytest.mark.parametrize('name', CONFIGS)
def test_config_trains_and_samples_on_one_device(results, name):
  one, _ = results
  got = one[f'{name}/one']
  assert isinstance(got, dict), got
  assert len(got['losses']) == matrix.NUM_STEPS
  assert len(got['sample']) == matrix.FEW_SAMPLES


@pytest.mark.parametrize('mesh', MESHES)
@pytest.mark.parametrize('name', CONFIGS)
def test_config_on_eight_devices_matches_one(results, name, mesh):
  one, many = results
  got, want = many[f'{name}/{mesh}'], one[f'{name}/one']
  assert isinstance(got, dict), got
  assert isinstance(want, dict), want
  np.testing.assert_allclose(got['losses'], want['losses'], rtol=RTOL)
  assert len(got['sample']) == matrix.FEW_SAMPLES


def _vae_run(workdir, num_devices):
  """configs/vae_tiny.py through its trainer's command line, 3 steps, each logged."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env['XLA_FLAGS'] = (multidevice.CPU_COLLECTIVE_TIMEOUT_FLAGS +
                      f' --xla_force_host_platform_device_count={num_devices}')
  env['PYTHONPATH'] = os.pathsep.join(p for p in (REPO, env.get('PYTHONPATH')) if p)
  proc = subprocess.run(
      [sys.executable, '-m', 'vdit_jax.train.vae', '--config=configs/vae_tiny.py',
       f'--workdir={workdir}', f'--config.train.num_steps={matrix.NUM_STEPS}',
       '--config.train.log_every=1', '--config.train.stats_batches=1'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=1800, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout, metrics_lib.read_metrics(str(workdir / 'metrics.jsonl'))


@pytest.mark.skipif(not FULL, reason='the full matrix only (VDIT_FULL_CONFIG_MATRIX=1)')
def test_vae_config_on_eight_devices_matches_one(tmp_path):
  """configs/vae_tiny.py, the VAE trainer's config: its batch of 4 splits over 4 of 8
  devices (data parallel, params replicated) and trains as on one."""
  _, one = _vae_run(tmp_path / 'one', 1)
  out, eight = _vae_run(tmp_path / 'eight', 8)
  assert 'batch 4 over 4 of 8 device(s)' in out, out[-2000:]
  for key in ('loss', 'mse', 'kl'):
    np.testing.assert_allclose([r[key] for r in eight], [r[key] for r in one], rtol=RTOL,
                               err_msg=key)


def test_matrix_names_configs_that_exist():
  """Every configs/*.py DiT config is in the matrix (vae_tiny trains the VAE; the plain
  bench harness config is listed too), so a new config cannot be left out silently."""
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  files = {f[:-3] for f in os.listdir(os.path.join(here, 'configs'))
           if f.endswith('.py') and not f.startswith('_')}
  assert files - set(matrix.CONFIGS) == {'vae_tiny'}, files - set(matrix.CONFIGS)
  assert set(matrix.CONFIGS) <= files


# Every config through launch/local_multiprocess.sh as 2 processes x 4 devices (the full
# matrix only; the suite runs configs/tiny.py so in cli_test.py).
LAUNCH_MESH = 'data2_fsdp2_tensor2'


@pytest.mark.parametrize('name', CONFIGS if FULL else ())
def test_config_through_the_two_process_launcher_matches_one_device(data, results, name,
                                                                       tmp_path):
  root, data_dir = data
  one, _ = results
  arg = ','.join([name, LAUNCH_MESH, str(data_dir), str(root / 'one' / 'tiny' / 'one')])
  workdir = tmp_path / 'run'
  env = dict(os.environ, PYTHON=sys.executable, DEVICES_PER_PROCESS='4')
  env['XLA_FLAGS'] = multidevice.CPU_COLLECTIVE_TIMEOUT_FLAGS
  env['PYTHONPATH'] = os.pathsep.join(p for p in (REPO, env.get('PYTHONPATH')) if p)
  proc = subprocess.run(
      [os.path.join(REPO, 'launch', 'local_multiprocess.sh'), '2',
       f'--config={os.path.join(REPO, "tests", "configs_multidevice.py")}:{arg}',
       f'--workdir={workdir}'], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=1800, check=False)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-5000:]
  assert '8 device(s), 2 process(es)' in out, out[-3000:]
  records = metrics_lib.read_metrics(str(workdir / 'metrics.jsonl'))
  assert [r['step'] for r in records] == list(range(1, matrix.NUM_STEPS + 1))
  np.testing.assert_allclose([r['loss'] for r in records], one[f'{name}/one']['losses'],
                             rtol=RTOL)
