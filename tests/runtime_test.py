"""vdit_jax/runtime.py (the launch path's host set-up) and the bench/ scripts' output.

The set-up is checked as a pure function of the environment (opt-out, allocator found or
absent, the user's own variables kept, XLA_FLAGS merged) and end to end in a subprocess:
it restarts exactly once, the allocator is really mapped into the restarted process, and
the opt-out runs once with nothing changed. The three bench scripts run concurrently on
tiny shapes and must end with a JSON line holding their documented keys.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from vdit_jax import runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JEMALLOC = '/opt/lib/libjemalloc.so.2'
TCMALLOC = '/opt/lib/libtcmalloc_minimal.so.4'
OLD = (2, 31)  # a glibc without the hugetlb tunable: auto preloads an allocator


def finder(*available):
  """A `find` for compose_env that knows only the given library paths."""
  def find(names):
    for path in available:
      if os.path.basename(path) in names:
        return path
    return None
  return find


def test_default_on_recent_glibc_is_its_malloc_with_huge_pages():
  for glibc in ((2, 35), (2, 36), (3, 0)):
    plan = runtime.compose_env({}, platform='linux', find=finder(TCMALLOC, JEMALLOC),
                               glibc=glibc)
    assert plan.changes == {'GLIBC_TUNABLES': runtime.GLIBC_TUNABLES}, glibc
    assert plan.needs_reexec  # the loader reads GLIBC_TUNABLES at start-up only
  asked = runtime.compose_env({runtime.ENV_ALLOCATOR: 'jemalloc'}, platform='linux',
                              find=finder(TCMALLOC, JEMALLOC), glibc=(2, 36))
  assert asked.changes['LD_PRELOAD'] == JEMALLOC


def test_glibc_version_reads_this_machine():
  version = runtime.glibc_version()
  assert version is None or (len(version) == 2 and all(isinstance(v, int) for v in version))


def test_default_preloads_jemalloc_with_its_settings_and_restarts():
  plan = runtime.compose_env({}, platform='linux', find=finder(TCMALLOC, JEMALLOC), glibc=OLD)
  assert plan.changes['LD_PRELOAD'] == JEMALLOC
  assert plan.changes['MALLOC_CONF'] == dict(runtime.ALLOCATORS['jemalloc'].env)['MALLOC_CONF']
  assert 'GLIBC_TUNABLES' not in plan.changes
  assert plan.needs_reexec


def test_tcmalloc_when_jemalloc_is_absent_or_asked_for():
  plan = runtime.compose_env({}, platform='linux', find=finder(TCMALLOC), glibc=OLD)
  assert plan.changes['LD_PRELOAD'] == TCMALLOC
  assert plan.changes['TCMALLOC_RELEASE_RATE'] == '0'
  assert any('jemalloc not found' in n for n in plan.notes)
  asked = runtime.compose_env({runtime.ENV_ALLOCATOR: 'tcmalloc'}, platform='linux',
                              find=finder(TCMALLOC, JEMALLOC))
  assert asked.changes['LD_PRELOAD'] == TCMALLOC
  # A named allocator that is not installed falls back to the others.
  fallback = runtime.compose_env({runtime.ENV_ALLOCATOR: 'tcmalloc'}, platform='linux',
                                 find=finder(JEMALLOC))
  assert fallback.changes['LD_PRELOAD'] == JEMALLOC


def test_no_allocator_installed_falls_back_to_glibc_tunables():
  plan = runtime.compose_env({}, platform='linux', find=finder(), glibc=OLD)
  assert 'LD_PRELOAD' not in plan.changes
  assert plan.changes['GLIBC_TUNABLES'] == runtime.GLIBC_TUNABLES
  assert plan.needs_reexec
  assert sum('not found' in n for n in plan.notes) == len(runtime.AUTO_ORDER)
  system = runtime.compose_env({runtime.ENV_ALLOCATOR: 'system'}, platform='linux',
                               find=finder(JEMALLOC))
  assert 'LD_PRELOAD' not in system.changes
  assert system.changes['GLIBC_TUNABLES'] == runtime.GLIBC_TUNABLES


@pytest.mark.parametrize('value', ['0', 'off', 'False', 'no'])
def test_opt_out_changes_nothing(value):
  plan = runtime.compose_env({runtime.ENV_SWITCH: value}, platform='linux',
                             find=finder(JEMALLOC))
  assert plan.changes == {} and not plan.needs_reexec


def test_user_variables_are_kept():
  env = {'LD_PRELOAD': '/my/libfoo.so', 'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}
  plan = runtime.compose_env(env, platform='linux', find=finder(JEMALLOC))
  assert plan.changes == {}  # the allocator and the tunables are the user's
  own_preload = runtime.compose_env({'LD_PRELOAD': '/my/libfoo.so'}, platform='linux',
                                    find=finder(JEMALLOC))
  assert own_preload.changes == {'GLIBC_TUNABLES': runtime.GLIBC_TUNABLES}
  own_conf = runtime.compose_env({'MALLOC_CONF': 'narenas:1'}, platform='linux',
                                 find=finder(JEMALLOC), glibc=OLD)
  assert own_conf.changes['LD_PRELOAD'] == JEMALLOC
  assert 'MALLOC_CONF' not in own_conf.changes
  kept = runtime.compose_env({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, platform='linux',
                             find=finder())
  assert 'GLIBC_TUNABLES' not in kept.changes


def test_marker_and_other_platforms_stop_any_change():
  # The restarted process sees the marker and does not restart again.
  plan = runtime.compose_env({runtime.ENV_MARKER: 'x'}, platform='linux', find=finder(JEMALLOC))
  assert plan.changes == {} and not plan.needs_reexec
  mac = runtime.compose_env({}, platform='darwin', find=finder(JEMALLOC))
  assert mac.changes == {} and not mac.needs_reexec


def test_bad_allocator_name_is_rejected():
  with pytest.raises(ValueError, match=r"VDIT_ALLOCATOR='mimalloc' is not one of"):
    runtime.compose_env({runtime.ENV_ALLOCATOR: 'mimalloc'}, platform='linux',
                        find=finder(JEMALLOC))


def test_merge_xla_flags_keeps_the_users_and_adds_only_new_names():
  merged = runtime.merge_xla_flags('--xla_force_host_platform_device_count=8 --xla_a=1',
                                   ['--xla_a=2', '--xla_b=true'])
  assert merged.split() == ['--xla_force_host_platform_device_count=8', '--xla_a=1',
                            '--xla_b=true']
  assert runtime.merge_xla_flags('', []) == ''


def test_setup_execs_once_with_the_marker():
  calls = []
  env = {}
  plan = runtime.setup(argv=['python', '-m', 'vdit_jax.main', '--x=1'], environ=env,
                       execv=lambda path, argv: calls.append((path, list(argv))))
  assert calls == [(sys.executable, ['python', '-m', 'vdit_jax.main', '--x=1'])]
  assert runtime.ENV_MARKER in env
  assert all(env[k] == v for k, v in plan.changes.items())
  # What the restarted process would see: the same environment, marker included.
  again = runtime.setup(argv=['python'], environ=dict(env),
                        execv=lambda path, argv: calls.append(path))
  assert len(calls) == 1 and again.changes == {}


_PROBE = textwrap.dedent('''
    import json, os, sys
    sys.path.insert(0, {repo!r})
    with open({log!r}, 'a') as f:
      f.write('start\\n')
    from vdit_jax import runtime
    runtime.setup()
    maps = open('/proc/self/maps').read()
    print(json.dumps({{k: os.environ.get(k) for k in ('LD_PRELOAD', 'GLIBC_TUNABLES',
        'VDIT_RUNTIME_APPLIED')}} | {{'mapped': [l.split()[-1] for l in maps.splitlines()
        if 'malloc' in l.split()[-1]]}}))
    ''')


def _run_probe(tmp_path, **env_extra):
  log = tmp_path / 'starts.log'
  script = tmp_path / 'probe.py'
  script.write_text(_PROBE.format(repo=REPO, log=str(log)))
  env = {k: v for k, v in os.environ.items()
         if k not in ('LD_PRELOAD', 'GLIBC_TUNABLES', 'MALLOC_CONF', runtime.ENV_MARKER,
                      runtime.ENV_SWITCH, runtime.ENV_ALLOCATOR)}
  env.update(env_extra)
  p = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                     timeout=120)
  assert p.returncode == 0, p.stderr
  return json.loads(p.stdout.strip().splitlines()[-1]), log.read_text().count('start'), p.stderr


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='LD_PRELOAD is Linux only')
def test_process_restarts_once_and_the_allocator_is_loaded(tmp_path):
  expected = runtime.compose_env({})
  out, starts, stderr = _run_probe(tmp_path)
  assert starts == 2  # the original process and one restart, never a loop
  assert out['VDIT_RUNTIME_APPLIED'] and 'vdit_jax.runtime:' in stderr
  if 'LD_PRELOAD' in expected.changes:
    assert out['LD_PRELOAD'] == expected.changes['LD_PRELOAD']
    assert out['mapped'] and os.path.realpath(expected.changes['LD_PRELOAD']) in [
        os.path.realpath(m) for m in out['mapped']]
  else:  # no allocator on this machine: glibc tunables instead
    assert out['GLIBC_TUNABLES'] == runtime.GLIBC_TUNABLES


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='LD_PRELOAD is Linux only')
def test_opt_out_runs_once_unchanged(tmp_path):
  out, starts, stderr = _run_probe(tmp_path, VDIT_RUNTIME='0')
  assert starts == 1
  assert out['LD_PRELOAD'] is None and out['GLIBC_TUNABLES'] is None and not out['mapped']
  assert 'vdit_jax.runtime' not in stderr


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='LD_PRELOAD is Linux only')
def test_missing_preload_library_degrades_gracefully(tmp_path):
  # A user's LD_PRELOAD naming a library that is not there: the loader warns, the run goes on,
  # and the set-up leaves the user's choice alone.
  out, starts, _ = _run_probe(tmp_path, LD_PRELOAD=str(tmp_path / 'libnot_there.so'))
  assert starts == 2  # restarted for the glibc-side settings only
  assert out['LD_PRELOAD'] == str(tmp_path / 'libnot_there.so') and not out['mapped']


# A tiny model for the eval script's run (the bench scripts' smoke tests: bench_test.py).
_TINY = ['--config.model.depth=1', '--config.model.width=32', '--config.model.num_heads=2',
         '--config.model.mlp_dim=64', '--config.data.num_frames=2', '--config.data.height=8',
         '--config.data.width=8']


def test_denoise_error_diagnostic_writes_its_grid_and_probe(tmp_path):
  """vdit_jax.eval.denoise_error on a 2-step model: per-t errors, the PNG grid and the probe."""
  from PIL import Image
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  common = ['--config=configs/tiny.py', f'--workdir={tmp_path}', *_TINY,
            '--config.train.batch_size=2', '--config.train.num_steps=2',
            '--config.checkpoint.every_steps=2', '--config.sample.num_steps=2',
            '--config.sample.num_samples=2', '--config.sample.formats=gif']
  train = subprocess.run([sys.executable, '-m', 'vdit_jax.main', *common], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
  assert train.returncode == 0, train.stderr[-3000:]
  image = tmp_path / 'x0.png'
  p = subprocess.run([sys.executable, '-m', 'vdit_jax.eval.denoise_error', *common,
                      '--batch=2',
                      f'--image={image}', '--probe'], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith('{')]
  per_t = [r for r in rows if 't' in r]
  # configs/tiny.py is rectified flow: t in [0, 1].
  assert [r['t'] for r in per_t] == [0.01, 0.1, 0.3, 0.5, 0.7, 0.85, 0.95, 1.0]
  assert all(np.isfinite(r['x0_mse']) and r['x0_mse'] >= 0 for r in per_t)
  (probe,) = [r for r in rows if 'probe_t' in r]
  assert probe['probe_t'] == 0.9 and probe['last_tubelet_change'] > 0
  # 2 clips x frames (0, T/2), 8x8 pixels with 2 of padding, 1 + 2 x 8 rows, scaled 3x.
  with Image.open(image) as im:
    assert im.size == (2 * 2 * 10 * 3, 17 * 10 * 3)


def test_several_cpu_devices_get_threads_enough_for_their_collectives():
  base = {'GLIBC_TUNABLES': 'x'}  # the allocator is the user's: only the pool is decided
  one = runtime.compose_env(base, platform='linux', find=finder())
  assert runtime.ENV_PJRT_NPROC not in one.changes  # one device: XLA's default
  flags = '--xla_cpu_foo=1 --xla_force_host_platform_device_count=8'
  eight = runtime.compose_env(dict(base, XLA_FLAGS=flags), platform='linux', find=finder())
  assert eight.changes == {runtime.ENV_PJRT_NPROC: str(max(os.cpu_count(), 16))}
  assert not eight.needs_reexec  # read when jax makes its CPU client, after setup
  four = runtime.compose_env(dict(base, JAX_NUM_CPU_DEVICES='4'), platform='linux',
                             find=finder())
  assert four.changes == {runtime.ENV_PJRT_NPROC: str(max(os.cpu_count(), 8))}
  kept = runtime.compose_env(dict(base, XLA_FLAGS=flags, PJRT_NPROC='3'), platform='linux',
                             find=finder())
  assert kept.changes == {}


def test_cpu_only_host_gets_jax_platforms_cpu_unless_the_user_set_it():
  plan = runtime.compose_env({'GLIBC_TUNABLES': 'x'}, platform='linux', find=finder(),
                             glibc=(2, 36), cpu_only='libtpu installed, no TPU or GPU')
  assert plan.changes['JAX_PLATFORMS'] == 'cpu'
  assert not plan.needs_reexec  # JAX reads it when its backends start, not the loader
  kept = runtime.compose_env({'JAX_PLATFORMS': 'tpu,cpu'}, platform='linux', find=finder(),
                             glibc=(2, 36), cpu_only='libtpu installed, no TPU or GPU')
  assert 'JAX_PLATFORMS' not in kept.changes
  assert 'JAX_PLATFORMS' not in runtime.compose_env({}, platform='linux', find=finder(),
                                                    glibc=(2, 36)).changes


def test_a_cpu_run_with_libtpu_installed_prints_no_libtpu_errors(tmp_path):
  """Issue 27, point 7: libtpu's start-up errors on a host without TPU."""
  if runtime.cpu_only_host() is None:
    pytest.skip('libtpu is not installed, or this host has a TPU or GPU')
  env = {k: v for k, v in os.environ.items()
         if k not in ('JAX_PLATFORMS', runtime.ENV_MARKER, runtime.ENV_SWITCH)}
  code = ('from vdit_jax import runtime; runtime.setup()\n'
          'import jax; print(jax.devices()[0].platform)')
  p = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                     timeout=120, check=False)
  assert p.returncode == 0 and p.stdout.split()[-1] == 'cpu', p.stderr
  for noise in ('Failed to find host bounds', 'unexpected worker hostname',
                'could not determine TPU'):
    assert noise not in p.stderr, p.stderr
