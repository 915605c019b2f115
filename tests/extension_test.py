"""Given frames: masks, re-imposition in the samplers, the masked loss, the extension loop,
the model's mask channel, --mode=extend inputs and config checks."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny_extend
from tests.conftest import shrink
from vdit_jax.config import defaults
from vdit_jax.config import validate
from vdit_jax.data import video_io
from vdit_jax.diffusion import conditioning as cond_lib
from vdit_jax.diffusion import objectives
from vdit_jax.model import spec as spec_lib
from vdit_jax.model import dit
from vdit_jax.generate import conditional

SHAPE = (2, 4, 8, 8, 3)  # [B, T, H, W, C]


def small_config(k_max=2):
  return shrink(tiny_extend.get_config(), small=('model',),
                model=dict(num_heads=4, context_frames_max=k_max),
                data=dict(num_frames=SHAPE[1], height=SHAPE[2], width=SHAPE[3]),
                sample=dict(num_steps=3, overlap=k_max, num_samples=2))


def random_params(model, *inputs, seed=1):
  """Random params of the model's shapes, non-zero everywhere (the output depends on z),
  drawn with numpy: no init program to compile."""
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *inputs))['params']
  rng = np.random.default_rng(seed)

  def draw(path, x):
    noise = 0.1 * rng.normal(size=x.shape).astype(np.float32)
    return jnp.asarray(noise + (1.0 if path[-1].key == 'scale' else 0.0))
  return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.lru_cache(maxsize=None)
def built(objective='v', input_scale='none'):
  """(config, model, random params, diffusion) of a small model with given frames."""
  config = small_config()
  config.diffusion.objective = objective
  config.diffusion.input_scale = input_scale
  config.sample.sampler = 'euler' if objective == 'flow' else 'ddim'
  model = dit.build_model(spec_lib.from_config(config.model), 3, num_classes=12)
  params = random_params(model, jnp.zeros(SHAPE), jnp.zeros(2))
  return config, model, params, objectives.Diffusion.from_config(config.diffusion)


def random_clip(shape=SHAPE, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, shape), jnp.float32)


def test_frame_mask_and_impose():
  mask = cond_lib.frame_mask(jnp.array([0, 1, 3]), 4)
  np.testing.assert_array_equal(mask, [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]])
  z, given = random_clip(seed=1), random_clip(seed=2)
  out = cond_lib.impose(z, given, cond_lib.frame_mask(jnp.array([1, 2]), 4))
  np.testing.assert_array_equal(out[0, :1], given[0, :1])
  np.testing.assert_array_equal(out[0, 1:], z[0, 1:])
  np.testing.assert_array_equal(out[1, :2], given[1, :2])
  with pytest.raises(ValueError, match=r'frame_mask \(2, 3\) must be \[B, T\]'):
    cond_lib.impose(z, given, jnp.zeros((2, 3), bool))


def test_number_of_given_frames_is_checked():
  assert cond_lib.check_num_given(3, 4) == 3
  with pytest.raises(ValueError, match=r'k=4 given frames leave nothing to generate in a clip '
                                       r'of 4 \(latent\) frames'):
    cond_lib.check_num_given(4, 4)
  with pytest.raises(ValueError, match='must be an integer >= 0'):
    cond_lib.check_num_given(-1, 4)
  with pytest.raises(ValueError, match='k=5 given frames'):
    cond_lib.given_condition(random_clip((1, 5, 8, 8, 3)), 4)


def test_draw_num_given_covers_the_range():
  k = np.asarray(cond_lib.draw_num_given(jax.random.key(0), 4000, 3, 0.25))
  assert k.min() == 0 and k.max() == 3
  assert abs((k == 0).mean() - 0.25) < 0.03
  for value in (1, 2, 3):
    assert abs((k == value).mean() - 0.25) < 0.03
  assert np.asarray(cond_lib.draw_num_given(jax.random.key(0), 100, 2, 0.0)).min() == 1


@pytest.mark.parametrize('objective,input_scale', [('v', 'none'), ('flow', 'none'),
                                                   ('v', 'signal')])
def test_sampler_returns_the_given_frames_exactly(objective, input_scale):
  config, model, params, diffusion = built(objective, input_scale)
  given = random_clip(seed=3)[:, :2]
  context, mask = cond_lib.given_condition(given, SHAPE[1])
  mask = mask.at[1, 1].set(False)  # 2 given frames in the first clip, 1 in the second
  cond = {'label': jnp.array([1, 5]), 'context': context, 'frame_mask': mask}
  sample_fn = jax.jit(conditional.make_sample_fn(model, diffusion, config, 12, SHAPE))
  out = np.asarray(sample_fn(params, jax.random.key(0), cond))
  np.testing.assert_array_equal(out[0, :2], np.asarray(given[0]))
  np.testing.assert_array_equal(out[1, :1], np.asarray(given[1, :1]))
  assert np.abs(out[1, 1] - np.asarray(given[1, 1])).max() > 1e-3  # not given: generated
  # The model sees the given frames: other given frames, other continuations.
  other = dict(cond, context=cond['context'] * -1.0)
  moved = np.asarray(sample_fn(params, jax.random.key(0), other))
  assert np.abs(moved[:, 2:] - out[:, 2:]).max() > 1e-4


def test_loss_ignores_the_given_frames():
  diffusion = objectives.Diffusion.create('v', schedule='cosine')
  x0, noise = random_clip(seed=4), random_clip(seed=5)
  inputs = {'video': x0, 'noise': noise, 't': jnp.array([100, 700]),
            'frame_mask': cond_lib.frame_mask(jnp.array([1, 3]), 4)}
  conditioning = cond_lib.Conditioning(context_frames_max=3)
  seen = {}

  def apply_fn(z, t, frame_mask=None, shift=0.0):
    seen['z'] = z
    pred = jnp.tanh(z) * 0.5
    return pred + shift * frame_mask[:, :, None, None, None]  # moves only the given frames

  base = conditioning.loss(diffusion, apply_fn, inputs)
  # The model input holds the given frames clean, the others noisy.
  np.testing.assert_array_equal(seen['z'][0, :1], x0[0, :1])
  np.testing.assert_array_equal(seen['z'][1, :3], x0[1, :3])
  assert np.abs(np.asarray(seen['z'][0, 1:] - x0[0, 1:])).max() > 0.1
  shifted = conditioning.loss(diffusion, functools.partial(apply_fn, shift=100.0), inputs)
  assert float(shifted) == float(base)
  # Changing the prediction on a generated frame does change it.
  moved = conditioning.loss(
      diffusion, lambda z, t, frame_mask=None: apply_fn(z, t, frame_mask).at[0, 2].add(1.0),
      inputs)
  assert float(moved) > float(base) + 1e-3
  # With no frame given it is the plain MSE.
  none = {**inputs, 'frame_mask': jnp.zeros((2, 4), bool)}
  target = diffusion.target(x0, noise, inputs['t'])
  pred = apply_fn(diffusion.corrupt(x0, noise, inputs['t']), None, none['frame_mask'])
  np.testing.assert_allclose(float(conditioning.loss(diffusion, apply_fn, none)),
                             float(objectives.mse(target, pred)), rtol=1e-6)


def test_given_frames_enter_clean_when_the_noisy_input_is_scaled():
  diffusion = objectives.Diffusion.create('v', schedule='cosine', input_scale='signal')
  x0, noise = random_clip(seed=4), random_clip(seed=5)
  t = jnp.array([100, 999])
  inputs = {'video': x0, 'noise': noise, 't': t,
            'frame_mask': cond_lib.frame_mask(jnp.array([1, 3]), 4)}
  seen = {}

  def apply_fn(z, t_model, frame_mask=None):
    seen['z'] = z
    return jnp.tanh(z)

  cond_lib.Conditioning(context_frames_max=3).loss(diffusion, apply_fn, inputs)
  np.testing.assert_array_equal(seen['z'][0, :1], x0[0, :1])  # given: clean, unscaled
  np.testing.assert_array_equal(seen['z'][1, :3], x0[1, :3])
  a = diffusion.sqrt_alphas_cumprod[t]  # [B]
  z = diffusion.corrupt(x0, noise, t)
  np.testing.assert_allclose(seen['z'][0, 1:], a[0] * z[0, 1:], rtol=1e-6)  # generated: a z
  np.testing.assert_allclose(seen['z'][1, 3:], a[1] * z[1, 3:], rtol=1e-6)
  assert np.abs(np.asarray(seen['z'][1, 3:])).max() < 0.01  # next to nothing at t = T - 1


def test_model_input_has_a_mask_channel_and_the_class_path_is_unchanged():
  config = small_config()
  with_frames = dit.build_model(spec_lib.from_config(config.model), 3, num_classes=12)
  config.model.context_frames_max = 0
  plain = dit.build_model(spec_lib.from_config(config.model), 3, num_classes=12)
  shapes = lambda m: jax.tree.map(lambda x: x.shape, nn.unbox(jax.eval_shape(
      m.init, jax.random.key(0), jnp.zeros(SHAPE), jnp.zeros(2), jnp.zeros(2, jnp.int32))))
  a, b = shapes(with_frames), shapes(plain)
  assert a['params']['patch_embed']['proj']['kernel'] == (16 * 4, 48)  # (C + 1) * 1*4*4
  assert b['params']['patch_embed']['proj']['kernel'] == (16 * 3, 48)
  a['params']['patch_embed']['proj']['kernel'] = b['params']['patch_embed']['proj']['kernel']
  assert a == b  # nothing else differs
  _, model, params, _ = built()
  z = random_clip(seed=6)
  out0 = model.apply({'params': params}, z, jnp.array([5.0, 5.0]), None)
  out1 = model.apply({'params': params}, z, jnp.array([5.0, 5.0]), None,
                     frame_mask=cond_lib.frame_mask(jnp.array([1, 1]), 4))
  assert out0.shape == SHAPE and np.abs(np.asarray(out1 - out0)).max() > 1e-5
  with pytest.raises(ValueError, match=r'frame_mask \(2, 3\) must be \[B, T\]'):
    model.apply({'params': params}, z, jnp.zeros(2), None, frame_mask=jnp.zeros((2, 3), bool))


def test_extension_loop_length_and_overlap():
  calls = []

  def window_fn(context, mask, index):  # keeps the given frames, fills the rest
    calls.append(int(mask[0].sum()))
    fill = jnp.full(context.shape, float(index + 1))
    return cond_lib.impose(fill, context, mask)

  frames = random_clip((2, 3, 8, 8, 3), seed=7)
  clip, windows = cond_lib.extend(window_fn, frames, 12, window=4, overlap=2)
  assert clip.shape == (2, 12, 8, 8, 3)
  np.testing.assert_array_equal(clip[:, :3], frames)
  assert calls == [2] * len(windows) and len(windows) == 5  # 3 + 2 * 5 >= 12
  for previous, window in zip(windows, windows[1:]):
    np.testing.assert_array_equal(window[:, :2], previous[:, -2:])
  # One given frame (image-to-video): the first window is given only it.
  calls.clear()
  clip, windows = cond_lib.extend(window_fn, frames[:, :1], 5, window=4, overlap=2)
  assert clip.shape[1] == 5 and calls == [1, 2]
  with pytest.raises(ValueError, match='total_frames=3 must exceed the 3 frames given'):
    cond_lib.extend(window_fn, frames, 3, window=4, overlap=2)
  with pytest.raises(ValueError, match='k=4 given frames leave nothing'):
    cond_lib.extend(window_fn, frames, 8, window=4, overlap=4)
  with pytest.raises(ValueError, match=r'must be \[B, F, H, W, C\]'):
    cond_lib.extend(window_fn, frames[0], 8, window=4, overlap=2)


def test_extend_clip_with_a_model_keeps_the_overlap():
  config, model, params, diffusion = built()
  frames = np.asarray(random_clip((2, 1, 8, 8, 3), seed=8))  # one frame: image-to-video
  clip, windows = conditional.extend_clip(model, diffusion, config, params, frames, 7,
                                       rng=jax.random.key(0), num_classes=12)
  assert clip.shape == (2, 7, 8, 8, 3) and len(windows) == 3  # 1 + 3 + 2 + 2 >= 7
  np.testing.assert_array_equal(clip[:, :1], frames)
  np.testing.assert_array_equal(windows[0][:, :1], frames)
  for previous, window in zip(windows, windows[1:]):
    np.testing.assert_array_equal(window[:, :2], previous[:, -2:])
  with pytest.raises(ValueError, match=r'must be \[B, F, 8, 8, 3\]'):
    conditional.extend_clip(model, diffusion, config, params, frames[:, :, :4], 7,
                         rng=jax.random.key(0))
  with pytest.raises(ValueError, match="needs model.conditioning='text'"):
    conditional.extend_clip(model, diffusion, config, params, frames, 7, rng=jax.random.key(0),
                         prompt='a red square')
  no_frames = small_config(k_max=0)
  with pytest.raises(ValueError, match=r'model.context_frames_max > 0'):
    conditional.extend_clip(model, diffusion, no_frames, params, frames, 7, rng=jax.random.key(0))


def test_read_input_images_and_videos(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rgb = np.random.default_rng(0).integers(0, 256, (3, 12, 16, 3), np.uint8)
  Image.fromarray(rgb[0]).save(tmp_path / 'frame.png')
  frames = conditional.read_input(str(tmp_path / 'frame.png'), 8, 8)
  assert frames.shape == (1, 8, 8, 3) and frames.dtype == np.float32
  assert -1.0 <= frames.min() and frames.max() <= 1.0
  video_io.write_video(str(tmp_path / 'clip.gif'), rgb)
  assert conditional.read_input(str(tmp_path / 'clip.gif'), 8, 8).shape == (3, 8, 8, 3)
  with pytest.raises(FileNotFoundError, match='no such file'):
    conditional.read_input(str(tmp_path / 'missing.mp4'), 8, 8)
  (tmp_path / 'notes.txt').write_text('hello')
  with pytest.raises(ValueError, match='the extension must be an image'):
    conditional.read_input(str(tmp_path / 'notes.txt'), 8, 8)


def test_config_errors_are_clear():
  validate.validate_config(tiny_extend.get_config(), 1)
  config = tiny_extend.get_config()
  config.model.context_frames_max = 8
  with pytest.raises(ValueError, match=r'context_frames_max=8 must be < data.num_frames=8'):
    validate.validate_config(config, 1)
  config = tiny_extend.get_config()
  config.sample.overlap = 5
  with pytest.raises(ValueError, match=r'sample.overlap=5 exceeds model.context_frames_max=4'):
    validate.validate_config(config, 1)
  config = tiny_extend.get_config()
  config.model.context_none_prob = 1.5
  with pytest.raises(ValueError, match=r'context_none_prob=1.5 must be in \[0, 1\]'):
    validate.validate_config(config, 1)
  config = defaults.base_config()
  config.model.context_frames_max = -1
  with pytest.raises(ValueError, match=r'context_frames_max=-1 must be an integer >= 0'):
    validate.validate_config(config, 1)
