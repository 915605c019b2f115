"""LoRA: adapters as their own pytree, merged into a frozen base; training them end to end."""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import lora_finetune, small, tiny
from tests.conftest import shrink
from vdit_jax import modes
from vdit_jax.config import validate
from vdit_jax.data import pipeline
from vdit_jax.data import synthetic
from vdit_jax.model import spec as spec_lib
from vdit_jax.model import dit
from vdit_jax.model import lora
from vdit_jax.train import compile_cache
from vdit_jax.generate import export as export_lib
from vdit_jax.train import loop
from vdit_jax.train import metrics as metrics_lib
from vdit_jax.train import state as state_lib

RANK, ALPHA = 4, 8.0
SCALE = ALPHA / RANK


def tiny_config(scan_layers=True):
  """4 frames of 16x16, tubelets 1x4x4 (64 tokens), width 48, depth 2 scanned (1 unrolled,
  which compiles per layer and takes the first layer of the scanned params): fast on a CPU."""
  return shrink(tiny.get_config(),
                model=dict(depth=2 if scan_layers else 1, scan_layers=scan_layers),
                train=dict(log_every=2),
                # use_ema: as configs/lora_finetune.py (tiny samples its raw params)
                sample=dict(use_ema=True))


def lora_config(base, **lora_fields):
  """The LoRA runs' config; the step test and the end-to-end run compile the same step
  (the same train settings), so the second one loads it from the compilation cache."""
  config = tiny_config()
  config.model.label_dropout = 0.0
  config.train.learning_rate = 1e-2
  config.train.num_steps = 30
  config.lora.rank = RANK
  config.lora.alpha = ALPHA
  config.lora.targets = 'attn,mlp'
  config.lora.base_checkpoint = str(base)
  for key, value in lora_fields.items():
    config.lora[key] = value
  return config


def _add_noise(tree, seed, std):
  """Gaussian noise on every leaf, drawn on the host (one XLA random op per leaf would
  cost seconds of compilation)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: jnp.asarray(x + std * rng.standard_normal(x.shape).astype(x.dtype)), tree)


@functools.lru_cache(maxsize=None)
def trained_like_params(scan_layers=True):
  """(model, params) of tiny_config: init params plus noise on every leaf, so the adaLN
  gates are non-zero as in a trained model (a fresh DiT's zero gates hide the blocks and
  give the adapters zero gradients). The unrolled layout gets the scanned params' layers
  as blocks_0, blocks_1, ... (no second init to compile)."""
  config = tiny_config(scan_layers)
  model = dit.build_model(spec_lib.from_config(config.model), 3, synthetic.NUM_CLASSES)
  if not scan_layers:
    _, scanned = trained_like_params(True)
    params = {k: v for k, v in scanned.items() if k != 'blocks'}
    for i in range(config.model.depth):
      params[f'blocks_{i}'] = jax.tree.map(lambda x, i=i: x[i], scanned['blocks'])
    return model, params
  init = jax.jit(lambda rng: nn.unbox(
      model.init(rng, *state_lib.model_inputs(config.data, 1))['params']))
  return model, _add_noise(init(jax.random.key(0)), 1, 0.05)


@functools.lru_cache(maxsize=None)
def jit_apply(scan_layers=True):
  """params -> the model's output on `model_batch()`, compiled once per layout."""
  model, _ = trained_like_params(scan_layers)
  return jax.jit(lambda params: model.apply({'params': params}, *model_batch()))


def random_adapters(params, targets, seed=2):
  """Adapters with both factors random (a trained adapter), not the B = 0 init."""
  fresh = lora.init_adapters(jax.random.key(seed), params, targets, RANK)
  return _add_noise(fresh, seed, 0.1)


def model_batch(seed=3):
  video = jax.random.uniform(jax.random.key(seed), (2, 4, 16, 16, 3), minval=-1.0, maxval=1.0)
  return video, jnp.array([10.0, 700.0]), jnp.array([1, 12], jnp.int32)


def test_parse_targets():
  assert lora.parse_targets('attn') == ('query', 'key', 'value', 'out')
  assert lora.parse_targets('mlp, query') == ('query', 'fc1', 'fc2')
  assert lora.parse_targets('attn,mlp') == tuple(lora.TARGETS)
  with pytest.raises(ValueError, match=r"lora.targets='attn,conv'.*unknown: \['conv'\]"):
    lora.parse_targets('attn,conv')


@pytest.mark.parametrize('scan_layers', [True, False])
def test_fresh_adapter_leaves_the_model_unchanged(scan_layers):
  _, params = trained_like_params(scan_layers)
  adapters = lora.init_adapters(jax.random.key(5), params, lora.TARGETS, RANK)
  merged = lora.merge(params, adapters, ALPHA, RANK)
  # Every kernel bitwise equal (B = 0), so the outputs are too (checked on the unrolled
  # layout; the scanned one has the same kernels with a leading layers axis).
  jax.tree.map(np.testing.assert_array_equal, merged, params)
  if not scan_layers:
    apply = jit_apply(scan_layers)
    np.testing.assert_array_equal(apply(merged), apply(params))
  # The factors: A random with std ~ 1/sqrt(fan-in), B zero, one leading axis if scanned.
  a = adapters['blocks' if scan_layers else 'blocks_0']['mlp']['fc2']['kernel']['a']
  assert a.shape == ((2,) if scan_layers else ()) + (96, RANK)
  assert abs(float(jnp.std(a)) * np.sqrt(96) - 1.0) < 0.25
  assert all(not np.any(leaf) for path, leaf in traverse_util.flatten_dict(adapters).items()
             if path[-1] == 'b')


def test_adapter_names_and_shardings():
  config = tiny_config()
  model = dit.build_model(spec_lib.from_config(config.model), 3, synthetic.NUM_CLASSES)
  boxed = jax.eval_shape(model.init, jax.random.key(0),
                         *state_lib.model_inputs(config.data, 1))['params']
  specs = nn.get_partition_spec(lora.init_adapters(jax.random.key(0), boxed, lora.TARGETS, 8))
  P = jax.sharding.PartitionSpec
  attn, mlp = specs['blocks']['attn'], specs['blocks']['mlp']
  assert attn['query_kernel'] == {'a': P('layers', 'embed', 'lora_rank'),
                                  'b': P('layers', 'lora_rank', 'heads', 'kv')}
  assert attn['out_kernel'] == {'a': P('layers', 'heads', 'kv', 'lora_rank'),
                                'b': P('layers', 'lora_rank', 'embed')}
  assert mlp['fc1']['kernel'] == {'a': P('layers', 'embed', 'lora_rank'),
                                  'b': P('layers', 'lora_rank', 'mlp')}
  assert mlp['fc2']['kernel'] == {'a': P('layers', 'mlp', 'lora_rank'),
                                  'b': P('layers', 'lora_rank', 'embed')}
  assert ('lora_rank', None) in config.logical_axis_rules


def test_targets_cover_every_attention_of_a_block():
  """'attn' adapts the self-, factorised temporal and text cross-attention of the blocks,
  and nothing of the text encoder."""
  config = tiny_config()
  config.model.attention_pattern = 'factorised'
  config.model.factorised_mode = 'within_block'
  config.model.conditioning = 'text'
  config.model.class_tokens = 0  # configs/tiny.py's class tokens are for class labels
  config.model.text.update(width=32, num_heads=2, depth=1)
  model = dit.build_model(spec_lib.from_config(config.model), 3, synthetic.NUM_CLASSES)
  boxed = jax.eval_shape(state_lib.make_init_fn(model, state_lib.make_optimizer(config.train),
                                                config.data), jax.random.key(0)).params
  specs = lora.adapter_specs(boxed, lora.parse_targets('attn'), RANK)
  assert sorted('/'.join(p) for p in specs) == sorted(
      f'blocks/{module}/{kind}_kernel' for module in ('attn', 'attn_temporal', 'cross_attn/attn')
      for kind in ('query', 'key', 'value', 'out'))
  assert any(p[0] == 'text' for p in traverse_util.flatten_dict(boxed))  # there, not adapted


def test_trainable_fraction_of_the_small_model():
  """Rank 8 on DiT-S (small config): attention only ~0.9%, attention + MLP <= 2%."""
  config = small.get_config()
  spec = spec_lib.from_config(config.model)
  model = dit.build_model(spec_lib.from_config(config.model), 3, synthetic.NUM_CLASSES)
  boxed = jax.eval_shape(model.init, jax.random.key(0),
                         *state_lib.model_inputs(config.data, 1))['params']
  total = state_lib.param_count(nn.unbox(boxed))
  d, f, depth, r = spec.width, spec.mlp_dim, spec.depth, 8
  attn = lora.num_adapter_params(lora.adapter_specs(boxed, lora.parse_targets('attn'), r))
  both = lora.num_adapter_params(lora.adapter_specs(boxed, lora.parse_targets('attn,mlp'), r))
  assert attn == depth * 4 * r * (d + d)                 # q, k, v, out: D -> D
  assert both == attn + depth * 2 * r * (d + f)          # fc1 D -> F, fc2 F -> D
  assert attn / total < 0.01                             # the default targets: ~1%
  assert both / (total + both) <= 0.02, both / (total + both)


def test_merged_equals_unmerged_per_kernel():
  """x @ (W + s A B) == x @ W + s (x A) B for every target kernel of every scanned layer."""
  config = tiny_config()
  _, params = trained_like_params()
  adapters = random_adapters(params, lora.TARGETS)
  specs = lora.adapter_specs(params, lora.TARGETS, RANK)
  depth = config.model.depth
  xs = {path: jnp.asarray(np.random.default_rng(7).standard_normal(
      (depth, 3) + spec.a_shape[1:-1]), jnp.float32) for path, spec in specs.items()}  # [L, 3, *I]

  @jax.jit
  def outputs(params, adapters, xs):
    merged = traverse_util.flatten_dict(lora.merge(params, adapters, ALPHA, RANK))
    base, pairs = traverse_util.flatten_dict(params), traverse_util.flatten_dict(adapters)
    result = {}
    for path, spec in specs.items():
      n = lora.TARGETS[spec.target].num_in
      dot = lambda x, w, n=n: jnp.tensordot(x, w, n, precision=jax.lax.Precision.HIGHEST)
      unmerged = functools.partial(lora.apply_unmerged, num_in=n, scale=SCALE)
      result['/'.join(path)] = (
          jax.vmap(dot)(xs[path], merged[path]),                        # merged
          jax.vmap(unmerged)(xs[path], base[path], pairs[path + ('a',)],
                             pairs[path + ('b',)]),                     # unmerged
          jax.vmap(dot)(xs[path], base[path]))                          # base alone
    return result

  result = outputs(params, adapters, xs)
  # Each target once, and q, k, v, out again in the class tokens' cross-attention.
  assert len(result) == len(lora.TARGETS) + 4 and all(s.num_lead == 1 for s in specs.values())
  for name, (merged, unmerged, base) in result.items():
    assert merged.shape[:2] == (depth, 3), name
    np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-5, err_msg=name)
    assert float(jnp.max(jnp.abs(unmerged - base))) > 1e-3, name  # the adapter does act


def test_merged_model_equals_unmerged_mlp_adapters():
  """The whole model: merged fc1/fc2 kernels vs the base model with each adapter applied
  beside its Dense layer (y = Dense(x) + s (x A) B, intercepted), never merging."""
  model, params = trained_like_params(scan_layers=False)
  adapters = random_adapters(params, lora.parse_targets('mlp'))
  flat = traverse_util.flatten_dict(adapters)

  def unmerged(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    path = tuple(context.module.path) + ('kernel',)
    if context.method_name != '__call__' or path + ('a',) not in flat:
      return y
    (x,) = args
    return y + SCALE * (x @ flat[path + ('a',)]) @ flat[path + ('b',)]

  def forward_unmerged(p):
    with nn.intercept_methods(unmerged):
      return model.apply({'params': p}, *model_batch())

  want = jax.jit(forward_unmerged)(params)
  got = jit_apply(scan_layers=False)(lora.merge(params, adapters, ALPHA, RANK))
  base = jit_apply(scan_layers=False)(params)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert float(jnp.max(jnp.abs(want - base))) > 1e-3


def write_base_export(directory, config):
  """A base 'run' without training: trained-like params exported as WORKDIR/export/0."""
  _, params = trained_like_params()
  export_lib.write(export_lib.export_dir(directory, 0), params, config, step=0,
                   which='ema_params')
  return params


@pytest.fixture(scope='module')
def jax_cache(tmp_path_factory):
  """A persistent compilation cache shared by this module's compiles, then the old one."""
  previous = jax.config.jax_compilation_cache_dir
  path = compile_cache.configure(str(tmp_path_factory.mktemp('jax_cache')))
  yield path
  compile_cache.configure(previous or '')


def test_train_step_changes_only_the_adapters_and_fits_a_batch(tmp_path, jax_cache):
  del jax_cache  # the step compiled here is loaded again by the end-to-end test
  base_params = write_base_export(tmp_path / 'base', tiny_config())
  config = lora_config(tmp_path / 'base')
  s = loop.build(config, None)
  state, _ = state_lib.create_state(s.init_fn, jax.random.key(0), s.mesh, s.rules)
  # The state is the adapters' alone: params, Adam moments, EMA.
  adapter_tree = jax.tree.structure(state.params)
  assert jax.tree.structure(state.ema_params) == adapter_tree
  assert state_lib.param_count(state.params) == s.lora.num_adapter_params
  base = s.lora.base_params()
  jax.tree.map(np.testing.assert_array_equal, base, base_params)
  before = jax.tree.map(np.array, base)
  fresh = jax.tree.map(np.array, state.params)

  train_step = loop.jit_train_step(s)
  batch = loop.global_batch(next(pipeline.make_dataset(config.data, 4, seed=0)), s.mesh,
                            s.rules)

  rng = jax.random.key(1)

  def probe_loss(state):
    """The step's loss (before its update) at the draws of steps 0..7, on copies of the
    state (the step donates it): fixed (t, noise) draws, so only the adapters vary."""
    losses = []
    for i in range(8):
      probe = jax.tree.map(jnp.array, state.replace(step=jnp.full_like(state.step, i)))
      losses.append(float(train_step(probe, batch, rng)[1]['loss']))
    return np.mean(losses)

  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    loss_before = probe_loss(state)
    for _ in range(30):
      state, metrics = train_step(state, batch, rng)
    loss_after = probe_loss(state)
  assert float(metrics['grad_norm']) > 0
  # The frozen base is bitwise unchanged (an input of the step, not donated).
  jax.tree.map(np.testing.assert_array_equal, base, before)
  # Both factors of every adapter moved.
  for path, leaf in traverse_util.flatten_dict(state.params).items():
    assert np.any(np.asarray(leaf) != traverse_util.flatten_dict(fresh)[path]), path
  assert loss_after < 0.8 * loss_before, (loss_before, loss_after)


def test_adapters_save_load_round_trip(tmp_path):
  config = tiny_config()
  _, params = trained_like_params()
  adapters = random_adapters(params, lora.parse_targets('attn'))
  export_lib.write(str(tmp_path / 'a'), adapters, config, step=7, which='ema_params')
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), adapters)
  restored, info = export_lib.read(str(tmp_path / 'a'), abstract)
  assert info['step'] == 7
  jax.tree.map(np.testing.assert_array_equal, restored, adapters)


@pytest.fixture(scope='module')
def base_run(tmp_path_factory, jax_cache):
  """A base model trained for 4 steps through train_and_evaluate (checkpoints, no export).

  Not fewer: adaLN-Zero blocks get their first gradient once the zero-initialised final
  layer has moved (step 2; step 1 has learning rate 0), so their gates open at step 3,
  and only then do adapters inside the blocks get a gradient.
  """
  root = tmp_path_factory.mktemp('lora_e2e')
  config = tiny_config()
  config.train.num_steps = 4
  config.train.compilation_cache_dir = jax_cache
  loop.train_and_evaluate(config, str(root / 'base'))
  return root


def _tree_bytes(directory):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(directory) for f in fs)


def test_lora_end_to_end_resume_export_sample(base_run, jax_cache):
  base_dir = base_run / 'base'
  base_files = {f: os.path.getmtime(os.path.join(d, f))
                for d, _, fs in os.walk(base_dir / 'checkpoints') for f in fs}
  config = lora_config(base_dir)
  config.data.colours = 'red'
  config.train.compilation_cache_dir = jax_cache
  workdir = str(base_run / 'lora')
  loop.train_and_evaluate(config, workdir, stop_at=2)          # stopped after step 2
  state = loop.train_and_evaluate(config, workdir, stop_at=4)  # resumes: steps 3, 4
  assert int(state.step) == 4
  s = loop.build(config, None)
  assert state_lib.param_count(state.params) == s.lora.num_adapter_params
  lines = metrics_lib.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  assert [l['step'] for l in lines] == [1, 2, 4] and np.isfinite([l['loss'] for l in lines]).all()
  assert all(l['grad_norm'] > 0 for l in lines), lines
  assert all(l['update_norm'] > 0 for l in lines[1:]), lines  # step 1: learning rate 0
  assert os.path.isfile(os.path.join(workdir, 'samples', 'step_0000004.gif'))
  # The LoRA checkpoint holds adapters + optimizer state + EMA: far smaller than the base's.
  lora_bytes = _tree_bytes(os.path.join(workdir, 'checkpoints', '4', 'state'))
  base_bytes = _tree_bytes(base_dir / 'checkpoints' / '4' / 'state')
  assert lora_bytes < 0.5 * base_bytes, (lora_bytes, base_bytes)
  # The base run's files were only read.
  assert base_files == {f: os.path.getmtime(os.path.join(d, f))
                        for d, _, fs in os.walk(base_dir / 'checkpoints') for f in fs}

  # Export = the EMA adapters alone; sampling from it merges them into the base.
  path = modes.export(config, workdir)
  adapters, info = export_lib.read(path, s.abstract_state.ema_params)
  assert info == {'step': 4, 'params': 'ema_params'}
  jax.tree.map(np.testing.assert_array_equal, adapters, state.ema_params)
  videos, paths = modes.sample(config, workdir, checkpoint=path)
  assert videos.shape == (2, 4, 16, 16, 3) and np.isfinite(np.asarray(videos)).all()
  assert paths and os.path.isfile(paths[0])


def test_base_checkpoint_problems_raise_clear_errors(base_run, tmp_path):
  with pytest.raises(FileNotFoundError, match='base_checkpoint=.*is not a directory'):
    loop.build(lora_config(tmp_path / 'missing'), None)
  with pytest.raises(FileNotFoundError, match='holds no complete export'):
    loop.build(lora_config(tmp_path), None)
  wide = lora_config(base_run / 'base')
  wide.model.width = 64
  with pytest.raises(ValueError, match='width: base 48, this config 64'):
    loop.build(wide, None)
  lora_run = tmp_path / 'lora_run'
  lora_run.mkdir()
  (lora_run / 'config.json').write_text(lora_config(base_run / 'base').to_json_best_effort())
  os.symlink(base_run / 'base' / 'checkpoints', lora_run / 'checkpoints')
  with pytest.raises(ValueError, match='is the config of a LoRA run'):
    loop.build(lora_config(lora_run), None)


@pytest.mark.parametrize('fields, message', [
    (dict(rank=-1), r'config.lora.rank=-1 must be an integer >= 0'),
    (dict(base_checkpoint=''), r'config.lora.rank=4 needs config.lora.base_checkpoint'),
    (dict(targets='attn,conv'), r"lora.targets='attn,conv' must be a comma list"),
    (dict(targets=''), r"lora.targets='' must be a comma list"),
    (dict(alpha=0.0), r'config.lora.alpha=0.0 must be a finite number > 0'),
    (dict(rank=49), r'config.lora.rank=49 exceeds min\(in, out\) = 48 of the query kernel'),
])
def test_bad_lora_configs_raise(fields, message):
  config = lora_config('/some/base', **fields)
  with pytest.raises(ValueError, match=message):
    validate.validate_config(config, num_devices=1)


def test_lora_finetune_config_is_valid_once_given_a_base():
  config = lora_finetune.get_config()
  with pytest.raises(ValueError, match='needs config.lora.base_checkpoint'):
    validate.validate_config(config, num_devices=1)
  config.lora.base_checkpoint = '/runs/tiny'
  validate.validate_config(config, num_devices=1)
  assert spec_lib.from_config(config.model) == spec_lib.from_config(tiny.get_config().model)


def test_synthetic_colour_subset():
  full = synthetic.SyntheticShapes(4, 16, 16, num_examples=64, seed=3)
  red = synthetic.SyntheticShapes(4, 16, 16, num_examples=64, seed=3, colours='red')
  two = synthetic.SyntheticShapes(4, 16, 16, num_examples=64, seed=3, colours=('blue', 'red'))
  assert full.colour_ids == tuple(range(len(synthetic.COLOURS)))
  seen = set()
  for i in range(64):
    a, b, c = full[i], red[i], two[i]
    assert int(b['colour']) == list(synthetic.COLOURS).index('red')
    seen.add(int(c['colour']))
    for key in ('label', 'shape', 'direction'):  # only the paint changes
      assert a[key] == b[key] == c[key]
    if a['colour'] == b['colour']:  # a red clip of the full source: the same clip
      np.testing.assert_array_equal(a['video'], b['video'])
  assert seen == {0, 2}
  with pytest.raises(ValueError, match=r"colours='purple' must name colours of"):
    synthetic.SyntheticShapes(4, 16, 16, colours='purple')
  config = tiny_config()
  config.data.colours = 'red,purple'
  with pytest.raises(ValueError, match=r"config.data.colours='red,purple' must name"):
    validate.validate_config(config, num_devices=1)


def test_sharded_lora_steps_match_one_device(multidevice):
  """LoRA training on data x fsdp x tensor (8 fake devices, tests/multidevice/lora.py)
  equals one device, with the planned adapter shardings."""
  check = 'data2_fsdp2_tensor2'
  multidevice.assert_ok(multidevice.run('multidevice/lora.py'), [check], check)
