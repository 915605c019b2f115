"""umT5 text encoder (model/umt5.py) and its converter (convert/umt5.py) against transformers
and diffusers on CPU torch, with a tiny random UMT5EncoderModel saved in shards and a tiny
Unigram tokenizer trained here (no download)."""

import json
import os
import shutil
import subprocess
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
tokenizers = pytest.importorskip('tokenizers')
pytest.importorskip('safetensors')

from vdit_jax.convert import umt5 as convert  # pylint: disable=g-import-not-at-top
from vdit_jax.model import umt5  # pylint: disable=g-import-not-at-top

# Small, with few buckets and a short max distance so that a 40-token sequence reaches the
# exact, the logarithmic and the clamped buckets in both directions.
SMALL = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
             relative_attention_num_buckets=16, relative_attention_max_distance=24)
CORPUS = [
    'a red square moving left across the frame',
    'a cat and a dog baking a cake together in a kitchen',
    'the kitchen is cozy, with sunlight streaming through the window',
    'bright tones, overexposed, static, blurred details, subtitles',
] * 3
PROMPTS = [
    'a red square moving left',
    'A cat and a dog baking a cake together in a kitchen, the kitchen is cozy with sunlight '
    'streaming through the window and a red square moving left across the frame',
    '',
    '  the  cat\tand\n\nthe dog  ',
    'bright tones & overexposed \u3000 details \u00e9\u00e8',
]
# Prompts whose cleaning matters: html entities (twice escaped), Unicode whitespace, and
# \x1c (whitespace to Python's re, not to the `regex` module diffusers uses).
DIRTY = [
    '  A cat &amp;amp; a dog &lt;baking&gt;\u3000a\u2003cake\xa0 together\n\tin a kitchen  ',
    'the\x1cwindow &#x3000; and\u2028the frame\x85 ',
    'a red square moving left',
]


def _perturb(model, seed=0):
  """Adds seeded noise to every constant tensor (the norm weights are all 1 at init, which
  would hide a converter that drops or swaps them)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      if bool((p == p.reshape(-1)[0]).all()):
        p.add_(0.3 * torch.randn(p.shape, generator=g))


def _hf_model(kind='umt5', seed=0):
  torch.manual_seed(seed)
  if kind == 'umt5':
    model = transformers.UMT5EncoderModel(transformers.UMT5Config(**SMALL))
  else:
    model = transformers.T5EncoderModel(transformers.T5Config(**SMALL,
                                                              feed_forward_proj='gated-gelu'))
  _perturb(model, seed)
  return model.eval()


def _train_tokenizer():
  """A T5-like Unigram tokenizer: <pad>=0, </s>=1, <unk>=2, '</s>' appended."""
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers
  tok = tokenizers.Tokenizer(models.Unigram())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.WhitespaceSplit(),
      pre_tokenizers.Metaspace(replacement='\u2581', prepend_scheme='always', split=True)])
  tok.decoder = decoders.Metaspace(replacement='\u2581', prepend_scheme='always', split=True)
  trainer = trainers.UnigramTrainer(vocab_size=150, special_tokens=['<pad>', '</s>', '<unk>'],
                                    unk_token='<unk>', show_progress=False)
  tok.train_from_iterator(CORPUS, trainer)
  tok.post_processor = processors.TemplateProcessing(
      single='$A </s>', pair='$A </s> $B </s>', special_tokens=[('</s>', 1)])
  assert [tok.token_to_id(t) for t in ('<pad>', '</s>', '<unk>')] == [0, 1, 2]
  return tok


@pytest.fixture(scope='module')
def wan(tmp_path_factory):
  """A Wan-pipeline-like folder: text_encoder/ (sharded safetensors) and tokenizer/."""
  root = tmp_path_factory.mktemp('wan')
  model = _hf_model('umt5')
  model.save_pretrained(root / 'text_encoder', max_shard_size='20KB')
  assert (root / 'text_encoder' / convert.INDEX).is_file()
  (root / 'tokenizer').mkdir()
  _train_tokenizer().save(str(root / 'tokenizer' / 'tokenizer.json'))
  return types.SimpleNamespace(root=root, model=model)


def _hf_tokenizers(root):
  path = str(root / 'tokenizer' / 'tokenizer.json')
  return [transformers.T5TokenizerFast(tokenizer_file=path, extra_ids=0),
          transformers.PreTrainedTokenizerFast(tokenizer_file=path, pad_token='<pad>',
                                               eos_token='</s>', unk_token='<unk>')]


def _hf_encode(model, ids, mask):
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(np.asarray(ids, np.int64)),
                attention_mask=torch.from_numpy(np.asarray(mask, np.int64)))
  return out.last_hidden_state.numpy()


@pytest.mark.parametrize('buckets,distance,length', [(32, 128, 600), (16, 24, 64), (8, 20, 50)])
def test_relative_buckets_match_transformers(buckets, distance, length):
  from transformers.models.umt5 import modeling_umt5
  config = transformers.UMT5Config(d_model=8, d_kv=2, num_heads=2,
                                   relative_attention_num_buckets=buckets,
                                   relative_attention_max_distance=distance)
  attention = modeling_umt5.UMT5Attention(config, has_relative_attention_bias=True)
  position = torch.arange(length)
  expected = attention._relative_position_bucket(position[None, :] - position[:, None])
  got = umt5.relative_position_buckets(length, length, buckets, distance)
  np.testing.assert_array_equal(got, expected.numpy())


@pytest.mark.parametrize('max_length', [4, 12, 40])
def test_tokenize_matches_transformers(wan, max_length):
  for folder in (wan.root, wan.root / 'tokenizer'):
    tokenizer = convert.load_tokenizer(folder)
    ids, mask = convert.tokenize(tokenizer, PROMPTS, max_length)
    assert ids.shape == mask.shape == (len(PROMPTS), max_length)
    assert ids.dtype == np.int32 and mask.dtype == bool
    for reference in _hf_tokenizers(wan.root):
      out = reference(PROMPTS, padding='max_length', max_length=max_length, truncation=True,
                      add_special_tokens=True, return_attention_mask=True, return_tensors='np')
      np.testing.assert_array_equal(ids, out['input_ids'])
      np.testing.assert_array_equal(mask, out['attention_mask'] > 0)
  assert (mask[:, 0]).all() and mask[1].all()  # every prompt has </s>; the long one is cut
  assert ids[1, -1] == 1 and (ids[2] == [1] + [0] * (max_length - 1)).all()
  # The call left no padding length or truncation behind.
  assert tokenizer.truncation is None and tokenizer.padding['length'] is None


@pytest.mark.parametrize('kind', ['umt5', 't5'])
def test_encoder_matches_transformers(wan, tmp_path, kind):
  model = wan.model if kind == 'umt5' else _hf_model('t5', seed=1)
  if kind == 't5':
    model.save_pretrained(tmp_path, max_shard_size='20KB')
  spec, params = convert.load_encoder(wan.root if kind == 'umt5' else tmp_path)
  assert spec.relative_bias_per_layer == (kind == 'umt5')
  ids, mask = convert.tokenize(convert.load_tokenizer(wan.root), PROMPTS, 40)
  rng = np.random.default_rng(0)
  # Besides the tokenizer's right padding: random ids with holes and left padding.
  ids = np.concatenate([ids, rng.integers(0, spec.vocab_size, (2, 40)).astype(np.int32)])
  holes = rng.random((2, 40)) > 0.4
  holes[0, :7] = False
  holes[:, -1] = True
  mask = np.concatenate([mask, holes])
  assert not mask.all(axis=1).all()
  got = np.asarray(jax.jit(umt5.UMT5Encoder(spec).apply)({'params': params}, ids, mask))
  expected = _hf_encode(model, ids, mask)
  assert got.shape == (len(ids), 40, spec.d_model) and got.dtype == np.float32
  print(f'{kind}: max |jax - torch| = {np.abs(got - expected).max():.2e}')
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_encode_prompts_matches_diffusers(wan):
  pipeline_wan = pytest.importorskip('diffusers.pipelines.wan.pipeline_wan')
  for text in DIRTY:
    assert convert.prompt_clean(text) == pipeline_wan.prompt_clean(text)
  pipe = types.SimpleNamespace(tokenizer=_hf_tokenizers(wan.root)[0], text_encoder=wan.model)
  tokenizer = convert.load_tokenizer(wan.root)
  spec, params = convert.load_encoder(wan.root)
  prompts = DIRTY + PROMPTS
  for max_length in (8, 32):
    with torch.no_grad():
      expected = pipeline_wan.WanPipeline._get_t5_prompt_embeds(
          pipe, prompt=prompts, max_sequence_length=max_length, device=torch.device('cpu'),
          dtype=torch.float32).numpy()
    got = convert.encode_prompts(tokenizer, spec, params, prompts, max_length=max_length)
    assert got.shape == (len(prompts), max_length, spec.d_model) and got.dtype == np.float32
    print(f'max_length={max_length}: max |jax - diffusers| = {np.abs(got - expected).max():.2e}')
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    _, mask = convert.tokenize(tokenizer, [convert.prompt_clean(p) for p in prompts], max_length)
    assert (got[~mask] == 0).all() and (np.abs(got[mask]).sum(-1) > 0).all()


def test_convert_twice_identical_and_matches_the_model(wan):
  spec, first = convert.load_encoder(wan.root)
  spec2, second = convert.load_encoder(wan.root / 'text_encoder')
  assert spec == spec2 == umt5.UMT5Spec(**SMALL)
  flat1 = jax.tree_util.tree_flatten_with_path(first)[0]
  flat2 = jax.tree_util.tree_flatten_with_path(second)[0]
  assert [p for p, _ in flat1] == [p for p, _ in flat2]
  for (_, a), (_, b) in zip(flat1, flat2):
    assert a.dtype == b.dtype == np.float32
    np.testing.assert_array_equal(a, b)
  # The tree is exactly the module's, leaf for leaf.
  abstract = nn.unbox(convert.abstract_params(spec))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == \
      jax.tree.map(lambda x: (x.shape, x.dtype), first)
  # 128*32 table + 2 layers * (4*32*32 attn + 16*4 bias + 3*32*64 mlp + 2*32 norms) + 32
  assert sum(x.size for x in jax.tree.leaves(first)) == 4096 + 2 * (4096 + 64 + 6144 + 64) + 32
  state = wan.model.state_dict()
  np.testing.assert_array_equal(first['token_embed'], state['shared.weight'].numpy())
  np.testing.assert_array_equal(
      first['layers_1']['attn']['o']['kernel'].reshape(32, 32).T,
      state['encoder.block.1.layer.0.SelfAttention.o.weight'].numpy())


def test_param_logical_axes():
  spec = umt5.UMT5Spec(**SMALL)
  specs = nn.get_partition_spec(convert.abstract_params(spec))
  P = jax.sharding.PartitionSpec
  assert specs['token_embed'] == P('classes', 'embed')
  layer = specs['layers_0']
  assert layer['attn']['q']['kernel'] == P('embed', 'heads', 'kv')
  assert layer['attn']['o']['kernel'] == P('heads', 'kv', 'embed')
  assert layer['attn']['rel_bias'] == P(None, 'heads')
  assert layer['mlp']['wi_0']['kernel'] == P('embed', 'mlp')
  assert layer['mlp']['wo']['kernel'] == P('mlp', 'embed')
  assert layer['attn_norm']['scale'] == specs['final_norm']['scale'] == P('embed')


def test_bfloat16_checkpoint(tmp_path):
  model = _hf_model('umt5', seed=2).to(torch.bfloat16)
  model.save_pretrained(tmp_path)  # one model.safetensors
  assert (tmp_path / convert.WEIGHTS).is_file()
  spec, params = convert.load_encoder(tmp_path)
  table = model.state_dict()['shared.weight'].float().numpy()
  np.testing.assert_array_equal(params['token_embed'], table)
  spec16, params16 = convert.load_encoder(tmp_path, dtype=jnp.bfloat16,
                                          param_dtype=jnp.bfloat16)
  assert params16['token_embed'].dtype == jnp.bfloat16
  ids = np.arange(24, dtype=np.int32).reshape(2, 12)
  out = umt5.UMT5Encoder(spec16).apply({'params': params16}, ids, ids > 3)
  assert out.shape == (2, 12, spec.d_model) and out.dtype == jnp.float32
  assert np.isfinite(np.asarray(out)).all()


def _copy(wan, tmp_path):
  folder = tmp_path / 'text_encoder'
  shutil.copytree(wan.root / 'text_encoder', folder)
  with open(folder / convert.INDEX) as f:
    weight_map = json.load(f)['weight_map']
  return folder, weight_map


def test_errors_name_file_and_tensor(wan, tmp_path):
  from safetensors import numpy as safetensors_numpy
  name = 'encoder.block.1.layer.1.DenseReluDense.wo.weight'

  folder, weight_map = _copy(wan, tmp_path / 'missing_shard')
  os.remove(folder / weight_map[name])
  with pytest.raises(ValueError, match=f'{weight_map[name]} does not exist'):
    convert.load_encoder(folder)

  folder, weight_map = _copy(wan, tmp_path / 'wrong_shape')
  shard = folder / weight_map[name]
  tensors = safetensors_numpy.load_file(str(shard))
  tensors[name] = tensors[name][:, :-1].copy()
  safetensors_numpy.save_file(tensors, str(shard), metadata={'format': 'pt'})
  with pytest.raises(ValueError, match=rf'{weight_map[name]}: tensor {name} has shape \[32, 63\]'):
    convert.load_encoder(folder)

  folder, weight_map = _copy(wan, tmp_path / 'missing_tensor')
  shard = folder / weight_map[name]
  tensors = safetensors_numpy.load_file(str(shard))
  del tensors[name]
  safetensors_numpy.save_file(tensors, str(shard), metadata={'format': 'pt'})
  with pytest.raises(ValueError, match=f'{weight_map[name]} has no tensor {name}'):
    convert.load_encoder(folder)
  index = json.loads((folder / convert.INDEX).read_text())
  del index['weight_map'][name]
  (folder / convert.INDEX).write_text(json.dumps(index))
  with pytest.raises(ValueError, match=f'{convert.INDEX} has no tensor {name}'):
    convert.load_encoder(folder)

  folder, _ = _copy(wan, tmp_path / 'other_model')
  config = json.loads((folder / 'config.json').read_text())
  (folder / 'config.json').write_text(json.dumps({**config, 'model_type': 'bert'}))
  with pytest.raises(ValueError, match=r"config\.json: model_type='bert'"):
    convert.load_encoder(folder)
  (folder / 'config.json').write_text(json.dumps({**config, 'feed_forward_proj': 'relu'}))
  with pytest.raises(ValueError, match=r"config\.json: feed_forward_proj='relu'"):
    convert.load_encoder(folder)
  # umT5 weights (a bias table in every layer) under a T5 config (one table).
  (folder / 'config.json').write_text(json.dumps({**config, 'model_type': 't5'}))
  with pytest.raises(ValueError, match='block.1.layer.0.SelfAttention.relative_attention_bias'):
    convert.load_encoder(folder)

  with pytest.raises(ValueError, match='tokenizer.json'):
    convert.load_tokenizer(tmp_path)
  with pytest.raises(ValueError, match='config.json'):
    convert.load_encoder(tmp_path)
  with pytest.raises(ValueError, match='max_length=0'):
    convert.tokenize(convert.load_tokenizer(wan.root), ['a cat'], 0)


_SHARDED = r'''
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
from vdit_jax.model import umt5
from vdit_jax.parallel import axes
spec = umt5.UMT5Spec(**SMALL)
model = umt5.UMT5Encoder(spec)
ids = jnp.asarray(np.random.default_rng(0).integers(0, spec.vocab_size, (4, 24)), jnp.int32)
mask = jnp.arange(24)[None, :] < jnp.asarray([[24], [9], [1], [17]])
init = lambda: model.init(jax.random.PRNGKey(0), ids, mask)
mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(1, 4, 2, 1), axes.MESH_AXES)
logical = nn.get_partition_spec(jax.eval_shape(init))
shardings = nn.logical_to_mesh_sharding(logical, mesh, axes.DEFAULT_RULES)
with mesh, nn.logical_axis_rules(axes.DEFAULT_RULES):
  variables = jax.jit(init, out_shardings=shardings)()
  sharded = jax.jit(model.apply)(variables, ids, mask)
kernel = variables['params']['layers_0']['mlp']['wi_0']['kernel'].value
assert kernel.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor'), kernel.sharding
assert kernel.addressable_shards[0].data.shape == (8, 32)
single = model.apply(jax.device_get(nn.unbox(variables)), ids, mask)
np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5, rtol=1e-5)
print('sharded max diff', float(np.abs(np.asarray(sharded) - np.asarray(single)).max()))
'''


def test_sharded_matches_single_device():
  """Params born sharded (fsdp 4 x tensor 2 on 8 fake CPU devices, the DiT's default rules)
  give the single-device output."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  script = f'SMALL = {SMALL!r}\n' + _SHARDED
  result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  print(result.stdout.strip())
