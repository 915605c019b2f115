"""Wan 2.1 image-to-video: generate/wan_i2v.py (the first-frame condition, the CLIP image
tokens, the project's UniPC + CFG with both threaded to the DiT) equal to diffusers'
WanImageToVideoPipeline on a tiny pipeline (I2V transformer, AutoencoderKLWan,
CLIPVisionModel + CLIPImageProcessor; every constant tensor noised), same image, prompt
embeddings and initial latents; and --mode=extend on the whole tiny Wan I2V folder (umT5
too), each window sampled from the clip's last frame."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import wan as wan_config
from tests import clip_vision_test
from tests import wan_pipeline_test
from tests import wan_test
from vdit_jax import modes
from vdit_jax.config import resolve
from vdit_jax.convert import clip_vision as clip_convert
from vdit_jax.data import video_io
from vdit_jax.diffusion import objectives
from vdit_jax.generate import conditional
from vdit_jax.generate import sampling
from vdit_jax.generate import wan_i2v
from vdit_jax.model import wan
from vdit_jax.train import loop
from vdit_jax.vae import checkpoint as vae_checkpoint

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')
transformers = pytest.importorskip('transformers')

Z = 4                           # latent channels of the tiny VAE
FRAMES, HEIGHT, WIDTH = 9, 32, 32
LATENT = (3, 4, 4)              # [T', H', W'] through the 4x / 8x VAE
# The I2V transformer's input: Z noisy latents, 4 mask channels, Z image latents.
I2V = dict(wan_test.I2V, in_channels=Z + 4 + Z, out_channels=Z)
# CLIP as wide as the transformer's image_dim: 16 x 16 images in 8 x 8 patches, 5 tokens.
CLIP = dict(hidden_size=I2V['image_dim'], intermediate_size=16, num_attention_heads=2,
            image_size=16, patch_size=8)
TEXT_ROWS = wan.TEXT_LENGTH     # diffusers splits the context at 512 text rows
BATCH = 2


def _vae(root):
  """A tiny diffusers AutoencoderKLWan (noised) and its conversion (a vdit_jax VAE folder)."""
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  from vdit_jax.convert import wan_vae  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  ref = diffusers.AutoencoderKLWan(
      base_dim=8, z_dim=Z, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
      temperal_downsample=[False, True, True],
      latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 0.5, 1.0]).eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for p in ref.parameters():
      p.add_(0.02 * torch.randn(p.shape, generator=gen))
  vae_dir = os.path.join(root, 'vae')
  os.makedirs(vae_dir)
  save_file({k: v.contiguous() for k, v in ref.state_dict().items()},
            os.path.join(vae_dir, 'diffusion_pytorch_model.safetensors'))
  with open(os.path.join(vae_dir, 'config.json'), 'w') as f:
    json.dump(dict(ref.config), f)
  out = wan_vae.convert(os.path.join(vae_dir, 'diffusion_pytorch_model.safetensors'),
                        os.path.join(vae_dir, 'config.json'), os.path.join(root, 'wan_vae'))
  return ref, out


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """The Wan I2V folder's parts: diffusers / transformers references and our loads."""
  root = str(tmp_path_factory.mktemp('wan_i2v'))
  transformer = wan_test.make_reference(root, I2V, seed=7)
  clip, processor = clip_vision_test.make_reference(root, 'gelu', seed=2, **CLIP)
  vae_ref, vae_dir = _vae(root)
  vae_cfg, vae_params = vae_checkpoint.load(vae_dir)
  clip_spec, clip_params = clip_convert.load_params(root)
  return dict(root=root, transformer=transformer, clip=clip, processor=processor,
              vae_ref=vae_ref, vae_dir=vae_dir, vae_cfg=vae_cfg, vae_params=vae_params,
              clip_spec=clip_spec, clip_params=clip_params,
              processing=clip_convert.read_processor(root))


def _pipeline(tiny, shift=3.0):
  scheduler = diffusers.UniPCMultistepScheduler(
      prediction_type='flow_prediction', use_flow_sigmas=True, flow_shift=shift,
      num_train_timesteps=1000)
  return diffusers.WanImageToVideoPipeline(
      tokenizer=None, text_encoder=None, vae=tiny['vae_ref'], scheduler=scheduler,
      image_processor=tiny['processor'], image_encoder=tiny['clip'],
      transformer=tiny['transformer'])


def _image(seed=0):
  """A PIL image of another size and aspect than the video (both resizes do work)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8))


def _config(root, num_steps, cfg_scale=5.0):
  """configs/wan.py (UniPC, shift 3, flow) with the tiny transformer's model, fp32."""
  config = wan_config.get_config()
  wan.apply_overrides(config.model, wan.read_config(root))
  config.model.dtype = 'float32'
  config.model.remat_policy = 'none'
  d = config.data
  d.num_frames, d.height, d.width, d.channels = *LATENT, Z
  config.sample.num_steps = num_steps
  config.sample.cfg_scale = cfg_scale
  config.sample.num_samples = BATCH
  return resolve.complete(config)


def test_vae_image_equals_the_video_processor(tiny):
  pipe = _pipeline(tiny)
  want = pipe.video_processor.preprocess(_image(), height=HEIGHT, width=WIDTH).numpy()
  got = wan_i2v.vae_image(_image(), HEIGHT, WIDTH)
  np.testing.assert_array_equal(got, want.transpose(0, 2, 3, 1))  # bit-identical


def test_condition_equals_prepare_latents(tiny):
  """The condition channels [mask x 4, normalised image latents], as prepare_latents."""
  pipe = _pipeline(tiny)
  pixels = wan_i2v.vae_image(_image(), HEIGHT, WIDTH)  # [1, H, W, 3]
  noise = torch.zeros(BATCH, Z, *LATENT)
  with torch.no_grad():
    _, want = pipe.prepare_latents(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()),
                                   BATCH, Z, HEIGHT, WIDTH, FRAMES, torch.float32, 'cpu', None,
                                   noise)
  want = want.numpy().transpose(0, 2, 3, 4, 1)  # [B, T', H', W', 4 + Z]
  got = wan_i2v.i2v_condition(tiny['vae_cfg'], tiny['vae_params'],
                              np.repeat(pixels, BATCH, axis=0), FRAMES)
  assert got.shape == want.shape == (BATCH, *LATENT, 4 + Z)
  np.testing.assert_array_equal(got[..., :4], want[..., :4])
  assert got[:, 0, ..., :4].min() == 1 and got[:, 1:, ..., :4].max() == 0  # first frame only
  np.testing.assert_allclose(got[..., 4:], want[..., 4:], atol=1e-5, rtol=0)
  assert np.abs(want[:, 1:, ..., 4:]).max() > 0.1  # the zero frames have latents too


def test_image_tokens_equal_encode_image(tiny):
  pipe = _pipeline(tiny)
  with torch.no_grad():
    want = pipe.encode_image(_image(), device='cpu').numpy()  # [1, 5, 8]
  got = np.asarray(clip_convert.encode_images(tiny['clip_spec'], tiny['clip_params'],
                                              tiny['processing'], [_image()]))
  assert got.shape == want.shape == (1, 5, I2V['image_dim'])
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def _embeds(seed):
  rng = np.random.default_rng(seed)
  embeds = rng.standard_normal((BATCH, TEXT_ROWS, I2V['text_dim'])).astype(np.float32)
  embeds[1, 3:] = 0  # a shorter prompt: umT5's rows past its end are zeros
  return embeds


def test_sampling_equals_wan_image_to_video_pipeline(tiny):
  num_steps, cfg_scale = 2, 5.0
  config = _config(tiny['root'], num_steps, cfg_scale)
  _, spec, model = wan_test.project_model(tiny['root'])
  assert (spec.condition_channels, spec.image_embed_dim) == (4 + Z, I2V['image_dim'])
  embeds, negative = _embeds(0), _embeds(1)
  shape = (BATCH, *LATENT, Z)
  x = dict(video=np.zeros(shape, np.float32), t=np.zeros(BATCH), embed=embeds,
           cond=np.zeros(shape[:4] + (4 + Z,), np.float32),
           image=np.zeros((BATCH, 5, I2V['image_dim']), np.float32))
  params = wan.load_params(tiny['root'], spec, wan_test.abstract_params(model, x))

  image = _image()
  cond = wan_i2v.image_condition(
      [image] * BATCH, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
      clip_spec=tiny['clip_spec'], clip_params=tiny['clip_params'],
      processing=tiny['processing'], vae_cfg=tiny['vae_cfg'], vae_params=tiny['vae_params'])
  mask = jnp.ones((BATCH, TEXT_ROWS), bool)
  cond['text'] = {'embed': jnp.asarray(embeds), 'mask': mask}
  cond['negative_text'] = {'embed': jnp.asarray(negative), 'mask': mask}
  diffusion = objectives.Diffusion.from_config(config.diffusion)
  key = jax.random.key(11)
  got = wan_i2v.sample_i2v(model, params, diffusion, config, cond, key)
  # samplers.sample draws its initial noise from the first half of the key's split.
  noise = np.asarray(jax.random.normal(jax.random.split(key)[0], shape, jnp.float32))

  pipe = _pipeline(tiny, shift=config.sample.shift)
  with torch.no_grad():
    want = pipe(image=image, prompt_embeds=torch.from_numpy(embeds),
                negative_prompt_embeds=torch.from_numpy(negative), height=HEIGHT,
                width=WIDTH, num_frames=FRAMES, num_inference_steps=num_steps,
                guidance_scale=cfg_scale,
                latents=torch.from_numpy(noise.transpose(0, 4, 1, 2, 3).copy()),
                output_type='latent', return_dict=False)[0]
  want = want.numpy().transpose(0, 2, 3, 4, 1)  # [B, T', H', W', Z]
  assert got.shape == want.shape == shape
  scale = np.abs(want).max()
  np.testing.assert_allclose(got, want, atol=1e-4 * scale, rtol=0)
  assert np.abs(got - noise).max() > 0.1 * scale  # the sampler moved

  # The image reaches the model: another first frame gives other latents.
  other = dict(cond, **wan_i2v.image_condition(
      [_image(seed=5)] * BATCH, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
      clip_spec=tiny['clip_spec'], clip_params=tiny['clip_params'],
      processing=tiny['processing'], vae_cfg=tiny['vae_cfg'], vae_params=tiny['vae_params']))
  moved = wan_i2v.sample_i2v(model, params, diffusion, config, other, key)
  assert np.abs(moved - got).max() > 1e-3 * scale


def test_bad_inputs_are_named(tiny):
  config = _config(tiny['root'], 1)
  _, spec, model = wan_test.project_model(tiny['root'])
  diffusion = objectives.Diffusion.from_config(config.diffusion)
  shape = (BATCH, *LATENT, Z)
  fn = wan_i2v.make_sample_fn(model, diffusion, config, shape)
  text = {'embed': jnp.zeros((BATCH, TEXT_ROWS, I2V['text_dim'])),
          'mask': jnp.ones((BATCH, TEXT_ROWS), bool)}
  good = {'text': text, 'negative_text': text,
          'condition': jnp.zeros(shape[:4] + (4 + Z,)),
          'image': jnp.zeros((BATCH, 5, I2V['image_dim']))}
  key = jax.random.key(0)
  with pytest.raises(ValueError, match=r"'condition' of shape \(2, 3, 4, 4, 4\) must be"):
    fn(None, key, dict(good, condition=jnp.zeros(shape[:4] + (4,))))
  with pytest.raises(ValueError, match="needs 'negative_text'"):
    fn(None, key, {k: v for k, v in good.items() if k != 'negative_text'})
  with pytest.raises(ValueError, match=r"'image' of shape \(2, 5, 6\) must be"):
    fn(None, key, dict(good, image=jnp.zeros((BATCH, 5, 6))))
  with pytest.raises(ValueError, match=r"keys \['label'\] are not read"):
    fn(None, key, dict(good, label=jnp.zeros((BATCH,), jnp.int32)))
  with pytest.raises(ValueError, match=r"shape=\(2, 3, 4, 4, 12\) must be"):
    wan_i2v.make_sample_fn(model, diffusion, config, shape[:4] + (12,))
  with pytest.raises(ValueError, match='num_frames=8 must be 1 \\+ 4 k'):
    wan_i2v.i2v_condition(tiny['vae_cfg'], tiny['vae_params'],
                          np.zeros((1, HEIGHT, WIDTH, 3)), 8)
  with pytest.raises(ValueError, match=r'image of shape \(32, 32, 3\) must be \[B, H, W, 3\]'):
    wan_i2v.i2v_condition(tiny['vae_cfg'], tiny['vae_params'], np.zeros((HEIGHT, WIDTH, 3)),
                          FRAMES)
  with pytest.raises(ValueError, match=r'latents_std of shape \(3,\) must hold z_dim=4'):
    wan_i2v.i2v_condition(tiny['vae_cfg'], tiny['vae_params'],
                          np.zeros((1, HEIGHT, WIDTH, 3)), FRAMES, latents_std=[1, 2, 3])
  with pytest.raises(ValueError, match='clip_spec is given without clip_params'):
    wan_i2v.image_condition([_image()], height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                            clip_spec=tiny['clip_spec'], vae_cfg=tiny['vae_cfg'],
                            vae_params=tiny['vae_params'])
  del spec


@pytest.fixture(scope='module')
def folder(tiny):
  """The tiny Wan I2V folder made whole: a umT5 text_encoder/ and tokenizer/ beside the
  transformer, image_encoder/ and image_processor/."""
  wan_pipeline_test._text_encoder(tiny['root'], I2V['text_dim'])  # pylint: disable=protected-access
  return tiny['root']


def _extend_config(tiny, folder):
  """configs/wan.py:i2v_14b shrunk to the tiny folder's transformer, fp32, 2 UniPC steps
  with CFG 5, sampling from the folder's weights (no checkpoint) with its umT5 and CLIP."""
  config = wan_config.get_config('i2v_14b')
  wan.apply_overrides(config.model, wan.read_config(folder))
  config.model.dtype = 'float32'
  config.model.remat_policy = 'none'
  config.model.text.encoder_path = folder
  config.model.image_encoder_path = folder
  d = config.data
  d.num_frames, d.height, d.width, d.channels = *LATENT, Z
  d.vae = tiny['vae_dir']
  config.train.init_from = folder
  config.sample.num_steps = 2
  config.sample.num_samples = BATCH
  config.sample.negative_prompt = 'blurred, static'
  config.sample.overlap = 0  # not read by an I2V model (configs/wan.py's 5 is for T2V)
  config.mesh.fsdp = 1
  config.mesh.data = -1
  return config


def test_extend_mode_continues_an_image_with_the_i2v_model(tiny, folder, tmp_path):
  """--mode=extend --input=frame.png on a Wan I2V model: window i (9 frames) is
  sample_i2v from the clip's last frame with rng fold_in(key, i), decoded, its first
  frame (the given one) dropped: 1 + 8 + 8 frames, cut to 15."""
  config = _extend_config(tiny, folder)
  png = str(tmp_path / 'frame.png')
  _image().save(png)
  prompt = 'a cat and a dog'
  workdir = str(tmp_path / 'run')
  extended, written = modes.extend(config, workdir, png, 15, prompt=prompt)
  extended = np.asarray(extended)
  assert extended.shape == (BATCH, 15, HEIGHT, WIDTH, 3)
  mp4 = [p for p in written if p.endswith('.mp4')]
  assert len(mp4) == 1 and video_io.count_frames(mp4[0]) == 15
  given = conditional.read_input(png, HEIGHT, WIDTH)  # [1, H, W, 3]
  np.testing.assert_array_equal(extended[:, :1], np.broadcast_to(given, (BATCH, 1) +
                                                                 given.shape[1:]))

  # The windows' latents, through the same path as the mode, against sample_i2v.
  s = loop.build(resolve.complete(config), None)
  decoder = sampling.latent_decoder(s.config)
  s = dataclasses.replace(s, decoder=decoder)
  params = modes.pretrained_params(s)
  key = jax.random.key(s.config.sample.seed)
  frames = np.broadcast_to(given[None], (BATCH,) + given.shape)
  shape = (BATCH, *LATENT, Z)
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    clip, windows = conditional.extend_i2v(s, params, frames, 15, rng=key, prompt=prompt)
    sample_fn = jax.jit(wan_i2v.make_sample_fn(s.model, s.diffusion, s.config, shape))
    text = conditional.encoded_prompts(s.config, [prompt] * BATCH)
    want = []
    for i, first in enumerate((0, 8)):  # each window's image: the clip's frame so far
      images = video_io.to_uint8(clip[:, first])  # [B, H, W, 3]
      cond = dict(text, **wan_i2v.image_condition(
          list(images), height=HEIGHT, width=WIDTH, num_frames=FRAMES,
          clip_spec=tiny['clip_spec'], clip_params=tiny['clip_params'],
          processing=tiny['processing'], vae_cfg=tiny['vae_cfg'],
          vae_params=tiny['vae_params']))
      want.append(np.asarray(sample_fn(params, jax.random.fold_in(key, i), cond)))
  np.testing.assert_array_equal(clip, extended)
  assert len(windows) == 2
  for got, ref in zip(windows, want):
    assert got.shape == ref.shape == shape
    scale = np.abs(ref).max()
    np.testing.assert_allclose(got, ref, atol=1e-5 * scale, rtol=0)
  assert np.abs(windows[1] - windows[0]).max() > 1e-3 * np.abs(want[0]).max()
  decoded = [decoder(w) for w in windows]  # [B, 9, H, W, 3] each
  np.testing.assert_array_equal(clip[:, 1:9], decoded[0][:, 1:])
  np.testing.assert_array_equal(clip[:, 9:], decoded[1][:, 1:7])


def test_i2v_extension_keys_are_checked(tiny, folder, tmp_path):
  config = _extend_config(tiny, folder)
  config.model.image_encoder_path = ''
  png = str(tmp_path / 'frame.png')
  _image().save(png)
  with pytest.raises(ValueError, match=r'image_embed_dim=8 needs model\.image_encoder_path'):
    modes.extend(config, str(tmp_path / 'run'), png, 15)
  config = resolve.complete(_extend_config(tiny, folder))
  config.model.text.encoder_path = ''
  with pytest.raises(ValueError, match=r'condition_channels=8\) needs model\.text\.encoder_path'):
    conditional.check_i2v_extend(config)
  config.model.image_encoder_path = str(tmp_path / 'missing')
  with pytest.raises(ValueError, match=r'image_encoder_path=.*missing.* is not a folder'):
    conditional.check_config(config)
  config.model.image_encoder_path = folder
  config.model.image_embed_dim = 0  # a model without image tokens refuses the key
  with pytest.raises(ValueError, match=r'image_embed_dim=0: this model takes no image'):
    conditional.check_config(config)
