"""Wan 2.1 as a configuration of the DiT: diffusers' WanTransformer3DModel (T2V and I2V,
small, random weights with every constant tensor noised, saved in shards) converted by
model/wan.py and compared in fp32; errors for a wrong folder name the file and tensor."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdit_jax.config import defaults
from vdit_jax.config import resolve
from vdit_jax.model import dit
from vdit_jax.model import spec as spec_lib
from vdit_jax.model import wan

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

# Tiny Wan transformers in the real layout: head dim 12 (RoPE split 4 / 4 / 4).
T2V = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
           out_channels=4, text_dim=16, freq_dim=256, ffn_dim=40, num_layers=2,
           cross_attn_norm=True, qk_norm='rms_norm_across_heads', eps=1e-6,
           rope_max_seq_len=32)
I2V = dict(T2V, in_channels=9, image_dim=8, added_kv_proj_dim=24)
# fp32: max |ours - diffusers| / max |diffusers| (outputs ~3; measured 2-3e-6 relative).
RTOL_OF_MAX = 1e-5


def make_reference(folder, kwargs, seed=0):
  """A WanTransformer3DModel with random weights, every tensor noised (norm weights of 1
  and zero biases hide converter bugs), saved in several shards with an index."""
  torch.manual_seed(seed)
  model = diffusers.WanTransformer3DModel(**kwargs).eval()
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
  model.save_pretrained(os.path.join(folder, 'transformer'), max_shard_size='40KB')
  return model


def project_model(folder, scan_layers=True):
  hf = wan.read_config(folder)
  config = defaults.base_config()
  wan.apply_overrides(config.model, hf)
  config.model.scan_layers = scan_layers
  config.data.channels = hf['out_channels']
  config = resolve.complete(config)
  spec = spec_lib.from_config(config.model)
  return hf, spec, dit.build_model(spec, hf['out_channels'], num_classes=0)


def inputs(kwargs, batch=2, frames=3, size=8, text_len=7, image_len=5, seed=0):
  rng = np.random.default_rng(seed)
  c_out = kwargs['out_channels']
  video = rng.standard_normal((batch, frames, size, size, c_out)).astype(np.float32)
  embed = rng.standard_normal((batch, text_len, kwargs['text_dim'])).astype(np.float32)
  embed[0, text_len // 2:] = 0  # a shorter caption: its rows past the end are zeros
  out = dict(video=video, t=np.array([999, 417][:batch]), embed=embed)
  extra = kwargs['in_channels'] - c_out
  if extra:
    out['cond'] = rng.standard_normal((batch, frames, size, size, extra)).astype(np.float32)
  if kwargs.get('image_dim'):
    out['image'] = rng.standard_normal((batch, image_len, kwargs['image_dim'])).astype(np.float32)
  return out


def reference_forward(model, x):
  video = x['video']
  if 'cond' in x:
    video = np.concatenate([video, x['cond']], axis=-1)
  with torch.no_grad():
    out = model(hidden_states=torch.from_numpy(video.transpose(0, 4, 1, 2, 3).copy()),
                timestep=torch.from_numpy(x['t']).long(),
                encoder_hidden_states=torch.from_numpy(x['embed']),
                encoder_hidden_states_image=(torch.from_numpy(x['image'])
                                             if 'image' in x else None),
                return_dict=False)[0]
  return out.numpy().transpose(0, 2, 3, 4, 1)  # [B, T, H, W, C]


def project_forward(model, params, x):
  mask = np.ones(x['embed'].shape[:2], bool)
  return np.asarray(model.apply(
      {'params': params}, jnp.asarray(x['video']), jnp.asarray(x['t'], jnp.float32),
      text={'embed': jnp.asarray(x['embed']), 'mask': jnp.asarray(mask)},
      cond=None if 'cond' not in x else jnp.asarray(x['cond']),
      image=None if 'image' not in x else jnp.asarray(x['image'])))


def abstract_params(model, x):
  mask = np.ones(x['embed'].shape[:2], bool)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.asarray(x['video']),
                         jnp.asarray(x['t'], jnp.float32),
                         text={'embed': jnp.asarray(x['embed']), 'mask': jnp.asarray(mask)},
                         cond=None if 'cond' not in x else jnp.asarray(x['cond']),
                         image=None if 'image' not in x else jnp.asarray(x['image'])))
  return jax.tree.map(lambda b: b, __import__('flax').linen.meta.unbox(variables['params']))


@pytest.fixture(scope='module')
def t2v(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp('wan_t2v'))
  return folder, make_reference(folder, T2V)


@pytest.mark.parametrize('scan_layers', [True, False])
def test_t2v_forward_equals_diffusers(t2v, scan_layers):
  folder, reference = t2v
  assert os.path.exists(os.path.join(folder, 'transformer',
                                     'diffusion_pytorch_model.safetensors.index.json'))
  x = inputs(T2V)
  _, spec, model = project_model(folder, scan_layers)
  params = wan.load_params(folder, spec, abstract_params(model, x))
  want = reference_forward(reference, x)
  got = project_forward(model, params, x)
  assert got.shape == want.shape == x['video'].shape
  np.testing.assert_allclose(got, want, atol=RTOL_OF_MAX * np.abs(want).max(), rtol=0)
  assert np.abs(want).max() > 0.1  # a real output, not zeros on both sides


def test_i2v_forward_equals_diffusers(tmp_path):
  folder = str(tmp_path)
  reference = make_reference(folder, I2V, seed=3)
  # diffusers splits the context at 512 text rows (its umT5 length), the image tokens first.
  x = inputs(I2V, text_len=wan.TEXT_LENGTH, seed=1)
  _, spec, model = project_model(folder)
  assert (spec.image_embed_dim, spec.condition_channels) == (8, 5)
  params = wan.load_params(folder, spec, abstract_params(model, x))
  want = reference_forward(reference, dict(x, embed=x['embed'],
                                           image=x['image']))
  np.testing.assert_allclose(project_forward(model, params, x), want,
                             atol=RTOL_OF_MAX * np.abs(want).max(), rtol=0)


def test_converting_twice_gives_identical_params(t2v):
  folder, _ = t2v
  x = inputs(T2V)
  _, spec, model = project_model(folder)
  expected = abstract_params(model, x)
  first = wan.load_params(folder, spec, expected)
  second = wan.load_params(folder, spec, expected)
  jax.tree.map(np.testing.assert_array_equal, first, second)
  assert jax.tree.structure(first) == jax.tree.structure(expected)


def test_config_maps_onto_the_dit(t2v):
  folder, _ = t2v
  hf, spec, _ = project_model(folder)
  assert (spec.width, spec.depth, spec.num_heads, spec.mlp_dim) == (24, 2, 2, 40)
  assert (spec.rope_style, spec.modulation, spec.qk_norm_across_heads) == ('wan', 'shared', True)
  assert spec.text.projection == 'gelu_mlp' and spec.text.attend_padding
  assert hf['_class_name'] == wan.TRANSFORMER_CLASS


def _copy(folder, tmp_path):
  target = str(tmp_path / 'copy')
  shutil.copytree(folder, target)
  return target


def test_bad_folders_name_the_file_and_tensor(t2v, tmp_path):
  folder, _ = t2v
  x = inputs(T2V)
  _, spec, model = project_model(folder)
  expected = abstract_params(model, x)
  with pytest.raises(ValueError, match='no config.json'):
    wan.read_config(str(tmp_path))

  # A shard missing: named with a tensor it should hold.
  broken = _copy(folder, tmp_path / 'a')
  shards = sorted(f for f in os.listdir(os.path.join(broken, 'transformer'))
                  if f.endswith('.safetensors'))
  assert len(shards) > 2
  os.remove(os.path.join(broken, 'transformer', shards[1]))
  with pytest.raises(ValueError, match=shards[1]):
    wan.load_params(broken, spec, expected)

  # Another model's config: the class is named.
  other = _copy(folder, tmp_path / 'b')
  cfg_file = os.path.join(other, 'transformer', 'config.json')
  with open(cfg_file) as f:
    cfg = json.load(f)
  with open(cfg_file, 'w') as f:
    json.dump(dict(cfg, _class_name='CogVideoXTransformer3DModel'), f)
  with pytest.raises(ValueError, match='CogVideoXTransformer3DModel.*not a Wan'):
    wan.read_config(other)

  # A config that disagrees with the weights (one layer more): the missing tensor named.
  with open(cfg_file, 'w') as f:
    json.dump(dict(cfg, num_layers=3), f)
  with pytest.raises(ValueError, match="blocks.2"):
    wan.open_folder(other)

  # A model config that does not match the stored shapes: param, tensor and shapes named.
  with open(cfg_file, 'w') as f:
    json.dump(dict(cfg, ffn_dim=48), f)
  hf_wrong, spec_wrong, model_wrong = project_model(other)
  with pytest.raises(ValueError, match=r'mlp/fc1/kernel.*ffn.net.0.proj.weight.*'
                                       r'\(2, 24, 40\).*\(2, 24, 48\)'):
    wan.load_params(other, spec_wrong, abstract_params(model_wrong, x))
  del hf_wrong


def test_convert_tool_writes_an_export_equal_to_the_folder(t2v, tmp_path):
  from vdit_jax.generate import export as export_lib  # pylint: disable=g-import-not-at-top
  from vdit_jax.tools import convert_wan  # pylint: disable=g-import-not-at-top
  folder, _ = t2v
  out = convert_wan.convert(folder, str(tmp_path / 'export'))
  config = convert_wan.wan_config(folder)
  spec = spec_lib.from_config(config.model)
  _, ours, model = project_model(folder)
  assert spec == dataclasses.replace(ours, dtype='bfloat16')  # the DiT configured as Wan
  expected = abstract_params(model, inputs(T2V))
  params, info = export_lib.read(out, expected)
  assert info == {'step': 0, 'params': 'params'}
  jax.tree.map(np.testing.assert_array_equal, params, wan.load_params(folder, spec, expected))
  with pytest.raises(ValueError, match='already holds an export'):
    convert_wan.convert(folder, out)
  # The command line: a folder that is not Wan's exits 2 naming it.
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  p = subprocess.run([sys.executable, '-m', 'vdit_jax.tools.convert_wan', f'--input={tmp_path}',
                      f'--output={tmp_path / "x"}'], capture_output=True, text=True,
                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     check=False)
  assert p.returncode == 2 and 'no config.json found' in p.stderr.strip().splitlines()[-1]
