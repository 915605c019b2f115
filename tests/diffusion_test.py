"""Tests for vdit_jax.diffusion: schedules, objectives, samplers (CPU, tiny shapes)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdit_jax import diffusion as vd
from vdit_jax.config import defaults
from vdit_jax.diffusion import objectives

SHAPE = (2, 4, 8, 8, 3)  # [B, T, H, W, C]


def _cfg(**kw):
  config = defaults.base_config().diffusion  # every field, then this test's values
  config.update(dict(
      objective='eps', schedule='linear', num_timesteps=1000, t_sampling='uniform',
      logit_mean=0.0, logit_std=1.0, shift=1.0) | kw)
  return config


def _make(**kw):
  return vd.Diffusion.from_config(_cfg(**kw))


def _clip_x0(seed=0):
  return jax.random.uniform(jax.random.PRNGKey(seed), SHAPE, jnp.float32, -0.9, 0.9)


def _oracle(diff, x0):
  """model_fn returning the exact eps / v / velocity for the fixed clip x0, given z and t."""
  x0 = np.asarray(x0, np.float64)

  def model_fn(z, t_model, labels):
    del labels
    if diff.is_flow:
      t = (t_model / vd.FLOW_T_SCALE).reshape(-1, 1, 1, 1, 1)
      eps = (z - (1.0 - t) * x0) / t
      return eps - x0
    abar = diff.alphas_cumprod[t_model.astype(jnp.int32)].reshape(-1, 1, 1, 1, 1)
    eps = (z - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)
    if diff.objective == 'eps':
      return eps
    return jnp.sqrt(abar) * eps - jnp.sqrt(1.0 - abar) * x0

  return model_fn


# ------------------------------------------------------------------------------ schedules


@pytest.mark.parametrize('num_timesteps', [1000, 500, 100])
def test_linear_endpoints(num_timesteps):
  betas = vd.make_betas('linear', num_timesteps)
  scale = 1000.0 / num_timesteps
  assert betas.dtype == np.float64 and betas.shape == (num_timesteps,)
  np.testing.assert_allclose(betas[0], 1e-4 * scale, rtol=1e-12)
  np.testing.assert_allclose(betas[-1], 0.02 * scale, rtol=1e-12)
  np.testing.assert_allclose(np.diff(betas), np.full(num_timesteps - 1, np.diff(betas)[0]),
                             rtol=1e-9)


def test_cosine_alphas_cumprod_closed_form():
  T, s = 1000, 0.008
  abar = vd.alphas_cumprod(vd.make_betas('cosine', T))
  f = lambda t: np.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
  expected = f(np.arange(1, T + 1)) / f(0.0)  # abar_t = f(t + 1) / f(0)
  # Only the last beta is clipped at 0.999; all others follow the closed form exactly.
  np.testing.assert_allclose(abar[:-1], expected[:-1], rtol=1e-9)
  betas = vd.make_betas('cosine', T)
  assert betas.max() == pytest.approx(0.999)
  assert np.sum(betas >= 0.999) == 1


@pytest.mark.parametrize('name', ['linear', 'cosine'])
@pytest.mark.parametrize('num_timesteps', [1000, 50])
def test_alphas_cumprod_monotone_in_unit_interval(name, num_timesteps):
  abar = vd.alphas_cumprod(vd.make_betas(name, num_timesteps))
  assert np.all(np.diff(abar) < 0)
  assert np.all((abar > 0) & (abar < 1))


def test_schedule_errors():
  with pytest.raises(ValueError, match="schedule='quadratic'"):
    vd.make_betas('quadratic', 10)
  with pytest.raises(ValueError, match='num_timesteps=0'):
    vd.make_betas('cosine', 0)
  with pytest.raises(ValueError, match='num_timesteps=-3'):
    vd.make_betas('linear', -3)
  with pytest.raises(ValueError, match='num_timesteps=10.*below 1'):
    vd.make_betas('linear', 10)
  with pytest.raises(ValueError, match='in \\(0, 1\\)'):
    vd.alphas_cumprod(np.array([0.5, 1.2]))


def test_config_errors():
  with pytest.raises(ValueError, match="objective='x0'"):
    _make(objective='x0')
  with pytest.raises(ValueError, match="t_sampling='beta'"):
    _make(objective='flow', t_sampling='beta')
  with pytest.raises(ValueError, match='shift=0.0'):
    _make(objective='flow', shift=0.0)
  with pytest.raises(ValueError, match='shift=-2.0 must be a finite number > 0'):
    _make(objective='v', schedule='cosine', shift=-2.0)
  with pytest.raises(ValueError, match='logit_std=-1.0'):
    _make(objective='flow', t_sampling='logit_normal', logit_std=-1.0)
  with pytest.raises(ValueError, match="schedule='nope'"):
    _make(schedule='nope')
  with pytest.raises(ValueError, match="loss_weighting='snr'"):
    _make(objective='v', loss_weighting='snr')
  with pytest.raises(ValueError, match="loss_weighting='x0' needs objective 'v' or 'flow'"):
    _make(objective='eps', loss_weighting='x0')
  with pytest.raises(ValueError, match=r"input_scale='alpha' is not known.*'none', 'signal'"):
    _make(objective='v', input_scale='alpha')


@pytest.mark.parametrize('objective,schedule', [('v', 'cosine'), ('eps', 'linear'),
                                                ('flow', None)])
def test_input_scale_signal_gives_the_network_z_times_its_signal_coefficient(objective,
                                                                              schedule):
  plain = _make(objective=objective, schedule=schedule or 'linear')
  scaled = _make(objective=objective, schedule=schedule or 'linear', input_scale='signal')
  x0, noise = _clip_x0(seed=3), jax.random.normal(_key(4), SHAPE)
  t_max = 1.0 if plain.is_flow else plain.num_timesteps - 1
  t = jnp.array([0.3, t_max]) if plain.is_flow else jnp.array([300, t_max])
  seen = {}

  def pred_fn(z, t_model):
    seen['z'] = z
    return jnp.tanh(z)

  plain_loss = plain.loss_at(pred_fn, x0, t, noise)
  np.testing.assert_array_equal(seen['z'], plain.corrupt(x0, noise, t))
  scaled_loss = scaled.loss_at(pred_fn, x0, t, noise)
  a = (1.0 - t) if plain.is_flow else plain.sqrt_alphas_cumprod[t]  # [B]
  np.testing.assert_allclose(seen['z'], a[:, None, None, None, None]
                             * plain.corrupt(x0, noise, t), rtol=1e-6)
  assert np.abs(np.asarray(seen['z'][1])).max() < 0.05  # the noisiest input fades out
  assert float(scaled_loss) != float(plain_loss)


@pytest.mark.parametrize('objective,schedule,sampler', [
    ('v', 'cosine', 'ddim'), ('eps', 'linear', 'ddpm'), ('flow', None, 'euler')])
def test_samplers_give_the_network_the_scaled_input(objective, schedule, sampler):
  # Sampling with input_scale='signal' and a network f is sampling with 'none' and the
  # network z -> f(a_t z): the scaling is the only change, at every step.
  plain = _make(objective=objective, schedule=schedule or 'linear', shift=2.0)
  scaled = _make(objective=objective, schedule=schedule or 'linear', shift=2.0,
                 input_scale='signal')

  def f(z, t_model, labels):
    del labels
    return jnp.tanh(2.0 * z) * (0.5 + t_model[:, None, None, None, None] / 2000.0)

  def f_of_scaled(z, t_model, labels):
    t = t_model / vd.FLOW_T_SCALE if plain.is_flow else t_model.astype(jnp.int32)
    return f(scaled.model_input(z, t), t_model, labels)

  a = _run(scaled, f, _key(7), sampler=sampler, num_steps=5)
  b = _run(plain, f_of_scaled, _key(7), sampler=sampler, num_steps=5)
  np.testing.assert_allclose(a, b, atol=1e-6)
  c = _run(plain, f, _key(7), sampler=sampler, num_steps=5)
  assert np.abs(np.asarray(a - c)).max() > 1e-3


@pytest.mark.parametrize('objective', ['v', 'flow'])
def test_x0_loss_weighting_is_the_x0_estimate_error(objective):
  """loss_weighting='x0': the loss of a prediction equals the MSE of the x0 it implies; with
  'none' it is the plain target MSE, which differs from that at every t but the clean end."""
  x0 = _clip_x0()
  noise = jax.random.normal(jax.random.PRNGKey(1), SHAPE)
  pred = jax.random.normal(jax.random.PRNGKey(2), SHAPE)
  t = jnp.array([700, 990]) if objective == 'v' else jnp.array([0.6, 0.95], jnp.float32)
  weighted = _make(objective=objective, schedule='cosine', loss_weighting='x0')
  plain = _make(objective=objective, schedule='cosine')
  z = weighted.corrupt(x0, noise, t)
  x0_hat, _ = weighted.pred_to_x0_eps(z, pred, t)
  per_clip = [float(jnp.mean((x0_hat[i] - x0[i]) ** 2)) for i in range(2)]
  got = weighted.loss_at(lambda z_, t_: pred, x0, t, noise)
  np.testing.assert_allclose(float(got), np.mean(per_clip), rtol=1e-5)
  unweighted = plain.loss_at(lambda z_, t_: pred, x0, t, noise)
  np.testing.assert_allclose(
      float(unweighted), float(jnp.mean((plain.target(x0, noise, t) - pred) ** 2)), rtol=1e-6)
  assert float(unweighted) > 1.05 * float(got)
  # Diffusion.loss applies the same weighting to its own draws.
  rng = jax.random.PRNGKey(3)
  loss, _ = weighted.loss(lambda z_, t_: jnp.zeros_like(z_), x0, rng)
  t_draw, noise_draw = weighted.draw(rng, x0)
  z_draw = weighted.corrupt(x0, noise_draw, t_draw)
  x0_zero, _ = weighted.pred_to_x0_eps(z_draw, jnp.zeros(SHAPE), t_draw)
  np.testing.assert_allclose(float(loss), float(jnp.mean((x0_zero - x0) ** 2)), rtol=1e-5)


@pytest.mark.parametrize('objective', ['v', 'flow'])
def test_x0_prediction_has_the_objectives_loss_and_samples_its_x0(objective):
  """prediction='x0': the network outputs x0; its loss is the objective's loss of the target
  that x0 implies at z_t (1 / sigma capped at 1 / X0_MIN_SIGMA), x0 weighting gives the plain
  x0 MSE, and a network that always outputs one clean clip samples exactly that clip."""
  x0 = _clip_x0()
  noise = jax.random.normal(jax.random.PRNGKey(1), SHAPE)
  x0_hat = _clip_x0(seed=5)
  t = jnp.array([300, 990]) if objective == 'v' else jnp.array([0.3, 0.95], jnp.float32)
  d = _make(objective=objective, schedule='cosine', prediction='x0')
  plain = _make(objective=objective, schedule='cosine')
  z = d.corrupt(x0, noise, t)
  a, b = (np.asarray(c) for c in d._coefs(t))  # pylint: disable=protected-access
  assert b.min() > vd.objectives.X0_MIN_SIGMA
  if objective == 'v':  # the v that x0_hat implies at z: eps_hat = (z - a x0_hat) / b
    implied = a[:, None, None, None, None] * (z - a[:, None, None, None, None] * x0_hat) / b[
        :, None, None, None, None] - b[:, None, None, None, None] * x0_hat
  else:  # velocity eps_hat - x0_hat = (z - x0_hat) / t
    implied = (z - x0_hat) / t[:, None, None, None, None]
  want = plain.loss_at(lambda z_, t_: implied, x0, t, noise)
  got = d.loss_at(lambda z_, t_: x0_hat, x0, t, noise)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-4)
  x0_weighted = _make(objective=objective, schedule='cosine', prediction='x0',
                      loss_weighting='x0')
  np.testing.assert_allclose(float(x0_weighted.loss_at(lambda z_, t_: x0_hat, x0, t, noise)),
                             float(jnp.mean((x0_hat - x0) ** 2)), rtol=1e-5)
  # Near the clean end the weight stops at 1 / X0_MIN_SIGMA^2.
  t0 = jnp.array([0, 1]) if objective == 'v' else jnp.array([0.0, 0.001], jnp.float32)
  near = d.loss_at(lambda z_, t_: x0_hat, x0, t0, noise)
  np.testing.assert_allclose(float(near), float(jnp.mean((x0_hat - x0) ** 2))
                             / vd.objectives.X0_MIN_SIGMA ** 2, rtol=1e-5)
  # (x0, eps) from the prediction: x0 as given, eps consistent with z.
  x0_back, eps_back = d.pred_to_x0_eps(z, x0_hat, t)
  np.testing.assert_array_equal(np.asarray(x0_back), np.asarray(x0_hat))
  np.testing.assert_allclose(np.asarray(a[:, None, None, None, None] * x0_back
                                        + b[:, None, None, None, None] * eps_back),
                             np.asarray(z), atol=1e-5)
  sampler = 'ddim' if objective == 'v' else 'euler'
  out = vd.samplers.sample(d, lambda z_, t_, y_: jnp.broadcast_to(x0, z_.shape), _key(4),
                           SHAPE, None, sampler=sampler, num_steps=8)
  np.testing.assert_allclose(np.asarray(out), np.asarray(x0), atol=1e-4)
  with pytest.raises(ValueError, match=r"prediction='x0' needs objective 'v' or 'flow'"):
    _make(objective='eps', prediction='x0')
  with pytest.raises(ValueError, match=r"prediction='x' is not known"):
    _make(objective='v', prediction='x')


# ------------------------------------------------------------------------------ objectives


def test_targets_on_known_inputs():
  x0 = jnp.full(SHAPE, 0.5, jnp.float32)
  noise = jnp.full(SHAPE, -1.0, jnp.float32)
  t = jnp.array([0, 700], jnp.int32)
  abar = vd.alphas_cumprod(vd.make_betas('cosine', 1000))[np.array([0, 700])]
  eps_d, v_d = _make(schedule='cosine'), _make(objective='v', schedule='cosine')
  np.testing.assert_array_equal(eps_d.target(x0, noise, t), noise)
  v = np.sqrt(abar) * -1.0 - np.sqrt(1 - abar) * 0.5  # [B]
  np.testing.assert_allclose(v_d.target(x0, noise, t), np.broadcast_to(
      v.reshape(2, 1, 1, 1, 1), SHAPE), rtol=1e-6)
  flow = _make(objective='flow')
  np.testing.assert_allclose(flow.target(x0, noise, jnp.array([0.2, 0.9])),
                             np.full(SHAPE, -1.5), rtol=0)


@pytest.mark.parametrize('objective,schedule', [('eps', 'linear'), ('v', 'cosine'),
                                                ('flow', None)])
def test_loss_oracle_and_zero_prediction(objective, schedule):
  diff = _make(objective=objective, schedule=schedule or 'linear',
               t_sampling='logit_normal', shift=2.0)
  x0 = _clip_x0()
  rng = jax.random.PRNGKey(7)
  # Reproduce the documented draw order: t from the first split key, noise from the second.
  t_rng, noise_rng = jax.random.split(rng)
  t = diff.sample_t(t_rng, SHAPE[0])
  noise = jax.random.normal(noise_rng, SHAPE, jnp.float32)
  target = diff.target(x0, noise, t)

  loss, aux = diff.loss(lambda z, tm: target, x0, rng)
  assert loss.shape == () and float(loss) == 0.0
  np.testing.assert_array_equal(aux['t'], t)
  np.testing.assert_array_equal(aux['model_t'], diff.model_t(t))

  # Zeros: loss = mean(target^2), target built by hand in float64 from the closed form.
  x0_np, n_np = np.asarray(x0, np.float64), np.asarray(noise, np.float64)
  if objective == 'flow':
    by_hand = n_np - x0_np
  else:
    abar = vd.alphas_cumprod(vd.make_betas(schedule, 1000))[np.asarray(t)].reshape(-1, 1, 1, 1, 1)
    abar = abar / (abar + 4.0 * (1.0 - abar))  # shift 2 divides the SNR by 4
    by_hand = n_np if objective == 'eps' else np.sqrt(abar) * n_np - np.sqrt(1 - abar) * x0_np
  loss0, _ = diff.loss(lambda z, tm: jnp.zeros_like(z), x0, rng)
  np.testing.assert_allclose(float(loss0), np.mean(by_hand ** 2), rtol=1e-5)


def test_loss_is_jittable_with_diffusion_as_argument():
  diff = _make(objective='v', schedule='cosine')
  x0 = _clip_x0()

  @jax.jit
  def f(d, x0, rng):
    return d.loss(lambda z, tm: 0.5 * z, x0, rng)[0]

  eager = diff.loss(lambda z, tm: 0.5 * z, x0, jax.random.PRNGKey(1))[0]
  np.testing.assert_allclose(f(diff, x0, jax.random.PRNGKey(1)), eager, rtol=1e-6)


def test_corrupt_at_zero_is_data():
  x0 = _clip_x0()
  noise = jax.random.normal(jax.random.PRNGKey(3), SHAPE)
  flow = _make(objective='flow')
  np.testing.assert_array_equal(flow.corrupt(x0, noise, jnp.zeros((2,))), x0)
  np.testing.assert_allclose(flow.corrupt(x0, noise, jnp.ones((2,))), noise, atol=0)
  diff = _make()
  z0 = diff.corrupt(x0, noise, jnp.zeros((2,), jnp.int32))
  a0 = 1.0 - 1e-4  # abar_0 of the linear schedule
  np.testing.assert_allclose(z0, np.sqrt(a0) * x0 + np.sqrt(1 - a0) * noise, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(z0, x0, atol=0.05)


@pytest.mark.parametrize('objective,schedule,t', [
    ('eps', 'linear', [0, 500]), ('eps', 'cosine', [250, 900]),
    ('v', 'linear', [0, 999]), ('v', 'cosine', [1, 999]),
    ('flow', 'linear', [0.0, 0.37]), ('flow', 'linear', [0.8, 1.0])])
def test_conversions_invert_corrupt(objective, schedule, t):
  diff = _make(objective=objective, schedule=schedule)
  x0 = _clip_x0()
  noise = jax.random.normal(jax.random.PRNGKey(4), SHAPE)
  t = jnp.asarray(t, jnp.float32 if objective == 'flow' else jnp.int32)
  z = diff.corrupt(x0, noise, t)
  x0_hat, eps_hat = diff.pred_to_x0_eps(z, diff.target(x0, noise, t), t)
  np.testing.assert_allclose(x0_hat, x0, atol=2e-5)
  np.testing.assert_allclose(eps_hat, noise, atol=2e-5)


def test_model_t():
  np.testing.assert_array_equal(_make().model_t(jnp.array([0, 999])), [0.0, 999.0])
  assert _make().model_t(jnp.array([3])).dtype == jnp.float32
  np.testing.assert_allclose(_make(objective='flow').model_t(jnp.array([0.0, 0.25, 1.0])),
                             [0.0, 250.0, 1000.0])


def test_sample_t_ranges_and_shift():
  rng = jax.random.PRNGKey(0)
  t = _make().sample_t(rng, 4096)
  assert t.dtype == jnp.int32 and int(t.min()) >= 0 and int(t.max()) <= 999
  assert int(t.max()) > 900 and int(t.min()) < 100
  tu = _make(objective='flow').sample_t(rng, 4096)
  assert tu.dtype == jnp.float32 and float(tu.min()) >= 0 and float(tu.max()) <= 1
  ln = _make(objective='flow', t_sampling='logit_normal')
  tl = ln.sample_t(rng, 4096)
  assert float(tl.min()) > 0 and float(tl.max()) < 1
  assert abs(float(jnp.median(tl)) - 0.5) < 0.03  # sigmoid(N(0, 1)) has median 0.5
  ts = _make(objective='flow', t_sampling='logit_normal', shift=3.0).sample_t(rng, 4096)
  assert float(ts.min()) > 0 and float(ts.max()) < 1
  np.testing.assert_allclose(ts, 3 * tl / (1 + 2 * tl), rtol=1e-6)
  assert np.all(np.asarray(ts) >= np.asarray(tl)) and float(ts.mean()) > float(tl.mean()) + 0.1
  assert vd.shift_t(0.5, 3.0) == pytest.approx(0.75)


# ------------------------------------------------------------------------------ samplers


def _key(seed):
  """Sampler tests use typed 'rbg' keys: the sampler is key-agnostic and these compile faster."""
  return jax.random.key(seed, impl='rbg')


# The documented way to jit `sample`: model_fn and shape static, diffusion a pytree argument.
_jit_sample = jax.jit(vd.sample, static_argnums=(1, 3), static_argnames=(
    'sampler', 'num_steps', 'eta', 'cfg_scale', 'null_label', 'clip_x0', 'self_condition',
    'cfg_interval'))


def _run(diff, model_fn, rng, labels=None, **kw):
  return _jit_sample(diff, model_fn, rng, SHAPE, labels, **kw)


@pytest.mark.parametrize('objective,schedule,sampler,num_steps', [
    ('eps', 'linear', 'ddpm', 10), ('v', 'cosine', 'ddpm', 7),
    ('eps', 'cosine', 'ddim', 10), ('v', 'linear', 'ddim', 1),
    ('flow', None, 'euler', 8), ('flow', None, 'euler', 1)])
def test_oracle_recovers_x0(objective, schedule, sampler, num_steps):
  diff = _make(objective=objective, schedule=schedule or 'linear')
  x0 = _clip_x0(seed=11)
  out = _run(diff, _oracle(diff, x0), _key(5), sampler=sampler,
             num_steps=num_steps)
  assert out.shape == SHAPE and out.dtype == jnp.float32
  np.testing.assert_allclose(out, x0, atol=1e-4)


def test_oracle_euler_with_shift_and_ddim_with_eta():
  x0 = _clip_x0(seed=12)
  flow = _make(objective='flow', shift=3.0)
  out = _run(flow, _oracle(flow, x0), _key(0), sampler='euler', num_steps=5)
  np.testing.assert_allclose(out, x0, atol=1e-4)
  diff = _make(objective='v', schedule='cosine')
  out = _run(diff, _oracle(diff, x0), _key(0), sampler='ddim', num_steps=6,
             eta=1.0)
  np.testing.assert_allclose(out, x0, atol=1e-4)


def test_ddpm_two_steps_by_hand():
  diff = _make()
  rng = _key(9)
  model_fn = lambda z, t, labels: 0.5 * z  # eps prediction
  out = _run(diff, model_fn, rng, sampler='ddpm', num_steps=2, clip_x0=False)
  init_rng, step_rng = jax.random.split(rng)
  z = np.asarray(jax.random.normal(init_rng, SHAPE), np.float64)
  n0 = np.asarray(jax.random.normal(jax.random.fold_in(step_rng, 0), SHAPE), np.float64)
  abar = vd.alphas_cumprod(vd.make_betas('linear', 1000))
  a_t, a_p = abar[999], abar[0]  # respaced chain 999 -> 0
  x0_hat = (z - np.sqrt(1 - a_t) * 0.5 * z) / np.sqrt(a_t)
  beta = 1 - a_t / a_p
  mean = np.sqrt(a_p) * beta / (1 - a_t) * x0_hat + np.sqrt(1 - beta) * (1 - a_p) / (1 - a_t) * z
  z1 = mean + np.sqrt(beta * (1 - a_p) / (1 - a_t)) * n0
  expected = (z1 - np.sqrt(1 - a_p) * 0.5 * z1) / np.sqrt(a_p)  # last step returns x0_hat
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def _ddim_v_by_hand(z, abar, ts, slope=0.3):
  """DDIM (eta 0) in float64 for the v-model v = slope * z, over timesteps ts of abar."""
  for i, t in enumerate(ts):
    a, a_p = abar[t], (abar[ts[i + 1]] if i + 1 < len(ts) else 1.0)
    x0_hat = np.sqrt(a) * z - np.sqrt(1 - a) * slope * z
    eps_hat = np.sqrt(1 - a) * z + np.sqrt(a) * slope * z
    z = np.sqrt(a_p) * x0_hat + np.sqrt(1 - a_p) * eps_hat
  return z


def test_ddim_and_euler_by_hand():
  rng = _key(2)
  z = np.asarray(jax.random.normal(jax.random.split(rng)[0], SHAPE), np.float64)
  diff = _make(objective='v', schedule='cosine')
  out = _run(diff, lambda z, t, labels: 0.3 * z, rng, sampler='ddim', num_steps=3,
             clip_x0=False)
  abar = vd.alphas_cumprod(vd.make_betas('cosine', 1000))
  ts = [999, 500, 0]
  np.testing.assert_array_equal(vd.respaced_timesteps(1000, 3), ts)
  np.testing.assert_allclose(out, _ddim_v_by_hand(z, abar, ts), rtol=1e-4, atol=1e-5)

  flow = _make(objective='flow', shift=2.0)
  out = _run(flow, lambda z, t, labels: -z, rng, sampler='euler', num_steps=4, clip_x0=False)
  grid = 2 * np.linspace(1, 0, 5) / (1 + np.linspace(1, 0, 5))
  z0 = np.asarray(jax.random.normal(jax.random.split(rng)[0], SHAPE), np.float64)
  np.testing.assert_allclose(out, z0 * np.prod(1 - np.diff(grid)), rtol=1e-5)


def test_sampling_shift_retimes_only_flows_grid():
  flow = _make(objective='flow', t_sampling='logit_normal', shift=2.0)
  assert flow.for_sampling(None) is flow and flow.for_sampling(2.0) is flow
  walk = flow.for_sampling(5.0)
  assert walk.shift == 5.0 and (walk.t_sampling, walk.prediction) == ('logit_normal', 'target')
  rng = _key(3)
  out = _run(walk, lambda z, t, labels: -z, rng, sampler='euler', num_steps=4, clip_x0=False)
  grid = 5 * np.linspace(1, 0, 5) / (1 + 4 * np.linspace(1, 0, 5))
  np.testing.assert_allclose(vd.flow_time_grid(4, 5.0), grid, rtol=1e-6)
  z0 = np.asarray(jax.random.normal(jax.random.split(rng)[0], SHAPE), np.float64)
  np.testing.assert_allclose(out, z0 * np.prod(1 - np.diff(grid)), rtol=1e-5)
  v = _make(objective='v', schedule='cosine', shift=2.0)
  assert v.for_sampling(2.0) is v
  with pytest.raises(ValueError, match=r"sample.shift=3.0 re-times only the flow objective's"):
    v.for_sampling(3.0)
  with pytest.raises(ValueError, match='shift=-1 must be a finite number > 0'):
    flow.for_sampling(-1)


def test_self_conditioned_loss_feeds_the_first_passs_estimate_without_its_gradient():
  """loss_at(self_condition=True): the trained pass gets clip(x0 of a first pass at zeros),
  which carries no gradient; False gives it zeros, as the sampler's first step."""
  diff = _make(objective='flow', prediction='x0', t_sampling='logit_normal', shift=3.0)
  x0, noise = _clip_x0(21), jax.random.normal(_key(22), SHAPE)
  t = jnp.array([0.3, 0.9], jnp.float32)
  b = 0.7

  def self_cond_fn(a):
    return lambda z, t_model, x0_prev: a * z + b * x0_prev  # x0 output

  a0 = 1.6  # its first pass is clipped in places: |1.6 z| > 1
  z_in = diff.model_input(diff.corrupt(x0, noise, t), t)
  estimate = jnp.clip(a0 * z_in, -1.0, 1.0)
  assert float(jnp.mean(jnp.abs(a0 * z_in) > 1)) > 0.05
  fixed = lambda a: diff.loss_at(lambda z, t_model: a * z + b * estimate, x0, t, noise)
  with_estimate = lambda a: diff.loss_at(self_cond_fn(a), x0, t, noise, self_condition=True)
  np.testing.assert_allclose(with_estimate(a0), fixed(a0), rtol=1e-6)
  # The gradient is the second pass's only: the estimate held fixed.
  np.testing.assert_allclose(jax.grad(with_estimate)(a0), jax.grad(fixed)(a0), rtol=1e-5)
  zero = lambda a: diff.loss_at(lambda z, t_model: a * z, x0, t, noise)
  without = lambda a: diff.loss_at(self_cond_fn(a), x0, t, noise,
                                   self_condition=jnp.asarray(False))
  np.testing.assert_allclose(without(a0), zero(a0), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(without)(a0), jax.grad(zero)(a0), rtol=1e-6)
  assert abs(float(with_estimate(a0)) - float(zero(a0))) > 1e-3
  # Traced under jit, the coin picks the branch.
  coin = jax.jit(lambda c: diff.loss_at(self_cond_fn(a0), x0, t, noise, self_condition=c))
  np.testing.assert_allclose(coin(True), fixed(a0), rtol=1e-6)
  np.testing.assert_allclose(coin(False), zero(a0), rtol=1e-6)


@pytest.mark.parametrize('sampler', ['euler', 'ddim'])
def test_self_conditioned_sampler_passes_the_guided_estimate_on(sampler):
  """Each step's model call gets the previous step's guided, clipped x0 estimate (zeros at
  the first), doubled beside z under guidance; checked against a float64 loop by hand."""
  rng = _key(7)
  labels = jnp.array([1, 2])
  scale, null = 3.0, 9
  diff = (_make(objective='flow', prediction='x0', shift=2.0) if sampler == 'euler'
          else _make(objective='v', schedule='cosine', prediction='x0'))

  def model_fn(z, t_model, y, x0_prev):  # x0 output
    return 0.6 * z + 0.5 * x0_prev + 0.1 * y.reshape(-1, 1, 1, 1, 1)

  out = _run(diff, model_fn, rng, labels, sampler=sampler, num_steps=3, cfg_scale=scale,
             null_label=null, self_condition=True, clip_x0=False)
  z = np.asarray(jax.random.normal(jax.random.split(rng)[0], SHAPE), np.float64)
  y = np.asarray(labels, np.float64).reshape(-1, 1, 1, 1, 1)
  prev = np.zeros(SHAPE)
  guided = lambda z_in, prev: (0.6 * z_in + 0.5 * prev + 0.1 * null
                               + scale * 0.1 * (y - null))
  if sampler == 'euler':
    grid = 2 * np.linspace(1, 0, 4) / (1 + np.linspace(1, 0, 4))
    for t, t_next in zip(grid[:-1], grid[1:]):
      x0_hat = guided(z, prev)
      z = z + (t_next - t) * (z - x0_hat) / t  # velocity eps - x0 = (z - x0) / t
      prev = np.clip(x0_hat, -1, 1)
  else:
    abar = diff.alphas_cumprod_f64()
    ts = vd.respaced_timesteps(1000, 3)
    for i, t in enumerate(ts):
      a_p = abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
      x0_hat = guided(z, prev)
      eps_hat = (z - np.sqrt(abar[t]) * x0_hat) / np.sqrt(1 - abar[t])
      z = np.sqrt(a_p) * x0_hat + np.sqrt(1 - a_p) * eps_hat
      prev = np.clip(x0_hat, -1, 1)
  np.testing.assert_allclose(out, z, rtol=1e-4, atol=1e-4)
  # Without self-conditioning the same model_fn at zeros gives another answer.
  plain = _run(diff, lambda z, t, y: model_fn(z, t, y, jnp.zeros_like(z)), rng, labels,
               sampler=sampler, num_steps=3, cfg_scale=scale, null_label=null, clip_x0=False)
  assert np.abs(np.asarray(plain) - np.asarray(out)).max() > 1e-3


@pytest.mark.parametrize('name', ['linear', 'cosine'])
@pytest.mark.parametrize('shift', [2.0, 3.5])
def test_shifted_discrete_schedule_divides_the_snr(name, shift):
  plain = vd.alphas_cumprod(vd.make_betas(name, 1000))  # [T] float64
  diff = _make(objective='v', schedule=name, shift=shift)
  snr = lambda a: a / (1.0 - a)
  shifted = diff.alphas_cumprod_f64()
  np.testing.assert_allclose(snr(shifted) / snr(plain), np.full(1000, shift ** -2), rtol=1e-9)
  # The float32 leaves are the same schedule: abar, its square roots, and the betas.
  np.testing.assert_allclose(diff.alphas_cumprod, shifted, rtol=2e-6, atol=1e-12)
  np.testing.assert_allclose(diff.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - shifted), rtol=1e-6)
  np.testing.assert_allclose(np.cumprod(1.0 - np.asarray(diff.betas, np.float64)), shifted,
                             rtol=1e-4, atol=1e-12)
  x0, noise, t = _clip_x0(3), jax.random.normal(_key(4), SHAPE), jnp.array([250, 700])
  a = shifted[np.asarray(t)].reshape(-1, 1, 1, 1, 1)
  np.testing.assert_allclose(diff.corrupt(x0, noise, t),
                             np.sqrt(a) * x0 + np.sqrt(1 - a) * noise, rtol=1e-5, atol=1e-6)
  assert _make(objective='v', schedule=name, shift=1.0).alphas_cumprod_f64().tolist() == (
      plain.tolist())


def test_ddim_by_hand_on_a_shifted_schedule():
  rng = _key(5)
  z = np.asarray(jax.random.normal(jax.random.split(rng)[0], SHAPE), np.float64)
  diff = _make(objective='v', schedule='cosine', shift=2.0)
  out = _run(diff, lambda z, t, labels: 0.3 * z, rng, sampler='ddim', num_steps=3,
             clip_x0=False)
  plain = vd.alphas_cumprod(vd.make_betas('cosine', 1000))
  abar = plain / (plain + 4.0 * (1.0 - plain))  # SNR / 2^2
  ts = [999, 500, 0]
  np.testing.assert_allclose(out, _ddim_v_by_hand(z, abar, ts), rtol=1e-4, atol=1e-5)


def _scaled_model(z, t, labels):
  return 0.9 * z


def test_ddim_eta0_deterministic_eta1_not():
  diff = _make(objective='eps', schedule='cosine')
  model_fn = _scaled_model  # one object, so the jitted sampler is reused across calls
  noise = jax.random.normal(jax.random.PRNGKey(0), SHAPE)
  a = _run(diff, model_fn, _key(1), sampler='ddim', num_steps=5,
           init_noise=noise)
  b = _run(diff, model_fn, _key(2), sampler='ddim', num_steps=5,
           init_noise=noise)
  np.testing.assert_array_equal(a, b)
  c = _run(diff, model_fn, _key(1), sampler='ddim', num_steps=5,
           init_noise=noise, eta=1.0)
  d = _run(diff, model_fn, _key(2), sampler='ddim', num_steps=5,
           init_noise=noise, eta=1.0)
  assert float(jnp.max(jnp.abs(c - d))) > 1e-2
  # Without init_noise the initial noise comes from rng: different rng, different sample.
  e = _run(diff, model_fn, _key(2), sampler='ddim', num_steps=5)
  assert float(jnp.max(jnp.abs(a - e))) > 1e-2


def _label_model(z, t, labels):
  return 0.1 * z + 0.05 * labels.astype(jnp.float32).reshape(-1, 1, 1, 1, 1)


def test_guidance_combines_cond_and_uncond():
  z = jax.random.normal(jax.random.PRNGKey(0), SHAPE)
  t = jnp.array([10.0, 500.0])
  labels = jnp.array([3, 7], jnp.int32)
  calls = []

  def counting(z, t, labels):
    calls.append(z.shape[0])
    return _label_model(z, t, labels)

  np.testing.assert_array_equal(vd.guided_prediction(counting, z, t, labels, 1.0, None),
                                _label_model(z, t, labels))
  np.testing.assert_array_equal(vd.guided_prediction(counting, z, t, labels, 1.0, 10),
                                _label_model(z, t, labels))
  assert calls == [2, 2]
  got = vd.guided_prediction(counting, z, t, labels, 3.0, null_label=10)
  assert calls == [2, 2, 4]
  cond = _label_model(z, t, labels)
  uncond = _label_model(z, t, jnp.full((2,), 10, jnp.int32))
  np.testing.assert_allclose(got, uncond + 3.0 * (cond - uncond), rtol=1e-6, atol=1e-6)


def test_cfg_in_sampler_label_dependent_and_independent():
  diff = _make(objective='v', schedule='cosine')
  labels = jnp.array([1, 2], jnp.int32)
  rng = _key(3)
  kw = dict(sampler='ddim', num_steps=3)
  cond_only = _run(diff, _label_model, rng, labels, **kw)
  guided4 = _run(diff, _label_model, rng, labels, cfg_scale=4.0, null_label=0, **kw)
  assert float(jnp.max(jnp.abs(guided4 - cond_only))) > 1e-3
  indep = _scaled_model
  np.testing.assert_allclose(_run(diff, indep, rng, labels, cfg_scale=4.0, null_label=0, **kw),
                             _run(diff, indep, rng, labels, **kw), rtol=1e-6, atol=1e-6)


def test_guidance_interval_guides_only_the_steps_at_noise_levels_inside_it():
  # Euler over 4 steps of flow times 1, .75, .5, .25 (shift 1): with (0.5, 1) the first three
  # steps take uncond + 3 (cond - uncond), the last the conditional prediction alone (one
  # model call on B, counted at trace time: the two branches of lax.cond).
  flow = _make(objective='flow')
  labels = jnp.array([1, 2], jnp.int32)
  rng = _key(5)
  kw = dict(sampler='euler', num_steps=4, clip_x0=False)
  z0 = jax.random.normal(jax.random.split(rng)[0], SHAPE, jnp.float32)
  grid = vd.flow_time_grid(4, 1.0)
  np.testing.assert_allclose(grid, [1.0, 0.75, 0.5, 0.25, 0.0])

  def expected(guided_steps):
    z = np.asarray(z0, np.float64)
    for i in range(4):
      t_model = jnp.full((2,), grid[i] * vd.FLOW_T_SCALE, jnp.float32)
      cond = np.asarray(_label_model(jnp.asarray(z, jnp.float32), t_model, labels), np.float64)
      uncond = np.asarray(_label_model(jnp.asarray(z, jnp.float32), t_model,
                                       jnp.zeros((2,), jnp.int32)), np.float64)
      v = uncond + 3.0 * (cond - uncond) if i in guided_steps else cond
      z = z + (grid[i + 1] - grid[i]) * v
    return z

  for interval, guided_steps in [(None, {0, 1, 2, 3}), ((0.0, 1.0), {0, 1, 2, 3}),
                                 ((0.5, 1.0), {0, 1, 2}), ((0.2, 0.6), {2, 3}),
                                 ((0.0, 0.1), set())]:
    got = _run(flow, _label_model, rng, labels, cfg_scale=3.0, null_label=0,
               cfg_interval=interval, **kw)
    np.testing.assert_allclose(got, expected(guided_steps), rtol=1e-5, atol=1e-5,
                               err_msg=str(interval))
  # DDIM: the level is t / num_timesteps; an interval holding every step is plain guidance,
  # one holding none is the conditional sampler.
  diff = _make(objective='v', schedule='cosine')
  kw = dict(sampler='ddim', num_steps=3)
  guided = _run(diff, _label_model, rng, labels, cfg_scale=4.0, null_label=0, **kw)
  np.testing.assert_array_equal(
      _run(diff, _label_model, rng, labels, cfg_scale=4.0, null_label=0,
           cfg_interval=(0.0, 1.0), **kw), guided)
  np.testing.assert_allclose(
      _run(diff, _label_model, rng, labels, cfg_scale=4.0, null_label=0,
           cfg_interval=(0.9995, 1.0), **kw), _run(diff, _label_model, rng, labels, **kw),
      rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('interval,match', [
    ((0.5,), r'cfg_interval=\(0.5,\) must be None or a pair'),
    ((0.8, 0.2), r'must satisfy 0 <= lo < hi <= 1'),
    ((0.0, 1.5), r'must satisfy 0 <= lo < hi <= 1'),
    ('ab', r'must be None or a pair'),
])
def test_guidance_interval_is_refused_outside_zero_one(interval, match):
  with pytest.raises(ValueError, match=match):
    vd.sample(_make(objective='flow'), _label_model, _key(0), SHAPE, jnp.zeros((2,), jnp.int32),
              sampler='euler', num_steps=2, cfg_scale=2.0, null_label=0, cfg_interval=interval)


def test_make_sampler_matches_sample():
  flow = _make(objective='flow')
  apply = lambda params, z, t, labels: params['w'] * z
  fn = vd.make_sampler(flow, apply, SHAPE, sampler='euler', num_steps=3)
  params = {'w': jnp.float32(-0.5)}
  rng = jax.random.PRNGKey(0)
  out = fn(params, rng, None)
  ref = vd.sample(flow, functools.partial(apply, params), rng, SHAPE, None, sampler='euler',
                  num_steps=3)
  assert out.shape == SHAPE
  np.testing.assert_allclose(out, ref, rtol=1e-6)


@pytest.mark.parametrize('objective,kw,match', [
    ('eps', dict(sampler='euler'), "sampler='euler' cannot sample objective='eps'"),
    ('v', dict(sampler='euler'), "sampler='euler' cannot sample objective='v'"),
    ('flow', dict(sampler='ddpm'), "sampler='ddpm' cannot sample objective='flow'"),
    ('flow', dict(sampler='ddim'), "sampler='ddim' cannot sample objective='flow'"),
    ('eps', dict(sampler='ddim', num_steps=0), 'num_steps=0 must satisfy 1 <= num_steps'),
    ('eps', dict(sampler='ddim', num_steps=1001), 'num_steps=1001 .*num_timesteps=1000'),
    ('eps', dict(sampler='heun'), "sampler='heun' is not known"),
    ('eps', dict(sampler='ddim', cfg_scale=2.0), 'cfg_scale=2.0 != 1 needs null_label'),
    ('eps', dict(sampler='ddpm', eta=0.5), "eta=0.5 only applies to sampler 'ddim'"),
    ('eps', dict(sampler='ddim', eta=-1.0), 'eta=-1.0 must be >= 0'),
])
def test_invalid_sampler_settings(objective, kw, match):
  diff = _make(objective=objective)
  kw = dict(num_steps=4) | kw
  with pytest.raises(ValueError, match=match):
    vd.sample(diff, _label_model, jax.random.PRNGKey(0), SHAPE, jnp.zeros((2,), jnp.int32),
              **kw)
  if 'cfg_scale' not in kw:
    with pytest.raises(ValueError, match=match):
      vd.make_sampler(diff, lambda p, z, t, l: z, SHAPE, **kw)


@pytest.mark.parametrize('objective,prediction', [('v', 'target'), ('v', 'x0'),
                                                  ('flow', 'target'), ('eps', 'target')])
def test_min_snr_weighting_weighs_the_x0_error_by_the_capped_snr(objective, prediction):
  """loss_weighting='min_snr': each clip's loss is min(SNR(t), gamma) times the MSE of the x0
  its prediction implies, at known t on both sides of the cap (cosine: SNR(100) ~ 37.6,
  SNR(700) ~ 0.24)."""
  x0 = _clip_x0()
  noise = jax.random.normal(jax.random.PRNGKey(1), SHAPE)
  pred = 0.5 * jax.random.normal(jax.random.PRNGKey(2), SHAPE)
  if objective == 'flow':
    t = jnp.array([0.1, 0.7], jnp.float32)
    snr = np.array([(0.9 / 0.1) ** 2, (0.3 / 0.7) ** 2])
  else:
    t = jnp.array([100, 700])
    abar = np.cos((np.array([100, 700]) / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
    snr = None  # read from the schedule below, checked against the closed form
  d = _make(objective=objective, schedule='cosine', prediction=prediction,
            loss_weighting='min_snr', min_snr_gamma=5.0)
  got_snr = np.asarray(d.snr(t))
  if snr is None:
    np.testing.assert_allclose(got_snr, abar / (1 - abar), rtol=2e-2)
    snr = got_snr
  else:
    np.testing.assert_allclose(got_snr, snr, rtol=1e-5)
  assert snr[0] > 5.0 > snr[1]  # one clip above the cap, one below
  z = d.corrupt(x0, noise, t)
  x0_hat, _ = d.pred_to_x0_eps(z, pred, t)
  per_clip = [float(jnp.mean((x0_hat[i] - x0[i]) ** 2)) for i in range(2)]
  want = np.mean([min(snr[i], 5.0) * per_clip[i] for i in range(2)])
  np.testing.assert_allclose(float(d.loss_at(lambda z_, t_: pred, x0, t, noise)), want,
                             rtol=1e-4)
  # The config's float field holds the 0 as 0.0.
  with pytest.raises(ValueError, match=r'min_snr_gamma=0\.0 must be a finite number > 0'):
    _make(objective=objective, loss_weighting='min_snr', min_snr_gamma=0)


def test_uncertainty_weighted_mse_is_mse_at_zero_and_least_at_the_log_error():
  """objectives.uncertainty_weighted_mse: mean_i(L_i / exp(u_i) + u_i) with L_i clip i's MSE;
  u = 0 gives the plain MSE, u = log L minimises it (value mean(1 + log L), zero gradient)."""
  rng = np.random.default_rng(0)
  target = rng.normal(size=(3, 2, 4, 4, 3)).astype(np.float32)
  pred = (target + rng.normal(size=target.shape) * np.array([0.3, 1.0, 2.0])[:, None, None,
                                                                           None, None]
          ).astype(np.float32)
  per_clip = np.mean((target - pred) ** 2, axis=(1, 2, 3, 4))
  loss = lambda u: objectives.uncertainty_weighted_mse(target, pred, u)
  np.testing.assert_allclose(float(loss(jnp.zeros(3))), float(objectives.mse(target, pred)),
                             rtol=1e-6)
  u_star = jnp.asarray(np.log(per_clip), jnp.float32)
  np.testing.assert_allclose(float(loss(u_star)), np.mean(1 + np.log(per_clip)), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(jax.grad(loss)(u_star)), 0.0, atol=1e-6)
  assert float(loss(u_star + 0.1)) > float(loss(u_star)) < float(loss(u_star - 0.1))
  with pytest.raises(ValueError, match='log_variance'):
    loss(jnp.zeros(2))
  # keep: only the kept frames enter each clip's mean (here clip 0 keeps its second frame).
  keep = np.zeros((3, 2, 1, 1, 1), bool)
  keep[0, 1] = keep[1, :] = keep[2, 0] = True
  kept = [np.mean((target - pred)[0, 1] ** 2), per_clip[1], np.mean((target - pred)[2, 0] ** 2)]
  u = jnp.asarray([0.5, -1.0, 0.0], jnp.float32)
  np.testing.assert_allclose(
      float(objectives.uncertainty_weighted_mse(target, pred, u, keep=keep)),
      np.mean(np.asarray(kept) * np.exp(-np.asarray(u)) + np.asarray(u)), rtol=1e-5)
