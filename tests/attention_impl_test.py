"""Attention kernels behind dot_product_attention: xla, blockwise, splash (interpreted on CPU),
cudnn (validation only, no GPU here) and auto.

Every kernel that runs on CPU equals XLA's attention in float32, outputs and gradients, for
lengths that are and are not multiples of the tiles, also inside the Attention module with and
without QK-norm; blockwise keeps float32 softmax statistics for bfloat16 inputs and its
compiled forward + backward memory grows linearly where XLA's grows quadratically; splash and
auto lower to the Mosaic kernel for a TPU topology; auto's choices and the validation errors.
Multi-device checks (splash in shard_map, ulysses running the chosen kernel per device) run in
tests/multidevice/attention_impl.py under 8 fake CPU devices.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import shrink
from vdit_jax.config import defaults
from vdit_jax.config import validate
from vdit_jax.model import spec as spec_lib
from vdit_jax.model import attention
from vdit_jax.model import blocks
from vdit_jax.parallel import axes
from vdit_jax.model import blockwise_attention
from vdit_jax.model import dit
from vdit_jax.model import embeddings

TOPOLOGY = 'v5p:2x2x1'  # 4 chips, one host


def qkv_do(n, m=None, shape=(2, None, 3, 16), dtype=jnp.float32, seed=0):
  """q [B, n, K, Dh], k/v [B, m, K, Dh] and an output cotangent [B, n, K, Dh]."""
  m = n if m is None else m
  rng = np.random.default_rng(seed)
  b, _, k, d = shape
  make = lambda tokens: jnp.asarray(1.5 * rng.normal(size=(b, tokens, k, d)), dtype)
  return make(n), make(m), make(m), make(n)


def out_and_grads(impl):
  """jit((q, k, v, dout) -> (out, dq, dk, dv)) through dot_product_attention."""
  def f(q, k, v, dout):
    out, vjp = jax.vjp(lambda q, k, v: attention.dot_product_attention(q, k, v, impl), q, k, v)
    return (out,) + vjp(dout)
  return jax.jit(f)


def assert_all_close(got, want, rtol, atol):
  for name, g, w in zip(('out', 'dq', 'dk', 'dv'), got, want):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               rtol=rtol, atol=atol, err_msg=name)


# --- numerics against xla -------------------------------------------------------------------


@pytest.mark.parametrize('n,m,impl', [
    (64, 64, 'blockwise:16x32'),    # tiles divide both lengths
    (37, 70, 'blockwise:16x32'),    # cross lengths, both padded
    (50, 50, 'blockwise:512x512'),  # tiles larger than the sequence: one tile
    (200, 200, 'splash:128x128'),   # padded to 256, padded keys masked by segment ids
    # (splash with tiles that divide N: 'ulysses/splash' in multidevice/attention_impl.py)
])
def test_kernel_equals_xla_in_float32(n, m, impl):
  args = qkv_do(n, m)
  assert_all_close(out_and_grads(impl)(*args), out_and_grads('xla')(*args),
                   rtol=1e-5, atol=2e-5)


@functools.lru_cache(maxsize=None)
def _module_run(impl, qk_norm):
  """Output and gradients (params, input) of an Attention module on fixed inputs."""
  grid = (2, 6, 10)  # N = 120 tokens: not a multiple of the tiles
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 120, 48)), jnp.float32)
  rope = embeddings.rope_3d(grid, 16)
  module = blocks.Attention(num_heads=3, qk_norm=qk_norm, attention_impl=impl)
  params = module.init(jax.random.key(0), x, rope)  # the same for every impl

  def loss(params, x):
    out = module.apply(params, x, rope)
    return jnp.sum(out * jnp.cos(out)), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
  return params, out, grads


@pytest.mark.parametrize('impl,qk_norm', [
    ('blockwise:32x16', True), ('blockwise:32x16', False), ('splash:128x128', True)])
def test_attention_module_equals_xla(impl, qk_norm):
  """The whole Attention module (projections, QK-norm, 3-D RoPE) with each kernel:
  outputs and gradients w.r.t. every parameter and the input."""
  params, out, grads = _module_run(impl, qk_norm)
  _, out_ref, grads_ref = _module_run('xla', qk_norm)
  np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=2e-5)
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=5e-5),
               grads, grads_ref)
  assert ('q_norm' in params['params']) == qk_norm


def test_blockwise_bfloat16_keeps_float32_statistics():
  q, k, v, do = qkv_do(300, dtype=jnp.float32, seed=2)
  want = out_and_grads('xla')(q, k, v, do)  # float32 reference
  bf = [x.astype(jnp.bfloat16) for x in (q, k, v, do)]
  got = out_and_grads('blockwise:64x64')(*bf)
  xla_bf16 = out_and_grads('xla')(*bf)
  assert all(g.dtype == jnp.bfloat16 for g in got)
  assert_all_close(got, want, rtol=5e-2, atol=5e-2)
  for g, x, w in zip(got, xla_bf16, want):  # no worse than XLA's bf16 path (f32 softmax)
    err = float(jnp.max(jnp.abs(g.astype(jnp.float32) - w)))
    err_xla = float(jnp.max(jnp.abs(x.astype(jnp.float32) - w)))
    assert err <= 2 * err_xla + 1e-3, (err, err_xla)
  # Every exp, max and sum of the online softmax, forward and backward, is float32.
  loss = lambda q, k, v: jnp.sum(blockwise_attention.blockwise_attention(
      q, k, v, block_q=64, block_kv=64).astype(jnp.float32))
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(*bf[:3])
  dtypes = set()

  def walk(jpr):
    for eqn in jpr.eqns:
      if eqn.primitive.name in ('exp', 'reduce_max', 'reduce_sum', 'log'):
        dtypes.update(str(o.aval.dtype) for o in eqn.outvars)
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if hasattr(sub, 'eqns'):
            walk(sub)
          elif hasattr(sub, 'jaxpr') and hasattr(sub.jaxpr, 'eqns'):
            walk(sub.jaxpr)

  walk(jaxpr.jaxpr)
  assert dtypes == {'float32'}, dtypes


# --- memory ---------------------------------------------------------------------------------


def _temp_bytes(impl, n):
  spec = jax.ShapeDtypeStruct((1, n, 2, 32), jnp.float32)
  compiled = out_and_grads(impl).lower(spec, spec, spec, spec).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_memory_is_linear_where_xla_is_quadratic():
  block = [_temp_bytes('blockwise:256x256', n) for n in (1024, 2048, 4096)]
  xla = [_temp_bytes('xla', n) for n in (2048, 4096)]  # past its fixed overheads
  for a, b in zip(block, block[1:]):
    assert b <= 2.2 * a, block
  assert xla[1] >= 3.5 * xla[0], xla
  # At 4096 tokens the [2, N, N] float32 logits alone are 128 MiB; blockwise holds tiles.
  assert block[-1] < xla[-1] / 10, (block, xla)


# --- TPU lowering ---------------------------------------------------------------------------


@pytest.fixture(scope='module')
def tpu_devices():
  try:
    import libtpu  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    pytest.skip(f'libtpu cannot be imported ({e}); pip install "jax[tpu]=={jax.__version__}"')
  from vdit_jax.tools import plan  # pylint: disable=g-import-not-at-top
  return plan.topology_devices(TOPOLOGY)


def _tpu_train_step_hlo(devices, attention_impl):
  """AOT-compiles grad of a tiny VideoDiT loss on a data=4 TPU mesh; returns its HLO text."""
  config = defaults.base_config()
  m = config.model
  m.variant, m.depth, m.attention_impl = 'Mu/1x2x2', 1, attention_impl
  m.attention_block_q = m.attention_block_kv = 128
  spec = spec_lib.from_config(m)
  spec_lib.check_spec(spec)
  model = dit.VideoDiT(spec=spec, channels=3, num_classes=4)
  mesh = jax.sharding.Mesh(np.asarray(devices).reshape(4, 1, 1, 1), axes.MESH_AXES)
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  video = jax.ShapeDtypeStruct((4, 4, 16, 16, 3), jnp.float32, sharding=data)  # 256 tokens
  t = jax.ShapeDtypeStruct((4,), jnp.float32, sharding=data)
  labels = jax.ShapeDtypeStruct((4,), jnp.int32, sharding=data)
  with jax.set_mesh(mesh), nn.logical_axis_rules(axes.DEFAULT_RULES):
    params = jax.eval_shape(lambda: nn.unbox(model.init(
        jax.random.key(0), jnp.zeros(video.shape), jnp.zeros(4), jnp.zeros(4, jnp.int32))))
    params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=rep),
                          params)

    def loss(params, video, t, labels):
      return jnp.mean(jnp.square(model.apply(params, video, t, labels) - video))

    compiled = jax.jit(jax.grad(loss)).lower(params, video, t, labels).compile()
  return compiled.as_text()


@pytest.mark.parametrize('impl', ['splash', 'auto'])
def test_video_dit_train_step_lowers_splash_for_tpu(tpu_devices, impl):
  """On this CPU host the TPU compile picks the Mosaic kernel for 'auto' too
  (lax.platform_dependent), forward and backward."""
  hlo = _tpu_train_step_hlo(tpu_devices, impl)
  kernels = hlo.count('custom_call_target="tpu_custom_call"')
  assert kernels >= 2, hlo[:2000]  # forward kernel and the fused backward kernel


# --- auto and validation --------------------------------------------------------------------


@pytest.mark.parametrize('platform,dtype,tokens,head_dim,want', [
    ('tpu', jnp.float32, 4096, 64, 'splash'),
    ('tpu', jnp.bfloat16, 100, 64, 'xla'),        # shorter than AUTO_SPLASH_MIN_TOKENS
    ('gpu', jnp.bfloat16, 100, 64, 'cudnn'),
    ('gpu', jnp.float16, 65536, 128, 'cudnn'),
    ('gpu', jnp.bfloat16, 65536, 12, 'blockwise'),  # head dim not a multiple of 8
    ('gpu', jnp.float32, 1024, 64, 'xla'),
    ('gpu', jnp.float32, 16384, 64, 'blockwise'),
    ('gpu', jnp.float32, attention.AUTO_BLOCKWISE_MIN_TOKENS, 64, 'xla'),
    ('gpu', jnp.float32, attention.AUTO_BLOCKWISE_MIN_TOKENS + 1, 64, 'blockwise'),
    ('cpu', jnp.float32, attention.AUTO_CPU_BLOCKWISE_MIN_TOKENS - 1, 64, 'xla'),
    ('cpu', jnp.float32, attention.AUTO_CPU_BLOCKWISE_MIN_TOKENS, 64, 'blockwise'),
    ('cpu', jnp.bfloat16, 32768, 64, 'blockwise'),
])
def test_auto_choice(platform, dtype, tokens, head_dim, want):
  assert attention.choose_impl(platform, dtype, tokens, tokens, head_dim) == want


def test_auto_on_cpu_runs_the_chosen_kernel():
  short = jax.make_jaxpr(lambda q: attention.dot_product_attention(q, q, q, 'auto'))(
      jnp.zeros((1, 64, 2, 8)))
  long_ = jax.make_jaxpr(lambda q: attention.dot_product_attention(q, q, q, 'auto:512x512'))(
      jnp.zeros((1, attention.AUTO_CPU_BLOCKWISE_MIN_TOKENS + 8, 2, 8)))
  assert 'custom_vjp_call' not in str(short) and 'custom_vjp_call' in str(long_)
  assert 'platform_index' in str(long_)  # a TPU lowering would take splash instead


def test_impl_strings_round_trip():
  impl = attention.AttentionImpl('blockwise', 256, 1024)
  assert impl.key() == 'blockwise:256x1024'
  assert attention.AttentionImpl.parse(impl.key()) == impl
  assert attention.AttentionImpl.parse('xla') == attention.AttentionImpl('xla')
  assert attention.AttentionImpl('xla', 64, 64).key() == 'xla'
  # Tiles left None take each kernel's default.
  assert attention.AttentionImpl.parse('blockwise') == attention.AttentionImpl('blockwise')
  half = attention.AttentionImpl.parse('auto:x1024')
  assert (half.block_q, half.block_kv, half.key()) == (None, 1024, 'auto:x1024')
  assert half.blocks('blockwise') == (blockwise_attention.DEFAULT_BLOCK_Q, 1024)
  assert attention.AttentionImpl('splash').blocks('splash') == attention.DEFAULT_BLOCKS['splash']


@pytest.mark.parametrize('impl,kwargs,message', [
    ('flash', {}, r"attention_impl='flash' is not one of"),
    ('blockwise:12', {}, r'must read BQxBKV'),
    (attention.AttentionImpl('blockwise', 0, 64), {}, r'attention_block_q=0 must be a positive'),
    (attention.AttentionImpl('splash', 512, 100), {},
     r'attention_block_kv=100.*multiples of 128'),
    ('splash', dict(platform='cpu'), r"'splash' is a TPU kernel, but the devices are 'cpu'"),
    ('splash', dict(platform='gpu'), r"'splash' is a TPU kernel"),
    ('cudnn', dict(dtype='float32'), r"'cudnn' needs model.dtype in \('bfloat16', 'float16'\)"),
    ('cudnn', dict(dtype='bfloat16', head_dim=12), r'multiple of 8 and <= 256.*not 12'),
    ('cudnn', dict(dtype='bfloat16', platform='cpu'), r"needs NVIDIA GPUs, but the devices are"),
    ('cudnn', dict(dtype='float16', platform='tpu'), r"needs NVIDIA GPUs"),
])
def test_check_impl_errors(impl, kwargs, message):
  with pytest.raises(ValueError, match=message):
    attention.check_impl(impl, **kwargs)


def test_check_impl_accepts():
  attention.check_impl('cudnn', dtype='bfloat16', head_dim=64, platform='gpu')
  attention.check_impl('splash', platform='tpu')
  attention.check_impl('auto', platform='cpu')
  attention.check_impl('blockwise:100x300', dtype='float16', platform='tpu')


def _config(**model):
  """configs/tiny.py (its own sizes: the validation of its attention settings)."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  return shrink(tiny.get_config(), small=(), model=model)


@pytest.mark.parametrize('model,message', [
    (dict(attention_impl='cudnn'), r"'cudnn' needs model.dtype"),                 # float32
    (dict(attention_impl='cudnn', dtype='bfloat16'), r"needs NVIDIA GPUs, .*'cpu'"),
    (dict(attention_impl='splash'), r"'splash' is a TPU kernel, but the devices are 'cpu'"),
    (dict(attention_impl='blockwise', attention_block_kv=-4), r'attention_block_kv=-4'),
])
def test_validate_config_rejects(model, message):
  with pytest.raises(ValueError, match=message):
    validate.validate_config(_config(**model), num_devices=1)


def test_validate_config_takes_the_devices_platform():
  validate.validate_config(_config(attention_impl='splash'), num_devices=1, platform='tpu')
  validate.validate_config(_config(attention_impl='auto'), num_devices=1)


def test_cudnn_off_gpu_is_a_value_error_when_called():
  q = jnp.zeros((1, 16, 2, 8), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"needs NVIDIA GPUs, but the devices are 'cpu'"):
    attention.dot_product_attention(q, q, q, 'cudnn')


# --- multi-device ---------------------------------------------------------------------------

MULTIDEVICE_CHECKS = (
    'splash_shard_map/data2_tensor2', 'splash_shard_map/indivisible_batch',
    'splash_shard_map/batch_of_one', 'ring/batch_of_one', 'ulysses/splash_batch_of_one',
    'ulysses/blockwise', 'ulysses/splash')


@pytest.mark.parametrize('check', MULTIDEVICE_CHECKS)
def test_multidevice(multidevice, check):
  results = multidevice.run('multidevice/attention_impl.py', timeout=600)
  multidevice.assert_ok(results, MULTIDEVICE_CHECKS, check)
