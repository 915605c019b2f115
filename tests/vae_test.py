"""Video VAE: config rules, init, equivalence with diffusers' AutoencoderKLWan (converted
weights), chunked == whole-clip encoding/decoding, tiled == diffusers' tiled, checkpoints."""

import dataclasses
import functools
import json
import os

import jax
import numpy as np
import pytest

from vdit_jax.config import defaults
from vdit_jax.data import pipeline
from vdit_jax.data import shards
from vdit_jax.data import synthetic
from vdit_jax.convert import wan_vae
from vdit_jax.tools import encode_latents
from vdit_jax.vae import checkpoint
from vdit_jax.vae import chunked
from vdit_jax.vae.config import VAEConfig
from vdit_jax.vae.config import check_clip_shape
from vdit_jax.train import vae
from vdit_jax.vae.model import WanVAE

# Wan 2.1's layout (8x spatial, 4x temporal, first frame alone) at a tiny width. Every
# test uses this config and 9 frames of 16x8 (latents 3x2x1) where it can: XLA:CPU
# compiles each new (function, shape) for seconds, and the tests share the compiled
# functions (and the tiles below are 16x8 where they can).
SMALL = dict(base_dim=8, z_dim=4, dim_mult=(1, 2, 4, 4), num_res_blocks=1,
             temporal_downsample=(False, True, True))
ATOL = 1e-4


@functools.lru_cache(maxsize=None)
def _whole_fn(cfg, method):
  model = WanVAE(cfg)
  return jax.jit(lambda p, x: model.apply({'params': p}, x, method=getattr(WanVAE, method)))


def _whole(cfg, method):
  """jit of a whole-clip WanVAE method, one per architecture (latent statistics aside)."""
  return _whole_fn(dataclasses.replace(cfg, latents_mean=None, latents_std=None), method)


def _to_torch_layout(a):  # [B, T, H, W, C] -> [B, C, T, H, W]
  return np.asarray(a).transpose(0, 4, 1, 2, 3)


def _to_flax_layout(a):  # [B, C, T, H, W] -> [B, T, H, W, C]
  return np.asarray(a).transpose(0, 2, 3, 4, 1)


def test_config_rules():
  cfg = VAEConfig(**SMALL)
  assert (cfg.spatial_factor, cfg.temporal_factor) == (8, 4)
  assert cfg.latent_shape(17, 32, 64) == (5, 4, 8, 4)
  with pytest.raises(ValueError, match='num_frames=16 .* 1 \\+ 4 \\* k'):
    check_clip_shape(cfg, 16, 32, 32)
  with pytest.raises(ValueError, match='multiples of the VAE\'s spatial factor 8'):
    check_clip_shape(cfg, 17, 36, 32)
  with pytest.raises(ValueError, match='temporal_downsample=.*len\\(dim_mult\\) - 1 = 3'):
    VAEConfig(**{**SMALL, 'temporal_downsample': (True, True)})
  with pytest.raises(ValueError, match='latents_mean has 3 entries, z_dim=4'):
    VAEConfig(**SMALL, latents_mean=(0.0,) * 3, latents_std=(1.0,) * 3)
  with pytest.raises(ValueError, match='is_residual=True is not supported'):
    VAEConfig.from_diffusers({'is_residual': True, 'z_dim': 48})
  wan = VAEConfig.from_diffusers({'base_dim': 96, 'z_dim': 16, 'attn_scales': [],
                                  'temperal_downsample': [False, True, True]})
  assert wan == VAEConfig()
  assert VAEConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_init_params_distribution_and_count():
  cfg = VAEConfig(**SMALL)
  params = checkpoint.init_params(cfg, jax.random.PRNGKey(0))
  abstract = checkpoint.abstract_params(cfg)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(abstract)
  # Full Wan 2.1 layout at width 96: the published VAE's 126.9 M parameters.
  full = checkpoint.abstract_params(VAEConfig())
  assert sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(full)) == 126_892_531
  kernel = np.asarray(params['decoder']['up_blocks_3']['resnets_0']['conv1']['kernel'])
  assert kernel.shape == (3, 3, 3, 8, 8)  # fan_in 216, 1728 values
  np.testing.assert_allclose(kernel.std(), np.sqrt(1 / 216), rtol=0.1)
  assert np.all(np.abs(kernel) <= np.sqrt(3 / 216))
  assert np.all(np.asarray(params['encoder']['norm_out']['scale']) == 1)
  assert np.all(np.asarray(params['encoder']['conv_in']['bias']) == 0)


def test_chunked_equals_whole_clip():
  """Chunks through the frame caches == one call on the whole clip (fp32 rounding)."""
  cfg = VAEConfig(**SMALL)
  params = checkpoint.init_params(cfg, jax.random.PRNGKey(1))
  video = np.random.RandomState(0).uniform(-1, 1, (1, 9, 16, 8, 3)).astype(np.float32)
  mean, logvar = _whole(cfg, 'encode')(params, video)  # [1, 3, 2, 1, 4]
  assert mean.shape == (1, 3, 2, 1, 4)
  # The reference's cut: frame 0, then 4 frames at a time.
  chunk_mean, chunk_logvar = chunked.encode_video(cfg, params, video)
  np.testing.assert_allclose(chunk_mean, mean, atol=1e-5)
  np.testing.assert_allclose(chunk_logvar, logvar, atol=1e-5)
  decoded = _whole(cfg, 'decode')(params, mean)  # [1, 9, 16, 8, 3]
  assert decoded.shape == video.shape
  chunk_decoded = chunked.decode_latents(cfg, params, mean, latents_per_chunk=2)
  np.testing.assert_allclose(chunk_decoded, decoded, atol=1e-5)
  with pytest.raises(ValueError, match="first_chunk=False needs the cache"):
    WanVAE(cfg).apply({'params': params}, mean, first_chunk=False, method=WanVAE.decode)
  with pytest.raises(ValueError, match='frames_per_chunk=6 must be a multiple'):
    chunked.encode_video(cfg, params, video, frames_per_chunk=6)
  with pytest.raises(ValueError, match='num_frames=8'):
    chunked.encode_video(cfg, params, video[:, :8])


def test_encode_latents_writes_shards_the_data_pipeline_reads(tmp_path):
  cfg = VAEConfig(**SMALL, latents_mean=(0.5,) * 4, latents_std=(2.0,) * 4)
  params = checkpoint.init_params(cfg, jax.random.PRNGKey(3))
  vae_dir = checkpoint.save(tmp_path / 'vae', cfg, params)
  index = encode_latents.encode_latents(
      'synthetic', vae_dir, tmp_path / 'latents', num_shards=2, batch_size=1, num_frames=9,
      height=16, width=8, num_examples=3, progress=None)
  assert index['clip_shape'] == [3, 2, 1, 4] and index['dtype'] == 'float16'
  assert index['vae']['normalized'] and index['source_clip_shape'] == [9, 16, 8, 3]
  stored = shards.ShardSource(tmp_path / 'latents')
  clip = synthetic.SyntheticShapes(9, 16, 8, num_examples=3)[1]
  mean, _ = _whole(cfg, 'encode')(params, clip['video'][None] / np.float32(127.5) - 1)
  np.testing.assert_allclose(stored[1]['video'], (np.asarray(mean[0]) - 0.5) / 2.0,
                             rtol=2e-3, atol=2e-3)  # float16 storage
  assert stored[1]['label'] == clip['label']
  # The DiT's shard source reads them as they are: float latents reach the model unchanged.
  data = defaults.base_config().data
  data.update(source='shards', path=str(tmp_path / 'latents'), num_frames=3, height=2,
              width=1, channels=4)
  batch = next(pipeline.make_dataset(data, 2, seed=0, process_index=0, process_count=1))
  assert batch['video'].shape == (2, 3, 2, 1, 4) and batch['video'].dtype == np.float32
  with pytest.raises(ValueError, match='already holds shards'):
    encode_latents.encode_latents('synthetic', vae_dir, tmp_path / 'latents', num_frames=9,
                                  height=16, width=8, num_examples=3, progress=None)


def test_vae_train_config_is_checked():
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      'vae_tiny', os.path.join(os.path.dirname(__file__), '..', 'configs', 'vae_tiny.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  cfg = vae.check_config(config)
  assert cfg.latent_shape(config.data.num_frames, config.data.height, config.data.width) == (
      3, 4, 4, 16)
  config.data.num_frames = 16
  with pytest.raises(ValueError, match='num_frames=16 does not fit the VAE'):
    vae.check_config(config)
  config = module.get_config()
  config.train.kl_weight = -1.0
  with pytest.raises(ValueError, match='train.kl_weight must be a number >= 0'):
    vae.check_config(config)


def test_vae_trainer_splits_the_batch_over_the_devices_that_divide_it():
  devices = ['d0', 'd1', 'd2', 'd3', 'd4', 'd5', 'd6', 'd7']  # stand-ins: only counted
  assert vae.data_mesh(4, devices).devices.tolist() == devices[:4]
  assert vae.data_mesh(6, devices).devices.tolist() == devices[:6]
  assert vae.data_mesh(16, devices).devices.tolist() == devices
  assert vae.data_mesh(7, devices[:2]).devices.tolist() == devices[:1]


# ---- against the reference (torch + diffusers) ------------------------------------------


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """A small random diffusers AutoencoderKLWan, saved as safetensors + config.json and
  converted by the real tool into a VAE folder; returns (torch model, cfg, params)."""
  torch = pytest.importorskip(
      'torch', reason='torch + diffusers (the reference AutoencoderKLWan) are not installed: '
      "pip install -e '.[test]' installs them")
  diffusers = pytest.importorskip(
      'diffusers', reason='diffusers (the reference AutoencoderKLWan) is not installed: '
      "pip install -e '.[test]' installs it")
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  # One thread: the tiny reference runs thousands of small ops, which torch's thread pool
  # only slows down on a busy 2-core machine.
  torch.set_num_threads(1)
  torch.manual_seed(0)
  ref = diffusers.AutoencoderKLWan(
      base_dim=SMALL['base_dim'], z_dim=SMALL['z_dim'], dim_mult=list(SMALL['dim_mult']),
      num_res_blocks=SMALL['num_res_blocks'],
      temperal_downsample=list(SMALL['temporal_downsample']),
      latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 0.5, 1.0]).eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():  # norm scales 1 and biases 0 would hide mix-ups
      if name.endswith(('gamma', 'bias')):
        p.add_(0.2 * torch.randn_like(p))
    ref.decoder.conv_out.weight.mul_(0.2)  # outputs inside [-1, 1]: clipping hides nothing
  folder = tmp_path_factory.mktemp('wan_vae_reference')
  save_file({k: v.contiguous() for k, v in ref.state_dict().items()},
            str(folder / 'diffusion_pytorch_model.safetensors'))
  with open(folder / 'config.json', 'w') as f:
    json.dump(dict(ref.config), f)
  out = wan_vae.convert(str(folder / 'diffusion_pytorch_model.safetensors'),
                                str(folder / 'config.json'), str(folder / 'converted'))
  cfg, params = checkpoint.load(out)
  assert cfg == VAEConfig(**SMALL, latents_mean=(0.1, -0.2, 0.3, 0.0),
                          latents_std=(1.5, 2.0, 0.5, 1.0))
  return torch, ref, cfg, params


def test_converted_weights_match_diffusers(reference):
  torch, ref, cfg, params = reference
  video = np.random.RandomState(1).uniform(-1, 1, (1, 9, 16, 8, 3)).astype(np.float32)
  with torch.no_grad():
    posterior = ref.encode(torch.from_numpy(_to_torch_layout(video))).latent_dist
    want_decoded = ref.decode(posterior.mean).sample.numpy()
  mean, logvar = _whole(cfg, 'encode')(params, video)
  np.testing.assert_allclose(_to_torch_layout(mean), posterior.mean.numpy(), atol=ATOL)
  np.testing.assert_allclose(_to_torch_layout(logvar), posterior.logvar.numpy(), atol=ATOL)
  decoded = _whole(cfg, 'decode')(params, _to_flax_layout(posterior.mean.numpy()))
  assert np.mean(np.abs(want_decoded) >= 1) < 0.01  # the comparison is not of clipped values
  np.testing.assert_allclose(_to_torch_layout(decoded), want_decoded, atol=ATOL)


def test_tiled_matches_diffusers_tiled(reference):
  """Spatial tiles (+ temporal chunks) with blending == diffusers' tiled_encode/decode."""
  torch, ref, cfg, params = reference
  tiling = chunked.Tiling(min_height=16, min_width=16, stride_height=8, stride_width=8)
  ref.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16,
                    tile_sample_stride_height=8, tile_sample_stride_width=8)
  rng = np.random.RandomState(2)
  # Tiles of 16 pixels (2 latents) every 8 (1 latent), blended over 8 pixels (1 latent).
  video = rng.uniform(-1, 1, (1, 9, 24, 8, 3)).astype(np.float32)  # 3 tiles down
  z = rng.normal(size=(1, 3, 1, 3, 4)).astype(np.float32)  # 3 tiles across
  try:
    with torch.no_grad():
      posterior = ref.encode(torch.from_numpy(_to_torch_layout(video))).latent_dist
      want_decoded = ref.decode(torch.from_numpy(_to_torch_layout(z))).sample.numpy()
  finally:
    ref.disable_tiling()
  mean, logvar = chunked.encode_video(cfg, params, video, tiling=tiling)
  np.testing.assert_allclose(_to_torch_layout(mean), posterior.mean.numpy(), atol=ATOL)
  np.testing.assert_allclose(_to_torch_layout(logvar), posterior.logvar.numpy(), atol=ATOL)
  # Decoded in chunks of 2 latent frames where diffusers takes 1: the same result.
  decoded = chunked.decode_latents(cfg, params, z, latents_per_chunk=2, tiling=tiling)
  assert decoded.shape == (1, 9, 8, 24, 3)
  np.testing.assert_allclose(_to_torch_layout(decoded), want_decoded, atol=ATOL)


def test_convert_cli_rejects_mismatched_weights(tmp_path, reference):
  _, ref, _, _ = reference
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  state = {k: v.numpy() for k, v in ref.state_dict().items()}
  config = dict(ref.config)
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(config, f)
  del state['decoder.conv_out.bias']
  save_file(state, str(tmp_path / 'w.safetensors'))
  with pytest.raises(ValueError, match='lack 1 parameter.*decoder/conv_out/bias'):
    wan_vae.convert(str(tmp_path / 'w.safetensors'), str(tmp_path / 'config.json'),
                            str(tmp_path / 'out'))
  assert not os.path.exists(tmp_path / 'out' / checkpoint.INFO_NAME)


@pytest.mark.parametrize('damage', ['truncated', 'foreign'])
def test_convert_names_a_truncated_or_foreign_weights_file(tmp_path, damage):
  """Issue 27: safetensors' "incomplete metadata" / "header too large" named no file."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'diffusion_pytorch_model.safetensors'
  save_file({'encoder.conv_in.bias': np.zeros(96, np.float32)}, str(path))
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2] if damage == 'truncated' else b'<html>' * 40)
  (tmp_path / 'config.json').write_text('{}')
  with pytest.raises(ValueError, match=f'{path} is not a readable .safetensors file'):
    wan_vae.convert(str(path), str(tmp_path / 'config.json'), str(tmp_path / 'out'))
  (tmp_path / 'config.json').write_text('{"base_dim": 9')
  with pytest.raises(ValueError, match='config.json is not a JSON file'):
    wan_vae.convert(str(path), str(tmp_path / 'config.json'), str(tmp_path / 'out'))
