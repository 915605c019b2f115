"""Multi-stage generation: keyframe masks against a numpy reference, the interpolation loss
and sampler, the plan's frame counts and errors, the stitched pipeline, and the CLI end to
end on freshly initialised checkpoints."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny_interpolate
from configs import tiny_keyframes
from vdit_jax import modes
from vdit_jax.config import validate
from vdit_jax.data import synthetic
from vdit_jax.data import video_io
from vdit_jax.diffusion import conditioning as cond_lib
from vdit_jax.diffusion import objectives
from vdit_jax.model import spec as spec_lib
from vdit_jax.model import dit
from vdit_jax.generate import conditional
from vdit_jax.generate import multistage

H = W = 8
KEY_FRAMES = 6          # keyframe clip: 6 frames at 2 fps
WINDOW = 5              # interpolation window: keyframes at 0 and 4, 8 fps


def shrink(config, num_frames, patch):
  """A config's keys with a model and clips small enough to sample in a second."""
  config.model.update(dict(variant=None, width=48, depth=1, num_heads=4, mlp_dim=96,
                           patch_size=patch))
  config.model.text.update(dict(width=32, depth=1, num_heads=4))
  config.data.update(dict(num_frames=num_frames, height=H, width=W))
  config.sample.update(dict(num_steps=2, num_samples=2))
  config.checkpoint.async_save = False
  return config


def keyframe_config():
  return shrink(tiny_keyframes.get_config(), KEY_FRAMES, (2, 4, 4))


def interp_config():
  return shrink(tiny_interpolate.get_config(), WINDOW, (1, 4, 4))


def random_params(model, *inputs, seed=1):
  """Random params of the model's shapes, non-zero everywhere (the zero-initialised
  projections would hide the inputs), drawn with numpy: no init program to compile."""
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *inputs))['params']
  rng = np.random.default_rng(seed)

  def draw(path, x):
    noise = 0.1 * rng.normal(size=x.shape).astype(np.float32)
    return jnp.asarray(noise + (1.0 if path[-1].key == 'scale' else 0.0))
  return jax.tree_util.tree_map_with_path(draw, shapes)


def make_stage(config, seed):
  model = dit.build_model(spec_lib.from_config(config.model), 3, num_classes=12)
  shape = (1, config.data.num_frames, H, W, 3)
  params = random_params(model, jnp.zeros(shape), jnp.zeros(1), seed=seed)
  return multistage.Stage(config, model, objectives.Diffusion.from_config(config.diffusion),
                          params, num_classes=12)


@functools.lru_cache(maxsize=None)
def stages():
  return make_stage(keyframe_config(), 1), make_stage(interp_config(), 2)


def random_clip(shape, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def reference_positions(num_frames, stride):
  """Keyframe positions by hand: every s-th frame, s = stride or T - 1."""
  s = stride or num_frames - 1
  return [t for t in range(num_frames) if t % s == 0]


@pytest.mark.parametrize('num_frames,stride', [(5, 0), (9, 4), (9, 2), (16, 5), (3, 0)])
def test_keyframe_masks_match_a_numpy_reference(num_frames, stride):
  positions = cond_lib.keyframe_positions(num_frames, stride)
  assert list(positions) == reference_positions(num_frames, stride)
  assert positions[0] == 0 and positions[-1] == num_frames - 1
  expected = np.zeros(num_frames, bool)
  expected[reference_positions(num_frames, stride)] = True
  np.testing.assert_array_equal(cond_lib.positions_mask(positions, num_frames), expected)
  # The train step's draw: the same mask on every clip, whatever the rng.
  cond = cond_lib.Conditioning(context_frames_max=len(positions), given_frames='keyframes',
                               keyframe_stride=stride)
  video = jnp.zeros((3, num_frames, 4, 4, 3))
  mask = np.asarray(cond.draw(jax.random.key(7), {'video': video})['frame_mask'])
  np.testing.assert_array_equal(mask, np.broadcast_to(expected, (3, num_frames)))
  # given_at puts frame j of the given ones at positions[j], zeros elsewhere.
  frames = random_clip((3, len(positions), 4, 4, 3), seed=num_frames)
  context, mask = cond_lib.given_at(frames, positions, num_frames)
  reference = np.zeros((3, num_frames, 4, 4, 3), np.float32)
  for j, p in enumerate(positions):
    reference[:, p] = frames[:, j]
  np.testing.assert_array_equal(np.asarray(context), reference)
  np.testing.assert_array_equal(np.asarray(mask), np.broadcast_to(expected, (3, num_frames)))


def test_prefix_mode_is_unchanged_and_given_at_generalises_it():
  frames = random_clip((2, 3, 4, 4, 3), seed=1)
  a = cond_lib.given_condition(frames, 7)
  b = cond_lib.given_at(frames, range(3), 7)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  prefix = cond_lib.Conditioning(context_frames_max=3, context_none_prob=0.0)
  mask = np.asarray(prefix.draw(jax.random.key(0), {'video': jnp.zeros((64, 7, 4, 4, 3))})
                    ['frame_mask'])
  k = mask.sum(axis=1)
  assert k.min() == 1 and k.max() == 3  # first k frames, k in [1, 3]
  np.testing.assert_array_equal(mask, np.arange(7)[None] < k[:, None])
  assert cond_lib.Conditioning.from_config(tiny_interpolate.get_config()) == (
      cond_lib.Conditioning(text_encoder='builtin', caption_dropout=0.1, context_frames_max=2,
                            given_frames='keyframes', keyframe_stride=0))


def test_position_and_stride_errors_are_clear():
  with pytest.raises(ValueError, match=r'keyframe_stride=3 must be >= 2 and divide '
                                       r'num_frames - 1 = 7'):
    cond_lib.keyframe_positions(8, 3)
  with pytest.raises(ValueError, match=r'num_frames=2 must be an integer >= 3'):
    cond_lib.keyframe_positions(2, 0)
  with pytest.raises(ValueError, match=r'keyframe_stride=1 must be >= 2'):
    cond_lib.keyframe_positions(5, 1)
  with pytest.raises(ValueError, match=r'position 5 must be an integer in \[0, 5\)'):
    cond_lib.given_at(random_clip((1, 2, 4, 4, 3)), (0, 5), 5)
  with pytest.raises(ValueError, match=r'positions \(0, 0\) repeat a frame'):
    cond_lib.positions_mask((0, 0), 5)
  with pytest.raises(ValueError, match=r'K = 2 \(positions \(0, 4\)\), got shape'):
    cond_lib.given_at(random_clip((1, 3, 4, 4, 3)), (0, 4), 5)


def test_config_errors_are_clear():
  validate.validate_config(tiny_keyframes.get_config(), 1)
  validate.validate_config(tiny_interpolate.get_config(), 1)

  def check(match, **model):
    config = tiny_interpolate.get_config()
    config.model.update(model)
    with pytest.raises(ValueError, match=match):
      validate.validate_config(config, 1)

  check(r"model.given_frames='middle' is not one of \('prefix', 'keyframes'\)",
        given_frames='middle')
  check(r"gives 2 frames \(0, 4\) of data.num_frames=5; set model.context_frames_max=2 "
        r"\(it is 1", context_frames_max=1)
  check(r'data.num_frames=5, model.keyframe_stride=3: keyframe_stride=3 must be >= 2 and '
        r'divide num_frames - 1 = 4', keyframe_stride=3)
  check(r"keyframe_stride=2 is only read with model.given_frames='keyframes'",
        given_frames='prefix', keyframe_stride=2)
  config = tiny_interpolate.get_config()
  config.model.keyframe_stride = 2   # 0, 2, 4: three keyframes
  config.model.context_frames_max = 3
  validate.validate_config(config, 1)
  extend_cfg = interp_config()
  _, interp = stages()
  with pytest.raises(ValueError, match=r"model.given_frames='prefix'.*not 'keyframes'"):
    conditional.extend_clip(interp.model, interp.diffusion, extend_cfg, interp.params,
                         random_clip((1, 1, H, W, 3)), 7, rng=jax.random.key(0))


def test_loss_is_on_the_frames_between_the_keyframes_only():
  diffusion = objectives.Diffusion.create('v', schedule='cosine')
  x0, noise = jnp.asarray(random_clip((2, 5, 4, 4, 3), 3)), jnp.asarray(random_clip(
      (2, 5, 4, 4, 3), 4))
  cond = cond_lib.Conditioning(context_frames_max=2, given_frames='keyframes')
  inputs = {'video': x0, 'noise': noise, 't': jnp.array([300, 800]),
            **cond.draw(jax.random.key(0), {'video': x0})}
  seen = {}

  def apply_fn(z, t, frame_mask=None, shift=0.0, frame=None):
    seen['z'] = z
    pred = jnp.tanh(z) * 0.5 + shift * frame_mask[:, :, None, None, None]
    return pred if frame is None else pred.at[:, frame].add(1.0)

  base = cond.loss(diffusion, apply_fn, inputs)
  for t in (0, 4):  # keyframes enter clean
    np.testing.assert_array_equal(seen['z'][:, t], x0[:, t])
  assert np.abs(np.asarray(seen['z'][:, 2] - x0[:, 2])).max() > 0.1
  assert float(cond.loss(diffusion, functools.partial(apply_fn, shift=50.0), inputs)) == (
      float(base))
  assert float(cond.loss(diffusion, functools.partial(apply_fn, frame=0), inputs)) == (
      float(base))
  assert float(cond.loss(diffusion, functools.partial(apply_fn, frame=2), inputs)) > (
      float(base) + 1e-3)


def test_interpolation_sampler_returns_the_keyframes_unchanged():
  _, interp = stages()
  keys = random_clip((2, 2, H, W, 3), seed=5)
  context, mask = cond_lib.given_at(keys, (0, WINDOW - 1), WINDOW)
  cond = {**multistage.stage_condition(interp, 'a red square moving left', 2),
          'context': context, 'frame_mask': mask}
  shape = (2, WINDOW, H, W, 3)  # the pipeline's window batch: its compiled sampler
  out = np.asarray(multistage.sample_stage(interp, shape, cond, jax.random.key(0)))
  np.testing.assert_array_equal(out[:, 0], keys[:, 0])
  np.testing.assert_array_equal(out[:, -1], keys[:, 1])
  assert np.abs(out[:, 1:-1]).max() > 1e-3
  # The frames between depend on the keyframes.
  moved = np.asarray(multistage.sample_stage(interp, shape, {**cond, 'context': -context},
                                             jax.random.key(0)))
  assert np.abs(moved[:, 1:-1] - out[:, 1:-1]).max() > 1e-4


def test_plan_counts_and_errors():
  def plan(duration_s, fps, **kw):
    args = dict(keyframe_frames=16, keyframe_fps=2, window=5, positions=(0, 4), full_fps=8)
    args.update(kw)
    return multistage.make_plan(duration_s, fps, **args)

  p = plan(4, 8)
  assert (p.num_frames, p.subsample, p.ratio, p.num_windows, p.num_keyframes) == (
      32, 1, 4, 8, 9)
  assert p.full_frames == 33 and p.keyframe_indices() == tuple(range(0, 32, 4))
  p = plan(3, 4)  # every 2nd full-rate frame
  assert (p.num_frames, p.subsample, p.num_windows) == (12, 2, 6)
  assert p.keyframe_indices() == tuple(range(0, 12, 2))
  p = plan(7.6, 8)  # the longest: 61 frames from all 16 keyframes
  assert (p.num_frames, p.num_keyframes) == (61, 16)
  p = plan(2, 8, window=9, positions=(0, 4, 8))  # three keyframes a window
  assert (p.num_windows, p.num_keyframes, p.full_frames) == (2, 5, 17)
  with pytest.raises(ValueError, match=r'fps=24 is not reachable: the interpolation model '
                                       r'makes 8 fps from keyframes at 2 fps.*\[8.0, 4.0, 2.0\]'):
    plan(2, 24)
  with pytest.raises(ValueError, match=r'fps=3 is not reachable'):
    plan(2, 3)
  with pytest.raises(ValueError, match=r'duration_s=10 at fps=8 is 80 frames, which need 21 '
                                       r'keyframes .* makes 16 .* at most 61 frames at fps=8: '
                                       r'duration_s <= 7.625'):
    plan(10, 8)
  with pytest.raises(ValueError, match=r'duration_s=0.1 at fps=8 is round\(0.8\) = 1 frame'):
    plan(0.1, 8)
  with pytest.raises(ValueError, match=r'duration_s=-1 must be a finite number > 0'):
    plan(-1, 8)
  with pytest.raises(ValueError, match=r'sample.fps=8\) must be 4 x the keyframe '
                                       r"model's \(sample.fps=3\)"):
    plan(2, 8, keyframe_fps=3)
  config = keyframe_config()
  config.data.time_stride = 2.0
  with pytest.raises(ValueError, match=r'keyframe data.time_stride=2 must be 4 x the '
                                       r'interpolation data.time_stride=1'):
    multistage.plan_for(config, interp_config(), 2, 8)
  with pytest.raises(ValueError, match=r"interpolation stage needs .*given_frames='keyframes'"):
    multistage.plan_for(keyframe_config(), keyframe_config(), 2, 8)


def test_stitch_shares_the_keyframes_between_windows():
  keys = random_clip((2, 5, 4, 4, 3), seed=6)  # 5 keyframes, windows of 3 -> 2 windows
  seen = {}

  def window_fn(context, mask):
    seen['mask'] = np.asarray(mask)
    rows = np.arange(context.shape[0], dtype=np.float32)[:, None, None, None, None]
    return cond_lib.impose(jnp.broadcast_to(100.0 + rows, context.shape), context, mask)

  full, windows = multistage.stitch(keys, window_fn, (0, 2, 4), 5)
  assert full.shape == (2, 9, 4, 4, 3) and windows.shape == (2, 2, 5, 4, 4, 3)
  np.testing.assert_array_equal(full[:, ::2], keys)  # keyframe j at full-rate frame 2j
  np.testing.assert_array_equal(seen['mask'], np.tile([[1, 0, 1, 0, 1]], (4, 1)).astype(bool))
  # Window-major rows: window 1 of clip 0 is row 2.
  np.testing.assert_array_equal(full[0, 5], np.full((4, 4, 3), 102.0, np.float32))
  with pytest.raises(ValueError, match=r'M - 1 a multiple of 2'):
    multistage.stitch(keys[:, :4], window_fn, (0, 2, 4), 5)


@pytest.mark.parametrize('duration_s,fps,frames,step', [(2.0, 8, 16, 4), (2.5, 4, 10, 2)])
def test_pipeline_makes_the_full_frame_count_with_the_keyframes_in_place(
    duration_s, fps, frames, step):
  keyframe, interp = stages()
  result = multistage.generate('a red square moving left', duration_s, fps, keyframe, interp,
                               rng=jax.random.key(3), num_samples=2)
  assert result.video.shape == (2, frames, H, W, 3)
  assert result.plan.keyframe_indices() == tuple(range(0, frames, step))
  for j, index in enumerate(result.plan.keyframe_indices()):
    np.testing.assert_array_equal(result.video[:, index], result.keyframes[:, j])
  assert np.isfinite(result.video).all()
  # The keyframes are the keyframe stage's own sample (same rng: same clip).
  again = multistage.generate('a red square moving left', 1.0, 8, keyframe, interp,
                              rng=jax.random.key(3), num_samples=2)
  np.testing.assert_array_equal(again.keyframes, result.keyframes[:, :3])
  with pytest.raises(ValueError, match=r'duration_s=3 at fps=8 is 24 frames, which need 7 '
                                       r'keyframes .* at most 21 frames'):
    multistage.generate('a red square', 3.0, 8, keyframe, interp, rng=jax.random.key(0))
  with pytest.raises(ValueError, match=r"'squircle'"):
    multistage.generate('a red squircle', 1.0, 8, keyframe, interp, rng=jax.random.key(0))


def test_interpolate_pads_the_last_window_batch_and_takes_a_prompt_per_clip():
  _, interp = stages()
  keys = random_clip((1, 4, H, W, 3), seed=9)  # 3 windows, 2 per sampler call: one padded
  full, windows = multistage.interpolate(interp, keys, rng=jax.random.key(1),
                                         prompt=['a green triangle moving down'])
  assert full.shape == (1, 13, H, W, 3) and windows.shape == (3, 1, WINDOW, H, W, 3)
  np.testing.assert_array_equal(full[:, ::4], keys)
  with pytest.raises(ValueError, match=r'2 prompts for 1 clips of keyframes'):
    multistage.interpolate(interp, keys, rng=jax.random.key(1), prompt=['a red square'] * 2)


def test_sample_grid_of_an_interpolation_model_interpolates_synthetic_keyframes():
  config = interp_config()
  cond = conditional.sample_condition(config, 12, 3)
  clips, captions, _ = conditional.synthetic_clips(config, 3)
  np.testing.assert_array_equal(np.asarray(cond['frame_mask']),
                                np.tile([[1, 0, 0, 0, 1]], (3, 1)).astype(bool))
  np.testing.assert_array_equal(np.asarray(cond['context'][:, [0, 4]]), clips[:, [0, 4]])
  assert not np.asarray(cond['context'][:, 1:4]).any()
  ids, _ = conditional.text_lib.Tokenizer(config.model.text.max_length).encode_batch(captions)
  np.testing.assert_array_equal(np.asarray(cond['text']['tokens']), ids)


def test_synthetic_keyframe_clips_are_the_full_rate_motion_sampled_sparsely():
  full = synthetic.SyntheticShapes(13, 16, 16, num_examples=4, seed=3)
  sparse = synthetic.SyntheticShapes(4, 16, 16, num_examples=4, seed=3, time_stride=4.0)
  for i in range(4):
    np.testing.assert_array_equal(sparse[i]['video'], full[i]['video'][::4])


def test_cli_writes_the_clip_from_checkpoints(tmp_path):
  from vdit_jax.train import loop  # pylint: disable=g-import-not-at-top
  from vdit_jax.tools import generate_video  # pylint: disable=g-import-not-at-top
  workdirs = {}
  for stage in stages():
    name = 'interp' if conditional.is_keyframes(stage.config) else 'keyframe'
    workdirs[name] = str(tmp_path / name)
    s = loop.build(stage.config, workdirs[name])
    # A checkpoint whose params and EMA params (sampling reads one, as sample.use_ema says)
    # are the stage's random params; built from the abstract state, so no init program is
    # compiled.
    state = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), s.abstract_state)
    state = state.replace(params=stage.params, ema_params=stage.params)
    s.checkpointer.save(1, state)
    s.checkpointer.close()
    loaded = modes.load_stage(stage.config, workdirs[name])
    jax.tree.map(np.testing.assert_array_equal, loaded.params, stage.params)
  out = str(tmp_path / 'clip.mp4')
  summary = generate_video.run(
      keyframe_config(), interp_config(), keyframe_workdir=workdirs['keyframe'],
      interp_workdir=workdirs['interp'], prompt='a blue circle moving up', duration_s=1.5,
      fps=None, out=out)
  assert summary['frames'] == 12 and summary['fps'] == 8 and summary['path'] == out
  assert summary['keyframe_indices'] == [0, 4, 8]
  assert video_io.count_frames(out) == 12
  with pytest.raises(ValueError, match=r'fps=6 is not reachable'):
    generate_video.run(keyframe_config(), interp_config(), keyframe_workdir=workdirs['keyframe'],
                       interp_workdir=workdirs['interp'], prompt=None, duration_s=1.0, fps=6,
                       out=out)
