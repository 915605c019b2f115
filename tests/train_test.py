"""Train step, checkpoints, resume, and the end-to-end loop on tiny shapes."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from tests.conftest import shrink
from vdit_jax import modes
from vdit_jax.data import pipeline
from vdit_jax.data import video_io
from vdit_jax.model import dit
from vdit_jax.generate import conditional
from vdit_jax.train import loop
from vdit_jax.train import metrics as metrics_lib
from vdit_jax.train import state as state_lib
from vdit_jax.train import step as step_lib


def small_config(**train):
  """configs/tiny.py shrunk, width 64 (> the 1*4*4*3 = 48 values of a tubelet), 2 layers."""
  return shrink(tiny.get_config(), model=dict(width=64, depth=2, mlp_dim=128),
                train={'warmup_steps': 2, 'log_every': 2, **train}, sample=dict(num_steps=3))


def test_overfitting_one_batch_drives_loss_down():
  config = small_config(learning_rate=3e-3, warmup_steps=5, num_steps=100)
  config.model.label_dropout = 0.0
  s = loop.build(config, None)
  state, _ = state_lib.create_state(s.init_fn, jax.random.key(0), s.mesh, s.rules)
  train_step = jax.jit(step_lib.make_train_step(
      s.model, s.diffusion, s.tx, s.schedule, num_classes=s.num_classes, label_dropout=0.0,
      ema=0.99), donate_argnums=0)
  batch = jax.tree.map(jnp.asarray, next(pipeline.make_dataset(config.data, 4, seed=0)))

  @jax.jit
  def eval_loss(params):
    # The same (t, noise) draws before and after: only the params change.
    def one(key):
      pred_fn = lambda z, t: s.model.apply({'params': params}, z, t, batch['label'])
      return s.diffusion.loss(pred_fn, batch['video'], key)[0]
    return jnp.mean(jax.vmap(one)(jax.random.split(jax.random.key(42), 16)))

  before = float(eval_loss(state.params))
  losses = []
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    for _ in range(config.train.num_steps):
      state, metrics = train_step(state, batch, jax.random.key(0))
      losses.append(float(metrics['loss']))
  after = float(eval_loss(state.params))
  assert int(state.step) == config.train.num_steps
  assert np.isfinite(losses).all()
  assert after < 0.5 * before, (before, after)
  assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10]), losses


def _tiny_abstract_params(config):
  s = loop.build(config, None)
  return jax.eval_shape(
      lambda r: s.model.init(r, *state_lib.model_inputs(config.data, 1))['params'],
      jax.random.key(0))


def test_muon_takes_the_block_matrices_and_leaves_the_rest_to_adamw():
  config = small_config()
  dims = state_lib.muon_dimension_numbers(_tiny_abstract_params(config))
  flat = {jax.tree_util.keystr(path): d for path, d in jax.tree_util.tree_flatten_with_path(
      dims, is_leaf=lambda x: x is None or isinstance(x, tuple))[0]}
  muon = {k: (d.reduction_axis, d.output_axis) for k, d in flat.items() if d is not None}
  qkv = ((-3,), (-2, -1))
  expected = {
      "['blocks']['adaln']['proj']['kernel']": ((-2,), (-1,)),
      "['blocks']['attn']['query_kernel']": qkv,
      "['blocks']['attn']['key_kernel']": qkv,
      "['blocks']['attn']['value_kernel']": qkv,
      "['blocks']['attn']['out_kernel']": ((-3, -2), (-1,)),
      "['blocks']['mlp']['fc1']['kernel']": ((-2,), (-1,)),
      "['blocks']['mlp']['fc2']['kernel']": ((-2,), (-1,)),
  }
  expected.update({k.replace("['attn']", "['cross_attn']['attn']", 1): v
                   for k, v in expected.items() if "['attn']" in k})
  assert muon == expected
  # Embeddings, the output projection, biases, norms and the token convolution: AdamW.
  for name in ("['patch_embed']['proj']['kernel']", "['final']['proj']['kernel']",
               "['blocks']['mlp']['conv']['kernel']", "['blocks']['mlp']['fc1']['bias']",
               "['y_tokens']['table']"):
    assert flat[name] is None, name


def test_muon_orthogonalises_block_updates_at_adamws_rms():
  lr = 1e-2
  config = small_config(optimizer='muon', learning_rate=lr, warmup_steps=0, grad_clip=0.0)
  params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                        nn.unbox(_tiny_abstract_params(config)))
  grads = jax.tree.map(lambda a: jax.random.normal(jax.random.key(a.size), a.shape), params)
  tx = state_lib.make_optimizer(config.train)
  updates, _ = tx.update(grads, tx.init(params), params)
  fc1 = np.asarray(updates['blocks']['mlp']['fc1']['kernel'][0])  # [width, mlp] of block 0
  spread = lambda m: (lambda sv: sv.max() / sv.min())(np.linalg.svd(m, compute_uv=False))
  # A Gaussian gradient's singular values spread over ~6x; Muon's five Newton-Schulz
  # steps bring them into about [0.7, 1.2] of each other.
  assert spread(np.asarray(grads['blocks']['mlp']['fc1']['kernel'][0])) > 4
  assert spread(fc1) < 2.0, spread(fc1)
  np.testing.assert_allclose(np.sqrt(np.mean(fc1 ** 2)), 0.2 * lr, rtol=0.3)
  # The others take (Nesterov) AdamW, whose first step is one size times -sign(g).
  embed = np.asarray(updates['patch_embed']['proj']['kernel'])
  size = np.abs(embed).max()
  assert lr <= size <= 2 * lr, size
  np.testing.assert_allclose(embed, -size * np.sign(grads['patch_embed']['proj']['kernel']),
                             rtol=1e-4)


def _stepper(config, conditioning=None):
  """(setup, fresh state, the jitted train step with label dropout 0.1, a batch of 4): for
  the tests below that recompute a step's loss by hand from `_step_draws`."""
  s = loop.build(config, None)
  state, _ = state_lib.create_state(s.init_fn, jax.random.key(0), s.mesh, s.rules)
  train_step = jax.jit(step_lib.make_train_step(
      s.model, s.diffusion, s.tx, s.schedule, num_classes=s.num_classes, label_dropout=0.1,
      ema=0.99, conditioning=conditioning))
  batch = jax.tree.map(jnp.asarray, next(pipeline.make_dataset(config.data, 4, seed=0)))
  return s, state, train_step, batch


def _step_draws(s, batch, step):
  """What `_stepper`'s train step draws at `step` when called with jax.random.key(0): the
  step's key (its conditions come from fold_in(key, 1)), the labels after dropout, and the
  loss's t and noise."""
  rng = jax.random.fold_in(jax.random.key(0), step)
  drop_rng, loss_rng = jax.random.split(rng)
  labels = step_lib.drop_labels(drop_rng, batch['label'], s.num_classes, 0.1)
  t, noise = s.diffusion.draw(loss_rng, batch['video'])
  return rng, labels, t, noise


def test_self_conditioned_step_trains_on_the_first_passs_estimate_on_its_coin():
  """model.self_condition: each step's loss is Diffusion.loss_at with the step's coin
  (the first pass's estimate, or zeros), recomputed here from the same draws; over 8
  steps the coin falls both ways."""
  config = small_config()
  config.model.self_condition = True
  config.model.loss_uncertainty = False  # the plain loss, recomputed below
  s, state, train_step, batch = _stepper(config)

  @jax.jit
  def loss_with(params, step, coin):
    _, labels, t, noise = _step_draws(s, batch, step)
    pred_fn = lambda z, tm, **kw: s.model.apply({'params': params}, z, tm, labels, **kw)
    return s.diffusion.loss_at(pred_fn, batch['video'], t, noise, self_condition=coin)

  coins, gaps = [], []
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    for i in range(8):
      rng = jax.random.fold_in(jax.random.key(0), i)
      coin = bool(jax.random.bernoulli(jax.random.fold_in(rng, 2), 0.5))
      expected, other = (float(loss_with(state.params, i, c)) for c in (coin, not coin))
      state, metrics = train_step(state, batch, jax.random.key(0))
      np.testing.assert_allclose(float(metrics['loss']), expected, rtol=1e-5)
      coins.append(coin)
      gaps.append(abs(expected - other))
  assert set(coins) == {True, False}, coins
  assert max(gaps[2:]) > 1e-4, gaps  # once the output layer has moved, the estimate counts


def test_uncertainty_step_weighs_each_clip_by_its_learnt_log_variance():
  """model.loss_uncertainty: the step's loss is mean_i(L_i / exp(u_i) + u_i), with L_i each
  clip's (velocity-weighted x0) error and u the model's sown head at the clip's t,
  recomputed here from the same draws; the head starts at zero (the plain loss) and is
  trained by the step."""
  config = small_config()
  config.model.loss_uncertainty = True
  s, state, train_step, batch = _stepper(config)
  assert not np.any(np.asarray(state.params['loss_logvar']['proj']['kernel']))

  @jax.jit
  def losses(params, step):
    _, labels, t, noise = _step_draws(s, batch, step)
    z = s.diffusion.corrupt(batch['video'], noise, t)
    pred, sown = s.model.apply({'params': params}, s.diffusion.model_input(z, t),
                               s.diffusion.model_t(t), labels, mutable=['intermediates'])
    target, weighted = s.diffusion.weigh(s.diffusion.output_target(batch['video'], noise, t),
                                         pred, t)
    per_clip = jnp.mean(jnp.square(target - weighted), axis=(1, 2, 3, 4))  # [B]
    u = sown['intermediates'][dit.LOSS_LOG_VARIANCE][0]  # [B]
    return jnp.mean(per_clip * jnp.exp(-u) + u), jnp.mean(per_clip), u

  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    for i in range(8):
      expected, plain, u = losses(state.params, i)
      if i == 0:
        np.testing.assert_array_equal(np.asarray(u), 0.0)
        np.testing.assert_allclose(float(expected), float(plain), rtol=1e-6)
      state, metrics = train_step(state, batch, jax.random.key(0))
      np.testing.assert_allclose(float(metrics['loss']), float(expected), rtol=1e-5)
  assert np.all(np.abs(np.asarray(u)) > 1e-3), u


def test_uncertainty_step_with_given_frames_weighs_each_clips_generated_frames():
  """model.loss_uncertainty with given frames (model.context_frames_max): the step's loss is
  mean_i(L_i / exp(u_i) + u_i) with L_i the mean error over clip i's generated frames only,
  recomputed here by hand from the same draws (the given frames imposed clean)."""
  config = small_config()
  config.model.loss_uncertainty = True
  config.model.context_frames_max = 2
  cond = conditional.conditioning(config)
  s, state, train_step, batch = _stepper(config, conditioning=cond)

  @jax.jit
  def expected(params, step):
    rng, labels, t, noise = _step_draws(s, batch, step)
    mask = cond.draw(jax.random.fold_in(rng, 1), batch)['frame_mask']  # [B, T]
    x0 = batch['video']
    z = s.diffusion.corrupt(x0, noise, t)
    given = mask[:, :, None, None, None]
    z = jnp.where(given, x0, z)  # the given frames enter clean
    pred, sown = s.model.apply({'params': params}, s.diffusion.model_input(z, t),
                               s.diffusion.model_t(t), labels, frame_mask=mask,
                               mutable=['intermediates'])
    target, weighted = s.diffusion.weigh(s.diffusion.output_target(x0, noise, t), pred, t)
    square = jnp.where(given, 0.0, jnp.square(target - weighted))
    per_clip = jnp.sum(square, axis=(1, 2, 3, 4)) / (
        jnp.sum(~mask, axis=1) * np.prod(x0.shape[2:]))  # [B]
    u = sown['intermediates'][dit.LOSS_LOG_VARIANCE][0]  # [B]
    return jnp.mean(per_clip * jnp.exp(-u) + u), mask

  masks = []
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    for i in range(4):
      want, mask = expected(state.params, i)
      state, metrics = train_step(state, batch, jax.random.key(0))
      # x0 output weighs clean-end errors by up to 400: sums in another order differ by ~1e-5.
      np.testing.assert_allclose(float(metrics['loss']), float(want), rtol=5e-5)
      masks.append(np.asarray(mask).sum(axis=1))
  assert np.concatenate(masks).min() < np.concatenate(masks).max(), masks  # frames differ


def test_wsd_schedule_warms_up_holds_the_peak_then_cools_down_as_one_minus_sqrt():
  train = small_config(num_steps=1000, warmup_steps=100, learning_rate=2e-3,
                       end_lr_fraction=0.1, lr_schedule='wsd', decay_fraction=0.2).train
  lr = state_lib.learning_rate_schedule(train)
  got = {s: float(lr(s)) for s in (0, 50, 100, 500, 800, 900, 1000, 1200)}
  expected = {0: 0.0, 50: 1e-3, 100: 2e-3, 500: 2e-3, 800: 2e-3,
              900: 2e-4 + 1.8e-3 * (1 - 0.5 ** 0.5), 1000: 2e-4, 1200: 2e-4}
  assert got == pytest.approx(expected, rel=1e-5)
  cosine = state_lib.learning_rate_schedule(
      small_config(num_steps=1000, warmup_steps=100, learning_rate=1e-3,
                   lr_schedule='cosine').train)
  assert float(cosine(550)) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5), rel=1e-5)


def test_unknown_optimizer_is_refused_before_anything_compiles():
  config = small_config(optimizer='sgd')
  with pytest.raises(ValueError, match=r"train.optimizer='sgd' must be 'adamw' or 'muon'"):
    loop.build(config, None)


def test_label_dropout_uses_null_label():
  labels = jnp.arange(1000, dtype=jnp.int32) % 12
  dropped = step_lib.drop_labels(jax.random.key(0), labels, 12, 0.25)
  frac = float(jnp.mean(dropped == 12))
  assert 0.2 < frac < 0.3
  kept = dropped != 12
  np.testing.assert_array_equal(np.asarray(dropped)[np.asarray(kept)],
                                np.asarray(labels)[np.asarray(kept)])
  np.testing.assert_array_equal(step_lib.drop_labels(jax.random.key(0), labels, 12, 0.0), labels)


def test_save_then_restore_gives_identical_state_and_iterator(tmp_path):
  config = small_config()
  s = loop.build(config, str(tmp_path))
  state, shardings = state_lib.create_state(s.init_fn, jax.random.key(3), s.mesh, s.rules)
  # Make params, opt state and EMA all differ from their init.
  state = state.replace(step=jnp.asarray(7, jnp.int32),
                        params=jax.tree.map(lambda x: x + 0.5, state.params),
                        ema_params=jax.tree.map(lambda x: x - 0.25, state.params))
  it = pipeline.make_dataset(config.data, 4, seed=0)
  for _ in range(3):
    next(it)
  s.checkpointer.save(7, state, it)
  s.checkpointer.wait()
  expected_next = next(it)

  fresh = loop.build(config, str(tmp_path))
  it2 = pipeline.make_dataset(config.data, 4, seed=0)
  restored = fresh.checkpointer.restore(
      7, state_lib.abstract_with_shardings(fresh.abstract_state, fresh.state_shardings), it2)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               state, restored)
  got_next = next(it2)
  np.testing.assert_array_equal(got_next['video'], expected_next['video'])
  np.testing.assert_array_equal(got_next['label'], expected_next['label'])
  with pytest.raises(FileNotFoundError, match='no complete checkpoint for step 9'):
    fresh.checkpointer.restore(9, fresh.abstract_state)


@pytest.mark.parametrize('optimizer', ['adamw', 'muon'])
def test_train_resume_continues_from_saved_step(tmp_path, optimizer):
  resumed_dir, straight_dir = str(tmp_path / 'resumed'), str(tmp_path / 'straight')
  # Muon's state holds empty (masked) nodes where the shardings have leaves.
  config = small_config(num_steps=6, optimizer=optimizer)
  # A run of 6 steps stopped after step 4 (as a preemption would)...
  first = loop.train_and_evaluate(config, resumed_dir, stop_at=4)
  assert int(first.step) == 4
  assert sorted(os.listdir(os.path.join(resumed_dir, 'checkpoints'))) == ['2', '4']
  # ...restarted with the same config: starts at step 4, not 0, and appends.
  second = loop.train_and_evaluate(config, resumed_dir)
  assert int(second.step) == 6
  records = metrics_lib.read_metrics(os.path.join(resumed_dir, 'metrics.jsonl'))
  assert [r['step'] for r in records] == [1, 2, 4, 6]
  assert all(np.isfinite(r['loss']) for r in records)
  # The resumed run is the run that would have happened: a straight 6-step
  # run reaches bit-identical parameters and the same logged losses.
  straight = loop.train_and_evaluate(config, straight_dir)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               straight.params, second.params)
  straight_records = metrics_lib.read_metrics(os.path.join(straight_dir, 'metrics.jsonl'))
  assert [r['loss'] for r in straight_records] == [r['loss'] for r in records]


def test_main_job_writes_checkpoints_metrics_and_video(tmp_path):
  config = small_config(num_steps=3)
  config.sample.formats = 'mp4,gif'
  config.sample.num_samples = 4
  workdir = str(tmp_path)
  loop.train_and_evaluate(config, workdir)
  assert os.path.exists(os.path.join(workdir, 'metrics.jsonl'))
  assert os.path.exists(os.path.join(workdir, 'config.json'))
  assert os.listdir(os.path.join(workdir, 'checkpoints'))
  for ext in ('mp4', 'gif'):
    path = os.path.join(workdir, 'samples', f'step_0000003.{ext}')
    frames = video_io.read_video(path)
    assert frames.shape[0] >= 2 and frames.shape[-1] == 3
  # Sample mode restores the newest checkpoint and writes another video.
  videos, paths = modes.sample(config, workdir)
  assert videos.shape == (4, 4, 16, 16, 3)
  assert np.isfinite(np.asarray(videos)).all()
  assert all(os.path.exists(p) for p in paths)


def test_sample_without_checkpoint_names_the_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match='no checkpoint in .*checkpoints: train first'):
    modes.sample(small_config(), str(tmp_path))
