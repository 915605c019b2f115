r"""Sampling speed: denoising steps/s and clips/s per config, and the compiled loop vs Python.

python bench/sample.py [--configs=configs/tiny.py,configs/bench.py --num_steps=10 \
    --loop_config=configs/bench.py --loop_steps=50 --set=model.depth=2 ...]

1. Throughput: for each of --configs, the trainer's sampler (`train/sampling.make_sample_fn`:
   the config's sampler, CFG scale and sample.num_samples, the whole step loop a
   `lax.fori_loop` in one jit) on randomly initialised params, --num_steps denoising steps
   (not the config's sample.num_steps, so that the bench shape finishes in minutes; the
   figures are per step). After one compiling call, the median of --reps calls gives
   steps/s (model evaluations of the whole batch, doubled by CFG), clips/s at --num_steps,
   and clips/s extrapolated to the config's sample.num_steps.
2. Compiled loop vs Python loop, on --loop_config: --loop_steps DDIM steps (eta 0, the
   config's CFG) through `diffusion/samplers.sample` jitted once, against a Python `for` over
   a jitted single DDIM step (same model call, same float64-derived coefficients passed in
   as scalars, same initial noise); both are warmed up, the median of --reps runs is
   timed, and the final clips are compared (max |difference| is printed: the two must
   agree, or the comparison is not like for like).
--set=key=value (repeatable) overrides a field of every config, e.g. --set=model.depth=1.

A measurement, not a test: it never fails on a number. On a shared machine the figures move
with the load. Last line: one JSON object.
"""

import ast
import functools
import json
import os
import runpy
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

from vdit_jax.data import synthetic
from vdit_jax.diffusion import samplers
from vdit_jax.train import loop
from vdit_jax.generate import sampling
from vdit_jax.train import state as state_lib

FLAGS = flags.FLAGS
flags.DEFINE_list('configs', ['configs/tiny.py', 'configs/bench.py'],
                  'Config files whose sampling throughput is measured.')
flags.DEFINE_integer('num_steps', 10, 'Denoising steps per throughput run.')
flags.DEFINE_string('loop_config', 'configs/bench.py',
                    'Config of the compiled-loop vs Python-loop comparison, a discrete '
                    'objective (eps or v; "" skips it).')
flags.DEFINE_integer('loop_steps', 50, 'DDIM steps of that comparison.')
flags.DEFINE_integer('reps', 3, 'Timed runs per case; the median is reported.')
flags.DEFINE_multi_string('set', [], 'key=value override applied to every config, e.g. '
                          'model.depth=1 (values parsed as Python literals).')


def load_config(path: str, overrides):
  """get_config() of a configs/*.py file, with key=value overrides applied."""
  config = runpy.run_path(path)['get_config']()
  for item in overrides:
    key, sep, text = item.partition('=')
    if not sep:
      raise app.UsageError(f'--set={item!r} must be key=value.')
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text  # a bare string, e.g. --set=sample.sampler=ddpm
    node = config
    *parents, leaf = key.split('.')
    for part in parents:
      node = node[part]
    if leaf not in node:
      raise app.UsageError(f'--set={item!r}: {key} is not a field of {path}.')
    node[leaf] = value
  return config


def _median_time(fn, reps: int) -> float:
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def init_params(s: loop.Setup):
  """Randomly initialised model params, born with the config's shardings."""
  shardings = s.state_shardings.params
  def init(rng):
    video, t, labels = state_lib.model_inputs(s.config.data, 1)
    return nn.unbox(s.model.init(rng, video, t, labels)['params'])
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    return jax.jit(init, out_shardings=shardings)(jax.random.key(s.config.seed))


def throughput(path: str, config, num_steps: int, reps: int) -> dict:
  """Steps/s and clips/s of the trainer's compiled sampler at `num_steps` steps."""
  s = loop.build(config, None, num_classes=synthetic.NUM_CLASSES)
  params = init_params(s)
  n = config.sample.num_samples
  sample_cfg = config.sample.copy_and_resolve_references()
  sample_cfg.num_steps = num_steps
  sample_fn = jax.jit(sampling.make_sample_fn(s.model, s.diffusion, sample_cfg, config.data,
                                              s.num_classes, n))
  labels = sampling.sample_labels(n, s.num_classes)
  rng = jax.random.key(config.sample.seed)
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    t0 = time.perf_counter()
    jax.block_until_ready(sample_fn(params, rng, labels))
    first_s = time.perf_counter() - t0
    run_s = _median_time(lambda: sample_fn(params, rng, labels), reps)
  steps_per_s = num_steps / run_s
  return {
      'config': path, 'sampler': config.sample.sampler, 'cfg_scale': config.sample.cfg_scale,
      'num_samples': n, 'num_steps': num_steps, 'first_call_s': first_s, 'run_s': run_s,
      'steps_per_s': steps_per_s, 'clips_per_s': n / run_s,
      'config_num_steps': config.sample.num_steps,
      'clips_per_s_at_config_steps': n * steps_per_s / config.sample.num_steps,
  }


def ddim_tables(diffusion, num_steps: int):
  """(timesteps int32 [S], c_x0 [S], c_eps [S]) of DDIM with eta 0, from float64 abar."""
  ts = samplers.respaced_timesteps(diffusion.num_timesteps, num_steps)  # [S]
  abar = diffusion.alphas_cumprod_f64()[ts]  # [S]
  abar_prev = np.concatenate([abar[1:], [1.0]])  # [S]
  return ts, np.sqrt(abar_prev).astype(np.float32), np.sqrt(1.0 - abar_prev).astype(np.float32)


def compiled_vs_python(path: str, config, num_steps: int, reps: int) -> dict:
  """Wall time of `num_steps` DDIM steps: one jitted fori_loop vs a Python loop of jitted steps."""
  if config.diffusion.objective == 'flow':
    raise app.UsageError(f'--loop_config={path} uses the flow objective; the comparison runs '
                         'DDIM, which needs eps or v.')
  s = loop.build(config, None, num_classes=synthetic.NUM_CLASSES)
  params = init_params(s)
  d, n = config.data, config.sample.num_samples
  shape = (n, d.num_frames, d.height, d.width, d.channels)  # [B, T, H, W, C]
  null_label = s.num_classes if s.num_classes > 0 else None
  cfg_scale = config.sample.cfg_scale if s.num_classes > 0 else 1.0
  labels = sampling.sample_labels(n, s.num_classes)  # [B]
  noise = jax.random.normal(jax.random.key(config.sample.seed), shape, jnp.float32)
  diffusion = s.diffusion

  def model_fn(p, z, t, y):
    return s.model.apply({'params': p}, z, t, y)

  @jax.jit
  def whole(p, z0):
    return samplers.sample(diffusion, functools.partial(model_fn, p), jax.random.key(0), shape,
                           labels, sampler='ddim', num_steps=num_steps, eta=0.0,
                           cfg_scale=cfg_scale, null_label=null_label, clip_x0=True,
                           init_noise=z0)

  @jax.jit
  def one_step(p, z, t, c_x0, c_eps):
    t_vec = jnp.full((n,), t, jnp.int32)  # [B]
    pred = samplers.guided_prediction(functools.partial(model_fn, p),
                                      diffusion.model_input(z, t_vec),
                                      diffusion.model_t(t_vec), labels, cfg_scale=cfg_scale,
                                      null_label=null_label)  # [B, T, H, W, C]
    x0_hat, _ = diffusion.pred_to_x0_eps(z, pred, t_vec)
    x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
    eps_hat = diffusion.eps_from_x0(z, x0_hat, t_vec)  # consistent with the clipped x0
    return c_x0 * x0_hat + c_eps * eps_hat

  ts, c_x0, c_eps = ddim_tables(diffusion, num_steps)

  def python_loop(p, z):
    for i in range(num_steps):
      z = one_step(p, z, ts[i], c_x0[i], c_eps[i])
    return z

  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    t0 = time.perf_counter()
    out_compiled = jax.block_until_ready(whole(params, noise))
    compiled_first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out_python = jax.block_until_ready(python_loop(params, noise))
    python_first_s = time.perf_counter() - t0
    compiled_s = _median_time(lambda: whole(params, noise), reps)
    python_s = _median_time(lambda: python_loop(params, noise), reps)
  diff = float(jnp.max(jnp.abs(out_compiled - out_python)))
  return {
      'config': path, 'num_steps': num_steps, 'num_samples': n, 'cfg_scale': cfg_scale,
      'compiled_first_call_s': compiled_first_s, 'python_first_call_s': python_first_s,
      'compiled_s': compiled_s, 'python_loop_s': python_s,
      'python_over_compiled': python_s / compiled_s,
      'compiled_steps_per_s': num_steps / compiled_s, 'python_steps_per_s': num_steps / python_s,
      'max_abs_difference': diff,
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.num_steps < 1 or FLAGS.loop_steps < 1 or FLAGS.reps < 1:
    raise app.UsageError('--num_steps, --loop_steps and --reps must be >= 1.')
  summary = {'throughput': []}
  for path in FLAGS.configs:
    r = throughput(path, load_config(path, FLAGS.set), FLAGS.num_steps, FLAGS.reps)
    summary['throughput'].append(r)
    print(f'{path}: {r["sampler"]} cfg {r["cfg_scale"]}, {r["num_samples"]} clips x '
          f'{r["num_steps"]} steps in {r["run_s"]:.3f} s (first call {r["first_call_s"]:.1f} s '
          f'incl. compile): {r["steps_per_s"]:.2f} steps/s, {r["clips_per_s"]:.3f} clips/s; '
          f'{r["clips_per_s_at_config_steps"]:.3f} clips/s at the config\'s '
          f'{r["config_num_steps"]} steps')
  if FLAGS.loop_config:
    r = compiled_vs_python(FLAGS.loop_config, load_config(FLAGS.loop_config, FLAGS.set),
                           FLAGS.loop_steps, FLAGS.reps)
    summary['loop'] = r
    print(f'{r["config"]}: {r["num_steps"]} DDIM steps, {r["num_samples"]} clips: compiled loop '
          f'{r["compiled_s"]:.3f} s, Python loop of jitted steps {r["python_loop_s"]:.3f} s; '
          f'python/compiled = {r["python_over_compiled"]:.3f}; max |difference| '
          f'{r["max_abs_difference"]:.2e}')
    summary['python_over_compiled'] = r['python_over_compiled']
  summary['runtime'] = runtime.current_settings()
  print(json.dumps(summary))


if __name__ == '__main__':
  app.run(main)
