"""Latent diffusion end to end on CPU: a small VAE (random weights) encodes synthetic clips
into shards, the DiT trains on them through the trainer, and --mode=sample decodes its
latents through the VAE to an mp4 of frames; bad latent configs fail before compiling."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from configs import tiny_latent
from tests.conftest import shrink
from vdit_jax import modes
from vdit_jax.data import video_io
from vdit_jax.tools import encode_latents
from vdit_jax.train import loop
from vdit_jax.vae import checkpoint
from vdit_jax.vae import chunked
from vdit_jax.vae import latents as latents_lib
from vdit_jax.vae.config import VAEConfig
from vdit_jax.vae.model import WanVAE

# Wan 2.1's causal layout cut to two levels (4x time, 4x space; XLA:CPU compiles it in
# about half the time of the 3-level one) at width 8, with 4 latent channels and
# non-trivial statistics, so that a missing or wrong un-normalisation shows.
# 9 frames of 16x16 -> latents [3, 4, 4, 4].
VAE = dict(base_dim=8, z_dim=4, dim_mult=(1, 1, 1), num_res_blocks=1,
           temporal_downsample=(True, True))
MEAN = (0.1, -0.2, 0.3, 0.0)
STD = (1.5, 2.0, 0.5, 1.0)
LATENT_SHAPE = [3, 4, 4, 4]
PIXELS = (9, 16, 16, 3)
NUM_SAMPLES = 2


@pytest.fixture(scope='module')
def latents(tmp_path_factory):
  """(VAE folder, latent shard folder) encoded by the real tool."""
  root = tmp_path_factory.mktemp('latent_e2e')
  cfg = VAEConfig(**VAE, latents_mean=MEAN, latents_std=STD)
  params = checkpoint.init_params(cfg, jax.random.PRNGKey(0))
  vae_dir = checkpoint.save(root / 'vae', cfg, params)
  out = str(root / 'latents')
  index = encode_latents.encode_latents('synthetic', vae_dir, out, batch_size=8,
                                        num_frames=9, height=16, width=16, num_examples=8,
                                        progress=None)
  assert index['clip_shape'] == LATENT_SHAPE and index['vae']['normalized']
  return vae_dir, out


def _config(path, **data):
  t, h, w, c = LATENT_SHAPE
  return shrink(tiny_latent.get_config(path),
                model=dict(width=32, mlp_dim=64, patch_size=(1, 2, 2)),  # 12 tokens of 16 values
                data={'num_frames': t, 'height': h, 'width': w, 'channels': c, **data},
                train=dict(tensorboard=False),
                sample=dict(every_steps=2, num_samples=NUM_SAMPLES, formats='mp4'))


def test_latent_training_samples_decode_through_the_vae(latents, tmp_path, monkeypatch):
  vae_dir, shards_dir = latents
  loads = []
  real_load = checkpoint.load
  monkeypatch.setattr(checkpoint, 'load',
                      lambda *a, **k: loads.append(a) or real_load(*a, **k))
  config = _config(shards_dir)
  workdir = str(tmp_path / 'dit')
  loop.train_and_evaluate(config, workdir)
  assert len(loads) == 1  # two periodic samples (steps 2 and 4), one VAE load
  losses = [json.loads(line)['loss'] for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert len(losses) == 4 and np.isfinite(losses).all()
  samples = os.path.join(workdir, 'samples')
  for step in (2, 4):
    assert os.path.exists(os.path.join(samples, f'step_{step:07d}.mp4'))
    assert np.load(os.path.join(samples, f'step_{step:07d}_latents.npy')).shape == (
        NUM_SAMPLES, *LATENT_SHAPE)

  videos, paths = modes.sample(config, workdir)  # --mode=sample: newest checkpoint
  assert len(loads) == 2
  assert [os.path.basename(p) for p in paths] == ['sample_step_0000004.mp4',
                                                  'sample_step_0000004_latents.npy']
  videos = np.asarray(videos)
  assert videos.shape == (NUM_SAMPLES, *PIXELS)  # 1 + 4 * (3 - 1) frames of 16x16 RGB
  sampled = np.load(paths[1])  # [n, 3, 4, 4, 4]: the DiT's normalised latents
  assert sampled.shape == (NUM_SAMPLES, *LATENT_SHAPE) and np.isfinite(sampled).all()

  # Oracle: un-normalise with the statistics encode_latents used and decode the whole
  # clip in one WanVAE.decode call (no chunks), with the VAE read back from disk.
  cfg, params = real_load(vae_dir)
  decode = jax.jit(lambda p, x: WanVAE(cfg).apply({'params': p}, x, method=WanVAE.decode))
  z = sampled * np.float32(STD) + np.float32(MEAN)
  expected = np.clip(np.asarray(decode(params, z)), -1.0, 1.0)
  np.testing.assert_allclose(videos, expected, atol=1e-5)
  # Un-normalising matters: decoding the latents as they are gives other frames.
  assert np.abs(np.clip(np.asarray(decode(params, sampled)), -1, 1) - videos).max() > 0.05

  # The mp4 holds those frames: a grid of the 2 clips, 8x upscaled, padded to 16s.
  frames = video_io.read_video(paths[0])
  grid = video_io.make_grid(video_io.to_uint8(videos), ncols=2, pad=1, scale=8)
  assert grid.shape == (9, 128, 257, 3)
  assert frames.shape == (9, 128, 272, 3)
  error = np.abs(frames[:, :, :257].astype(np.float32) - grid).mean()
  swapped = video_io.make_grid(video_io.to_uint8(videos[::-1]), ncols=2, pad=1, scale=8)
  assert error < 6.0, error  # H.264 at quality 9
  assert error < 0.5 * np.abs(swapped.astype(np.float32) - grid).mean()

  # The decode compiled once: one shape each for the first latent frame and the rest,
  # over 3 decodes in two runs.
  arch = VAEConfig(**VAE)
  for first in (True, False):
    assert chunked._jitted_chunk_fn(arch, 'decode', first, False)._cache_size() == 1


def test_bad_latent_configs_fail_before_compiling(latents, tmp_path):
  vae_dir, shards_dir = latents
  # Shards made by another tool: the same clips, no 'vae' record in index.json.
  bare = str(tmp_path / 'bare')
  shutil.copytree(shards_dir, bare)
  with open(os.path.join(bare, 'index.json')) as f:
    index = json.load(f)
  del index['vae']
  with open(os.path.join(bare, 'index.json'), 'w') as f:
    json.dump(index, f)

  workdir = str(tmp_path / 'dit')
  with pytest.raises(ValueError, match=r"data.latents=True but .*bare/index.json records no "
                     r"VAE .* config.data.vae=''"):
    loop.train_and_evaluate(_config(bare), workdir)
  assert not os.path.exists(os.path.join(workdir, 'checkpoints'))  # stopped in validation

  # data.vae names the VAE: those shards decode with its statistics.
  space = latents_lib.resolve(_config(bare, vae=vae_dir).data)
  np.testing.assert_allclose(space.mean, MEAN)
  np.testing.assert_allclose(space.std, STD)
  assert space.vae_path == os.path.abspath(vae_dir)

  # A different architecture from the one that encoded the shards.
  other = checkpoint.save(tmp_path / 'other', VAEConfig(**{**VAE, 'num_res_blocks': 2}),
                          checkpoint.init_params(VAEConfig(**{**VAE, 'num_res_blocks': 2}),
                                                 jax.random.PRNGKey(1)))
  with pytest.raises(ValueError, match='has a different architecture from the VAE that'):
    loop.build(_config(shards_dir, vae=other), None)
  with pytest.raises(ValueError, match=r'data.channels=16 but the VAE .* z_dim=4'):
    loop.build(_config(shards_dir, channels=16), None)
  with pytest.raises(ValueError, match="reads VAE latents from data.source='shards'.*"
                     "not data.source='synthetic'"):
    loop.build(_config(shards_dir, source='synthetic'), None)
  with pytest.raises(ValueError, match=r'holds VAE latents .* but config.data.latents=False'):
    loop.build(_config(shards_dir, latents=False), None)
  with pytest.raises(ValueError, match=r'data.vae=.* is only read with data.latents=True'):
    loop.build(_config(shards_dir, latents=False, vae=vae_dir), None)
  with pytest.raises(FileNotFoundError, match=r'config.data.vae=.*missing.* is not a VAE '):
    loop.build(_config(shards_dir, vae=str(tmp_path / 'missing')), None)
  config = _config(shards_dir)
  config.sample.vae_latents_per_chunk = 0
  with pytest.raises(ValueError, match='sample.vae_latents_per_chunk=0 must be a positive'):
    loop.build(config, None)
