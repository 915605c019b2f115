"""Embeddings, QK-norm attention, adaLN-Zero blocks and the full VideoDiT."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vdit_jax.config import defaults
from vdit_jax.model import spec as spec_lib

from vdit_jax.model import attention, blocks, dit, embeddings


def model_cfg(**overrides):
  cfg = defaults.base_config().model
  cfg.update(dict(
      variant=None, width=48, depth=3, num_heads=4, mlp_dim=96, patch_size=(2, 4, 4),
      pos_embed='sincos', qk_norm=True, attention_impl='xla', scan_layers=True,
      remat_policy='none', dtype='float32', param_dtype='float32'))
  with cfg.ignore_type():  # tests also give values of the wrong type
    cfg.update(overrides)
  return cfg


def inputs(b=2, t=4, h=8, w=8, c=3, seed=0):
  rng = np.random.default_rng(seed)
  video = rng.normal(size=(b, t, h, w, c)).astype(np.float32)
  return video, np.array([3.0, 700.0][:b], np.float32), np.array([1, 5][:b], np.int32)


@functools.partial(jax.jit, static_argnums=(1, 2))
def randomise(params, seed=1, scale=0.1):
  """Non-zero values everywhere (zero-init layers would hide bugs); one compiled program,
  as the jax.jit(...init/apply) calls below: eager Flax code compiles every op on its own."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                   for x, k in zip(leaves, keys)])


def test_sincos_3d_shape_and_distinct_positions():
  table = embeddings.sincos_3d((2, 3, 4), 48)
  assert table.shape == (24, 48)
  # All rows distinct: each position gets its own code.
  d = np.abs(np.asarray(table)[:, None] - np.asarray(table)[None]).sum(-1)
  assert (d + np.eye(24) > 1e-3).all()


def test_rope_preserves_norm_and_is_relative():
  cos, sin = embeddings.rope_3d((2, 3, 4), 12)
  assert cos.shape == (24, 6)
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 24, 2, 12)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 24, 2, 12)), jnp.float32)
  rq = embeddings.apply_rope(q, cos, sin)
  np.testing.assert_allclose(np.linalg.norm(rq, axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-5)
  # Same vector at every position: the score depends only on the offset, so the
  # (t, h, w) = (0, 0, 0)->(0, 0, 1) score equals (1, 2, 2)->(1, 2, 3).
  qs = jnp.broadcast_to(q[:, :1], q.shape)
  ks = jnp.broadcast_to(k[:, :1], k.shape)
  rq, rk = embeddings.apply_rope(qs, cos, sin), embeddings.apply_rope(ks, cos, sin)
  score = jnp.einsum('bnkd,bmkd->bknm', rq, rk)  # [B, K, N, N]
  a, b = 0, 1
  c, d = 1 * 12 + 2 * 4 + 2, 1 * 12 + 2 * 4 + 3
  np.testing.assert_allclose(score[0, :, a, b], score[0, :, c, d], rtol=1e-4, atol=1e-4)


def test_qk_norm_gives_unit_rms_per_head_before_scale():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 3, 16)) * 7.0 + 2.0, jnp.float32)
  normed = attention.rms_normalize(x)
  rms = np.sqrt(np.mean(np.square(np.asarray(normed)), axis=-1))
  np.testing.assert_allclose(rms, np.ones_like(rms), rtol=1e-5)
  # The module applies a learnable per-feature scale after normalising.
  mod = attention.RMSNorm()
  variables = jax.jit(mod.init)(jax.random.key(0), x)
  variables = jax.tree.map(lambda s: s * 3.0, variables)
  np.testing.assert_allclose(jax.jit(mod.apply)(variables, x), 3.0 * normed, rtol=1e-5)


def test_attention_uses_normalised_q_and_k():
  # With QK-norm, scaling the input's q/k projections does not change the output.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 6, 16)), jnp.float32)
  mod = blocks.Attention(num_heads=2, qk_norm=True)
  params = nn.unbox(jax.jit(mod.init)(jax.random.key(0), x)['params'])
  out = jax.jit(mod.apply)({'params': params}, x)
  scaled = dict(params)
  for name in ('query_kernel', 'query_bias', 'key_kernel', 'key_bias'):
    scaled[name] = params[name] * 10.0
  np.testing.assert_allclose(jax.jit(mod.apply)({'params': scaled}, x), out, rtol=1e-4, atol=1e-5)
  plain = blocks.Attention(num_heads=2, qk_norm=False)
  p2 = nn.unbox(jax.jit(plain.init)(jax.random.key(0), x)['params'])
  s2 = dict(p2)
  for name in ('query_kernel', 'query_bias', 'key_kernel', 'key_bias'):
    s2[name] = p2[name] * 10.0
  assert not np.allclose(jax.jit(plain.apply)({'params': s2}, x), jax.jit(plain.apply)({'params': p2}, x),
                         atol=1e-3)


def test_zero_initialised_block_is_identity():
  block = blocks.DiTBlock(num_heads=4, mlp_dim=64)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 10, 32)), jnp.float32)
  c = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32)), jnp.float32)
  variables = jax.jit(block.init)(jax.random.key(0), x, c)
  out, _ = jax.jit(block.apply)(variables, x, c)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
  # Once the gates are non-zero, the block is no longer the identity.
  params = randomise(nn.unbox(variables['params']))
  out2, _ = jax.jit(block.apply)({'params': params}, x, c)
  assert np.abs(np.asarray(out2) - np.asarray(x)).max() > 1e-3


def test_final_layer_is_zero_initialised():
  model = dit.build_model(spec_lib.from_config(model_cfg()), channels=3, num_classes=10)
  video, t, y = inputs()
  variables = jax.jit(model.init)(jax.random.key(0), video, t, y)
  out = jax.jit(model.apply)(variables, video, t, y)
  assert out.shape == video.shape
  np.testing.assert_array_equal(np.asarray(out), 0.0)


@pytest.mark.parametrize('patch', [(1, 2, 2), (2, 4, 4), (4, 8, 8), (1, 1, 1)])
@pytest.mark.parametrize('pos_embed', ['sincos', 'rope'])
def test_output_shape_for_patch_sizes(patch, pos_embed):
  model = dit.build_model(spec_lib.from_config(model_cfg(patch_size=patch, pos_embed=pos_embed, depth=1)),
                          channels=3, num_classes=10)
  video, t, y = inputs()
  params = randomise(nn.unbox(jax.jit(model.init)(jax.random.key(0), video, t, y)['params']))
  out = jax.jit(model.apply)({'params': params}, video, t, y)
  assert out.shape == video.shape and out.dtype == jnp.float32
  assert np.isfinite(np.asarray(out)).all()


def test_param_count_independent_of_frames_and_resolution():
  model = dit.build_model(spec_lib.from_config(model_cfg()), channels=3, num_classes=10)
  counts = []
  for shape in [(4, 8, 8), (8, 16, 8), (2, 32, 32)]:
    video = np.zeros((1,) + shape + (3,), np.float32)
    v = jax.eval_shape(model.init, jax.random.key(0), video, np.zeros(1), np.zeros(1, np.int32))
    counts.append(sum(x.size for x in jax.tree.leaves(v)))
  assert counts[0] == counts[1] == counts[2]
  # And the same weights run on another resolution/duration.
  video, t, y = inputs()
  params = jax.jit(model.init)(jax.random.key(0), video, t, y)
  bigger = np.zeros((2, 8, 16, 8, 3), np.float32)
  assert jax.jit(model.apply)(params, bigger, t, y).shape == bigger.shape


def _unstack_scanned(scanned, depth):
  """{'blocks': stacked} -> {'blocks_0': ..., 'blocks_{depth-1}': ...}."""
  params = {k: v for k, v in scanned.items() if k != 'blocks'}
  for i in range(depth):
    params[f'blocks_{i}'] = jax.tree.map(lambda a, i=i: a[i], scanned['blocks'])
  return params


@pytest.mark.parametrize('pos_embed', ['sincos', 'rope'])
def test_scanned_equals_unrolled(pos_embed):
  video, t, y = inputs()
  scanned = dit.build_model(spec_lib.from_config(model_cfg(pos_embed=pos_embed)), 3, 10)
  unrolled = dit.build_model(spec_lib.from_config(model_cfg(pos_embed=pos_embed, scan_layers=False)), 3, 10)
  params = randomise(nn.unbox(jax.jit(scanned.init)(jax.random.key(0), video, t, y)['params']))
  assert params['blocks']['mlp']['fc1']['kernel'].shape == (3, 48, 96)
  out_scan = jax.jit(scanned.apply)({'params': params}, video, t, y)
  out_unrolled = jax.jit(unrolled.apply)({'params': _unstack_scanned(params, 3)}, video, t, y)
  np.testing.assert_allclose(out_scan, out_unrolled, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('policy', ['full', 'dots_saveable', 'dots_with_no_batch_dims_saveable'])
def test_remat_policies_keep_values_and_gradients(policy):
  video, t, y = inputs()
  base = dit.build_model(spec_lib.from_config(model_cfg()), 3, 10)
  remat = dit.build_model(spec_lib.from_config(model_cfg(remat_policy=policy)), 3, 10)
  params = randomise(nn.unbox(jax.jit(base.init)(jax.random.key(0), video, t, y)['params']))

  def loss(model, p):
    return jnp.mean(jax.jit(model.apply)({'params': p}, video, t, y) ** 2)

  g1 = jax.grad(lambda p: loss(base, p))(params)
  g2 = jax.grad(lambda p: loss(remat, p))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g2)


def test_labels_change_output_and_null_label_exists():
  model = dit.build_model(spec_lib.from_config(model_cfg()), 3, 10)
  video, t, _ = inputs()
  params = randomise(nn.unbox(jax.jit(model.init)(jax.random.key(0), video, t, None)['params']))
  assert params['y_embed']['table']['embedding'].shape == (11, 48)
  a = jax.jit(model.apply)({'params': params}, video, t, jnp.array([0, 0]))
  b = jax.jit(model.apply)({'params': params}, video, t, jnp.array([10, 10]))  # null label
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4


def test_every_param_has_logical_names():
  model = dit.build_model(spec_lib.from_config(model_cfg()), 3, 10)
  video, t, y = inputs()
  boxed = jax.eval_shape(model.init, jax.random.key(0), video, t, y)['params']
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  assert boxed['blocks']['attn']['query_kernel'].names == ('layers', 'embed', 'heads', 'kv')


@pytest.mark.parametrize('variant,expect', [
    ('S/2', dict(width=384, depth=12, num_heads=6, mlp_dim=1536, patch_size=(1, 2, 2))),
    ('XL/2x4x4', dict(width=1152, depth=28, num_heads=16, mlp_dim=4608, patch_size=(2, 4, 4))),
])
def test_variant_table(variant, expect):
  spec = spec_lib.from_config(model_cfg(variant=variant, width=None, depth=None, num_heads=None,
                                    mlp_dim=None, patch_size=None))
  for key, value in expect.items():
    assert getattr(spec, key) == value
  # Explicit fields override the variant's.
  spec = spec_lib.from_config(model_cfg(variant=variant, width=None, depth=2, num_heads=None,
                                    mlp_dim=None, patch_size=None))
  assert spec.depth == 2 and spec.width == expect['width']


def test_bf16_compute_with_f32_params():
  model = dit.build_model(spec_lib.from_config(model_cfg(dtype='bfloat16')), 3, 10)
  video, t, y = inputs()
  variables = jax.jit(model.init)(jax.random.key(0), video, t, y)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(variables)))
  params = randomise(nn.unbox(variables['params']))
  out = jax.jit(model.apply)({'params': params}, video, t, y)
  assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()


def _depthwise_reference(x, kernel, grid):
  """lax's grouped 3-D convolution, 'SAME' zero padding: [B, N, D] -> [B, N, D]."""
  b, n, d = x.shape
  out = jax.lax.conv_general_dilated(
      x.reshape((b,) + tuple(grid) + (d,)), kernel[:, :, :, None, :], (1, 1, 1), 'SAME',
      dimension_numbers=('NTHWC', 'THWIO', 'NTHWC'), feature_group_count=d)
  return out.reshape(b, n, d)


@pytest.mark.parametrize('kernel_size, grid', [
    ((3, 3, 3), (2, 3, 4)), ((1, 3, 3), (4, 4, 4)), ((3, 5, 1), (3, 4, 2)), ((5, 5, 5), (2, 2, 2))])
def test_token_conv_is_a_depthwise_convolution_over_the_grid(kernel_size, grid):
  conv = blocks.TokenConv(kernel_size, grid)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, int(np.prod(grid)), 5)), jnp.float32)
  params = nn.unbox(conv.init(jax.random.key(0), x)['params'])
  assert params['kernel'].shape == kernel_size + (5,)
  np.testing.assert_array_equal(conv.apply({'params': params}, x), x)  # identity at init
  kernel = jnp.asarray(rng.normal(size=kernel_size + (5,)), jnp.float32)
  np.testing.assert_allclose(conv.apply({'params': {'kernel': kernel}}, x),
                             _depthwise_reference(x, kernel, grid), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r'token grid \(1, 2, 3\) holds 6 tokens, but x has N='):
    blocks.TokenConv(kernel_size, (1, 2, 3)).init(jax.random.key(0), x)


def test_mlp_conv_starts_as_the_plain_model():
  video, t, y = inputs()
  plain = dit.build_model(spec_lib.from_config(model_cfg()), 3, 10)
  conv = dit.build_model(spec_lib.from_config(model_cfg(mlp_conv=(3, 3, 3))), 3, 10)
  params = randomise(nn.unbox(jax.jit(plain.init)(jax.random.key(0), video, t, y)['params']))
  fresh = nn.unbox(jax.jit(conv.init)(jax.random.key(0), video, t, y)['params'])
  kernel = fresh['blocks']['mlp']['conv']['kernel']  # the only new param: depth x taps x D
  assert kernel.shape == (3, 3, 3, 3, 48)
  assert (sum(x.size for x in jax.tree.leaves(fresh))
          == sum(x.size for x in jax.tree.leaves(params)) + kernel.size)

  def with_kernel(k):
    mlp = dict(params['blocks']['mlp'], conv={'kernel': k})
    return {**params, 'blocks': dict(params['blocks'], mlp=mlp)}

  expected = jax.jit(plain.apply)({'params': params}, video, t, y)
  np.testing.assert_allclose(jax.jit(conv.apply)({'params': with_kernel(kernel)}, video, t, y),
                             expected, rtol=1e-6, atol=1e-6)
  trained = jax.jit(conv.apply)({'params': with_kernel(randomise(kernel))}, video, t, y)
  assert np.abs(np.asarray(trained) - np.asarray(expected)).max() > 1e-4


def test_scanned_equals_unrolled_with_mlp_conv():
  video, t, y = inputs()
  scanned = dit.build_model(spec_lib.from_config(model_cfg(mlp_conv=(3, 3, 3))), 3, 10)
  unrolled = dit.build_model(spec_lib.from_config(model_cfg(mlp_conv=(3, 3, 3), scan_layers=False)), 3, 10)
  params = randomise(nn.unbox(jax.jit(scanned.init)(jax.random.key(0), video, t, y)['params']))
  out_scan = jax.jit(scanned.apply)({'params': params}, video, t, y)
  out_unrolled = jax.jit(unrolled.apply)({'params': _unstack_scanned(params, 3)}, video, t, y)
  np.testing.assert_allclose(out_scan, out_unrolled, rtol=1e-5, atol=1e-5)


def test_class_tokens_carry_the_label_through_cross_attention():
  """model.class_tokens=K: K learned tokens per class (the null label's row included)
  that each block cross-attends to; with the adaLN label vectors made equal, the label
  still changes the output, through the tokens alone."""
  model = dit.build_model(spec_lib.from_config(model_cfg(class_tokens=2)), 3, 10)
  video, t, _ = inputs()
  params = randomise(nn.unbox(jax.jit(model.init)(jax.random.key(0), video, t, None)['params']))
  assert params['y_tokens']['table'].shape == (11, 2, 48)
  assert 'cross_attn' in params['blocks']
  table = params['y_embed']['table']['embedding']
  params['y_embed']['table']['embedding'] = jnp.broadcast_to(table[:1], table.shape)
  apply = jax.jit(model.apply)
  a = apply({'params': params}, video, t, jnp.array([0, 0]))
  b = apply({'params': params}, video, t, jnp.array([3, 3]))
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4
  # Without tokens the same equal adaLN vectors leave no trace of the label.
  plain = dit.build_model(spec_lib.from_config(model_cfg()), 3, 10)
  p = randomise(nn.unbox(jax.jit(plain.init)(jax.random.key(0), video, t, None)['params']))
  p['y_embed']['table']['embedding'] = jnp.broadcast_to(
      p['y_embed']['table']['embedding'][:1], (11, 48))
  a, b = (jax.jit(plain.apply)({'params': p}, video, t, jnp.array([y, y])) for y in (0, 3))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize('overrides, message', [
    (dict(class_tokens=-1), r'model.class_tokens=-1 must be an integer >= 0'),
    (dict(class_tokens=True), r'model.class_tokens=True must be an integer >= 0'),
    (dict(class_tokens=2, conditioning='text'), r"model.class_tokens=2 is read only with "
                                                r"model.conditioning='class'"),
])
def test_class_tokens_rejects_bad_values(overrides, message):
  with pytest.raises(ValueError, match=message):
    spec_lib.check_spec(spec_lib.from_config(model_cfg(**overrides)))


def test_self_condition_reads_the_estimate_as_more_input_channels():
  """model.self_condition: x0_prev [B, T, H, W, C] enters beside the noisy clip (2C input
  channels); none given is zeros, and another estimate changes the output."""
  model = dit.build_model(spec_lib.from_config(model_cfg(self_condition=True)), 3, 10)
  video, t, labels = inputs()
  params = randomise(nn.unbox(jax.jit(model.init)(jax.random.key(0), video, t, labels)[
      'params']))
  assert params['patch_embed']['proj']['kernel'].shape == (2 * 2 * 4 * 4 * 3, 48)  # 2C in
  apply = jax.jit(model.apply)
  none = apply({'params': params}, video, t, labels)
  zeros = apply({'params': params}, video, t, labels, x0_prev=jnp.zeros_like(video))
  np.testing.assert_array_equal(np.asarray(none), np.asarray(zeros))
  other = apply({'params': params}, video, t, labels, x0_prev=0.5 * jnp.ones_like(video))
  assert np.abs(np.asarray(other) - np.asarray(none)).max() > 1e-4
  with pytest.raises(ValueError, match=r'x0_prev \(2, 2, 8, 8, 3\) must have the shape of video'):
    model.apply({'params': params}, video, t, labels, x0_prev=video[:, :2])
  plain = dit.build_model(spec_lib.from_config(model_cfg()), 3, 10)
  with pytest.raises(ValueError, match='x0_prev is given but model.self_condition is False'):
    plain.init(jax.random.key(0), video, t, labels, x0_prev=video)


@pytest.mark.parametrize('overrides, message', [
    (dict(self_condition=1), r'model.self_condition=1 must be True or False'),
    (dict(self_condition=True, conditioning='text'),
     r'model.self_condition=True is built for class-conditional models only'),
    (dict(self_condition=True, context_frames_max=2),
     r'context_frames_max=2 need'),
])
def test_self_condition_rejects_bad_values(overrides, message):
  with pytest.raises(ValueError, match=message):
    spec_lib.check_spec(spec_lib.from_config(model_cfg(**overrides)))


def _conv_reference(x, kernel):
  """numpy 'same' 3-D convolution: x [B, T, H, W, Cin], kernel [kt, kh, kw, Cin, Cout]."""
  kt, kh, kw = kernel.shape[:3]
  b, t, h, w, _ = x.shape
  padded = np.pad(x, ((0, 0), (kt // 2,) * 2, (kh // 2,) * 2, (kw // 2,) * 2, (0, 0)))
  out = np.zeros((b, t, h, w, kernel.shape[-1]))
  for i in range(t):
    for j in range(h):
      for k in range(w):
        window = padded[:, i:i + kt, j:j + kh, k:k + kw, :]  # [B, kt, kh, kw, Cin]
        out[:, i, j, k] = np.einsum('bxyzc,xyzcd->bd', window, kernel)
  return out


@pytest.mark.parametrize('kernel', [(1, 3, 3), (3, 3, 1)])  # the 2-D and the 3-D path
def test_pixel_refiner_matches_a_numpy_convolution_and_starts_as_the_identity(kernel):
  """blocks.PixelRefiner: out + conv2(gelu(mod(conv1([out, video])))) with 'same' zero
  padding, against a numpy reference; fresh (zero output kernel), it returns `out`."""
  rng = np.random.default_rng(0)
  out = rng.normal(size=(2, 3, 6, 5, 3)).astype(np.float32)
  video = rng.normal(size=(2, 3, 6, 5, 4)).astype(np.float32)  # C + a mask channel
  c = rng.normal(size=(2, 16)).astype(np.float32)
  module = blocks.PixelRefiner(8, kernel)
  params = nn.unbox(module.init(jax.random.key(0), out, video, c)['params'])
  np.testing.assert_array_equal(np.asarray(module.apply({'params': params}, out, video, c)), out)
  params = randomise(params, scale=0.3)
  got = np.asarray(module.apply({'params': params}, out, video, c))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  mod = np.asarray(jax.nn.silu(c), np.float64) @ p['adaln']['proj']['kernel'] + p['adaln'][
      'proj']['bias']
  shift, scale = mod[:, :8], mod[:, 8:]
  hidden = _conv_reference(np.concatenate([out, video], -1), p['in_kernel']) + p['in_bias']
  hidden = hidden * (1 + scale[:, None, None, None]) + shift[:, None, None, None]
  hidden = np.asarray(jax.nn.gelu(hidden, approximate=True))
  want = out + _conv_reference(hidden, p['out_kernel']) + p['out_bias']
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_model_with_a_fresh_refiner_gives_the_plain_models_output():
  video, t, y = inputs()
  refined = dit.build_model(spec_lib.from_config(model_cfg(refiner_width=4)), 3, 10)
  params = randomise(nn.unbox(jax.jit(refined.init)(jax.random.key(0), video, t, y)['params']))
  params['refiner'] = nn.unbox(jax.jit(refined.init)(jax.random.key(0), video, t, y)[
      'params'])['refiner']  # the refiner as initialised: its output kernel is zero
  plain = dit.build_model(spec_lib.from_config(model_cfg()), 3, 10)
  rest = {k: v for k, v in params.items() if k != 'refiner'}
  np.testing.assert_array_equal(
      np.asarray(jax.jit(refined.apply)({'params': params}, video, t, y)),
      np.asarray(jax.jit(plain.apply)({'params': rest}, video, t, y)))
  params['refiner'] = randomise(params['refiner'], seed=2)
  changed = jax.jit(refined.apply)({'params': params}, video, t, y)
  assert np.abs(np.asarray(changed) - np.asarray(
      jax.jit(plain.apply)({'params': rest}, video, t, y))).max() > 1e-3


@pytest.mark.parametrize('overrides, message', [
    (dict(refiner_width=-1), r'model.refiner_width=-1 must be an integer >= 0'),
    (dict(refiner_width=2.5), r'model.refiner_width=2.5 must be an integer >= 0'),
    (dict(refiner_width=8, refiner_kernel=(1, 2, 3)),
     r'model.refiner_kernel=\(1, 2, 3\) must be three odd positive ints'),
])
def test_refiner_rejects_bad_values(overrides, message):
  with pytest.raises(ValueError, match=message):
    spec_lib.check_spec(spec_lib.from_config(model_cfg(**overrides)))
