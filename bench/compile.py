r"""Compile time and HLO size of the train step vs depth, with layers scanned and unrolled.

python bench/compile.py --config=configs/bench.py [--depths=4,12,28 --scan=true,false]

Each (depth, scan_layers) case runs in a fresh Python process with JAX's persistent
compilation cache off, so every figure is a cold compile: the child builds the trainer's
jitted step (`loop.jit_train_step`) for abstract inputs of the config's shapes (nothing is
allocated or run), then times `.lower()` (tracing to StableHLO) and `.compile()` (XLA), and
reports the size of the lowered StableHLO text and of the optimised HLO text (characters
and lines). `nn.scan` traces one block whatever the depth, so scanned sizes should stay
flat while unrolled ones grow with depth. --config.* overrides reach every child.

A measurement, not a test: it never fails on a number (a case that fails is reported with
its error). On a shared machine the times move with the load. Last line: one JSON object.
"""

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vdit_jax import runtime  # pylint: disable=g-import-not-at-top

if __name__ == '__main__':
  runtime.setup()  # before jax is imported: allocator, huge pages, XLA flags (may re-exec)

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a configs/*.py file.',
                                lock_config=True)
flags.DEFINE_list('depths', ['4', '12', '28'], 'model.depth values to compile.')
flags.DEFINE_list('scan', ['true', 'false'], 'model.scan_layers values to compile.')
flags.DEFINE_integer('child_timeout', 1800, 'Seconds before a case is given up.')
# Internal: set by the parent on each child's command line.
flags.DEFINE_integer('child_depth', None, 'Run one case in this process (internal).')
flags.DEFINE_bool('child_scan', None, 'scan_layers of the one case (internal).')

_BOOLS = {'true': True, '1': True, 'on': True, 'false': False, '0': False, 'off': False}


def _parse_bool(value: str) -> bool:
  if value.lower() not in _BOOLS:
    raise app.UsageError(f'--scan={value!r}: each value must be one of {sorted(_BOOLS)}.')
  return _BOOLS[value.lower()]


def compile_case(config) -> dict:
  """Lowers and compiles the train step for abstract inputs; times and HLO sizes."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp

  from vdit_jax.data import synthetic
  from vdit_jax.parallel import mesh as mesh_lib
  from vdit_jax.train import loop
  from vdit_jax.train import state as state_lib

  jax.config.update('jax_enable_compilation_cache', False)
  t0 = time.perf_counter()
  s = loop.build(config, None, num_classes=synthetic.NUM_CLASSES)
  build_s = time.perf_counter() - t0
  d, b = config.data, config.train.batch_size
  state = state_lib.abstract_with_shardings(s.abstract_state, s.state_shardings)
  shardings = loop.batch_shardings(s.mesh, s.rules)
  batch = {
      'video': jax.ShapeDtypeStruct((b, d.num_frames, d.height, d.width, d.channels),
                                    jnp.float32, sharding=shardings['video']),  # [B, T, H, W, C]
      'label': jax.ShapeDtypeStruct((b,), jnp.int32, sharding=shardings['label']),  # [B]
  }
  key = jax.eval_shape(lambda: jax.random.key(0))
  rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=mesh_lib.replicated(s.mesh))
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    t0 = time.perf_counter()
    lowered = loop.jit_train_step(s).lower(state, batch, rng)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
  stablehlo = lowered.as_text()
  hlo = compiled.as_text()
  return {
      'depth': s.model.spec.depth, 'scan_layers': s.model.spec.scan_layers,
      'build_s': build_s, 'lower_s': lower_s, 'compile_s': compile_s,
      'stablehlo_chars': len(stablehlo), 'stablehlo_lines': stablehlo.count('\n'),
      'hlo_chars': len(hlo), 'hlo_lines': hlo.count('\n'),
      'params': state_lib.param_count(s.abstract_state.params),
      'compilation_cache': bool(jax.config.jax_enable_compilation_cache),
  }


def _child_env() -> dict:
  env = dict(os.environ)
  env['JAX_ENABLE_COMPILATION_CACHE'] = 'false'
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  return env


def run_case(depth: int, scan: bool, config_args, timeout_s: int) -> dict:
  """One case in a fresh interpreter; its last stdout line is the case's JSON object."""
  script = os.path.abspath(__file__)
  cmd = [sys.executable, script, *config_args, f'--child_depth={depth}',
         f'--child_scan={str(scan).lower()}']
  t0 = time.perf_counter()
  try:
    p = subprocess.run(cmd, env=_child_env(), capture_output=True, text=True,
                       timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {'depth': depth, 'scan_layers': scan, 'error': f'timed out after {timeout_s} s'}
  wall_s = time.perf_counter() - t0
  lines = [l for l in p.stdout.splitlines() if l.startswith('{')]
  if p.returncode or not lines:
    return {'depth': depth, 'scan_layers': scan,
            'error': f'exit {p.returncode}: {p.stderr.strip()[-1500:]}'}
  result = json.loads(lines[-1])
  result['process_wall_s'] = wall_s
  return result


def _config_args(argv):
  """--config=... and --config.a.b=... from the command line, for the children."""
  return [a for a in argv[1:] if a.startswith('--config=') or a.startswith('--config.')]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.child_depth is not None:
    config = FLAGS.config
    with config.unlocked():
      config.model.depth = FLAGS.child_depth
      config.model.scan_layers = bool(FLAGS.child_scan)
    print(json.dumps(compile_case(config)))
    return
  depths = [int(x) for x in FLAGS.depths]
  if not depths or min(depths) < 1:
    raise app.UsageError(f'--depths={FLAGS.depths} must be positive integers.')
  scans = [_parse_bool(x) for x in FLAGS.scan]
  config_args = _config_args(sys.argv)
  rows = []
  print(f'{"depth":>5} {"scan":>5} {"lower s":>8} {"compile s":>9} {"StableHLO chars":>15} '
        f'{"HLO chars":>10} {"HLO lines":>9}')
  for depth in depths:
    for scan in scans:
      r = run_case(depth, scan, config_args, FLAGS.child_timeout)
      rows.append(r)
      if 'error' in r:
        print(f'{depth:>5} {str(scan):>5} failed: {r["error"]}')
        continue
      print(f'{depth:>5} {str(scan):>5} {r["lower_s"]:>8.2f} {r["compile_s"]:>9.2f} '
            f'{r["stablehlo_chars"]:>15,} {r["hlo_chars"]:>10,} {r["hlo_lines"]:>9,}')
  summary = {'cases': rows}
  ok = {(r['depth'], r['scan_layers']): r for r in rows if 'error' not in r}
  # Unrolled / scanned ratios at each depth where both compiled, measured in this run.
  for depth in depths:
    if (depth, True) in ok and (depth, False) in ok:
      on, off = ok[(depth, True)], ok[(depth, False)]
      summary[f'unrolled_over_scanned_compile_s_depth{depth}'] = off['compile_s'] / on['compile_s']
      summary[f'unrolled_over_scanned_hlo_chars_depth{depth}'] = off['hlo_chars'] / on['hlo_chars']
  for key, value in summary.items():
    if key != 'cases':
      print(f'{key}: {value:.2f}')
  print(json.dumps(summary))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
