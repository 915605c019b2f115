"""Sampling a Wan 2.1 model: the project's sampler path (generate/conditional.py, UniPC,
CFG with a negative prompt) equal to diffusers' WanPipeline on the same transformer,
initial noise and prompt embeddings; and --mode=sample on a whole Wan folder (transformer,
umT5 + tokenizer, VAE) writing the mp4."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import wan as wan_config
from tests import wan_test
from vdit_jax import modes
from vdit_jax.config import resolve
from vdit_jax.data import video_io
from vdit_jax.diffusion import objectives
from vdit_jax.generate import conditional
from vdit_jax.model import wan

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

LATENT = (3, 4, 4)   # [T', H', W']: 9 frames of 32 x 32 through a 4x / 8x VAE
TEXT_LEN = 6


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp('wan_sampling'))
  return folder, wan_test.make_reference(folder, wan_test.T2V, seed=5)


def small_config(folder, num_steps, cfg_scale=5.0):
  """configs/wan.py with the tiny reference's model (from its config.json), fp32."""
  config = wan_config.get_config()
  wan.apply_overrides(config.model, wan.read_config(folder))
  config.model.dtype = 'float32'
  config.model.remat_policy = 'none'
  config.model.text.max_length = TEXT_LEN
  d = config.data
  d.num_frames, d.height, d.width, d.channels = *LATENT, wan_test.T2V['out_channels']
  config.sample.num_steps = num_steps
  config.sample.cfg_scale = cfg_scale
  config.sample.num_samples = 2
  config.sample.overlap = 2  # latent frames given per --mode=extend window (of 3)
  return resolve.complete(config)


def pipeline_latents(transformer, noise, embeds, negative, num_steps, cfg_scale, shift):
  """WanPipeline's final latents [B, T', H', W', C] from `noise` (no VAE, no text encoder)."""
  scheduler = diffusers.UniPCMultistepScheduler(
      prediction_type='flow_prediction', use_flow_sigmas=True, flow_shift=shift,
      num_train_timesteps=1000)
  pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer,
                               vae=None, scheduler=scheduler)
  t, h, w = noise.shape[1:4]
  with torch.no_grad():
    out = pipe(prompt_embeds=torch.from_numpy(embeds),
               negative_prompt_embeds=torch.from_numpy(negative),
               height=h * 8, width=w * 8, num_frames=(t - 1) * 4 + 1,
               num_inference_steps=num_steps, guidance_scale=cfg_scale,
               latents=torch.from_numpy(noise.transpose(0, 4, 1, 2, 3).copy()),
               output_type='latent', return_dict=False)[0]
  return out.numpy().transpose(0, 2, 3, 4, 1)


@pytest.mark.parametrize('num_steps', [1, 4])
def test_sampling_equals_wan_pipeline(reference, num_steps):
  folder, transformer = reference
  config = small_config(folder, num_steps)
  _, spec, model = wan_test.project_model(folder)
  shape = (2, *LATENT, wan_test.T2V['out_channels'])
  rng = np.random.default_rng(0)
  embeds = rng.standard_normal((2, TEXT_LEN, wan_test.T2V['text_dim'])).astype(np.float32)
  embeds[1, 3:] = 0  # a shorter prompt, zero-padded as umT5's rows are
  negative = rng.standard_normal((2, TEXT_LEN, wan_test.T2V['text_dim'])).astype(np.float32)
  x = dict(video=np.zeros(shape, np.float32), t=np.zeros(2), embed=embeds)
  params = wan.load_params(folder, spec, wan_test.abstract_params(model, x))

  diffusion = objectives.Diffusion.from_config(config.diffusion)
  sample_fn = jax.jit(conditional.make_sample_fn(model, diffusion, config, 0, shape))
  mask = jnp.ones((2, TEXT_LEN), bool)
  cond = {'text': {'embed': jnp.asarray(embeds), 'mask': mask},
          'negative_text': {'embed': jnp.asarray(negative), 'mask': mask}}
  key = jax.random.key(3)
  got = np.asarray(sample_fn(params, key, cond))
  # samplers.sample draws its initial noise from the first half of the key's split.
  noise = np.asarray(jax.random.normal(jax.random.split(key)[0], shape, jnp.float32))
  want = pipeline_latents(transformer, noise, embeds, negative, num_steps,
                          config.sample.cfg_scale, config.sample.shift)
  scale = np.abs(want).max()
  np.testing.assert_allclose(got, want, atol=1e-4 * scale, rtol=0)
  assert np.abs(got - noise).max() > 0.1 * scale  # the sampler moved


def _vae_folder(root, z_dim):
  """A tiny diffusers AutoencoderKLWan (Wan's 4x / 8x layout) saved as vae/ and converted."""
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  from vdit_jax.convert import wan_vae  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  ref = diffusers.AutoencoderKLWan(
      base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
      temperal_downsample=[False, True, True],
      latents_mean=[0.1, -0.2, 0.3, 0.0][:z_dim], latents_std=[1.5, 2.0, 0.5, 1.0][:z_dim])
  vae_dir = os.path.join(root, 'vae')
  os.makedirs(vae_dir)
  save_file({k: v.contiguous() for k, v in ref.state_dict().items()},
            os.path.join(vae_dir, 'diffusion_pytorch_model.safetensors'))
  with open(os.path.join(vae_dir, 'config.json'), 'w') as f:
    json.dump(dict(ref.config), f)
  return wan_vae.convert(os.path.join(vae_dir, 'diffusion_pytorch_model.safetensors'),
                         os.path.join(vae_dir, 'config.json'), os.path.join(root, 'wan_vae'))


def _text_encoder(root, d_model):
  """A tiny umT5 (text_encoder/) with its tokenizer (tokenizer/) in the Wan folder."""
  transformers = pytest.importorskip('transformers')
  pytest.importorskip('tokenizers')
  from tests import umt5_test  # pylint: disable=g-import-not-at-top
  torch.manual_seed(1)
  small = dict(umt5_test.SMALL, d_model=d_model)
  model = transformers.UMT5EncoderModel(transformers.UMT5Config(**small))
  umt5_test._perturb(model, 1)  # pylint: disable=protected-access
  model.eval().save_pretrained(os.path.join(root, 'text_encoder'))
  os.makedirs(os.path.join(root, 'tokenizer'))
  umt5_test._train_tokenizer().save(  # pylint: disable=protected-access
      os.path.join(root, 'tokenizer', 'tokenizer.json'))


@pytest.fixture(scope='module')
def full_folder(reference):
  """The reference's folder with a tiny umT5 and its tokenizer beside the transformer."""
  folder, _ = reference
  _text_encoder(folder, wan_test.T2V['text_dim'])
  return folder


def folder_config(folder, tmp_path):
  """small_config reading everything from the Wan folder at run time: the transformer
  (train.init_from), umT5 (model.text.encoder_path), a converted tiny VAE; one sample on
  one device's mesh."""
  config = small_config(folder, num_steps=2)
  config.train.init_from = folder
  config.model.text.encoder_path = folder
  config.data.vae = _vae_folder(str(tmp_path), wan_test.T2V['out_channels'])
  config.sample.num_samples = 1
  config.mesh.fsdp = 1
  config.mesh.data = -1
  return config


def test_sample_mode_on_a_wan_folder_writes_the_mp4(full_folder, tmp_path):
  folder = full_folder
  config = folder_config(folder, tmp_path)
  config.sample.negative_prompt = 'blurred, static'
  workdir = str(tmp_path / 'run')
  videos, written = modes.sample(config, workdir, prompt='a cat and a dog baking a cake')
  mp4 = [p for p in written if p.endswith('.mp4')]
  assert len(mp4) == 1 and os.path.basename(mp4[0]).startswith('sample_pretrained')
  frames = video_io.read_frames(mp4[0], range(video_io.count_frames(mp4[0])))
  assert frames.shape[0] == 9  # (3 - 1) * 4 + 1 frames through the VAE (the file upscaled)
  assert np.asarray(videos).shape == (1, 9, 32, 32, 3)

  # A prompt changes the sample (the umT5 embeddings reach the model).
  other, _ = modes.sample(config, workdir, prompt='bright tones, overexposed')
  assert np.abs(np.asarray(other) - np.asarray(videos)).max() > 1e-3


def test_extend_mode_continues_a_clip_with_a_wan_model(full_folder, tmp_path):
  """--mode=extend on a Wan model (no given-frames channel): the clip's last frames are
  VAE-encoded and imposed, noised to each step's level, on the first sample.overlap latent
  frames of every window; the continuation is decoded to num_frames frames."""
  folder = full_folder
  config = folder_config(folder, tmp_path)
  config.sample.overlap = 2  # latent frames given per window (5 video frames)
  clip = np.random.default_rng(0).integers(0, 255, (9, 32, 32, 3), dtype=np.uint8)
  input_path = video_io.write_video(str(tmp_path / 'clip.mp4'), clip, fps=8)
  extended, written = modes.extend(config, str(tmp_path / 'run'), input_path, 17,
                                   prompt='a cat and a dog')
  assert np.asarray(extended).shape == (1, 17, 32, 32, 3)
  mp4 = [p for p in written if p.endswith('.mp4')]
  assert video_io.count_frames(mp4[0]) == 17

  # The given latents come back exactly at the start of each window (imposed on the result).
  from vdit_jax.train import loop  # pylint: disable=g-import-not-at-top
  s = loop.build(resolve.complete(config), None)
  decoder = loop.sampling.latent_decoder(s.config)
  params = modes.pretrained_params(s)
  given = decoder.encode(np.asarray(clip[None, 4:], np.float32) / 127.5 - 1)  # [1, 2, ...]
  latent_clip, windows = conditional.extend_clip(
      s.model, s.diffusion, s.config, params, given, 5, rng=jax.random.key(0), prompt='a cat')
  assert latent_clip.shape == (1, 5, *LATENT[1:], 4) and len(windows) == 3
  np.testing.assert_array_equal(latent_clip[:, :2], given)
  np.testing.assert_array_equal(windows[1][:, :2], latent_clip[:, 1:3])
