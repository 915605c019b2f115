"""Smoke tests of bench/ and experiments/: every script runs once at a tiny size.

Each script runs in a subprocess (JAX_PLATFORMS=cpu, a compilation cache of this test
session's own) with flags that shrink it to seconds, and must exit 0 and print the figures
its docstring names: the labels of its table and the keys of its last JSON line. Values are
never checked where they are timings or memory; the few asserted values are the scripts'
own correctness checks (two forms of one computation agreeing, counts that follow from
the flags). The selected scripts run two at a time (most of each run is one thread
compiling), so the file takes about as long as its slowest pair.

A script that needs a trained run gets one made here: 1 step of a width-32, depth-1 model.
"""

import concurrent.futures
import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARALLEL = 2
SLOWEST = ('latent_e2e', 'compile', 'shape_word', 'sample', 'train_step')
TIMEOUT_S = 900

# A width-32, depth-1 model on clips of 2 frames of 8 x 8.
TINY_MODEL = ['model.depth=1', 'model.width=32', 'model.num_heads=2', 'model.mlp_dim=64']
TINY_CLIP = ['data.num_frames=2', 'data.height=8', 'data.width=8']
CONFIG_TINY = [f'--config.{s}' for s in TINY_MODEL + TINY_CLIP]


def _python(*args):
  return [sys.executable, *args]


def _train(config, workdir, *flags_):
  """`python -m vdit_jax.main` for 1 step, checkpoint kept, no periodic samples."""
  return _python('-m', 'vdit_jax.main', f'--config={config}', f'--workdir={workdir}',
                 *flags_, '--config.train.num_steps=1', '--config.train.batch_size=2',
                 '--config.train.warmup_steps=0', '--config.checkpoint.every_steps=1',
                 '--config.sample.every_steps=0', '--config.sample.num_samples=2',
                 '--config.sample.num_steps=2', '--config.train.tensorboard=False')


def _scripts(tmp):
  """name -> the commands it runs, in order (the last one is the script itself)."""
  text_run = os.path.join(tmp, 'text_run')
  text_flags = [*CONFIG_TINY, '--config.data.num_frames=4', '--config.data.height=16',
                '--config.data.width=16', '--config.model.text.width=16',
                '--config.model.text.depth=1', '--config.model.text.num_heads=2',
                # The experiment steps a discrete (eps or v) chain, as tiny_text had then.
                '--config.diffusion.objective=v', '--config.diffusion.t_sampling=uniform',
                '--config.diffusion.shift=1.0', '--config.sample.sampler=ddim']
  return {
      'attention': [_python('bench/attention.py', '--tokens=64,128', '--repeats=1')],
      'compile': [_python('bench/compile.py', '--config=configs/bench.py', *CONFIG_TINY,
                          '--depths=1', '--scan=true,false')],
      'input_pipeline': [_python('bench/input_pipeline.py', '--num_videos=4',
                                 '--video_frames=16', '--batch_size=2', '--num_batches=2',
                                 '--workers=0', f'--tmpdir={tmp}')],
      'latent_e2e': [_python(
          'bench/latent_e2e.py', f'--workdir={os.path.join(tmp, "latent_e2e")}',
          '--vae_steps=1', '--num_examples=4', '--dit_steps=2', '--dit_batch=2',
          '--sample_steps=1', '--heldout=1', '--vae_set=vae.base_dim=4',
          '--vae_set=train.batch_size=1', '--vae_set=train.stats_batches=1',
          *[f'--dit_set={s}' for s in TINY_MODEL], '--dit_set=sample.num_samples=1')],
      'pixel_conv': [_python('bench/pixel_conv.py', '--batch=1', '--frames=2', '--size=8',
                             '--width=4', '--repeats=1')],
      'sample': [_python('bench/sample.py', '--configs=configs/tiny.py',
                         '--loop_config=configs/bench.py',
                         *[f'--set={s}' for s in TINY_MODEL + TINY_CLIP],
                         '--set=sample.num_samples=2', '--num_steps=2', '--loop_steps=3',
                         '--reps=1')],
      'sharded_load': [_python('bench/sharded_load.py', '--processes=2', '--size_mb=8',
                               f'--tmpdir={tmp}')],
      'token_conv': [_python('bench/token_conv.py', '--grid=2,4,4', '--widths=8', '--batch=1',
                             '--repeats=1')],
      'train_step': [_python('bench/train_step.py', '--config=configs/bench.py', *CONFIG_TINY,
                             '--warmup=1', '--steps=2', '--matmul_size=64',
                             '--matmul_reps=2')],
      'vae_decode': [_python('bench/vae_decode.py', '--height=16', '--width=16',
                             '--latent_frames=1,2')],
      'detector_robustness': [_python('experiments/detector_robustness.py', '--num_clips=3')],
      'shape_word': [
          _train('configs/tiny_text.py', text_run, *text_flags),
          _python('experiments/shape_word.py', '--config=configs/tiny_text.py',
                  f'--workdir={text_run}', *text_flags, '--num_clips=1', '--loss_ts=999',
                  '--loss_draws=1', '--t_starts=999', '--scales=1', '--shapes=square')],
  }


BENCH = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, 'bench')) if f.endswith('.py'))
EXPERIMENTS = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, 'experiments'))
                     if f.endswith('.py'))


def _run_all(commands, env):
  """Runs the commands in order, stopping at the first that fails: (the last run, seconds
  of the script itself)."""
  for cmd in commands:
    start = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=TIMEOUT_S, check=False)
    if p.returncode != 0:
      break
  return p, time.perf_counter() - start


@pytest.fixture(scope='module')
def runs(request, tmp_path_factory):
  """name -> future of _run_all's result, for the scripts this session selected."""
  tmp = str(tmp_path_factory.mktemp('bench'))
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=os.path.join(tmp, 'jcc'))
  env['PYTHONPATH'] = os.pathsep.join(p for p in (REPO, env.get('PYTHONPATH')) if p)
  scripts = _scripts(tmp)
  here = os.path.abspath(__file__)
  wanted = [item.callspec.params['name'] for item in request.session.items
            if str(item.fspath) == here and hasattr(item, 'callspec')
            and 'name' in item.callspec.params]
  # Slowest first (measured), so that the two lanes end together.
  wanted.sort(key=lambda n: (SLOWEST.index(n) if n in SLOWEST else len(SLOWEST), n))
  with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
    yield {name: pool.submit(_run_all, scripts[name], env) for name in wanted}


def _output(runs, name):
  p, seconds = runs[name].result()
  assert p.returncode == 0, f'{" ".join(p.args)}\n{p.stderr[-4000:]}'
  print(f'{name}: {seconds:.1f} s')  # the script's own wall time (pytest -rP shows it)
  lines = p.stdout.strip().splitlines()
  return p.stdout, json.loads(lines[-1])


def test_every_script_has_a_smoke_test(tmp_path):
  assert sorted(_scripts(str(tmp_path))) == sorted(CHECKS) == sorted(BENCH + EXPERIMENTS)


# bench/: what each prints.
CHECKS = {
    'attention': (['blockwise', 'xla', 'fwd+bwd total'], ['backend', 'rows']),
    'compile': (['unrolled_over_scanned_compile_s_depth1'],
                ['cases', 'unrolled_over_scanned_compile_s_depth1',
                 'unrolled_over_scanned_hlo_chars_depth1']),
    'input_pipeline': (['make_shards', 'synthetic num_workers=0', 'files     num_workers=0',
                        'shards    num_workers=0'],
                       ['cases', 'make_shards_clips_per_s', 'clip_shape']),
    'latent_e2e': (['[vae]', '[encode]', '[dit]', '[sample]', 'vae_heldout_psnr_db'],
                   ['vae_train_psnr_db', 'vae_heldout_psnr_db', 'dit_loss_start', 'dit_loss_end',
                    'sample_latents_shape', 'mp4_frames_shape', 'seconds']),
    'pixel_conv': (['lax 3-D conv', 'shifted matmuls', 'lax 2-D conv over frames'],
                   ['ms', 'kernel', 'shape']),
    'sample': (['steps/s', 'clips/s', 'python/compiled', 'max |difference|'],
               ['throughput', 'loop', 'python_over_compiled']),
    'sharded_load': (['share', 'bytes read', 'peak RSS growth'], ['checkpoint_bytes', 'rows']),
    'token_conv': (['shifted slices', 'lax grouped conv', 'Dense D->4D'], ['rows']),
    'train_step': (['fraction', 'minor faults', 'runtime'],
                   ['step_s', 'tokens_per_s', 'model_flops_per_s', 'matmul_flops_per_s',
                    'roofline_fraction', 'minor_faults_per_step', 'sys_s_per_step', 'runtime']),
    'vae_decode': (['whole-clip decode', 'one chunk', 'tiled'], ['rows']),
    'detector_robustness': (['shape accuracy raw', 'object mask'],
                            ['small (0.2-0.35)', 'big (0.4-0.55)']),
    'shape_word': (['held-out square clips', 'word-swap loss', 're-denoised from t=999'],
                   ['step', 'word_swap_loss', 'redenoise']),
}


@pytest.mark.parametrize('name', sorted(CHECKS))
def test_smoke(runs, name):
  stdout, result = _output(runs, name)
  text, keys = CHECKS[name]
  for label in text:
    assert label in stdout, f'{name}: {label!r} not printed'
  for key in keys:
    assert key in result, f'{name}: {key!r} not in the JSON line'
  # The scripts' own like-for-like checks (not timings).
  if name == 'attention':
    assert {(r['impl'], r['tokens']) for r in result['rows']} == {
        (i, n) for i in ('xla', 'blockwise') for n in (64, 128)}
  elif name == 'compile':
    cases = result['cases']
    assert [(c['depth'], c['scan_layers']) for c in cases] == [(1, True), (1, False)]
    assert all('error' not in c and c['compilation_cache'] is False for c in cases)
  elif name == 'input_pipeline':
    assert {(c['source'], c['num_workers']) for c in result['cases']} == {
        (s, 0) for s in ('synthetic', 'files', 'shards')}
  elif name == 'latent_e2e':
    assert result['sample_latents_shape'] == [1, 3, 4, 4, 16]  # vae_tiny's latents
    assert result['mp4_frames_shape'][0] == 9
    assert sorted(result['seconds']) == ['dit_train', 'encode', 'sample', 'vae_train']
  elif name == 'sample':
    (throughput,) = result['throughput']
    assert throughput['num_steps'] == 2 and result['loop']['num_steps'] == 3
    # The Python loop of single steps computes the same clips as the compiled sampler.
    assert result['loop']['max_abs_difference'] < 1e-4
  elif name == 'sharded_load':
    assert sorted((r['reader'], r['process']) for r in result['rows']) == [
        (reader, p) for reader in ('direct', 'safe_open') for p in (0, 1)]
    # Each of the 2 processes read exactly the half its devices hold.
    for r in result['rows']:
      assert r['bytes_read'] == r['bytes_held'] == result['checkpoint_bytes'] // 2
  elif name == 'token_conv':
    (row,) = result['rows']
    assert row['max_abs_diff'] < 1e-4  # the grouped conv computes the same thing
  elif name == 'train_step':
    assert result['tokens_per_step'] == 2 * (2 * 4 * 4)  # batch 2 x (2/1 x 8/2 x 8/2)
    assert result['roofline_fraction'] == pytest.approx(
        result['model_flops_per_s'] / result['matmul_flops_per_s'])
    assert result['tokens_per_s'] == pytest.approx(result['tokens_per_step'] / result['step_s'])
    assert 'runtime' in result and result['minor_faults_per_step'] >= 0
  elif name == 'vae_decode':
    assert [r['latent_frames'] for r in result['rows']] == [1, 2]
