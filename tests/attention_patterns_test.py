"""Attention patterns: each equals masked full attention; VideoDiT with each pattern; the
same with the tokens sharded over `sequence` (8 fake devices, in a subprocess).

The oracle is plain softmax attention over all N tokens with a boolean mask
built from the token coordinates (same frame, same position, same window,
same shifted window), so it shares no regrouping code with the patterns.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vdit_jax.config import defaults, validate
from vdit_jax.model import spec as spec_lib
from vdit_jax.model import attention, attention_patterns as ap, blocks, dit, flops

TOL = dict(rtol=1e-5, atol=1e-5)
GRID = (4, 4, 6)  # (T', H', W'), 96 tokens


def coords(grid):
  t, h, w = np.meshgrid(*(np.arange(g) for g in grid), indexing='ij')
  return np.stack([t.ravel(), h.ravel(), w.ravel()], axis=-1)  # [N, 3]


def window_mask(grid, window, shift=(0, 0, 0)):
  """[N, N]: same floor((c - s) / w) on every axis (Swin's shifted windows for s > 0)."""
  ids = (coords(grid) - np.asarray(shift)) // np.asarray(window)  # [N, 3]
  return (ids[:, None, :] == ids[None, :, :]).all(-1)


def masked_reference(q, k, v, allowed):
  """Softmax attention over all tokens where allowed [K or 1, N, N]; q/k/v [B, N, K, Dh]."""
  s = jnp.einsum('bnkd,bmkd->bknm', q, k) / math.sqrt(q.shape[-1])
  s = jnp.where(jnp.asarray(allowed)[None], s, -jnp.inf)
  return jnp.einsum('bknm,bmkd->bnkd', jax.nn.softmax(s, axis=-1), v)


def qkv_w(grid=GRID, b=2, k=4, d=8, seed=0):
  rng = np.random.default_rng(seed)
  n = math.prod(grid)
  q, kk, v, w = (jnp.asarray(rng.normal(size=(b, n, k, d)), jnp.float32) for _ in range(4))
  return 2.0 * q, 2.0 * kk, v, w  # scale 2: peaked softmax


def assert_same_values_and_grads(fn, ref, arrays):
  """fn and ref agree in outputs and in gradients of sum(out * w) w.r.t. q, k, v."""
  *qkv, w = arrays

  def value_and_grads(f):
    def loss(q, k, v):
      out = f(q, k, v)
      return jnp.sum(out * w), out
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(*qkv)

  (_, out), grads = value_and_grads(fn)
  (_, ref_out), ref_grads = value_and_grads(ref)
  np.testing.assert_allclose(out, ref_out, **TOL)
  for name, g, r in zip('qkv', grads, ref_grads):
    np.testing.assert_allclose(g, r, err_msg=f'd{name}', **TOL)


def test_spatial_and_temporal_match_masked_reference():
  arrays = qkv_w()
  c = coords(GRID)
  same_frame = c[:, None, 0] == c[None, :, 0]
  same_position = (c[:, None, 1:] == c[None, :, 1:]).all(-1)
  assert_same_values_and_grads(lambda q, k, v: ap.spatial_attention(q, k, v, GRID),
                               lambda q, k, v: masked_reference(q, k, v, same_frame[None]),
                               arrays)
  assert_same_values_and_grads(lambda q, k, v: ap.temporal_attention(q, k, v, GRID),
                               lambda q, k, v: masked_reference(q, k, v, same_position[None]),
                               arrays)


@pytest.mark.parametrize('window,shift', [
    ((2, 2, 3), (0, 0, 0)),
    ((2, 2, 3), (1, 1, 1)),     # Swin half-window shift (3 // 2 = 1)
    ((4, 2, 2), (0, 1, 1)),     # whole T': no shift on t
    ((1, 4, 3), (0, 3, 2)),     # any shift in [0, w) is a valid partition
    ((2, 1, 6), (1, 0, 3)),
])
def test_windows_match_masked_reference(window, shift):
  arrays = qkv_w()
  allowed = window_mask(GRID, window, shift)[None]
  assert_same_values_and_grads(
      lambda q, k, v: ap.window_attention(q, k, v, GRID, window, shift),
      lambda q, k, v: masked_reference(q, k, v, allowed), arrays)


def test_attend_shifts_odd_windowed_blocks_by_half_a_window():
  pattern = ap.PatternSpec(name='windowed', window_size=(2, 4, 2))
  even, = ap.block_groupings(pattern, 4)
  odd, = ap.block_groupings(pattern, 5)
  assert not even.shifted and odd.shifted
  assert ap.swin_shift(GRID, (2, 4, 2)) == (1, 0, 1)  # H' = 4 is one window: no shift
  arrays = qkv_w()
  allowed = window_mask(GRID, (2, 4, 2), (1, 0, 1))[None]
  assert_same_values_and_grads(lambda q, k, v: ap.attend(q, k, v, GRID, odd),
                               lambda q, k, v: masked_reference(q, k, v, allowed), arrays)


def test_hierarchical_matches_per_head_group_masks():
  windows = ((-1, -1, -1), (2, 4, 6), (1, 2, 3))  # coarse -> fine
  arrays = qkv_w(k=6)
  masks = [window_mask(GRID, ap.resolve_window(w, GRID)) for w in windows]
  allowed = np.stack([masks[h % 3] for h in range(6)])  # head h in group h % G
  grouping, = ap.block_groupings(ap.PatternSpec(name='hierarchical',
                                                hierarchical_windows=windows), 0)
  assert_same_values_and_grads(lambda q, k, v: ap.attend(q, k, v, GRID, grouping),
                               lambda q, k, v: masked_reference(q, k, v, allowed), arrays)


@pytest.mark.parametrize('grouping', [
    ap.Grouping('windowed', (GRID,), shifted=True),      # one window, shift 0 on every axis
    ap.Grouping('windowed', ((-1, -1, -1),)),
    ap.Grouping('hierarchical', ((-1, -1, -1), GRID)),
])
def test_one_window_covering_the_grid_equals_full(grouping):
  q, k, v, _ = qkv_w()
  full = attention.dot_product_attention(q, k, v)
  np.testing.assert_allclose(ap.attend(q, k, v, GRID, grouping), full, **TOL)


def test_patterns_run_on_other_impls():
  # Unmasked groups go through attention.dot_product_attention with any impl (here
  # blockwise tiles of 16 over the 96-token full-grid group and the 12-token windows).
  q, k, v, _ = qkv_w()
  grouping = ap.Grouping('hierarchical', ((-1, -1, -1), (2, 2, 3)))
  np.testing.assert_allclose(
      jax.jit(lambda q, k, v: ap.attend(q, k, v, GRID, grouping, 'blockwise:16x16'))(q, k, v),
      ap.attend(q, k, v, GRID, grouping), **TOL)
  # Shifted windows need a masked path.
  with pytest.raises(ValueError, match=r"attention_impl='blockwise:16x16' has no masked path"):
    ap.attend(q, k, v, GRID, ap.Grouping('windowed', ((2, 2, 3),), shifted=True),
              'blockwise:16x16')


def test_shifted_window_mask_separates_wrapped_tokens():
  # 1-D along w: grid 6, window 3, shift 1 -> rolled order [1 2 3 | 4 5 0]: 0 is alone.
  mask = ap.shifted_window_mask((1, 1, 6), (1, 1, 3), (0, 0, 1))
  assert mask.shape == (2, 3, 3)
  assert mask[0].all()
  np.testing.assert_array_equal(mask[1], [[1, 1, 0], [1, 1, 0], [0, 0, 1]])


# --- VideoDiT ------------------------------------------------------------------------------

PATTERNS = {
    'alternating': dict(attention_pattern='factorised', factorised_mode='alternating'),
    'within_block': dict(attention_pattern='factorised', factorised_mode='within_block'),
    'windowed_shift': dict(attention_pattern='windowed', window_size=(2, 2, 2)),
    'windowed': dict(attention_pattern='windowed', window_size=(1, -1, 2), window_shift=False),
    'hierarchical': dict(attention_pattern='hierarchical',
                         hierarchical_windows=((-1, -1, -1), (1, 2, 2))),
}
# Run through VideoDiT below ('windowed' shares hierarchical's unshifted path).
MODEL_PATTERNS = ('alternating', 'within_block', 'windowed_shift', 'hierarchical')
VIDEO_SHAPE = (2, 4, 8, 8, 3)  # patch (1, 2, 2): grid (4, 4, 4)
DEPTH = 2


@pytest.fixture(scope='module', autouse=True)
def fast_compiles():
  """Tiny graphs compiled without most XLA passes (the compile is the cost here)."""
  old = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', old)


def model_cfg(**overrides):
  cfg = defaults.base_config().model
  cfg.update(dict(
      variant=None, width=24, depth=DEPTH, num_heads=2, mlp_dim=32, patch_size=(1, 2, 2),
      pos_embed='rope', qk_norm=True, attention_impl='xla', scan_layers=True,
      remat_policy='none', dtype='float32', param_dtype='float32'))
  with cfg.ignore_type():  # tests also give values of the wrong type
    cfg.update(overrides)
  return cfg


def model_inputs(seed=0):
  rng = np.random.default_rng(seed)
  video = rng.normal(size=VIDEO_SHAPE).astype(np.float32)
  return video, np.array([3.0, 700.0], np.float32), np.array([1, 5], np.int32)


def random_params(model, seed=1):
  """Random values everywhere (zero-init gates would hide every attention bug)."""
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *model_inputs())['params'])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (0.2 * rng.normal(size=x.shape)).astype(np.float32), shapes)


def unstack(scanned, depth, period):
  """Scanned params -> unrolled: blocks_i = blocks[i] (or blocks/block_{i % 2}[i // 2])."""
  params = {k: v for k, v in scanned.items() if k != 'blocks'}
  for i in range(depth):
    stacked = scanned['blocks'] if period == 1 else scanned['blocks'][f'block_{i % period}']
    params[f'blocks_{i}'] = jax.tree.map(lambda a, j=i // period: a[j], stacked)
  return params


@pytest.fixture(scope='module')
def base():
  """Random scanned params of the full model, the within_block extras, and full's output."""
  params = random_params(dit.build_model(spec_lib.from_config(model_cfg()), 3, 10))
  extra = random_params(dit.build_model(spec_lib.from_config(model_cfg(**PATTERNS['within_block'])), 3, 10), seed=2)
  extra = {k: v for k, v in extra['blocks'].items() if k.endswith('_temporal')}
  full = dit.build_model(spec_lib.from_config(model_cfg()), 3, 10)
  return params, extra, jax.jit(full.apply)({'params': params}, *model_inputs())


def pattern_params(base, model):
  """The base params in `model`'s scanned layout (the same weights block by block)."""
  params, extra, _ = base
  blocks = dict(params['blocks'])
  if ap.attention_sublayers(model.spec.pattern) == 2:  # within_block
    blocks.update(extra)
  period = model.spec.pattern.period
  if period > 1:
    blocks = {f'block_{r}': jax.tree.map(lambda a, r=r: a[r::period], blocks)
              for r in range(period)}
  return {**params, 'blocks': blocks}


def loss_and_grads(model, params):
  video, t, y = model_inputs()
  target = np.random.default_rng(2).normal(size=video.shape).astype(np.float32)

  def loss(p):
    out = model.apply({'params': p}, video, t, y)
    return jnp.sum(out * target), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return out, grads


@pytest.mark.parametrize('name', MODEL_PATTERNS)
def test_scanned_equals_unrolled_forward_and_backward(base, name):
  scanned = dit.build_model(spec_lib.from_config(model_cfg(**PATTERNS[name])), 3, 10)
  unrolled = dit.build_model(spec_lib.from_config(model_cfg(scan_layers=False, **PATTERNS[name])), 3, 10)
  period = scanned.spec.pattern.period
  params = pattern_params(base, scanned)
  out_s, grads_s = loss_and_grads(scanned, params)
  out_u, grads_u = loss_and_grads(unrolled, unstack(params, DEPTH, period))
  assert out_s.shape == VIDEO_SHAPE and np.isfinite(np.asarray(out_s)).all()
  np.testing.assert_allclose(out_s, out_u, **TOL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL),
               unstack(grads_s, DEPTH, period), grads_u)
  # The same weights under full attention give another output: the pattern is in use.
  assert np.abs(np.asarray(base[2]) - np.asarray(out_s)).max() > 1e-3


def test_parameter_layout():
  video, t, y = model_inputs()

  def shapes(**kw):  # {'blocks/attn/query_kernel': shape, ...}
    model = dit.build_model(spec_lib.from_config(model_cfg(**kw)), 3, 10)
    params = jax.eval_shape(model.init, jax.random.key(0), video, t, y)['params']
    flat = jax.tree_util.tree_leaves_with_path(nn.unbox(params))
    return {'/'.join(k.key for k in path): leaf.shape for path, leaf in flat}

  full = shapes()
  # Patterns without alternation keep full's names and shapes, scanned or not.
  assert shapes(**PATTERNS['hierarchical']) == full
  assert shapes(**PATTERNS['windowed']) == full
  assert shapes(scan_layers=False, **PATTERNS['alternating']) == shapes(scan_layers=False)
  # Scanned alternating blocks stack as depth / 2 cycles of (block_0, block_1).
  alt = shapes(**PATTERNS['alternating'])
  for name, shape in full.items():
    if name.startswith('blocks/'):
      for r in (0, 1):
        assert alt.pop(name.replace('blocks/', f'blocks/block_{r}/')) == (1,) + shape[1:]
    else:
      assert alt.pop(name) == shape
  assert not alt
  # within_block adds a temporal attention and its (shift, scale, gate) projection.
  wb = shapes(**PATTERNS['within_block'])
  extra = {k: v for k, v in wb.items() if k not in full}
  assert {k: v for k, v in wb.items() if k in full} == full
  assert extra == {**{k.replace('/attn/', '/attn_temporal/'): v for k, v in full.items()
                      if k.startswith('blocks/attn/')},
                   'blocks/adaln_temporal/proj/kernel': (DEPTH, 24, 3 * 24),
                   'blocks/adaln_temporal/proj/bias': (DEPTH, 3 * 24)}


def test_within_block_is_identity_at_init_and_loads_one_attention_weights():
  pattern = ap.PatternSpec(name='factorised', factorised_mode='within_block')
  block = blocks.DiTBlock(num_heads=2, mlp_dim=32, pattern=pattern, grid=(2, 2, 3))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 12, 16)), jnp.float32)
  c = jnp.asarray(rng.normal(size=(2, 16)), jnp.float32)
  variables = jax.jit(block.init)(jax.random.key(0), x, c)
  apply = jax.jit(lambda p: block.apply({'params': p}, x, c)[0])
  np.testing.assert_array_equal(apply(variables['params']), x)
  # With the new temporal gate at zero, the block is the spatial-attention block
  # whose weights it shares (window (1, H', W') without shift).
  params = jax.tree.map(lambda a: jnp.asarray(0.2 * rng.normal(size=a.shape), a.dtype),
                        nn.unbox(variables['params']))
  params['adaln_temporal'] = jax.tree.map(jnp.zeros_like, params['adaln_temporal'])
  spatial = blocks.DiTBlock(num_heads=2, mlp_dim=32, grid=(2, 2, 3), pattern=ap.PatternSpec(
      name='windowed', window_size=(1, -1, -1), window_shift=False))
  one = {k: v for k, v in params.items() if not k.endswith('_temporal')}
  np.testing.assert_allclose(apply(params),
                             jax.jit(spatial.apply)({'params': one}, x, c)[0], **TOL)
  # ... and a non-zero temporal gate changes it.
  params['adaln_temporal'] = jax.tree.map(lambda a: a + 0.2, params['adaln_temporal'])
  assert np.abs(np.asarray(apply(params)) - np.asarray(apply({**params, **{
      'adaln_temporal': jax.tree.map(jnp.zeros_like, params['adaln_temporal'])}}))).max() > 1e-3


# --- errors --------------------------------------------------------------------------------


def check(pattern, **kw):
  args = dict(num_heads=4, depth=4, scan_layers=True, attention_impl='xla',
              sequence_parallel='none')
  args.update(kw)
  ap.check_spec(pattern, **args)


@pytest.mark.parametrize('pattern,kw,message', [
    (ap.PatternSpec(name='swin'), {}, r"attention_pattern='swin' is not one of"),
    (ap.PatternSpec(name='factorised', factorised_mode='both'), {},
     r"factorised_mode='both' is not one of"),
    (ap.PatternSpec(name='windowed', window_size=(2, 4)), {},
     r'window_size=\(2, 4\) must be 3 ints'),
    (ap.PatternSpec(name='windowed', window_size=(0, 4, 4)), {},
     r'window_size=\(0, 4, 4\) must be 3 ints .* positive or -1'),
    (ap.PatternSpec(name='windowed'), dict(attention_impl='splash'),
     r"window_shift=True masks .* not 'splash'; or set model.window_shift=False"),
    (ap.PatternSpec(name='hierarchical', hierarchical_windows=((-1, -1, -1),) * 3), {},
     r'num_heads=4 is not divisible by the 3 scales'),
    (ap.PatternSpec(name='hierarchical', hierarchical_windows=()), {},
     r'hierarchical_windows=\(\) must be a non-empty tuple'),
    (ap.PatternSpec(name='factorised'), dict(depth=3),
     r'model.depth=3 must be even; or set model.scan_layers=False'),
    (ap.PatternSpec(name='windowed'), dict(sequence_parallel='ring'),
     r"sequence_parallel='ring' is a strategy for full attention"),
])
def test_bad_patterns_raise(pattern, kw, message):
  with pytest.raises(ValueError, match=message):
    check(pattern, **kw)


def test_allowed_corner_cases():
  check(ap.PatternSpec(name='factorised'), depth=3, scan_layers=False)  # unrolled: any depth
  check(ap.PatternSpec(name='windowed', window_shift=False), attention_impl='splash')
  check(ap.PatternSpec(name='full', window_size='anything'), sequence_parallel='ring')


@pytest.mark.parametrize('pattern,message', [
    (ap.PatternSpec(name='windowed', window_size=(3, 4, 4)),
     r"window_size=\(3, 4, 4\) does not divide the token grid \(T', H', W'\)=\(8, 8, 8\): "
     r"3 does not divide T'=8"),
    (ap.PatternSpec(name='windowed', window_size=(2, 16, 4)), r"16 does not divide H'=8"),
    (ap.PatternSpec(name='hierarchical', hierarchical_windows=((4, 4, 4), (2, 8, 8))),
     r'coarse to fine, each window dividing the one before, but \(2, 8, 8\)'),
])
def test_windows_must_divide_the_grid(pattern, message):
  with pytest.raises(ValueError, match=message):
    ap.check_grid(pattern, (8, 8, 8))


def test_config_validation_and_model_call_reject_bad_windows():
  config = defaults.base_config()  # data 16 x 32 x 32, patch 2 x 4 x 4: grid (8, 8, 8)
  config.model.attention_pattern = 'windowed'
  validate.validate_config(config, num_devices=1)  # the default (2, 4, 4) divides it
  config.model.window_size = (2, 3, 4)
  with pytest.raises(ValueError, match=r"3 does not divide H'=8"):
    validate.validate_config(config, num_devices=1)
  config.model.window_size = (2, 4, 4)
  config.model.sequence_parallel = 'all_gather'
  with pytest.raises(ValueError, match=r"set model.sequence_parallel='none'"):
    validate.validate_config(config, num_devices=1)
  # The model checks the grid of the clip it is given (here 3 frames, window 2).
  model = dit.build_model(spec_lib.from_config(model_cfg(**PATTERNS['windowed_shift'])), 3, 10)
  video = np.zeros((1, 3, 8, 8, 3), np.float32)
  with pytest.raises(ValueError, match=r"2 does not divide T'=3"):
    jax.eval_shape(model.init, jax.random.key(0), video, np.zeros(1), np.zeros(1, np.int32))


def test_defaults_name_every_pattern_key():
  m = defaults.base_config().model
  spec = spec_lib.from_config(m)
  assert spec.pattern == ap.PatternSpec()
  for key in ('attention_pattern', 'factorised_mode', 'window_size', 'window_shift',
              'hierarchical_windows'):
    assert key in m


# --- FLOPs ---------------------------------------------------------------------------------


def test_flops_count_the_keys_each_pattern_attends_to():
  shape, d, depth = (8, 16, 16, 3), 24, 2  # patch (2, 4, 4): grid (4, 4, 4)
  n = 64

  def attention_flops(**kw):
    spec = spec_lib.from_config(model_cfg(patch_size=(2, 4, 4), **kw))
    return flops.train_step_flops(spec, shape, batch_size=1).attention

  per_key = 12 * d * n  # 12 x D per query token and key, N query tokens, 1 clip
  assert attention_flops() == per_key * depth * n
  assert attention_flops(**PATTERNS['alternating']) == per_key * (16 + 4)
  assert attention_flops(**PATTERNS['within_block']) == per_key * depth * (16 + 4)
  assert attention_flops(**PATTERNS['windowed_shift']) == per_key * depth * 8
  assert attention_flops(**PATTERNS['windowed']) == per_key * depth * 8  # (1, 4, 2)
  # Two head groups, half the width each: (64 + 4) / 2 keys per query on average.
  assert attention_flops(**PATTERNS['hierarchical']) == per_key * depth * 34


def test_flops_count_every_matmul_weight_of_within_block():
  cfg = model_cfg(patch_size=(2, 4, 4), **PATTERNS['within_block'])
  model = dit.build_model(spec_lib.from_config(cfg), 3, 10)
  video = jax.ShapeDtypeStruct((1, 8, 16, 16, 3), np.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), video,
                          jax.ShapeDtypeStruct((1,), np.float32),
                          jax.ShapeDtypeStruct((1,), np.int32))['params']
  kernels = sum(math.prod(leaf.shape) for path, leaf in
                jax.tree_util.tree_leaves_with_path(params)
                if 'kernel' in jax.tree_util.keystr(path))
  f = flops.train_step_flops(model.spec, (8, 16, 16, 3), batch_size=1)
  assert f.token_matmul_params + f.clip_matmul_params == kernels


# --- tokens sharded over `sequence` on 8 devices --------------------------------------------

# tests/multidevice/attention_patterns.py: each pattern's values and gradients, and a
# VideoDiT with shifted windows, on data=2 x sequence=4 equal one device's, and spatial
# attention on whole-frame shards compiles without collectives.
MULTIDEVICE_CHECKS = (
    [f'pattern/data2_seq4/{name}'
     for name in ('spatial', 'temporal', 'windowed_shift', 'hierarchical')]
    + ['hlo/spatial_without_collectives', 'model/data2_seq4/windowed_shift'])


@pytest.mark.parametrize('check', MULTIDEVICE_CHECKS)
def test_multidevice(multidevice, check):
  results = multidevice.run('multidevice/attention_patterns.py')
  multidevice.assert_ok(results, MULTIDEVICE_CHECKS, check)
