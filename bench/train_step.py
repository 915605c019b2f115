r"""Train-step speed on this host: step time, tokens/s, model FLOP/s and the roofline fraction.

python bench/train_step.py --config=configs/bench.py [--steps=8 --warmup=2]
VDIT_RUNTIME=0 python bench/train_step.py --config=configs/bench.py  # without the runtime set-up

Builds the trainer's own pieces (`loop.build`, `state.create_state`, `loop.jit_train_step`:
the jitted step with shardings and the state donated) and feeds it random batches of the
config's shape [B, T, H, W, C] (no data pipeline). After --warmup steps (the first one
compiles) it times --steps steps one by one and reports the median step time, tokens/s, the
model FLOP/s from the analytic count (`model/flops.py`, forward + backward, no remat), and
the FLOP/s of a --matmul_size^2 fp32 matmul measured in the same process;
roofline_fraction = model_flops_per_s / matmul_flops_per_s. It also reports what the host
did during the timed steps (getrusage deltas): minor page faults, user and system CPU
seconds per step, and the runtime settings the process ran with (vdit_jax/runtime.py
applies them before jax is imported, as `python -m vdit_jax.main` does).

A measurement, not a test: it never fails on a number. On a shared machine the figures move
with the load; compare cases measured in the same session, interleaved. Last line: one JSON
object.
"""

import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vdit_jax import runtime  # pylint: disable=g-import-not-at-top

if __name__ == '__main__':
  runtime.setup()  # before jax is imported: allocator, huge pages, XLA flags (may re-exec)

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from vdit_jax.data import synthetic
from vdit_jax.model import flops as flops_lib
from vdit_jax.train import loop
from vdit_jax.train import state as state_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a configs/*.py file.',
                                lock_config=True)
flags.DEFINE_integer('warmup', 2, 'Untimed steps first (the first one compiles).')
flags.DEFINE_integer('steps', 8, 'Timed steps; the median is reported.')
flags.DEFINE_integer('matmul_size', 4096, 'n of the n x n fp32 matmul that sets the roofline.')
flags.DEFINE_integer('matmul_reps', 5, 'Timed matmuls; the median is reported.')


def _usage():
  r = resource.getrusage(resource.RUSAGE_SELF)
  return {'minflt': r.ru_minflt, 'majflt': r.ru_majflt, 'utime': r.ru_utime,
          'stime': r.ru_stime, 'wall': time.perf_counter()}


def _per_step(before, after, steps):
  return {'minor_faults_per_step': (after['minflt'] - before['minflt']) / steps,
          'user_s_per_step': (after['utime'] - before['utime']) / steps,
          'sys_s_per_step': (after['stime'] - before['stime']) / steps,
          'wall_s_per_step': (after['wall'] - before['wall']) / steps}


def matmul_rates(n: int, reps: int):
  """(median wall FLOP/s, FLOPs per CPU-second) of an n x n fp32 matmul (2 n^3 FLOPs).

  Compiled and run once before timing. The CPU-second figure (user + sys of the whole
  process over all reps) moves less with other jobs' load than the wall-clock one.
  """
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.float32)  # [n, n]
  b = jax.random.normal(kb, (n, n), jnp.float32)  # [n, n]
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))
  times = []
  before = _usage()
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    times.append(time.perf_counter() - t0)
  after = _usage()
  cpu_s = (after['utime'] - before['utime']) + (after['stime'] - before['stime'])
  flops = 2.0 * n ** 3
  return flops / float(np.median(times)), flops * reps / max(cpu_s, 1e-9)


def random_batch(config, rng: np.random.Generator, num_classes: int):
  """{'video': float32 [B, T, H, W, C] ~ N(0, 1), 'label': int32 [B]} of the config's shape."""
  d = config.data
  shape = (config.train.batch_size, d.num_frames, d.height, d.width, d.channels)
  return {'video': rng.standard_normal(shape, dtype=np.float32),  # [B, T, H, W, C]
          'label': rng.integers(0, max(num_classes, 1), (shape[0],), dtype=np.int32)}  # [B]


def run(config, warmup: int, steps: int, matmul_size: int, matmul_reps: int) -> dict:
  if warmup < 1 or steps < 1:
    raise ValueError(f'--warmup={warmup} and --steps={steps} must be >= 1 (the first step '
                     'compiles and is never timed).')
  s = loop.build(config, None, num_classes=synthetic.NUM_CLASSES)
  spec = s.model.spec
  d = config.data
  flop_count = flops_lib.train_step_flops(
      spec, (d.num_frames, d.height, d.width, d.channels), config.train.batch_size)
  tokens_per_step = config.train.batch_size * flop_count.tokens_per_clip
  state, _ = state_lib.create_state(s.init_fn, jax.random.key(config.seed), s.mesh, s.rules)
  train_step = loop.jit_train_step(s)
  host_rng = np.random.default_rng(0)
  rng = jax.random.key(config.seed + 1)
  times = []
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    t0 = time.perf_counter()
    for _ in range(warmup):
      batch = loop.global_batch(random_batch(config, host_rng, s.num_classes), s.mesh, s.rules)
      state, metrics = train_step(state, batch, rng)
      jax.block_until_ready(metrics)
    warmup_s = time.perf_counter() - t0
    before = _usage()
    faults = []
    for _ in range(steps):
      t0 = time.perf_counter()
      start = _usage()
      batch = loop.global_batch(random_batch(config, host_rng, s.num_classes), s.mesh, s.rules)
      state, metrics = train_step(state, batch, rng)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
      faults.append(_usage()['minflt'] - start['minflt'])
    after = _usage()
  loss = float(jax.device_get(metrics['loss']))
  del state
  step_s = float(np.median(times))
  matmul, matmul_per_cpu_s = matmul_rates(matmul_size, matmul_reps)
  model_flops_per_s = flop_count.total / step_s
  steps_cpu_s = (after['utime'] - before['utime']) + (after['stime'] - before['stime'])
  model_flops_per_cpu_s = flop_count.total * steps / max(steps_cpu_s, 1e-9)
  result = {
      'step_s': step_s,
      'step_s_min': float(np.min(times)),
      'step_s_max': float(np.max(times)),
      'tokens_per_s': tokens_per_step / step_s,
      'model_flops_per_step': flop_count.total,
      'model_flops_per_s': model_flops_per_s,
      'matmul_flops_per_s': matmul,
      'roofline_fraction': model_flops_per_s / matmul,
      # The same ratio per CPU-second (user + sys): less sensitive to other jobs' load.
      'model_flops_per_cpu_s': model_flops_per_cpu_s,
      'matmul_flops_per_cpu_s': matmul_per_cpu_s,
      'roofline_fraction_cpu': model_flops_per_cpu_s / matmul_per_cpu_s,
      'matmul_size': matmul_size,
      'warmup_s': warmup_s,
      'steps': steps,
      'minor_faults_each_step': faults,
      'max_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      'loss': loss,
      'tokens_per_step': tokens_per_step,
      'params': int(sum(np.prod(x.shape) for x in jax.tree.leaves(s.abstract_state.params))),
      'devices': jax.device_count(),
      'backend': jax.default_backend(),
  }
  result.update(_per_step(before, after, steps))
  result['runtime'] = runtime.current_settings()
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = FLAGS.config
  r = run(config, FLAGS.warmup, FLAGS.steps, FLAGS.matmul_size, FLAGS.matmul_reps)
  m = config.model
  print(f'model width {m.width} depth {m.depth} heads {m.num_heads} patch {m.patch_size}: '
        f'{r["params"]:,} params, {r["tokens_per_step"]} tokens/step, '
        f'{r["model_flops_per_step"] / 1e9:.1f} GFLOP/step; {r["devices"]} {r["backend"]} '
        f'device(s)')
  print(f'warm-up {FLAGS.warmup} step(s) incl. compile: {r["warmup_s"]:.1f} s')
  print(f'step: median {r["step_s"]:.3f} s (min {r["step_s_min"]:.3f}, max '
        f'{r["step_s_max"]:.3f}) over {r["steps"]} steps; loss {r["loss"]:.4f}')
  print(f'tokens/s {r["tokens_per_s"]:.0f}; model {r["model_flops_per_s"] / 1e9:.1f} GFLOP/s; '
        f'{r["matmul_size"]}^2 fp32 matmul {r["matmul_flops_per_s"] / 1e9:.1f} GFLOP/s; '
        f'roofline fraction {r["roofline_fraction"]:.3f}')
  print(f'per CPU-second (user + sys): model {r["model_flops_per_cpu_s"] / 1e9:.1f} GFLOP, '
        f'matmul {r["matmul_flops_per_cpu_s"] / 1e9:.1f} GFLOP; fraction '
        f'{r["roofline_fraction_cpu"]:.3f}')
  print(f'per step: {r["minor_faults_per_step"]:.0f} minor faults, user '
        f'{r["user_s_per_step"]:.2f} s, sys {r["sys_s_per_step"]:.2f} s, wall '
        f'{r["wall_s_per_step"]:.2f} s')
  print(f'runtime: {r["runtime"]}')
  print(json.dumps(r))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
