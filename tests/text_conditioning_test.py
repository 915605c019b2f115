"""Text conditioning: tokeniser, text encoder, cross-attention, null caption, CFG, captions
in the input pipeline, the train step and config checks."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import tiny_text
from vdit_jax.config import defaults
from vdit_jax.config import validate
from vdit_jax.data import captions
from vdit_jax.data import pipeline
from vdit_jax.data import synthetic
from vdit_jax.diffusion import conditioning as cond_lib
from vdit_jax.diffusion import objectives
from vdit_jax.diffusion import samplers
from vdit_jax.model import spec as spec_lib
from vdit_jax.model import blocks
from vdit_jax.model import dit
from vdit_jax.model import text as text_lib
from vdit_jax.generate import conditional
from vdit_jax.train import state as state_lib
from vdit_jax.train import step as step_lib

L = 8


def model_cfg(encoder='builtin', pooled=False, **overrides):
  cfg = defaults.base_config().model
  cfg.update(dict(variant=None, width=48, depth=1, num_heads=4, mlp_dim=96, patch_size=(2, 4, 4),
                  conditioning='text'))
  cfg.text.update(dict(encoder=encoder, max_length=L, width=32, depth=1, num_heads=4,
                       embed_dim=24, pooled=pooled))
  cfg.update(overrides)
  return cfg


def random_params(model, *inputs, seed=1):
  """Random params of the model's shapes, non-zero everywhere (the zero-initialised
  projections would hide the text), drawn with numpy: no init program to compile."""
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *inputs))['params']
  rng = np.random.default_rng(seed)

  def draw(path, x):
    noise = 0.1 * rng.normal(size=x.shape).astype(np.float32)
    return jnp.asarray(noise + (1.0 if path[-1].key == 'scale' else 0.0))
  return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.lru_cache(maxsize=None)
def built(encoder='builtin', pooled=False):
  """(model, random params, jitted apply) of a small text model."""
  model = dit.build_model(spec_lib.from_config(model_cfg(encoder, pooled)), 3, num_classes=12)
  params = random_params(model, jnp.zeros((2, 4, 8, 8, 3)), jnp.zeros(2))
  apply = jax.jit(lambda p, z, t, text: model.apply({'params': p}, z, t, None, text=text))
  return model, params, apply


def clip_inputs(seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(2, 4, 8, 8, 3)), jnp.float32),
          jnp.asarray([10.0, 600.0], jnp.float32))


def tokens(*prompts):
  ids, mask = text_lib.Tokenizer(L).encode_batch(prompts)
  return {'tokens': jnp.asarray(ids), 'mask': jnp.asarray(mask)}


# ---------------------------------------------------------------- tokeniser


def test_tokenizer_encodes_every_synthetic_caption_and_decodes_back():
  tok = text_lib.Tokenizer(L)
  for s in range(len(synthetic.SHAPES)):
    for c in range(len(synthetic.COLOURS)):
      for d in range(len(synthetic.DIRECTIONS)):
        text = synthetic.caption(s, c, d)
        ids, mask = tok.encode(text)
        assert ids.shape == mask.shape == (L,) and ids.dtype == np.int32
        assert mask.sum() == 5 and (ids[~mask] == 0).all() and (ids[mask] > 0).all()
        assert tok.decode(ids, mask) == text
  ids, _ = tok.encode('A Blue circle, moving UP!')  # case and punctuation are ignored
  np.testing.assert_array_equal(ids, tok.encode('a blue circle moving up')[0])


def test_tokenizer_errors_name_the_word_and_the_vocabulary():
  tok = text_lib.Tokenizer(L)
  with pytest.raises(ValueError, match=r"'purple'.*known words: a an the .* red green"):
    tok.encode('a purple circle moving up')
  with pytest.raises(ValueError, match='no words'):
    tok.encode('  ,. ')
  with pytest.raises(ValueError, match=r'9 words, more than model.text.max_length=8'):
    tok.encode('a red square and a blue circle moving up')
  with pytest.raises(ValueError, match='<pad>'):
    tok.encode('<pad>')
  ids, mask = tok.encode('', allow_empty=True)  # the null caption
  assert not mask.any() and not ids.any()


# ---------------------------------------------------------------- model


def test_text_changes_the_output():
  _, params, apply = built()
  z, t = clip_inputs()
  a = apply(params, z, t, tokens('a red square moving left', 'a red square moving left'))
  b = apply(params, z, t, tokens('a blue circle moving up', 'a red square moving left'))
  assert np.abs(np.asarray(a[0] - b[0])).max() > 1e-4
  np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))  # rows are independent


@pytest.mark.parametrize('pooled', [False, True])
def test_masked_padding_tokens_have_no_effect(pooled):
  _, params, apply = built(pooled=pooled)
  z, t = clip_inputs()
  text = tokens('a red square moving left', 'a blue circle')
  out = apply(params, z, t, text)
  garbage = jnp.where(text['mask'], text['tokens'], jnp.array([[5, 9, 1, 17, 3, 22, 11, 2]]))
  assert (garbage != text['tokens']).any()
  np.testing.assert_array_equal(np.asarray(apply(params, z, t, {**text, 'tokens': garbage})),
                                np.asarray(out))
  # Unmasking one of those tokens does change the output.
  unmasked = {'tokens': garbage, 'mask': text['mask'].at[1, 3].set(True)}
  assert np.abs(np.asarray(apply(params, z, t, unmasked) - out)).max() > 1e-5


def test_masked_precomputed_embedding_rows_have_no_effect():
  _, params, apply = built('precomputed')
  z, t = clip_inputs()
  rng = np.random.default_rng(3)
  embed = jnp.asarray(rng.normal(size=(2, L, 24)), jnp.float32)
  mask = jnp.arange(L)[None] < jnp.array([[6], [2]])
  out = apply(params, z, t, {'embed': embed, 'mask': mask})
  other = jnp.where(mask[..., None], embed, 100.0 * jnp.asarray(rng.normal(size=embed.shape)))
  np.testing.assert_array_equal(np.asarray(apply(params, z, t, {'embed': other, 'mask': mask})),
                                np.asarray(out))
  with pytest.raises(ValueError, match='embed_dim=24'):
    apply(params, z, t, {'embed': embed[..., :20], 'mask': mask})


def test_empty_caption_is_the_learned_null_caption():
  model, params, apply = built()
  z, t = clip_inputs()
  empty = {'tokens': jnp.ones((2, L), jnp.int32), 'mask': jnp.zeros((2, L), bool)}
  np.testing.assert_array_equal(np.asarray(apply(params, z, t, empty)),
                                np.asarray(apply(params, z, t, None)))
  # The null caption is a parameter: changing it changes the unconditional output.
  moved = jax.tree.map(lambda x: x, params)
  moved['text']['null'] = params['text']['null'] + 1.0
  assert np.abs(np.asarray(apply(moved, z, t, empty) - apply(params, z, t, empty))).max() > 1e-5
  assert params['text']['null'].shape == (1, 48)
  assert 'y_embed' not in params  # labels are not used by a text model


def test_pooled_caption_drives_adaln_and_starts_as_a_no_op():
  """model.text.pooled: the caption's masked mean, through an MLP, joins the timestep
  embedding. Its last layer starts at zero, so a model with it computes what the same
  weights without it compute; once trained it changes the output, and only through
  the unmasked tokens (test_masked_padding_tokens_have_no_effect[True])."""
  _, plain_params, plain = built()
  model, params, apply = built(pooled=True)
  assert set(params) - set(plain_params) == {'text_pool'}
  assert params['text_pool']['fc1']['kernel'].shape == (48, 48)
  z, t = clip_inputs()
  text = tokens('a red square moving left', 'a blue circle moving up')
  fresh = nn.unbox(model.init(jax.random.key(0), z, t, None, text=text))['params']['text_pool']
  assert not np.asarray(fresh['fc2']['kernel']).any() and not np.asarray(fresh['fc2']['bias']).any()
  zeroed = {**params, 'text_pool': fresh}
  shared = {k: v for k, v in zeroed.items() if k != 'text_pool'}
  np.testing.assert_allclose(np.asarray(apply(zeroed, z, t, text)),
                             np.asarray(plain(shared, z, t, text)), rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(apply(params, z, t, text) - apply(zeroed, z, t, text))).max() > 1e-4
  # The pooled vector is the mean over the unmasked rows: by hand, through the MLP.
  ctx = text_lib.TextConditioner(model.spec.text, 48).apply({'params': params['text']}, text, 2)
  pool = text_lib.PooledText(48)
  got = pool.apply({'params': params['text_pool']}, *ctx)
  context, mask = (np.asarray(a) for a in ctx)
  mean = np.stack([context[i][mask[i]].mean(axis=0) for i in range(2)])
  p = params['text_pool']
  h = np.asarray(jax.nn.silu(mean @ p['fc1']['kernel'] + p['fc1']['bias']))
  np.testing.assert_allclose(np.asarray(got), h @ p['fc2']['kernel'] + p['fc2']['bias'],
                             rtol=1e-5, atol=1e-6)


def test_fresh_block_with_cross_attention_is_the_identity():
  block = blocks.DiTBlock(num_heads=4, mlp_dim=64)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 10, 32)), jnp.float32)
  c = jnp.asarray(rng.normal(size=(2, 32)), jnp.float32)
  text = (jnp.asarray(rng.normal(size=(2, 5, 32)), jnp.float32), jnp.ones((2, 5), bool))
  variables = jax.jit(block.init)(jax.random.key(0), x, c, None, text)
  assert 'cross_attn' in variables['params']
  np.testing.assert_array_equal(np.asarray(jax.jit(block.apply)(variables, x, c, None, text)[0]),
                                np.asarray(x))
  # The class-conditioned block has the same params as before (no cross-attention).
  assert 'cross_attn' not in jax.eval_shape(block.init, jax.random.key(0), x, c)['params']


def test_cross_attention_is_qk_normalised():
  """Scaling the query and key projections does not change the cross-attention."""
  mod = text_lib.MaskedAttention(num_heads=2)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, 6, 16)), jnp.float32)
  ctx = jnp.asarray(rng.normal(size=(1, 4, 16)), jnp.float32)
  mask = jnp.array([[True, True, True, False]])
  params = nn.unbox(jax.jit(mod.init)(jax.random.key(0), x, ctx, mask)['params'])
  apply = jax.jit(lambda p: mod.apply({'params': p}, x, ctx, mask))
  out = apply(params)
  scaled = dict(params)
  for name in ('query_kernel', 'query_bias', 'key_kernel', 'key_bias'):
    scaled[name] = params[name] * 10.0
  np.testing.assert_allclose(apply(scaled), out, rtol=1e-4, atol=1e-5)


def test_every_text_param_has_logical_names():
  model = dit.build_model(spec_lib.from_config(model_cfg()), 3, num_classes=0)
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4, 8, 8, 3)),
                         jnp.zeros(1))['params']
  leaves = jax.tree.leaves(boxed['text'], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  assert len(jax.tree.leaves(boxed['text'])) == len(leaves)


# ---------------------------------------------------------------- guidance


def test_cfg_scale_one_is_the_conditional_prediction_and_guidance_uses_the_null():
  _, params, apply = built()
  z, t = clip_inputs()
  cond = {'text': tokens('a red square moving left', 'a blue circle moving up')}
  model_fn = cond_lib.model_fn_with_context(
      lambda z, t, text=None: apply(params, z, t, text))
  null = functools.partial(cond_lib.null_condition, null_label=None)
  conditional = model_fn(z, t, cond)
  np.testing.assert_array_equal(
      np.asarray(samplers.guided_prediction(model_fn, z, t, cond, 1.0, null)),
      np.asarray(conditional))
  unconditional = apply(params, z, t, None)
  guided = samplers.guided_prediction(model_fn, z, t, cond, 3.0, null)
  np.testing.assert_allclose(np.asarray(guided),
                             np.asarray(unconditional + 3.0 * (conditional - unconditional)),
                             rtol=1e-5, atol=1e-5)


def test_caption_dropout_clears_whole_captions():
  batch = {'video': jnp.zeros((64, 4, 8, 8, 3)), 'tokens': jnp.ones((64, L), jnp.int32),
           'text_mask': jnp.ones((64, L), bool)}
  drop = cond_lib.Conditioning(text_encoder='builtin', caption_dropout=0.5)
  mask = np.asarray(drop.draw(jax.random.key(0), batch)['text']['mask'])
  kept = mask.all(axis=1)
  assert (kept | ~mask.any(axis=1)).all()  # each caption kept whole or dropped whole
  assert 10 < kept.sum() < 54
  keep = cond_lib.Conditioning(text_encoder='builtin', caption_dropout=0.0)
  assert np.asarray(keep.draw(jax.random.key(0), batch)['text']['mask']).all()
  with pytest.raises(ValueError, match=r"needs batch keys \['tokens', 'text_mask'\]"):
    drop.draw(jax.random.key(0), {'video': batch['video']})


# ---------------------------------------------------------------- data, train step


def test_pipeline_delivers_the_tokens_of_each_clips_caption():
  data = defaults.base_config().data
  data.update(dict(num_frames=2, height=8, width=8, num_examples=16))
  transform = captions.CaptionInputs('builtin', L)
  batch = next(pipeline.make_dataset(data, 4, seed=0, captions=transform))
  assert batch['tokens'].shape == (4, L) and batch['tokens'].dtype == np.int32
  assert batch['text_mask'].shape == (4, L) and batch['text_mask'].dtype == bool
  source = synthetic.SyntheticShapes(2, 8, 8, num_examples=16, captions=True)
  by_label = {}
  for i in range(16):
    by_label.setdefault(source[i]['caption'], source[i]['label'])
    assert source[i]['caption'] == synthetic.caption(source[i]['shape'], source[i]['colour'],
                                                      source[i]['direction'])
  tok = transform.tokenizer
  for ids, mask, label in zip(batch['tokens'], batch['text_mask'], batch['label']):
    text = tok.decode(ids, mask)
    assert by_label[text] == label  # the caption names the clip's shape and direction
  assert 'caption' not in synthetic.SyntheticShapes(2, 8, 8, num_examples=4)[0]


def test_precomputed_embeddings_are_padded_and_checked():
  transform = captions.CaptionInputs('precomputed', 5, embed_dim=3)
  out = transform({'caption_embedding': np.ones((2, 3), np.float16)})
  assert out['text_embed'].shape == (5, 3) and out['text_embed'].dtype == np.float32
  np.testing.assert_array_equal(out['text_mask'], [True, True, False, False, False])
  assert not out['text_embed'][2:].any()
  with pytest.raises(ValueError, match='6 rows, more than model.text.max_length=5'):
    transform({'caption_embedding': np.ones((6, 3), np.float32)})
  with pytest.raises(ValueError, match=r'E = model.text.embed_dim = 3'):
    transform({'caption_embedding': np.ones((2, 4), np.float32)})
  with pytest.raises(ValueError, match="needs a 'caption_embedding'"):
    transform({'video': None})


def test_train_step_trains_the_text_encoder():
  config = model_cfg()
  model = dit.build_model(spec_lib.from_config(config), 3, num_classes=12)
  diffusion = objectives.Diffusion.create('v', schedule='cosine')
  train = defaults.base_config().train
  train.update(dict(learning_rate=1e-2, warmup_steps=0, num_steps=10, end_lr_fraction=1.0,
                    grad_clip=1.0, b1=0.9, b2=0.99, weight_decay=0.0))
  tx = state_lib.make_optimizer(train)
  params = random_params(model, jnp.zeros((4, 4, 8, 8, 3)), jnp.zeros(4))
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params), ema_params=params)
  cfg = defaults.base_config()
  cfg.model = config
  conditioning = conditional.conditioning(cfg)
  assert conditioning.caption_dropout == 0.1 and conditioning.text_encoder == 'builtin'
  step = jax.jit(step_lib.make_train_step(
      model, diffusion, tx, state_lib.learning_rate_schedule(train), num_classes=12,
      label_dropout=0.0, ema=0.9, conditioning=conditioning))
  text = tokens(*[synthetic.caption(i % 3, i, i % 4) for i in range(4)])
  batch = {'video': jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 4, 8, 8, 3)),
                                jnp.float32),
           'label': jnp.zeros(4, jnp.int32), 'tokens': text['tokens'],
           'text_mask': text['mask']}
  new = state
  for _ in range(2):  # the learning rate may start at 0
    new, metrics = step(new, batch, jax.random.key(1))
  assert np.isfinite(float(metrics['loss']))
  before = state.params['text']['encoder']['fc1_0']['kernel']
  after = new.params['text']['encoder']['fc1_0']['kernel']
  assert np.abs(np.asarray(after - before)).max() > 0  # gradients reach the text encoder


def test_image_to_video_with_a_prompt_keeps_the_frame_and_reads_the_words():
  """A text model trained with the first frame given (model.context_frames_max=1, as
  configs/tiny_text.py): the train step draws captions and given frames together, and
  sampling with a prompt and a first frame returns that frame exactly, guided by the
  caption (the null caption keeps the frame) and changed by the words."""
  config = defaults.base_config()
  config.model = model_cfg(context_frames_max=1, context_none_prob=0.25)
  config.data.update(dict(num_frames=4, height=8, width=8))
  config.sample.update(dict(num_steps=3, cfg_scale=3.0))
  conditioning = conditional.conditioning(config)
  batch = {'video': jnp.zeros((64, 4, 8, 8, 3)), 'tokens': jnp.ones((64, L), jnp.int32),
           'text_mask': jnp.ones((64, L), bool)}
  drawn = conditioning.draw(jax.random.key(0), batch)
  given = np.asarray(drawn['frame_mask']).sum(axis=1)  # k per clip: 0 or 1
  assert set(given.tolist()) == {0, 1} and 5 < (given == 0).sum() < 30
  assert drawn['text']['mask'].shape == (64, L)

  shape = (2, 4, 8, 8, 3)
  model = dit.build_model(spec_lib.from_config(config.model), 3, num_classes=12)
  params = random_params(model, jnp.zeros(shape), jnp.zeros(2))
  diffusion = objectives.Diffusion.create('v', schedule='cosine')
  sample_fn = jax.jit(conditional.make_sample_fn(model, diffusion, config, 12, shape))
  first = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (2, 1, 8, 8, 3)), jnp.float32)
  context, frame_mask = cond_lib.given_at(first, (0,), 4)
  cond = {'text': tokens('a red square moving left', 'a blue circle moving up'),
          'context': context, 'frame_mask': frame_mask}
  out = np.asarray(sample_fn(params, jax.random.key(0), cond))
  np.testing.assert_array_equal(out[:, :1], np.asarray(first))
  other = dict(cond, text=tokens('a red square moving right', 'a blue circle moving down'))
  moved = np.asarray(sample_fn(params, jax.random.key(0), other))
  np.testing.assert_array_equal(moved[:, :1], np.asarray(first))
  assert np.abs(moved[:, 1:] - out[:, 1:]).max() > 1e-4  # the direction word changes it


# ---------------------------------------------------------------- config checks


def test_config_errors_are_clear():
  def check(**changes):
    config = tiny_text.get_config()
    for path, value in changes.items():
      section, *rest = path.split('__')
      target = config[section]
      for part in rest[:-1]:
        target = target[part]
      target[rest[-1]] = value
    validate.validate_config(config, 1)

  check()  # the shipped config is valid
  with pytest.raises(ValueError, match=r"model.conditioning='words' is not one of"):
    check(model__conditioning='words')
  with pytest.raises(ValueError, match=r"model.text.encoder='t5' is not one of"):
    check(model__text__encoder='t5')
  with pytest.raises(ValueError, match=r"'files' has none"):
    check(data__source='files', data__path='/nowhere')
  with pytest.raises(ValueError, match=r"'synthetic' has none"):
    check(model__text__encoder='precomputed', model__text__embed_dim=16)
  with pytest.raises(ValueError, match=r"'purple'"):
    check(sample__prompts='a red square; a purple circle')
  with pytest.raises(ValueError, match=r'model.text.width=30 is not divisible by'):
    check(model__text__width=30)
  with pytest.raises(ValueError, match=r"model.text.pooled='yes' must be True or False"):
    # (a ConfigDict refuses a str in the bool field unless told to ignore types)
    text = defaults.base_config().model.text
    with text.ignore_type():
      text.pooled = 'yes'
    text_lib.check_spec(text_lib.spec_from_config(text))
  with pytest.raises(ValueError, match=r'caption_dropout=1.0 must be in \[0, 1\)'):
    check(model__caption_dropout=1.0)
  with pytest.raises(ValueError, match=r"--prompt='a red square' needs a text-conditioned"):
    conditional.check_prompt_flag(defaults.base_config(), 'a red square')
  with pytest.raises(ValueError, match=r"'sideways'"):
    conditional.check_prompt_flag(tiny_text.get_config(), 'a red square moving sideways')


def test_sample_condition_cycles_prompts_over_the_grid():
  config = tiny_text.get_config()
  cond = conditional.sample_condition(config, 12, 4, 'a red square moving left; a blue circle')
  tok = text_lib.Tokenizer(config.model.text.max_length)
  texts = [tok.decode(i, m) for i, m in zip(cond['text']['tokens'], cond['text']['mask'])]
  assert texts == ['a red square moving left', 'a blue circle'] * 2
  default = conditional.sample_condition(config, 12, 12)
  texts = {tok.decode(i, m) for i, m in zip(default['text']['tokens'], default['text']['mask'])}
  assert len(texts) == 12  # the default grid shows 12 different captions
