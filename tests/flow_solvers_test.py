"""Wan's flow samplers (diffusion/flow_solvers.py) against diffusers' schedulers, all in float32.

The reference loops drive diffusers' `UniPCMultistepScheduler` / `FlowMatchEulerDiscreteScheduler`
with the same jitted JAX fake model as our samplers (v = tanh(W x + t / 1000), W mixing channels),
so only the solvers differ.
"""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from vdit_jax.diffusion import flow_solvers
from vdit_jax.diffusion import objectives
from vdit_jax.diffusion import samplers

try:
  import diffusers
  import torch
except ImportError:  # the comparisons skip; the oracle, project and validation tests still run
  diffusers = torch = None

SHAPE = (2, 4, 3, 4, 4)  # [B, C, T, H, W]: diffusers' Wan layout (the solvers are elementwise)
RTOL = 1e-5  # relative to the largest element of the reference


def _noise(seed=0, shape=SHAPE):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _fake_model(channel_axis=1):
  """v = tanh(W x + t / 1000), W [C, C] fixed, applied along `channel_axis`; t [B] any dtype."""
  c = SHAPE[1]
  w = (np.random.default_rng(7).standard_normal((c, c)) / np.sqrt(c)).astype(np.float32)
  w = jnp.asarray(w)

  @jax.jit
  def model(x, t):
    mixed = jnp.moveaxis(jnp.tensordot(x, w, axes=((channel_axis,), (1,)),
                                       precision=jax.lax.Precision.HIGHEST), -1, channel_axis)
    t = t.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1)) / 1000.0  # [B, 1, ...]
    return jnp.tanh(mixed + t)  # [B, ...]

  return model


def _unipc_scheduler(shift, order=2):
  # Wan2.1-T2V-*-Diffusers' scheduler: every other field is diffusers' default.
  return diffusers.UniPCMultistepScheduler(
      prediction_type='flow_prediction', use_flow_sigmas=True, flow_shift=shift,
      solver_order=order, num_train_timesteps=1000)


def _reference_run(scheduler, model, x_T, num_steps, int_timesteps):
  """diffusers' denoising loop (as WanPipeline runs it); returns every step's prev_sample."""
  scheduler.set_timesteps(num_steps)
  scheduler.set_begin_index(0)
  latents = torch.from_numpy(x_T.copy())
  outs = []
  for t in scheduler.timesteps:
    t_batch = np.full((x_T.shape[0],), t.item(), np.int32 if int_timesteps else np.float32)
    v = np.array(model(jnp.asarray(latents.numpy()), jnp.asarray(t_batch)))  # writable copy
    latents = scheduler.step(torch.from_numpy(v), t, latents, return_dict=False)[0]
    outs.append(latents.numpy().copy())
  return outs


def _assert_close(actual, desired, rtol=RTOL):
  actual, desired = np.asarray(actual), np.asarray(desired)
  np.testing.assert_allclose(actual, desired, rtol=0, atol=rtol * np.max(np.abs(desired)))


def _max_rel(actual, desired):
  return float(np.max(np.abs(np.asarray(actual) - desired)) / np.max(np.abs(desired)))


@functools.lru_cache(maxsize=None)
def _jitted(sampler, num_steps, shift, order=2):
  model = _fake_model()
  if sampler == 'unipc':
    fn = functools.partial(flow_solvers.unipc_sample, model, num_steps=num_steps, shift=shift,
                           order=order)
  else:
    fn = functools.partial(flow_solvers.euler_sample, model, num_steps=num_steps, shift=shift)
  return jax.jit(fn)


class ScheduleTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    if diffusers is None:
      self.skipTest('diffusers / torch not installed')

  @parameterized.product(num_steps=[1, 2, 3, 5, 10, 30, 50], shift=[1.0, 3.0, 5.0])
  def test_unipc_schedule_equals_diffusers(self, num_steps, shift):
    sched = _unipc_scheduler(shift)
    sched.set_timesteps(num_steps)
    sigmas, timesteps = flow_solvers.flow_sigmas(num_steps, shift)
    self.assertEqual(sigmas.shape, (num_steps + 1,))
    self.assertEqual(sigmas.dtype, np.float32)
    np.testing.assert_array_equal(sigmas, sched.sigmas.numpy())
    np.testing.assert_array_equal(timesteps, sched.timesteps.numpy())
    self.assertEqual(timesteps.dtype, np.int64)

  def test_unipc_first_sigma_and_truncation(self):
    sigmas, timesteps = flow_solvers.flow_sigmas(50, 3.0)
    self.assertEqual(sigmas[0], np.float32(1.0 - 1e-6))
    self.assertEqual(timesteps[0], 999)
    self.assertEqual(sigmas[-1], 0.0)
    # truncation, not rounding: int(1000 sigma) <= 1000 sigma < int(1000 sigma) + 1
    s64 = objectives.shift_t(np.linspace(1.0, 1e-3, 51)[1:-1], 3.0)
    np.testing.assert_array_equal(timesteps[1:], np.floor(s64 * 1000).astype(np.int64))

  @parameterized.product(num_steps=[1, 2, 3, 5, 10, 50], shift=[1.0, 3.0, 5.0, 7.3])
  def test_euler_schedule_equals_diffusers(self, num_steps, shift):
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(num_steps)
    sigmas, timesteps = flow_solvers.euler_sigmas(num_steps, shift)
    np.testing.assert_array_equal(sigmas, sched.sigmas.numpy())
    np.testing.assert_array_equal(timesteps, sched.timesteps.numpy())


class UniPCTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    if diffusers is None:
      self.skipTest('diffusers / torch not installed')

  @parameterized.product(order=[1, 2, 3])
  def test_each_step_equals_diffusers_step(self, order):
    num_steps, shift = 6, 3.0
    model = _fake_model()
    x_T = _noise(1)
    ref = _reference_run(_unipc_scheduler(shift, order), model, x_T, num_steps, True)
    tables = flow_solvers.unipc_tables(*flow_solvers.flow_sigmas(num_steps, shift), order)
    step = jax.jit(flow_solvers.unipc_step)
    state = flow_solvers.unipc_init(x_T, order)
    for i in range(num_steps):
      t = jnp.full((SHAPE[0],), tables.timesteps[i], jnp.int32)
      state = step(state, model(state.x, t), tables)
      self.assertEqual(int(state.step), i + 1)
      _assert_close(state.x, ref[i])

  @parameterized.product(num_steps=[1, 2, 3, 5, 10], shift=[3.0, 5.0])
  def test_run_equals_diffusers(self, num_steps, shift):
    x_T = _noise(2)
    ref = _reference_run(_unipc_scheduler(shift), _fake_model(), x_T, num_steps, True)[-1]
    out = _jitted('unipc', num_steps, shift)(x_T)
    self.assertEqual(out.shape, SHAPE)
    self.assertEqual(out.dtype, jnp.float32)
    self.assertFalse(np.any(np.isnan(out)))
    _assert_close(out, ref)

  @parameterized.product(order=[1, 3], num_steps=[2, 5, 10])
  def test_other_orders_equal_diffusers(self, order, num_steps):
    x_T = _noise(3)
    ref = _reference_run(_unipc_scheduler(3.0, order), _fake_model(), x_T, num_steps, True)[-1]
    _assert_close(_jitted('unipc', num_steps, 3.0, order)(x_T), ref)

  def test_coefficients_preserve_straight_paths(self):
    # Each update is affine in (x, m's) and exact on x = (1 - s) x0 + s n when every m = x0:
    # the coefficients on x0 and n must sum to the path's at the next sigma.
    for order in (1, 2, 3):
      sigmas, timesteps = flow_solvers.flow_sigmas(12, 5.0)
      tab = flow_solvers.unipc_tables(sigmas, timesteps, order)
      s = np.asarray(sigmas, np.float64)
      pred = np.asarray(tab.pred_x) * (1 - s[:-1]) + np.asarray(tab.pred_m).sum(1)
      np.testing.assert_allclose(pred, 1 - s[1:], rtol=0, atol=1e-6)
      np.testing.assert_allclose(np.asarray(tab.pred_x) * s[:-1], s[1:], rtol=0, atol=1e-6)
      corr = (np.asarray(tab.corr_x)[1:] * (1 - s[:-2]) + np.asarray(tab.corr_m).sum(1)[1:]
              + np.asarray(tab.corr_new)[1:])
      np.testing.assert_allclose(corr, 1 - s[1:-1], rtol=0, atol=1e-6)


class EulerTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    if diffusers is None:
      self.skipTest('diffusers / torch not installed')

  @parameterized.product(num_steps=[1, 2, 3, 5, 10], shift=[3.0, 5.0])
  def test_run_equals_diffusers(self, num_steps, shift):
    x_T = _noise(4)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    ref = _reference_run(sched, _fake_model(), x_T, num_steps, False)[-1]
    out = _jitted('euler', num_steps, shift)(x_T)
    self.assertEqual(out.shape, SHAPE)
    _assert_close(out, ref)


class OracleTest(parameterized.TestCase):
  """A velocity field whose exact flow is known: the straight path from a fixed x0 to a noise."""

  @parameterized.product(solver=[('unipc', 1), ('unipc', 2), ('unipc', 3), ('euler', None)],
                         num_steps=[1, 2, 5, 20])
  def test_straight_path_recovers_x0(self, solver, num_steps):
    sampler, order = solver
    x0 = jnp.asarray(_noise(5) * 0.5)
    noise = jnp.asarray(_noise(6))
    velocity = lambda x, t: noise - x0  # the same at every point: v = noise - x0
    if sampler == 'unipc':
      sigmas, _ = flow_solvers.flow_sigmas(num_steps, 3.0)
    else:
      sigmas, _ = flow_solvers.euler_sigmas(num_steps, 3.0)
    x_T = (1.0 - sigmas[0]) * x0 + sigmas[0] * noise  # on the path at the first sigma
    if sampler == 'unipc':
      out = jax.jit(lambda x: flow_solvers.unipc_sample(
          velocity, x, num_steps=num_steps, shift=3.0, order=order))(x_T)
    else:
      out = jax.jit(lambda x: flow_solvers.euler_sample(
          velocity, x, num_steps=num_steps, shift=3.0))(x_T)
    np.testing.assert_allclose(out, x0, rtol=0, atol=2e-6)  # |x0| <= 1.4; measured <= 1e-6

  def test_unipc_on_the_project_grid_with_float_timesteps(self):
    # The project's flow models see float32 1000 t: UniPC on flow_time_grid (first t moved
    # below 1, where log-SNR is finite) passes float timesteps through and stays exact.
    grid = samplers.flow_time_grid(6, 3.0)  # [S + 1] float32, from 1 to 0
    grid[0] = np.float32(1.0 - flow_solvers.FIRST_SIGMA_EPS)
    tables = flow_solvers.unipc_tables(grid, grid[:-1] * np.float32(1000.0))
    self.assertEqual(tables.timesteps.dtype, jnp.float32)
    x0, noise = jnp.asarray(_noise(5) * 0.5), jnp.asarray(_noise(6))
    seen = []

    def velocity(x, t):
      seen.append(t.dtype)
      return noise - x0

    out = flow_solvers.unipc_walk(velocity, (1.0 - grid[0]) * x0 + grid[0] * noise, tables)
    self.assertEqual(seen, [jnp.float32])  # traced once by fori_loop
    np.testing.assert_allclose(out, x0, rtol=0, atol=2e-6)

  def test_oracle_catches_a_wrong_sign(self):
    # The same oracle with v = x0 - noise lands far from x0: the test above can fail.
    x0, noise = jnp.asarray(_noise(5) * 0.5), jnp.asarray(_noise(6))
    out = flow_solvers.unipc_sample(lambda x, t: x0 - noise, noise, num_steps=5, shift=3.0)
    self.assertGreater(float(jnp.max(jnp.abs(out - x0))), 1.0)


class ProjectEulerTest(absltest.TestCase):

  def test_project_flow_euler_equals_euler_walk_on_its_grid(self):
    # samplers.sample('euler') on Diffusion('flow') walks flow_time_grid with model_t = 1000 t;
    # euler_walk given that grid is the same sampler (same t, same velocity sign).
    num_steps, shift = 7, 3.0
    shape = (2, 3, 4, 4, 4)  # [B, T, H, W, C]
    model = _fake_model(channel_axis=-1)
    x_T = _noise(8, shape)
    diffusion = objectives.Diffusion.create('flow', shift=shift)
    grid = samplers.flow_time_grid(num_steps, shift)  # [S + 1] float32
    project = samplers.sample(diffusion, lambda z, t, labels: model(z, t), jax.random.key(0),
                              shape, None, sampler='euler', num_steps=num_steps, clip_x0=False,
                              init_noise=jnp.asarray(x_T))
    timesteps = grid[:-1] * np.float32(objectives.FLOW_T_SCALE)  # [S]
    ours = flow_solvers.euler_walk(model, x_T, grid, timesteps)
    _assert_close(ours, project, rtol=1e-6)


class GuidanceTest(absltest.TestCase):

  def test_cfg_two_calls_and_batched_agree(self):
    apply = lambda x, t, ctx: jnp.tanh(x * ctx[:, None] + t[:, None] / 1000.0)  # [B, D]
    cond, uncond = jnp.array([1.0, 2.0]), jnp.array([-0.5, 0.25])
    x, t = jnp.asarray(_noise(9, (2, 5))), jnp.array([500, 500], jnp.int32)
    expected = apply(x, t, uncond) + 5.0 * (apply(x, t, cond) - apply(x, t, uncond))
    for batched in (False, True):
      fn = flow_solvers.cfg_model_fn(apply, cond, uncond, 5.0, batched=batched)
      np.testing.assert_allclose(fn(x, t), expected, rtol=1e-6, atol=1e-6)
    # guidance_scale <= 1: the conditional call alone, as WanPipeline.
    np.testing.assert_array_equal(
        flow_solvers.cfg_model_fn(apply, cond, uncond, 1.0)(x, t), apply(x, t, cond))


class ValidationTest(parameterized.TestCase):

  @parameterized.parameters(0, -3, 2.5, True)
  def test_bad_num_steps(self, num_steps):
    for fn in (flow_solvers.flow_sigmas, flow_solvers.euler_sigmas):
      with self.assertRaisesRegex(ValueError, f'num_steps={num_steps!r}'):
        fn(num_steps, 3.0)
    with self.assertRaisesRegex(ValueError, f'num_steps={num_steps!r}'):
      flow_solvers.unipc_sample(None, _noise(), num_steps=num_steps, shift=3.0)

  @parameterized.parameters(0.0, -1.0, float('nan'), float('inf'))
  def test_bad_shift(self, shift):
    with self.assertRaisesRegex(ValueError, f'shift={shift!r}.*> 0'):
      flow_solvers.flow_sigmas(5, shift)
    with self.assertRaisesRegex(ValueError, f'shift={shift!r}'):
      flow_solvers.euler_sample(None, _noise(), num_steps=5, shift=shift)

  @parameterized.parameters(0, 4, -1, 2.0, True)
  def test_bad_order(self, order):
    with self.assertRaisesRegex(ValueError, f'order={order!r} must be one of'):
      flow_solvers.unipc_sample(None, _noise(), num_steps=5, shift=3.0, order=order)

  def test_bad_sigmas(self):
    with self.assertRaisesRegex(ValueError, 'must decrease strictly'):
      flow_solvers.unipc_tables(np.array([1.0, 0.5, 0.0]), np.array([1000, 500]))
    with self.assertRaisesRegex(ValueError, 'timesteps shape'):
      flow_solvers.unipc_tables(np.array([0.9, 0.5, 0.0]), np.array([900]))

  def test_bad_guidance_scale(self):
    with self.assertRaisesRegex(ValueError, 'guidance_scale=nan'):
      flow_solvers.cfg_model_fn(None, None, None, float('nan'))


if __name__ == '__main__':
  absltest.main()
