r"""Train a causal video VAE from scratch on the configured clips (the synthetic shapes by
default), so that latent diffusion runs end to end with no download.

python -m vdit_jax.train.vae --config=configs/vae_tiny.py --workdir=runs/vae_tiny \
    [--config.train.num_steps=300 ...]

Loss: mean squared error of the reconstruction (clips in [-1, 1], z sampled from the
posterior) + `train.kl_weight` x the mean KL of the posterior to N(0, 1) per latent value.
AdamW with warm-up and cosine decay (the DiT trainer's optimizer). At the end the latents'
per-channel mean and std are measured on `train.stats_batches` batches, and the VAE folder
WORKDIR/vae (`vae/checkpoint.py`: params + config with those statistics) is written, for
`vae.checkpoint.load`, `tools/encode_latents` and decoding samples.

WORKDIR/metrics.jsonl: one JSON object per logged step (step, loss, mse, kl, psnr (dB, of
the training batch), grad_norm, learning_rate, steps_per_s). Single process, data
parallel over its devices: each batch is split over the most devices whose count divides
train.batch_size (4 clips on 8 devices: 4 of them), params replicated; no resume: a run
this size takes minutes (see configs/vae_tiny.py).
"""

from __future__ import annotations

import numbers
from typing import Dict
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vdit_jax.config import resolve
from vdit_jax.parallel import fatal
from vdit_jax.data import pipeline
from vdit_jax.parallel import paths
from vdit_jax.train import metrics as metrics_lib
from vdit_jax.train import state as state_lib
from vdit_jax.vae import checkpoint
from vdit_jax.vae import model as vae_model
from vdit_jax.vae.config import VAEConfig
from vdit_jax.vae.config import check_clip_shape

VAE_DIRNAME = 'vae'




def vae_config(config) -> VAEConfig:
  v = config.vae
  return VAEConfig(base_dim=v.base_dim, decoder_base_dim=v.decoder_base_dim, z_dim=v.z_dim,
                   dim_mult=tuple(v.dim_mult), num_res_blocks=v.num_res_blocks,
                   temporal_downsample=tuple(bool(b) for b in v.temporal_downsample),
                   in_channels=config.data.channels, out_channels=config.data.channels,
                   dtype=v.dtype)


def check_config(config) -> VAEConfig:
  """Raises ValueError naming the value and the rule; returns the VAE architecture."""
  cfg = vae_config(config)  # the architecture's own rules
  pipeline.check_data_config(config.data)
  check_clip_shape(cfg, config.data.num_frames, config.data.height, config.data.width)
  t = config.train
  for name in ('num_steps', 'batch_size', 'log_every', 'stats_batches'):
    value = t[name]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
      raise ValueError(f'train.{name} must be a positive integer, got {value!r}.')
  for name in ('learning_rate', 'kl_weight', 'grad_clip', 'weight_decay'):
    if not isinstance(t[name], numbers.Real) or t[name] < 0:
      raise ValueError(f'train.{name} must be a number >= 0, got {t[name]!r}.')
  if jax.process_count() != 1:
    raise ValueError(f'vae.train runs in one process; got {jax.process_count()} processes.')
  return cfg


def make_train_step(cfg: VAEConfig, tx: optax.GradientTransformation, kl_weight: float):
  """jit((params, opt_state, video [B, T, H, W, C], rng) -> (params, opt_state, metrics))."""
  model = vae_model.WanVAE(cfg)

  def loss_fn(params, video, rng):
    recon, mean, logvar = model.apply({'params': params}, video, rng)  # recon unclipped
    mse = jnp.mean(jnp.square(recon.astype(jnp.float32) - video))
    kl = jnp.mean(vae_model.kl_to_standard_normal(mean, logvar))
    return mse + kl_weight * kl, {'mse': mse, 'kl': kl}

  def step(params, opt_state, video, rng):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, video, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {'loss': loss, **aux, 'psnr': 10.0 * jnp.log10(4.0 / aux['mse']),
               'grad_norm': optax.tree.norm(grads)}
    return params, opt_state, metrics

  return jax.jit(step, donate_argnums=(0, 1))


def data_mesh(batch_size: int, devices) -> Mesh:
  """A 1-D ('data',) mesh of the first k devices, k the largest device count that divides
  `batch_size` (the VAE's params are small: replicated, batch split)."""
  devices = list(devices)
  ways = max(k for k in range(1, len(devices) + 1) if batch_size % k == 0)
  return Mesh(np.asarray(devices[:ways]), ('data',))


def latent_statistics(cfg: VAEConfig, params, batches) -> Dict[str, np.ndarray]:
  """Per-channel mean and std of the posterior means over `batches` (float64 sums)."""
  model = vae_model.WanVAE(cfg)
  encode = jax.jit(lambda p, x: model.apply({'params': p}, x, method=vae_model.WanVAE.encode))
  total = np.zeros(cfg.z_dim)
  total_sq = np.zeros(cfg.z_dim)
  count = 0
  for video in batches:
    mean, _ = encode(params, video)
    z = np.asarray(mean, np.float64).reshape(-1, cfg.z_dim)  # [N, z]
    total += z.sum(0)
    total_sq += np.square(z).sum(0)
    count += z.shape[0]
  mu = total / count
  std = np.sqrt(np.maximum(total_sq / count - np.square(mu), 0.0))
  return {'mean': mu, 'std': np.maximum(std, 1e-6)}


def train_and_evaluate(config, workdir: str) -> str:
  """Trains, writes WORKDIR/metrics.jsonl and the VAE folder WORKDIR/vae; returns its path."""
  config = resolve.complete(config)  # every default from config/defaults.py
  cfg = check_config(config)
  workdir = paths.check_writable(workdir, '--workdir')
  rng = jax.random.PRNGKey(config.seed)
  init_rng, rng = jax.random.split(rng)
  mesh = data_mesh(config.train.batch_size, jax.devices())
  replicated, split = NamedSharding(mesh, PartitionSpec()), NamedSharding(
      mesh, PartitionSpec('data'))
  params = jax.device_put(checkpoint.init_params(cfg, init_rng), replicated)
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
  tx = state_lib.make_optimizer(config.train)
  schedule = state_lib.learning_rate_schedule(config.train)
  opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
  train_step = make_train_step(cfg, tx, float(config.train.kl_weight))
  data = pipeline.make_dataset(config.data, config.train.batch_size, seed=config.seed)
  writer = metrics_lib.MetricsWriter(workdir)
  t = config.train
  print(f'vae.train: {num_params / 1e6:.2f} M params, latents '
        f'{list(cfg.latent_shape(config.data.num_frames, config.data.height, config.data.width))} '
        f'per clip of {[config.data.num_frames, config.data.height, config.data.width]}, '
        f'{t.num_steps} steps of batch {t.batch_size} over {mesh.size} of '
        f'{jax.device_count()} device(s)', flush=True)
  start = time.perf_counter()
  last_time, last_step = None, 0
  for step in range(1, t.num_steps + 1):
    video = jax.device_put(next(data)['video'], split)  # [B, T, H, W, C] in [-1, 1]
    params, opt_state, metrics = train_step(params, opt_state, video,
                                            jax.random.fold_in(rng, step))
    if step % t.log_every == 0 or step == t.num_steps:
      record = {k: float(v) for k, v in jax.device_get(metrics).items()}
      record['learning_rate'] = float(schedule(step - 1))
      now = time.perf_counter()
      if last_time is not None:  # the first window holds the compilation
        record['steps_per_s'] = (step - last_step) / (now - last_time)
      last_time, last_step = now, step
      record['wall_s'] = now - start
      writer.write(step, record)
      rate = record.get('steps_per_s')
      print(f'step {step}/{t.num_steps} loss {record["loss"]:.4g} psnr {record["psnr"]:.2f} dB '
            f'kl {record["kl"]:.3g} grad_norm {record["grad_norm"]:.3g}'
            + (f' steps_per_s {rate:.3g}' if rate else ''), flush=True)
  stats = latent_statistics(cfg, params, (next(data)['video'] for _ in range(t.stats_batches)))
  final = VAEConfig.from_dict({**cfg.to_dict(), 'latents_mean': stats['mean'].tolist(),
                               'latents_std': stats['std'].tolist()})
  writer.close()
  out = checkpoint.save(paths.join(workdir, VAE_DIRNAME), final, params,
                        step=t.num_steps, trained_on=config.data.to_dict(),
                        final_metrics=record)
  print(f'vae.train: wrote {out} (latents std per channel: '
        f'{np.array2string(stats["std"], precision=2)})', flush=True)
  return out


FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'Path to a configs/vae_*.py file.',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for metrics.jsonl and the trained VAE.')
  flags.mark_flags_as_required(['config', 'workdir'])
  fatal.run(main)
