"""The audio-video DiT (model/av_dit.py), its time positions, audio tokens, and the joint
objective and sampler (diffusion/av.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdit_jax.config import defaults
from vdit_jax.diffusion import av
from vdit_jax.diffusion import objectives
from vdit_jax.model import av_dit
from vdit_jax.model import dit
from vdit_jax.model import embeddings
from vdit_jax.model import patching
from vdit_jax.model import spec as spec_lib

NUM_CLASSES = 12


def _spec(design='cross', **model):
  c = defaults.base_config()
  c.model.variant = 'Mu/2x4x4'
  c.model.depth = 2
  c.model.pos_embed = 'rope'
  c.model.scan_layers = False
  c.model.class_tokens = 2
  c.model.mlp_conv = (3, 3, 3)
  for k, v in model.items():
    c.model[k] = v
  c.audio.enabled = True
  c.audio.design = design
  c.audio.mel_bins = 16
  return spec_lib.from_config(c.model, c.audio)


def _inputs(b=2, frames=4):
  rng = np.random.default_rng(0)
  video = jnp.asarray(rng.normal(size=(b, frames, 16, 16, 3)), jnp.float32)
  audio = jnp.asarray(rng.normal(size=(b, frames * 8, 16)), jnp.float32)  # 8 mel / frame
  t = jnp.asarray([100.0, 700.0][:b], jnp.float32)
  return video, audio, t, jnp.asarray([1, 5][:b], jnp.int32)


def _noised(params, scale=0.05, seed=0):
  """Every param moved off its init (zero-initialised gates and projections included),
  so that each path of the model carries a signal."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [l + scale * jax.random.normal(k, l.shape, l.dtype)
                                   for l, k in zip(leaves, keys)])


def _subset(tree, like):
  """The entries of `tree` at the paths of `like` (nested dicts)."""
  return {k: _subset(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in like.items()}


@pytest.fixture(scope='module', params=['cross', 'joint'])
def model_and_params(request):
  spec = _spec(request.param)
  model = av_dit.build_model(spec, 3, NUM_CLASSES)
  video, audio, t, y = _inputs()
  params = model.init(jax.random.key(0), video, t, y, audio=audio, t_audio=t)['params']
  return spec, model, _noised(params)


def test_shapes_and_audio_param_names(model_and_params):
  spec, model, params = model_and_params
  video, audio, t, y = _inputs()
  out_v, out_a = model.apply({'params': params}, video, t, y, audio=audio, t_audio=t[::-1])
  assert out_v.shape == video.shape and out_a.shape == audio.shape
  assert np.isfinite(np.asarray(out_v)).all() and np.isfinite(np.asarray(out_a)).all()
  names = set(params)
  assert {'audio_embed', 'audio_t_embed', 'audio_final'} <= names
  if spec.audio.design == 'cross':
    assert {'audio_blocks_0', 'av_cross_0', 'av_cross_1'} <= names
  else:
    assert {'audio_attn', 'audio_adaln', 'audio_mlp'} <= set(params['blocks_0'])


def test_audio_dropped_equals_the_video_model(model_and_params):
  """With no audio the model is VideoDiT (scan_layers=False) on its video params: the
  video path shares the video model's parameter names and function."""
  spec, model, params = model_and_params
  video, _, t, y = _inputs()
  video_model = dit.build_model(dataclasses.replace(spec, audio=None), 3, NUM_CLASSES)
  like = video_model.init(jax.random.key(1), video, t, y)['params']
  video_params = _subset(params, like)
  assert jax.tree.structure(video_params) == jax.tree.structure(like)
  want = video_model.apply({'params': video_params}, video, t, y)
  got = model.apply({'params': params}, video, t, y)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)


def test_audio_moves_the_video_and_couple_turns_it_off(model_and_params):
  """The streams meet: other audio changes the video prediction. couple=False (the
  modality guidance's uncoupled pass) removes that, and a per-clip couple takes each
  clip's row from the coupled or the uncoupled call."""
  _, model, params = model_and_params
  video, audio, t, y = _inputs()
  apply = lambda a, couple=None: model.apply({'params': params}, video, t, y, audio=a,
                                             t_audio=t, couple=couple)
  coupled, alone = apply(audio), apply(audio, False)
  other = apply(audio * 0.5 + 1.0)
  assert float(jnp.abs(coupled[0] - other[0]).max()) > 1e-3
  other_alone = apply(audio * 0.5 + 1.0, False)
  np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(other_alone[0]), atol=1e-6)
  mixed = apply(audio, jnp.asarray([1.0, 0.0]))
  for stream in (0, 1):
    np.testing.assert_allclose(np.asarray(mixed[stream][0]), np.asarray(coupled[stream][0]),
                               atol=2e-5)
    np.testing.assert_allclose(np.asarray(mixed[stream][1]), np.asarray(alone[stream][1]),
                               atol=2e-5)


def test_timestep_per_stream(model_and_params):
  _, model, params = model_and_params
  video, audio, t, y = _inputs()
  a = model.apply({'params': params}, video, t, y, audio=audio, t_audio=t)
  b = model.apply({'params': params}, video, t, y, audio=audio, t_audio=jnp.zeros_like(t))
  assert float(jnp.abs(a[1] - b[1]).max()) > 1e-3


def test_time_rope_of_audio_and_video_tokens_at_one_instant_agree():
  """pt = 1, r = 2 mel frames per video frame, audio patch 3: audio token j is centred on
  frame (3 j + 1) / 2, so audio token 1 sits on frame 2, video token 2's instant. Their
  time rotations are equal; the other audio tokens' lie between the video tokens'."""
  head_dim, grid = 24, (4, 2, 2)
  cos_v, sin_v = embeddings.rope_3d(grid, head_dim)
  positions = embeddings.audio_positions(3, grid, audio_patch=3, mel_frames_per_frame=2,
                                         video_patch_t=1)
  np.testing.assert_allclose(positions[:, 0], [0.5, 2.0, 3.5])
  cos_a, sin_a = embeddings.rope_at(positions, head_dim)
  time_dims = embeddings.split_three(head_dim)[0] // 2
  video_token = 2 * grid[1] * grid[2]  # (t=2, h=0, w=0) in (t, h, w) order
  np.testing.assert_array_equal(np.asarray(cos_a[1, :time_dims]),
                                np.asarray(cos_v[video_token, :time_dims]))
  np.testing.assert_array_equal(np.asarray(sin_a[1, :time_dims]),
                                np.asarray(sin_v[video_token, :time_dims]))
  assert not np.allclose(np.asarray(cos_a[0, :time_dims]), np.asarray(cos_v[0, :time_dims]))


@pytest.mark.parametrize('style', ['halves', 'wan'])
def test_rope_at_grid_points_is_rope_3d(style):
  grid = (3, 2, 4)
  want = embeddings.rope_3d(grid, 36, style=style)
  got = embeddings.rope_at(np.asarray(embeddings.grid_positions(grid)), 36, style=style)
  for w, g in zip(want, got):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6)


def test_audio_token_times_match_seconds():
  """A token's position times pt frames, plus the video token's centre offset, is its
  centre in frames: (pa j + (pa - 1) / 2) / r."""
  pa, r, pt = 4, 8, 2
  pos = embeddings.audio_token_times(5, pa, r, pt)
  centres = (pa * np.arange(5) + (pa - 1) / 2) / r
  np.testing.assert_allclose(pos * pt + (pt - 1) / 2, centres)


def test_audio_patchify_round_trip_is_the_identity():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 24, 5)), jnp.float32)
  tokens = patching.audio_patchify(x, 4)
  assert tokens.shape == (2, 6, 20)
  np.testing.assert_array_equal(np.asarray(patching.audio_unpatchify(tokens, 4, 5)),
                                np.asarray(x))
  np.testing.assert_array_equal(np.asarray(tokens[0, 1, :5]), np.asarray(x[0, 4]))
  with pytest.raises(ValueError, match='multiple of audio.patch=5'):
    patching.audio_patchify(x, 5)


def test_model_refuses_audio_of_the_wrong_length(model_and_params):
  _, model, params = model_and_params
  video, audio, t, y = _inputs()
  with pytest.raises(ValueError, match='mel frames'):
    model.apply({'params': params}, video, t, y, audio=audio[:, :-4], t_audio=t)


def test_spec_rules_name_the_field():
  with pytest.raises(ValueError, match="model.pos_embed='rope'"):
    spec_lib.check_spec(dataclasses.replace(_spec(), pos_embed='sincos'))
  with pytest.raises(ValueError, match='audio.design'):
    spec_lib.check_spec(dataclasses.replace(
        _spec(), audio=dataclasses.replace(_spec().audio, design='both')))


# ---------------------------------------------------------------------- objective, sampler


def _flow():
  return objectives.Diffusion.create('flow', prediction='x0', input_scale='signal')


def test_draw_tasks_and_clean_streams():
  diffusion = _flow()
  video, audio = jnp.zeros((4000, 1, 1, 1, 1)), jnp.zeros((4000, 1, 1))
  d = av.draw(diffusion, jax.random.key(0), video, audio, (0.5, 0.3, 0.1), 0.25)
  t, ta = np.asarray(d['t']), np.asarray(d['t_audio'])
  share = lambda m: float(np.mean(m))
  assert abs(share(t == 0) - 0.3) < 0.03          # video->audio: the video clean
  assert abs(share(ta == 0) - 0.1) < 0.02         # audio->video: the audio clean
  assert abs(share((t == ta) & (t > 0)) - 0.5) < 0.03  # joint: one t for both
  assert abs(share(np.asarray(d['couple']) == 0) - 0.25) < 0.03
  with pytest.raises(ValueError, match='task_probs'):
    av.draw(diffusion, jax.random.key(0), video, audio, (0.7, 0.3, 0.1), 0.0)


def test_loss_is_zero_for_a_perfect_model_and_skips_clean_streams():
  """An oracle model (it returns the clean streams: x0 prediction) has loss 0; a model
  wrong only on a clean stream also has loss 0 (a given stream is not learnt); wrong on
  a noisy stream, the loss is its error."""
  diffusion = _flow()
  rng = np.random.default_rng(0)
  video = jnp.asarray(rng.normal(size=(2, 2, 4, 4, 3)), jnp.float32)
  audio = jnp.asarray(rng.normal(size=(2, 8, 4)), jnp.float32)
  inputs = {'video': video, 'audio': audio, 't': jnp.asarray([0.0, 0.5]),
            't_audio': jnp.asarray([0.5, 0.0]), 'couple': jnp.ones((2,)),
            'noise': jnp.ones_like(video), 'noise_audio': jnp.ones_like(audio)}
  oracle = lambda zv, tv, za, ta, c: (video, audio)
  assert float(av.loss(diffusion, oracle, inputs, 1.0)[0]) == 0.0
  wrong_on_clean = lambda zv, tv, za, ta, c: (video.at[0].add(3.0), audio.at[1].add(3.0))
  assert float(av.loss(diffusion, wrong_on_clean, inputs, 1.0)[0]) == 0.0
  wrong_on_noisy = lambda zv, tv, za, ta, c: (video.at[1].add(0.1), audio)
  total, loss_v, loss_a = av.loss(diffusion, wrong_on_noisy, inputs, 1.0)
  # x0 prediction: the error divided by sigma = t = 0.5, squared: (0.1 / 0.5)^2
  np.testing.assert_allclose(float(loss_v), 0.04, rtol=1e-5)
  assert float(loss_a) == 0.0 and float(total) == pytest.approx(0.04, rel=1e-5)


def test_guide_is_the_modality_cfg_formula():
  cond, null, alone = jnp.asarray(1.0), jnp.asarray(0.5), jnp.asarray(0.25)
  assert float(av.guide(cond, null, alone, 1.0, 1.0)) == 1.0
  assert float(av.guide(cond, None, None, 1.0, 1.0)) == 1.0
  assert float(av.guide(cond, null, alone, 2.0, 3.0)) == pytest.approx(1.0 + 0.5 + 2 * 0.75)


def test_sampler_keeps_the_given_stream_and_calls_the_uncoupled_pass():
  calls = []

  def model_fn(zv, tv, za, ta, y, couple):
    calls.append((zv.shape[0], couple))
    return jnp.zeros_like(zv), jnp.zeros_like(za)  # x0 = 0

  diffusion = _flow()
  given = jnp.full((2, 2, 4, 4, 3), 0.5)
  video, audio = av.sample(diffusion, model_fn, jax.random.key(0), given.shape, (2, 8, 4),
                           jnp.asarray([0, 1]), num_steps=3, task='v2a', video=given,
                           cfg_video=2.0, cfg_audio=2.0, modality_audio=2.0, null_label=12)
  np.testing.assert_array_equal(np.asarray(video), np.asarray(given))
  np.testing.assert_allclose(np.asarray(audio), 0.0, atol=1e-6)  # x0 = 0 reached at t = 0
  assert (4, True) in calls and (2, False) in calls  # [cond; null] and the uncoupled pass
  with pytest.raises(ValueError, match="needs the clean video"):
    av.sample(diffusion, model_fn, jax.random.key(0), given.shape, (2, 8, 4),
              jnp.asarray([0, 1]), num_steps=2, task='v2a')
