"""Training-speed features: remat policies, bf16 compute over f32 params, gradient
accumulation, donated state, the persistent compilation cache, and MFU in the logs."""

import contextlib
import io
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.extend import core as jax_core

from configs import tiny
from vdit_jax.config import defaults
from vdit_jax.config import validate
from vdit_jax.data import pipeline
from vdit_jax.diffusion import objectives
from vdit_jax.model import spec as spec_lib
from vdit_jax.model import blocks
from vdit_jax.model import dit
from vdit_jax.train import checkpoint as ckpt_lib
from vdit_jax.train import compile_cache
from vdit_jax.train import loop
from vdit_jax.train import metrics as metrics_lib
from vdit_jax.train import mfu as mfu_lib
from vdit_jax.train import state as state_lib
from vdit_jax.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _restore_cache_dir():
  """Tests that point JAX's compilation cache somewhere put it back afterwards."""
  before = jax.config.jax_compilation_cache_dir
  yield
  compile_cache.configure(before or '')


def model_cfg(**overrides):
  cfg = defaults.base_config().model
  cfg.update(dict(
      variant=None, width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=(1, 4, 4),
      pos_embed='sincos', qk_norm=True, attention_impl='xla', scan_layers=True,
      remat_policy='none', remat_names='', dtype='float32', param_dtype='float32'))
  with cfg.ignore_type():  # tests also give values of the wrong type
    cfg.update(overrides)
  return cfg


def model_inputs(b=2):
  rng = np.random.default_rng(0)
  video = rng.normal(size=(b, 2, 8, 8, 3)).astype(np.float32)  # [B, T, H, W, C], 8 tokens
  return video, np.linspace(3.0, 900.0, b).astype(np.float32), np.arange(b, dtype=np.int32)


def randomise(params, seed=1, scale=0.1):
  """Non-zero values everywhere: zero-initialised layers would hide differences."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                   for x, k in zip(leaves, keys)])


def random_params(model, video, t, y):
  """Initialised params plus noise, in one compiled program (eager init compiles op by op,
  which costs more than this whole file's model compiles)."""
  return jax.jit(lambda: randomise(nn.unbox(model.init(jax.random.key(0), video, t, y)[
      'params'])))()


def abstract_params(model, video, t, y):
  return jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), video, t, y)['params']))


def train_config(**train):
  """A small trainable config: width 64 over 48-value tubelets, 16 tokens per clip."""
  config = tiny.get_config()
  config.model.variant = None
  config.model.update(dict(width=64, depth=2, num_heads=2, mlp_dim=128, patch_size=(1, 4, 4)))
  config.data.update(dict(num_frames=4, height=8, width=8))
  config.train.update(dict(batch_size=8, num_steps=3, warmup_steps=1, log_every=1))
  config.train.update(train)
  config.checkpoint.update(dict(every_steps=100, async_save=False))
  config.sample.update(dict(num_steps=1, num_samples=2, formats='gif'))
  return config


# ------------------------------------------------------------------ remat policies

def _loss(model, video, t, y):
  def loss(params):
    return jnp.mean(jnp.square(model.apply({'params': params}, video, t, y) - video))
  return loss


def _remat_model(policy, names='', **overrides):
  return dit.build_model(spec_lib.from_config(model_cfg(remat_policy=policy, remat_names=names, **overrides)), 3, 10)


def _memory_inputs():
  """4 layers, 64 tokens of width 32, MLP 256: the activations outweigh the weights."""
  video, t, y = model_inputs(b=4)
  video = np.tile(video, (1, 2, 2, 2, 1))  # [4, 4, 16, 16, 3]
  model = _remat_model('none', depth=4, mlp_dim=256)
  params = random_params(model, video, t, y)
  return params, video, t, y


def test_every_remat_policy_gives_the_loss_and_grads_of_none_with_less_memory():
  params, video, t, y = _memory_inputs()
  kw = dict(depth=4, mlp_dim=256)
  results, temp_bytes = {}, {}
  # The dots policies are checked the same way in tests/model_test.py; 'full' is an alias.
  assert spec_lib.REMAT_POLICIES['full'] is spec_lib.REMAT_POLICIES['nothing_saveable']
  for policy, names in (('none', ''), ('nothing_saveable', ''),
                        ('save_named', 'attn_out,mlp_hidden')):
    fn = jax.value_and_grad(_loss(_remat_model(policy, names, **kw), video, t, y))
    compiled = jax.jit(fn).lower(params).compile()
    temp_bytes[policy] = compiled.memory_analysis().temp_size_in_bytes
    results[policy] = compiled(params)
  # Saving nothing keeps one layer's activations at a time, 'none' all four layers'.
  assert temp_bytes['nothing_saveable'] < 0.5 * temp_bytes['none'], temp_bytes
  assert temp_bytes['save_named'] < 0.5 * temp_bytes['none'], temp_bytes
  want_loss, want_grads = results.pop('none')
  for policy, (loss, grads) in results.items():
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6, err_msg=policy)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7,
                                                         err_msg=policy), grads, want_grads)


def _saved_residuals(policy, names, scan_layers):
  """The lines of jax.ad_checkpoint.print_saved_residuals for the model's loss."""
  video, t, y = model_inputs()
  model = _remat_model(policy, names, scan_layers=scan_layers)
  params = abstract_params(model, video, t, y)  # tracing only
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    jax.ad_checkpoint.print_saved_residuals(_loss(model, video, t, y), params)
  return out.getvalue().splitlines()


def _named(policy, names=''):
  return sorted(line.split(" named '")[1].split("'")[0]
                for line in _saved_residuals(policy, names, False) if " named '" in line)


def test_save_named_keeps_exactly_the_named_activations():
  depth = 2
  assert _named('save_named', 'attn_out, mlp_hidden') == (
      ['attn_out'] * depth + ['mlp_hidden'] * depth)
  assert _named('save_named', 'mlp_in') == ['mlp_in'] * depth
  assert _named('nothing_saveable') == []
  assert _named('none') == sorted(list(blocks.CHECKPOINT_NAMES) * depth)
  # Scanned layers: what the backward scan keeps is stacked over the layers. Only the
  # carry [L, B, N, D] without names; the MLP hidden [L, B, N, F] too with it named.
  def scan_residuals(policy, names=''):
    return sorted(line.split(' ')[0] for line in _saved_residuals(policy, names, True)
                  if 'output of scan' in line)
  assert scan_residuals('nothing_saveable') == ['f32[2,2,8,32]']
  assert scan_residuals('save_named', 'mlp_hidden') == ['f32[2,2,8,32]', 'f32[2,2,8,64]']


@pytest.mark.parametrize('overrides,message', [
    (dict(remat_policy='save_named', remat_names='attn_out,qkv'),
     r"names \['qkv'\], which are not block activations; known names"),
    (dict(remat_policy='save_named', remat_names=' , '),
     "model.remat_policy='save_named' needs model.remat_names"),
    (dict(remat_policy='full', remat_names='attn_out'),
     "is only read by model.remat_policy='save_named', not 'full'"),
    (dict(remat_policy='dots'), "model.remat_policy='dots' is not one of"),
])
def test_remat_config_errors(overrides, message):
  with pytest.raises(ValueError, match=message):
    dit.build_model(spec_lib.from_config(model_cfg(**overrides)), 3, 10)


# ------------------------------------------------------------------ bf16 compute

def _equations(jaxpr):
  """Every equation of a jaxpr, sub-jaxprs (scan, jit, custom_vjp, remat) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else (value,):
        if isinstance(sub, jax_core.ClosedJaxpr):
          yield from _equations(sub.jaxpr)
        elif isinstance(sub, jax_core.Jaxpr):
          yield from _equations(sub)


def test_bf16_compute_keeps_f32_params_and_f32_statistics():
  video, t, y = model_inputs()
  bf16 = dit.build_model(spec_lib.from_config(model_cfg(dtype='bfloat16', qk_norm=True)), 3, 10)
  params = abstract_params(bf16, video, t, y)  # tracing only: no compile
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  assert jax.eval_shape(lambda p: bf16.apply({'params': p}, video, t, y),
                        params).dtype == jnp.float32

  jaxpr = jax.make_jaxpr(lambda p: bf16.apply({'params': p}, video, t, y))(params)
  eqns = list(_equations(jaxpr.jaxpr))

  def in_dtypes(eqn):
    return {str(v.aval.dtype) for v in eqn.invars if hasattr(v.aval, 'dtype')}

  # The matmuls run in bf16...
  dots = [e for e in eqns if e.primitive.name == 'dot_general']
  assert dots and all(in_dtypes(e) == {'bfloat16'} for e in dots)
  # ...the attention logits come out in f32 and the softmax max/exp/sum stay in f32...
  # (the logits are [B, K, N, M] or a grouped layout of them, keys M last; 8 tokens)
  logits = [e.outvars[0].aval for e in dots if e.outvars[0].aval.dtype == jnp.float32]
  assert len(logits) == 1 and logits[0].shape[0] == 2 and logits[0].shape[-1] == 8, logits
  maxes = [e.invars[0].aval for e in eqns if e.primitive.name == 'reduce_max']
  assert [m.size for m in maxes] == [logits[0].size]
  # ...and every reduction (LayerNorm mean/var, RMSNorm, softmax) and exp/rsqrt is f32.
  stats = [e for e in eqns if e.primitive.name in
           ('reduce_sum', 'reduce_max', 'reduce_min', 'exp', 'log', 'rsqrt', 'sqrt')]
  bad = [(e.primitive.name, in_dtypes(e)) for e in stats if in_dtypes(e) != {'float32'}]
  assert stats and not bad, bad
  # Per layer: 2 LayerNorms, q and k RMSNorms -> 4 rsqrt, plus the final LayerNorm.
  assert sum(e.primitive.name == 'rsqrt' for e in eqns) == 4 + 1


def test_bf16_train_step_keeps_f32_state():
  config = train_config()
  config.model.dtype = 'bfloat16'
  s = loop.build(config, None)
  state = state_lib.abstract_with_shardings(s.abstract_state, s.state_shardings)
  batch, rng = abstract_step_inputs(s, config)[1:]
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    new, metrics = jax.eval_shape(loop.jit_train_step(s), state, batch, rng)
  for tree in (state.params, new.params, new.ema_params, new.opt_state):
    floats = {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}
    assert floats == {jnp.dtype(jnp.float32)}
  assert all(m.dtype == jnp.float32 for m in metrics.values())


# ------------------------------------------------------------------ gradient accumulation

def test_k_micro_batches_equal_one_big_batch_and_the_state_is_donated(tmp_path):
  # No warm-up: optax's schedule counts its own steps, so a fresh state's first update
  # would have learning rate 0 and hide any difference in the updates.
  config, config2 = train_config(warmup_steps=0), train_config(warmup_steps=0,
                                                                grad_accum_steps=2)
  config.model.label_dropout = config2.model.label_dropout = 0.5  # label draws matter too
  s = loop.build(config, None)
  state, _ = state_lib.create_state(s.init_fn, jax.random.key(0), s.mesh, s.rules)
  state = state.replace(step=jnp.asarray(2, jnp.int32), **jax.jit(lambda p: dict(
      params=randomise(p), ema_params=randomise(p, 2)))(state.params))
  batch = jax.tree.map(jnp.asarray, next(pipeline.make_dataset(config.data, 8, seed=0)))
  rng = jax.random.key(5)
  saved = jax.tree.map(np.array, state)  # a copy: a zero-copy CPU view would pin the buffers
  # A copy with the step's exact input shardings (else jit moves it and donates the move).
  copy = jax.jit(lambda x: jax.tree.map(jnp.copy, x), out_shardings=s.state_shardings)(state)
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), keep=2, every_steps=1, async_save=True)
  step2 = loop.jit_train_step(loop.build(config2, None))  # grad_accum_steps=2
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    new2, m2 = step2(copy, batch, rng)
    step1 = loop.jit_train_step(s)  # grad_accum_steps=1
    compiled = step1.lower(state, batch, rng).compile()
    # As the loop does: save asynchronously, then donate the same state to the next step.
    checkpointer.save(0, state)
    new1, m1 = compiled(state, batch, rng)  # the executable just compiled, not a second compile

  assert float(m1['grad_norm']) > 0 and float(m1['update_norm']) > 0
  for key in ('loss', 'grad_norm', 'update_norm', 'param_norm'):
    np.testing.assert_allclose(m2[key], m1[key], rtol=2e-6, err_msg=key)
  # Adam's moments hold the (clipped) gradients, 0.1 g and 0.001 g^2 after one step; a
  # gradient summed in another order differs by float32 rounding of its largest terms.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-5, atol=1e-5 * np.abs(np.asarray(b)).max()), new2.opt_state, new1.opt_state)
  # The first Adam update is lr * g / (|g| + 1e-8) ~ lr * sign(g): for the few |g| near
  # 1e-8 the rounding above moves it by a visible fraction of lr = 1e-3 (measured: 1.6e-6
  # at 1 of 8192 elements with v output; 1.24e-5 at 1 of 49152 with configs/tiny.py's x0
  # output and class tokens), so the params agree to 2% of one step.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5),
               new2.params, new1.params)

  # k=1 is `Diffusion.loss` with the step's key: the two cannot drift apart.
  drop_rng, loss_rng = jax.random.split(jax.random.fold_in(rng, 2))
  labels = step_lib.drop_labels(drop_rng, batch['label'], s.num_classes, 0.5)
  params, sown = jax.tree.map(jnp.asarray, saved.params), {}

  def pred_fn(z, t):  # tiny's learned loss weighting: the model also sows u(t)
    out, variables = s.model.apply({'params': params}, z, t, labels, mutable=['intermediates'])
    sown['u'] = variables['intermediates'][dit.LOSS_LOG_VARIANCE][0]  # [B]
    return out
  reduce = lambda target, pred: objectives.uncertainty_weighted_mse(target, pred, sown['u'])
  t, noise = s.diffusion.draw(loss_rng, batch['video'])
  want = jax.jit(lambda: s.diffusion.loss_at(pred_fn, batch['video'], t, noise,
                                             reduce=reduce))()
  assert config.model.loss_uncertainty
  np.testing.assert_allclose(m1['loss'], want, rtol=1e-6)

  # Donated: the whole state (aliased in place), and nothing else the loop still uses.
  assert compiled.memory_analysis().alias_size_in_bytes >= sum(
      x.nbytes for x in jax.tree.leaves(saved))
  kept = [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_flatten_with_path(
      copy)[0] if not x.is_deleted()]
  assert not kept, kept
  assert not rng.is_deleted() and not any(x.is_deleted() for x in jax.tree.leaves(batch))
  # `state` went to an async save first: on CPU Orbax may still read its buffers (host
  # memory, no device-to-host copy), and JAX then copies instead of donating; either way
  # the checkpoint holds the state as it was before the step.
  checkpointer.wait()
  restored = checkpointer.restore(
      0, state_lib.abstract_with_shardings(s.abstract_state, s.state_shardings))
  checkpointer.close()
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored), saved)


def test_accumulated_grads_are_the_big_batch_grads():
  """accumulate_grads on a toy quadratic: mean over 4 micro-batches == the full batch."""
  x = jax.random.normal(jax.random.key(0), (8, 3))
  params = {'w': jnp.array([0.5, -1.0, 2.0])}

  def loss_and_grad(p, inputs):
    return jax.value_and_grad(lambda q: jnp.mean((inputs['x'] @ q['w'] - 1.0) ** 2))(p)

  want = loss_and_grad(params, {'x': x})
  got = step_lib.accumulate_grads(loss_and_grad, params, {'x': x}, 4)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  np.testing.assert_allclose(got[1]['w'], want[1]['w'], rtol=1e-6)
  # Micro-batch j holds rows j, j + k, ...: each device's contiguous rows stay local.
  split = step_lib.split_micro_batches({'x': jnp.arange(8)}, 4)['x']
  np.testing.assert_array_equal(split, [[0, 4], [1, 5], [2, 6], [3, 7]])


def test_grad_accum_errors():
  config = train_config(grad_accum_steps=3)
  with pytest.raises(ValueError, match=r'train.batch_size=8 gives 8 clips per batch shard .*'
                                       r'not divisible by train.grad_accum_steps=3'):
    validate.validate_config(config, num_devices=1)
  config = train_config(grad_accum_steps=4)
  validate.validate_config(config, num_devices=1)
  # 4 devices on the batch: 2 clips each, which 4 micro-batches cannot split.
  with pytest.raises(ValueError, match=r'gives 2 clips per batch shard \(split 4 ways over '
                                       r"mesh axes \('data', 'fsdp'\)\).*multiple of 16"):
    validate.validate_config(config, num_devices=4)
  with pytest.raises(ValueError, match='grad_accum_steps=0 must be a positive integer'):
    validate.validate_config(train_config(grad_accum_steps=0), num_devices=1)
  with pytest.raises(ValueError, match='not divisible by train.grad_accum_steps=3'):
    step_lib.check_grad_accum(3, 8)


# ------------------------------------------------------------------ compilation cache, MFU

def get_config(arg=None):
  """The config `--config=tests/perf_features_test.py` gives vdit_jax.main (see below)."""
  del arg
  return train_config(grad_accum_steps=2)


def abstract_step_inputs(s, config):
  """(state, batch, rng) ShapeDtypeStructs with the train step's input shardings."""
  state = state_lib.abstract_with_shardings(s.abstract_state, s.state_shardings)
  shardings = loop.batch_shardings(s.mesh, s.rules)
  d = config.data
  batch = {'video': jax.ShapeDtypeStruct(
               (config.train.batch_size, d.num_frames, d.height, d.width, d.channels),
               jnp.float32, sharding=shardings['video']),
           'label': jax.ShapeDtypeStruct((config.train.batch_size,), jnp.int32,
                                         sharding=shardings['label'])}
  return state, batch, jax.random.key(0)


def test_logged_steps_have_mfu_and_a_second_process_hits_the_compile_cache(tmp_path, capsys):
  """A 3-step run (2 micro-batches a step) logs model TFLOP/s and MFU at every step and
  fills the compilation cache; `python -m vdit_jax.main` with the same config, in a
  second process, then loads the train step from the cache instead of compiling it."""
  cache_dir = str(tmp_path / 'jax_cache')
  config = get_config()
  config.train.compilation_cache_dir = cache_dir
  loop.train_and_evaluate(config, str(tmp_path / 'first'))
  out = capsys.readouterr().out
  assert f'(written to the compilation cache {cache_dir})' in out, out
  assert any(f.startswith('jit_train_step') for f in os.listdir(cache_dir))

  records = metrics_lib.read_metrics(str(tmp_path / 'first' / 'metrics.jsonl'))
  assert [r['step'] for r in records] == [1, 2, 3]
  flops = mfu_lib.model_flops_per_step(config, spec_lib.from_config(config.model))
  peak = mfu_lib.device_peak()  # the CPU matmul figure is measured once: the run's
  for r in records:
    assert r['model_tflops_per_device'] > 0 and 0 < r['mfu'] < 1.5, r
    np.testing.assert_allclose(r['model_tflops_per_device'],
                               flops * r['steps_per_s'] / jax.device_count() / 1e12, rtol=1e-9)
    np.testing.assert_allclose(r['mfu'], r['model_tflops_per_device'] * 1e12
                               / peak.flops_per_device, rtol=1e-9)
  lines = [l for l in out.splitlines() if l.startswith('step ')]
  assert len(lines) == 3 and all(' | TFLOP/s/device ' in l and ' | MFU ' in l for l in lines)

  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join(
      p for p in (ROOT, os.environ.get('PYTHONPATH')) if p))
  proc = subprocess.run(
      [sys.executable, '-m', 'vdit_jax.main', f'--config={os.path.abspath(__file__)}',
       f'--workdir={tmp_path / "second"}', f'--config.train.compilation_cache_dir={cache_dir}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert f'(loaded from the compilation cache {cache_dir})' in proc.stdout, proc.stdout
  second = metrics_lib.read_metrics(str(tmp_path / 'second' / 'metrics.jsonl'))
  assert [r['loss'] for r in second] == [r['loss'] for r in records]


def test_cache_dir_config(tmp_path):
  assert compile_cache.resolve_dir('') is None
  assert compile_cache.resolve_dir('~/x') == os.path.join(os.path.expanduser('~'), 'x')
  assert compile_cache.resolve_dir('gs://b/c') == 'gs://b/c'
  assert compile_cache.configure(str(tmp_path / 'c')) == str(tmp_path / 'c')
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'c')
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
  assert jax.config.jax_persistent_cache_min_entry_size_bytes == 0
  assert compile_cache.configure('') is None and jax.config.jax_compilation_cache_dir is None
  config = train_config(compilation_cache_dir='~/.cache/x')
  validate.validate_config(config, num_devices=1)


def test_default_cache_dir_is_jaxs_own_variable_when_set(monkeypatch, tmp_path):
  """A user's JAX_COMPILATION_CACHE_DIR is the default; the run would otherwise point
  JAX's cache away from it. Unset: one cache per user and host, under ~/.cache."""
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'users'))
  assert tiny.get_config().train.compilation_cache_dir == str(tmp_path / 'users')
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR')
  assert (tiny.get_config().train.compilation_cache_dir
          == '~/.cache/vdit_jax/jax_compilation_cache')


# ------------------------------------------------------------------ MFU

@pytest.mark.parametrize('kind,tflops', [
    ('TPU v4', 275), ('TPU v5 lite', 197), ('TPU v5e', 197), ('TPU v5', 459),
    ('TPU v5p', 459), ('TPU v6 lite', 918), ('NVIDIA A100-SXM4-80GB', 312),
    ('NVIDIA A100-PCIE-40GB', 312), ('NVIDIA H100 80GB HBM3', 989), ('NVIDIA H100 PCIe', 756),
    ('NVIDIA H100 NVL', 835), ('NVIDIA H200', 989), ('NVIDIA B200', 2250),
])
def test_peak_table_known_kinds(kind, tflops):
  assert mfu_lib.table_peak(kind).flops_per_device == tflops * 1e12


@pytest.mark.parametrize('kind', ['TPU v4 lite', 'TPU7x', 'Tesla V100-SXM2-16GB', 'cpu',
                                  'NVIDIA GB200', 'NVIDIA A1000'])
def test_peak_table_unknown_kinds(kind):
  assert mfu_lib.table_peak(kind) is None


def test_mfu_formula_and_cpu_peak():
  peak = mfu_lib.Peak(100e12, 'test')
  # 3e15 FLOPs a step, 2 steps/s, 8 devices: 750 TFLOP/s per device, 7.5x a 100 TFLOP/s peak.
  out = mfu_lib.utilization(3e15, 2.0, 8, peak)
  assert out == pytest.approx({'model_tflops_per_device': 750.0, 'mfu': 7.5})
  assert mfu_lib.utilization(3e15, 2.0, 8, None) == pytest.approx(
      {'model_tflops_per_device': 750.0})
  measured = mfu_lib.measured_matmul_flops('cpu')
  assert measured == mfu_lib.measured_matmul_flops('cpu')  # measured once, then cached
  assert 1e8 < measured < 1e14
  cpu = mfu_lib.device_peak(jax.devices('cpu'))
  assert cpu.flops_per_device == measured / len(jax.local_devices(backend='cpu'))
  line = metrics_lib.format_line(4, 10, dict(loss=0.5, steps_per_s=2.0, mfu=0.1234,
                                             model_tflops_per_device=1.5))
  assert 'TFLOP/s/device 1.5 | MFU 12.34% |' in line
