r"""Latent video diffusion end to end on a CPU: VAE training -> latent shards -> DiT training
on the latents -> --mode=sample -> mp4, each stage through its real command line.

python bench/latent_e2e.py [--workdir=runs/latent_e2e] [--vae_steps=60] [--num_examples=256] \
    [--dit_steps=200] [--heldout=16] [--vae_set=train.batch_size=2 --dit_set=model.depth=1 ...]

Runs, in --workdir (replaced):
  python -m vdit_jax.train.vae --config=configs/vae_tiny.py --workdir=W/vae_run
  python -m vdit_jax.tools.encode_latents --videos=synthetic ... --vae=W/vae_run/vae --out=W/latents
  python -m vdit_jax.main --config=configs/tiny_latent.py:W/latents --workdir=W/dit
  python -m vdit_jax.main --config=configs/tiny_latent.py:W/latents --workdir=W/dit --mode=sample
then prints each stage's wall time, the VAE's PSNR (last training batch, and on --heldout
synthetic clips of another seed, encoded to the posterior mean and decoded in chunks), the
DiT's loss at the start and end (mean of the first / last 5 logged steps), and the sample
mp4's path and frame shape. Ends with one JSON line. Budgets are small: the figures show
that the chain works, not how good a trained model gets. --vae_set / --dit_set KEY=VALUE
(repeatable) pass --config.KEY=VALUE to the VAE trainer / to both DiT commands (the smoke
test in tests/bench_test.py shrinks both models with them).
"""

import json
import os
import shutil
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_string('workdir', 'runs/latent_e2e', 'Folder for every stage (replaced).')
flags.DEFINE_integer('vae_steps', 60, 'VAE training steps (configs/vae_tiny.py: 300).')
flags.DEFINE_integer('num_examples', 256, 'Synthetic clips encoded to latents.')
flags.DEFINE_integer('dit_steps', 200, 'DiT training steps on the latents.')
flags.DEFINE_integer('dit_batch', 16, 'DiT global batch size.')
flags.DEFINE_integer('sample_steps', 25, 'DDIM steps of --mode=sample.')
flags.DEFINE_integer('heldout', 16, 'Held-out synthetic clips for the VAE PSNR.')
flags.DEFINE_multi_string('vae_set', [], 'KEY=VALUE: --config.KEY=VALUE for the VAE trainer.')
flags.DEFINE_multi_string('dit_set', [], 'KEY=VALUE: --config.KEY=VALUE for the DiT commands.')
FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_EVERY = 5  # DiT steps between logged losses


def _run(name, args):
  """Runs `python -m args...` from the repository root; returns its wall seconds."""
  cmd = [sys.executable, '-m'] + args
  print(f'[{name}] {" ".join(cmd[1:])}', flush=True)
  t0 = time.perf_counter()
  subprocess.run(cmd, cwd=ROOT, check=True)
  seconds = time.perf_counter() - t0
  print(f'[{name}] {seconds:.1f}s', flush=True)
  return seconds


def _metrics(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _heldout_psnr(vae_dir, num_clips):
  """PSNR (dB, clips in [-1, 1]) of decode(mean(encode(x))) on unseen synthetic clips."""
  from vdit_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from vdit_jax.vae import checkpoint  # pylint: disable=g-import-not-at-top
  from vdit_jax.vae import chunked  # pylint: disable=g-import-not-at-top
  cfg, params = checkpoint.load(vae_dir)
  source = synthetic.SyntheticShapes(9, 32, 32, num_examples=num_clips, seed=12345)
  video = np.stack([source[i]['video'] for i in range(num_clips)]).astype(np.float32)
  video = video / np.float32(127.5) - np.float32(1.0)  # [N, 9, 32, 32, 3]
  mean, _ = chunked.encode_video(cfg, params, video)
  recon = chunked.decode_latents(cfg, params, mean)
  mse = float(np.mean(np.square(recon - video)))
  return 10.0 * np.log10(4.0 / mse)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
  w = os.path.abspath(FLAGS.workdir)
  shutil.rmtree(w, ignore_errors=True)
  os.makedirs(w)
  vae_run, latents, dit = (os.path.join(w, d) for d in ('vae_run', 'latents', 'dit'))
  seconds = {}
  seconds['vae_train'] = _run('vae', [
      'vdit_jax.train.vae', '--config=configs/vae_tiny.py', f'--workdir={vae_run}',
      f'--config.train.num_steps={FLAGS.vae_steps}'] + [f'--config.{s}' for s in FLAGS.vae_set])
  seconds['encode'] = _run('encode', [
      'vdit_jax.tools.encode_latents', '--videos=synthetic',
      f'--num_examples={FLAGS.num_examples}', '--num_frames=9', '--height=32', '--width=32',
      f'--vae={vae_run}/vae', f'--out={latents}', '--batch_size=16'])
  dit_flags = [f'--config=configs/tiny_latent.py:{latents}', f'--workdir={dit}',
               f'--config.train.num_steps={FLAGS.dit_steps}',
               f'--config.train.batch_size={FLAGS.dit_batch}',
               f'--config.sample.num_steps={FLAGS.sample_steps}',
               f'--config.train.log_every={LOG_EVERY}', '--config.train.tensorboard=False']
  dit_flags += [f'--config.{s}' for s in FLAGS.dit_set]
  seconds['dit_train'] = _run('dit', ['vdit_jax.main'] + dit_flags)
  seconds['sample'] = _run('sample', ['vdit_jax.main', '--mode=sample'] + dit_flags)

  vae_log = _metrics(os.path.join(vae_run, 'metrics.jsonl'))
  dit_log = _metrics(os.path.join(dit, 'metrics.jsonl'))
  losses = [r['loss'] for r in dit_log]
  from vdit_jax.data import video_io  # pylint: disable=g-import-not-at-top
  samples = os.path.join(dit, 'samples')
  mp4 = os.path.join(samples, f'sample_step_{FLAGS.dit_steps:07d}.mp4')
  frames = video_io.read_video(mp4)
  latent = np.load(os.path.join(samples, f'sample_step_{FLAGS.dit_steps:07d}_latents.npy'))
  result = {
      'vae_steps': FLAGS.vae_steps,
      'vae_train_psnr_db': round(vae_log[-1]['psnr'], 2),
      'vae_heldout_psnr_db': round(_heldout_psnr(os.path.join(vae_run, 'vae'),
                                                 FLAGS.heldout), 2),
      'num_latent_clips': FLAGS.num_examples,
      'dit_steps': FLAGS.dit_steps,
      'dit_loss_start': round(float(np.mean(losses[:5])), 4),
      'dit_loss_end': round(float(np.mean(losses[-5:])), 4),
      'dit_loss_ratio_end_over_start': round(float(np.mean(losses[-5:]) /
                                                   np.mean(losses[:5])), 3),
      'sample_latents_shape': list(latent.shape),
      'mp4': mp4,
      'mp4_frames_shape': list(frames.shape),
      'seconds': {k: round(v, 1) for k, v in seconds.items()},
      'load_average_1m': round(os.getloadavg()[0], 2),
  }
  for key, value in result.items():
    print(f'{key}: {value}')
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
