r"""Every shipped DiT config trains and samples, with its own defaults, on this process's devices.

Run by configs_test.py in fresh processes (1 CPU device, then 8 fake ones), which compares
each mesh's losses with one device's. Each config runs as `vdit_jax.main` runs it
(`loop.train_and_evaluate`, then `loop.sample`), on each mesh named, and the last stdout
line is one JSON object {'CONFIG/MESH': {'losses': [...], 'sample': [...]} | failure text}.

  python tests/configs_multidevice.py OUT_DIR DATA_DIR CONFIG[,CONFIG...] MESH[,MESH...]

What departs from a config's own defaults, and why:
- every config: train.num_steps=3 and log_every=1 (a few steps, each logged), one
  checkpoint at the end, sample.num_steps=2 (the compilation cache is the test session's,
  tests/conftest.py); then
  `--mode=sample` with sample.num_samples=3, fewer clips than the batch axes split;
- the mesh (MESHES);
- configs that need data on disk get it from DATA_DIR (configs_test.py writes it):
  tiny_latent its VAE-encoded shards, bench, dit_xl_video and wan float latent shards of
  their channel counts (wan's with caption embeddings), lora_finetune the tiny run of the same mesh as its base;
- the accelerator configs (small, bench, dit_xl_video, wan) are cut to CPU size
  (SHRINK: depth, batch and, for dit_xl_video, clip and width); their full sizes are
  AOT-compiled for a TPU topology instead (plan_test.py).
"""

import json
import os
import sys
import traceback

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import importlib  # pylint: disable=g-import-not-at-top

import jax
import numpy as np

from vdit_jax import modes

from vdit_jax.train import loop
from vdit_jax.train import metrics as metrics_lib

# name -> (mesh sizes, model.sequence_parallel); the meshes README.md shows.
MESHES = {
    'one': (dict(data=1, fsdp=1, tensor=1, sequence=1), 'none'),
    'data2_fsdp2_tensor2': (dict(data=2, fsdp=2, tensor=2, sequence=1), 'none'),
    'data2_seq4_all_gather': (dict(data=2, fsdp=1, tensor=1, sequence=4), 'all_gather'),
    'data2_seq4_ring': (dict(data=2, fsdp=1, tensor=1, sequence=4), 'ring'),
    # ulysses trades heads for tokens: the heads per device must divide by the sequence
    # axis, and configs/small.py and bench.py have 6 (validation stops sequence=4).
    'data4_seq2_ulysses': (dict(data=4, fsdp=1, tensor=1, sequence=2), 'ulysses'),
}
CONFIGS = ('tiny', 'tiny_text', 'tiny_extend', 'tiny_keyframes', 'tiny_interpolate',
           'tiny_buckets', 'lora_finetune', 'tiny_latent', 'small', 'bench', 'dit_xl_video',
           'wan', 'tiny_av')
# Latent shard folders under DATA_DIR (configs_test.make_data writes them).
LATENT_SHARDS = {'tiny_latent': 'tiny_latents', 'bench': 'bench_latents',
                 'dit_xl_video': 'xl_latents', 'wan': 'wan_latents'}
# CPU-size cuts of the accelerator configs (field -> value).
SHRINK = {
    'small': {'model.depth': 2, 'train.batch_size': 8, 'sample.num_samples': 8},
    'bench': {'model.depth': 2, 'train.batch_size': 8},
    'dit_xl_video': {'model.depth': 2, 'model.width': 256, 'model.mlp_dim': 1024,
                     'data.num_frames': 4, 'data.height': 16, 'data.width': 16,
                     'train.batch_size': 8, 'sample.num_samples': 8},
    # Wan 1.3B's layout at toy size, on latent shards with 4096-wide caption embeddings
    # (no VAE on disk: samples stay latents); 2 heads so that ulysses' sequence=2 splits them.
    'wan': {'model.depth': 2, 'model.width': 64, 'model.num_heads': 2, 'model.mlp_dim': 128,
            'data.num_frames': 3, 'data.height': 8, 'data.width': 8, 'data.latents': False,
            'train.batch_size': 8, 'sample.num_samples': 8, 'sample.overlap': 2},
}
NUM_STEPS = 3
FEW_SAMPLES = 3


def _set(config, path, value):
  *parents, key = path.split('.')
  node = config
  for part in parents:
    node = node[part]
  node[key] = value


def make_config(name, mesh_name, data_dir, lora_base=None):
  module = importlib.import_module(f'configs.{name}')
  arg = os.path.join(data_dir, LATENT_SHARDS[name]) if name == 'tiny_latent' else None
  config = module.get_config(arg)
  config.unlock()
  sizes, sequence_parallel = MESHES[mesh_name]
  config.mesh.update(sizes)
  config.model.sequence_parallel = sequence_parallel
  config.train.num_steps = NUM_STEPS
  config.train.log_every = 1
  config.checkpoint.every_steps = NUM_STEPS
  config.sample.num_steps = 2
  for path, value in SHRINK.get(name, {}).items():
    _set(config, path, value)
  if name in ('bench', 'dit_xl_video', 'wan'):
    config.data.source = 'shards'
    config.data.path = os.path.join(data_dir, LATENT_SHARDS[name])
  if name == 'lora_finetune':
    config.lora.base_checkpoint = lora_base
  return config


def get_config(arg):
  """The config file form, for the launcher: --config=tests/configs_multidevice.py:ARG
  with ARG = 'CONFIG,MESH,DATA_DIR[,LORA_BASE]'."""
  name, mesh_name, data_dir, *rest = arg.split(',')
  return make_config(name, mesh_name, data_dir, rest[0] if rest else None)


def run(name, mesh_name, out_dir, data_dir, workdirs):
  """Trains NUM_STEPS, then samples FEW_SAMPLES clips; (losses, sample summary)."""
  workdir = os.path.join(out_dir, name, mesh_name)
  config = make_config(name, mesh_name, data_dir, workdirs.get(f'tiny/{mesh_name}'))
  loop.train_and_evaluate(config, workdir)
  workdirs[f'{name}/{mesh_name}'] = workdir
  records = metrics_lib.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  losses = [r['loss'] for r in records]
  assert [r['step'] for r in records] == list(range(1, NUM_STEPS + 1)), records
  assert np.all(np.isfinite(losses)), losses
  config.sample.num_samples = FEW_SAMPLES
  videos, paths = modes.sample(config, workdir)
  videos = np.asarray(jax.device_get(videos), np.float64)
  assert videos.shape[0] == FEW_SAMPLES and np.all(np.isfinite(videos)), videos.shape
  assert paths and all(os.path.getsize(p) > 0 for p in paths), paths
  # Per-clip mean and std: enough to compare samplers across meshes without the pixels.
  summary = [[float(v.mean()), float(v.std())] for v in videos]
  return {'losses': losses, 'sample': summary}


def main(argv):
  out_dir, data_dir, names, meshes = argv[1], argv[2], argv[3].split(','), argv[4].split(',')
  results, workdirs = {}, {}
  for name in names:
    for mesh_name in meshes:
      key = f'{name}/{mesh_name}'
      try:
        results[key] = run(name, mesh_name, out_dir, data_dir, workdirs)
      except Exception:  # pylint: disable=broad-except
        results[key] = traceback.format_exc()[-3000:]
      print(f'{key}: {"ok" if isinstance(results[key], dict) else "FAILED"}',
            file=sys.stderr, flush=True)
  print(json.dumps(results))


if __name__ == '__main__':
  main(sys.argv)
