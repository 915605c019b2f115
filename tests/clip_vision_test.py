"""Wan 2.1 I2V's image encoder: transformers' CLIPVisionModel (tiny, random, every constant
tensor noised, saved in shards) ported by model/clip_vision.py and convert/clip_vision.py,
compared in fp32 on hidden_states[-2] (what WanImageToVideoPipeline.encode_image takes);
the preprocessing against CLIPImageProcessor; bad folders and inputs named."""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdit_jax.convert import clip_vision as convert
from vdit_jax.model import clip_vision
from vdit_jax.parallel import axes

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

# 3 layers, 4 heads of 8, 24 x 24 images in 8 x 8 patches: 10 tokens.
SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             image_size=24, patch_size=8, layer_norm_eps=1e-5)
ATOL = 1e-5


def _processor_class():
  """transformers 5 without torchvision: the PIL backend (what CLIPImageProcessor falls
  back to); transformers 4: CLIPImageProcessor itself (PIL)."""
  return getattr(transformers, 'CLIPImageProcessorPil', transformers.CLIPImageProcessor)


def make_reference(folder, hidden_act='gelu', seed=0, **overrides):
  """A CLIPVisionModel with every tensor noised, saved as image_encoder/ in shards, and a
  CLIPImageProcessor for its image size as image_processor/."""
  torch.manual_seed(seed)
  config = transformers.CLIPVisionConfig(**dict(SMALL, hidden_act=hidden_act, **overrides))
  model = transformers.CLIPVisionModel(config).eval()
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
  model.save_pretrained(os.path.join(folder, 'image_encoder'), max_shard_size='20KB')
  size = config.image_size
  processor = _processor_class()(size={'shortest_edge': size},
                                 crop_size={'height': size, 'width': size})
  processor.save_pretrained(os.path.join(folder, 'image_processor'))
  return model, processor


def reference_states(model, pixels):
  """transformers' hidden states (a tuple of [B, N, D]) of pixels [B, S, S, 3]."""
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()),
                output_hidden_states=True)
  return [h.numpy() for h in out.hidden_states]


def project_states(spec, params, pixels):
  return np.asarray(clip_vision.ClipVisionEncoder(spec).apply({'params': params},
                                                               jnp.asarray(pixels)))


def _pixels(batch=2, size=24, seed=0):
  return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


@pytest.fixture(scope='module')
def gelu(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp('clip_gelu'))
  model, processor = make_reference(folder, 'gelu')
  return folder, model, processor


@pytest.mark.parametrize('hidden_act', ['gelu', 'quick_gelu'])
def test_penultimate_hidden_state_equals_transformers(gelu, tmp_path, hidden_act):
  if hidden_act == 'gelu':
    folder, model, _ = gelu
  else:
    folder = str(tmp_path)
    model, _ = make_reference(folder, hidden_act, seed=4)
  index = os.path.join(folder, 'image_encoder', 'model.safetensors.index.json')
  assert os.path.exists(index)  # sharded, as real checkpoints are stored
  spec, params = convert.load_params(folder)
  assert (spec.output_layer, spec.hidden_act, spec.num_tokens) == (2, hidden_act, 10)
  pixels = _pixels()
  want = reference_states(model, pixels)[-2]
  got = project_states(spec, params, pixels)
  assert got.shape == want.shape == (2, 10, 32)
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
  assert np.abs(want).max() > 0.5  # a real output, not zeros on both sides


@pytest.mark.parametrize('hidden_state', [-1, 0, 1])
def test_any_hidden_state_equals_transformers(gelu, hidden_state):
  folder, model, _ = gelu
  spec, params = convert.load_params(folder, hidden_state=hidden_state)
  pixels = _pixels(batch=1, seed=1)
  want = reference_states(model, pixels)[hidden_state]
  np.testing.assert_allclose(project_states(spec, params, pixels), want, atol=ATOL, rtol=0)


def test_transformers4_names_load_the_same_params(gelu, tmp_path):
  """Wan's image_encoder was saved by transformers 4: every name under 'vision_model.'."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  folder, model, _ = gelu
  legacy = tmp_path / 'legacy'
  legacy.mkdir()
  shutil.copy(os.path.join(folder, 'image_encoder', 'config.json'), legacy)
  save_file({f'vision_model.{k}': v.numpy() for k, v in model.state_dict().items()},
            str(legacy / 'model.safetensors'))
  _, want = convert.load_params(folder)
  _, got = convert.load_params(str(legacy))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_params_tree_count_and_logical_axes(gelu):
  folder, model, _ = gelu
  spec, params = convert.load_params(folder)
  abstract = convert.abstract_params(spec)
  assert jax.tree.structure(nn.meta.unbox(abstract)) == jax.tree.structure(params)
  # Every stored tensor but the unused last layer and the pooled output's norm.
  unused = [v for k, v in model.state_dict().items()
            if k.startswith('encoder.layers.2.') or k.startswith('post_layernorm.')]
  count = sum(v.numel() for v in model.state_dict().values()) - sum(v.numel() for v in unused)
  assert sum(np.size(x) for x in jax.tree.leaves(params)) == count
  specs = nn.get_partition_spec(abstract)
  P = jax.sharding.PartitionSpec
  assert specs['patch_embed'] == P(axes.PATCH, axes.EMBED)
  assert specs['pos_embed'] == P(None, axes.EMBED)
  assert specs['layers_1']['attn']['query_kernel'] == P(axes.EMBED, axes.HEADS, axes.HEAD_DIM)
  assert specs['layers_1']['attn']['out_kernel'] == P(axes.HEADS, axes.HEAD_DIM, axes.EMBED)
  assert specs['layers_0']['mlp']['fc1']['kernel'] == P(axes.EMBED, axes.MLP)
  assert specs['layers_0']['mlp']['fc2']['bias'] == P(axes.EMBED)
  assert specs['pre_norm']['scale'] == P(axes.EMBED)


def _images(seed=0):
  """uint8 images: landscape, portrait, smaller than the crop (upsampled), square."""
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, shape, dtype=np.uint8)
          for shape in ((40, 57, 3), (61, 31, 3), (17, 20, 3), (24, 24, 3))]


@pytest.mark.parametrize('settings', ['tiny', 'wan'])
def test_preprocess_equals_clip_image_processor(gelu, tmp_path, settings):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  folder, _, processor = gelu
  if settings == 'wan':  # Wan 2.1 I2V's image_processor/: 224, bicubic, OpenAI mean / std
    folder = str(tmp_path)
    processor = _processor_class()(size={'shortest_edge': 224},
                                   crop_size={'height': 224, 'width': 224}, resample=3)
    processor.save_pretrained(os.path.join(folder, 'image_processor'))
  processing = convert.read_processor(folder)
  images = _images()
  for image in images:
    want = processor(images=Image.fromarray(image), return_tensors='np')['pixel_values']
    got = convert.preprocess(Image.fromarray(image), processing)
    assert got.dtype == np.float32 and got.shape == want.transpose(0, 2, 3, 1).shape
    np.testing.assert_array_equal(got, want.transpose(0, 2, 3, 1))  # bit-identical
  # A batch of arrays (same sizes) in one call.
  batch = np.stack([images[0], images[0][::-1]])
  want = processor(images=list(batch), return_tensors='np')['pixel_values']
  np.testing.assert_array_equal(convert.preprocess(batch, processing),
                                want.transpose(0, 2, 3, 1))


def test_legacy_integer_sizes_are_read(tmp_path):
  config = {'image_processor_type': 'CLIPImageProcessor', 'size': 30, 'crop_size': 28,
            'resample': 3, 'do_rescale': True, 'rescale_factor': 1 / 255}
  (tmp_path / 'preprocessor_config.json').write_text(json.dumps(config))
  processing = convert.read_processor(str(tmp_path))
  assert (processing.shortest_edge, processing.resize_to, processing.crop) == (30, None, (28, 28))
  out = convert.preprocess(_images()[0], processing)
  assert out.shape == (1, 28, 28, 3)


def test_encode_images_equals_the_pipeline_encode_image(gelu):
  """WanImageToVideoPipeline.encode_image: processor(images) -> hidden_states[-2]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  folder, model, processor = gelu
  spec, params = convert.load_params(folder)
  images = [Image.fromarray(a) for a in _images(seed=3)]
  pixels = processor(images=images, return_tensors='np')['pixel_values']
  want = reference_states(model, pixels.transpose(0, 2, 3, 1))[-2]
  got = np.asarray(convert.encode_images(spec, params, convert.read_processor(folder), images))
  assert got.shape == (4, spec.num_tokens, spec.hidden_size)
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_sharded_load_gives_the_host_params(gelu):
  folder, _, _ = gelu
  spec, host = convert.load_params(folder)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  _, placed = convert.load_params(folder, shardings=sharding)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), placed, host)
  del spec


def _copy_encoder(folder, target):
  shutil.copytree(os.path.join(folder, 'image_encoder'), target)
  return str(target)


def _edit_config(folder, **changes):
  path = os.path.join(folder, 'config.json')
  with open(path) as f:
    config = json.load(f)
  with open(path, 'w') as f:
    json.dump(dict(config, **changes), f)


def test_bad_folders_name_the_file_and_tensor(gelu, tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  folder, model, _ = gelu
  with pytest.raises(ValueError, match='neither .*config.json'):
    convert.load_params(str(tmp_path))

  # Another model's config: the model_type named.
  other = _copy_encoder(folder, tmp_path / 'other')
  _edit_config(other, model_type='clip_text_model')
  with pytest.raises(ValueError, match=r"config.json: model_type='clip_text_model' is not"):
    convert.load_params(other)

  # A shard missing: the file named with a tensor it should hold.
  broken = _copy_encoder(folder, tmp_path / 'broken')
  shards = sorted(f for f in os.listdir(broken) if f.endswith('.safetensors'))
  assert len(shards) > 2
  os.remove(os.path.join(broken, shards[1]))
  with pytest.raises(ValueError, match=shards[1]):
    convert.load_params(broken)

  # A config with one layer more than stored: the missing tensor named.
  deeper = _copy_encoder(folder, tmp_path / 'deeper')
  _edit_config(deeper, num_hidden_layers=4)
  with pytest.raises(ValueError, match=r"no tensor 'encoder\.layers\.3\."):
    convert.load_params(deeper)

  # A config whose sizes do not match the stored shapes: param, tensor and shapes named.
  wider = _copy_encoder(folder, tmp_path / 'wider')
  _edit_config(wider, intermediate_size=40)
  with pytest.raises(ValueError, match=r'layers_0/mlp/fc1/kernel.*encoder\.layers\.0\.mlp\.fc1'
                                       r'\.weight.*\(32, 48\).*\(32, 40\)'):
    convert.load_params(wider)

  # A tensor no CLIPVisionModel stores (a whole CLIPModel's text tower): named.
  mixed = tmp_path / 'mixed'
  mixed.mkdir()
  shutil.copy(os.path.join(folder, 'image_encoder', 'config.json'), mixed)
  tensors = {k: v.numpy() for k, v in model.state_dict().items()}
  tensors['text_model.embeddings.token_embedding.weight'] = np.zeros((5, 32), np.float32)
  save_file(tensors, str(mixed / 'model.safetensors'))
  with pytest.raises(ValueError, match='text_model.embeddings.token_embedding.weight'):
    convert.load_params(str(mixed))


def test_bad_specs_and_inputs_are_named(gelu, tmp_path):
  folder, _, _ = gelu
  with pytest.raises(ValueError, match=r'hidden_state=4 must index the 4 hidden states'):
    convert.load_params(folder, hidden_state=4)
  relu = _copy_encoder(folder, tmp_path / 'relu')
  _edit_config(relu, hidden_act='relu')
  with pytest.raises(ValueError, match=r"hidden_act='relu' is not one of"):
    convert.load_params(relu)
  with pytest.raises(ValueError, match='hidden_size=30 must be a multiple of num_attention'):
    clip_vision.ClipVisionSpec(**dict(SMALL, hidden_size=30), output_layer=1)

  spec, params = convert.load_params(folder)
  with pytest.raises(ValueError, match=r'must be \[B, 24, 24, 3\]'):
    project_states(spec, params, _pixels(size=32))
  processing = convert.read_processor(folder)
  with pytest.raises(ValueError, match='image 0: float32 .* must be uint8'):
    convert.preprocess(np.zeros((30, 30, 3), np.float32), processing)

  (tmp_path / 'siglip').mkdir()
  (tmp_path / 'siglip' / 'preprocessor_config.json').write_text(
      json.dumps({'image_processor_type': 'SiglipImageProcessor'}))
  with pytest.raises(ValueError, match="image_processor_type='SiglipImageProcessor'"):
    convert.read_processor(str(tmp_path / 'siglip'))
  (tmp_path / 'odd').mkdir()
  (tmp_path / 'odd' / 'preprocessor_config.json').write_text(
      json.dumps({'image_processor_type': 'CLIPImageProcessor', 'size': {'longest_edge': 9}}))
  with pytest.raises(ValueError, match=r"size=\{'longest_edge': 9\} must be"):
    convert.read_processor(str(tmp_path / 'odd'))
