"""tools.encode_latents --text_encoder: each clip's umT5 caption embedding stored beside its
latents (synthetic captions, video files' .txt sidecars, shard records' captions), read
back by the data pipeline as model.text.encoder='precomputed' gives it to the model."""

import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

pytest.importorskip('torch')
pytest.importorskip('transformers')
pytest.importorskip('tokenizers')
pytest.importorskip('safetensors')

from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
from tests import umt5_test  # pylint: disable=g-import-not-at-top
from vdit_jax.config import defaults  # pylint: disable=g-import-not-at-top
from vdit_jax.convert import umt5  # pylint: disable=g-import-not-at-top
from vdit_jax.data import captions  # pylint: disable=g-import-not-at-top
from vdit_jax.data import pipeline  # pylint: disable=g-import-not-at-top
from vdit_jax.data import shards  # pylint: disable=g-import-not-at-top
from vdit_jax.data import synthetic  # pylint: disable=g-import-not-at-top
from vdit_jax.data import video_files  # pylint: disable=g-import-not-at-top
from vdit_jax.data import video_io  # pylint: disable=g-import-not-at-top
from vdit_jax.tools import encode_latents  # pylint: disable=g-import-not-at-top
from vdit_jax.vae import checkpoint  # pylint: disable=g-import-not-at-top
from vdit_jax.vae.config import VAEConfig  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# vae_test's tiny Wan-layout VAE: 9 frames of 16 x 8 -> latents [3, 2, 1, 4].
VAE = dict(base_dim=8, z_dim=4, dim_mult=(1, 2, 4, 4), num_res_blocks=1,
           temporal_downsample=(False, True, True))
CLIP = dict(num_frames=9, height=16, width=8)
LATENT = dict(num_frames=3, height=2, width=1, channels=4)
MAX_LENGTH = 32  # tokens per caption (model.text.max_length): the synthetic captions
# take 19 to 23 of them, the second video's is cut to 32.
D_MODEL = umt5_test.SMALL['d_model']
# Every clip goes through the VAE and umT5 in batches of 2: each compiles once.
BATCH = 2


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  """A Wan-like folder with a tiny umT5 and its tokenizer, a tiny random VAE, and the
  encoder loaded as the tool loads it (to compute the expected embeddings)."""
  root = tmp_path_factory.mktemp('encode_text')
  wan = root / 'wan'
  # pylint: disable=protected-access
  umt5_test._hf_model('umt5').save_pretrained(wan / 'text_encoder')
  (wan / 'tokenizer').mkdir()
  umt5_test._train_tokenizer().save(str(wan / 'tokenizer' / 'tokenizer.json'))
  # pylint: enable=protected-access
  cfg = VAEConfig(**VAE)
  vae = checkpoint.save(root / 'vae', cfg, checkpoint.init_params(cfg, jax.random.PRNGKey(0)))
  spec, params = umt5.load_encoder(wan)
  return types.SimpleNamespace(wan=str(wan), vae=vae, spec=spec, params=params,
                               tokenizer=umt5.load_tokenizer(wan))


def _expected(folders, texts):
  """WanPipeline's embeddings of `texts` [N, MAX_LENGTH, D] and their token counts [N]."""
  embeds = umt5.encode_prompts(folders.tokenizer, folders.spec, folders.params, texts,
                               MAX_LENGTH)  # [N, L, D]
  _, mask = umt5.tokenize(folders.tokenizer, [umt5.prompt_clean(t) for t in texts],
                          MAX_LENGTH)  # [N, L]
  return embeds, mask.sum(axis=1)


def _check_batches_hold_the_embeddings(folders, out, texts, rtol):
  """The shards in `out` read by the pipeline (text encoder 'precomputed'): every row's
  text_embed is the umT5 embedding of its clip's caption `texts[i]` (to `rtol`, the storage
  dtype's rounding, and 1e-5 absolute: the tool encodes another batch, whose float32 sums
  differ by ~1e-6), zero past its length, where text_mask ends."""
  stored = shards.ShardSource(out)
  assert [stored[i]['caption'] for i in range(len(stored))] == list(texts)
  embeds, lengths = _expected(folders, list(texts))
  for i in range(len(stored)):  # trimmed to the caption's tokens
    assert stored[i]['caption_embedding'].shape == (lengths[i], D_MODEL)
  data = defaults.base_config().data
  data.update(source='shards', path=str(out), **LATENT)
  inputs = captions.CaptionInputs('precomputed', MAX_LENGTH, D_MODEL)
  batch = next(pipeline.make_dataset(data, len(stored), seed=0, process_index=0,
                                     process_count=1, captions=inputs))
  assert batch['text_embed'].shape == (len(stored), MAX_LENGTH, D_MODEL)
  latents = [np.asarray(stored[i]['video'], np.float32) for i in range(len(stored))]
  seen = set()
  for row, video in enumerate(batch['video']):  # shuffled: find each row's clip by its latents
    i = next(k for k, z in enumerate(latents) if np.array_equal(z, video))
    seen.add(i)
    np.testing.assert_allclose(batch['text_embed'][row], embeds[i], rtol=rtol, atol=1e-5)
    assert not batch['text_embed'][row, lengths[i]:].any()
    np.testing.assert_array_equal(batch['text_mask'][row], np.arange(MAX_LENGTH) < lengths[i])
  assert seen == set(range(len(stored)))


def test_synthetic_captions_are_encoded_beside_the_latents(folders, tmp_path):
  out = tmp_path / 'latents'
  index = encode_latents.encode_latents(
      'synthetic', folders.vae, out, batch_size=BATCH, num_examples=4, progress=None,
      text_encoder=folders.wan, text_max_length=MAX_LENGTH, **CLIP)
  assert index['text_encoder'] == {'path': os.path.abspath(folders.wan),
                                   'max_length': MAX_LENGTH, 'd_model': D_MODEL,
                                   'dtype': 'float16'}
  with open(out / shards.INDEX_NAME, encoding='utf-8') as f:
    assert json.load(f)['text_encoder'] == index['text_encoder']
  assert shards.ShardSource(out)[0]['caption_embedding'].dtype == np.float16
  source = synthetic.SyntheticShapes(9, 16, 8, num_examples=4, captions=True)
  texts = [source[i]['caption'] for i in range(4)]
  assert max(_expected(folders, texts)[1]) < MAX_LENGTH  # zero rows follow each
  _check_batches_hold_the_embeddings(folders, out, texts, rtol=2.0**-11)  # float16: half an ulp


def test_video_sidecar_captions_are_encoded_beside_the_latents(folders, tmp_path):
  videos = tmp_path / 'videos'
  frames = synthetic.SyntheticShapes(9, 16, 16, num_examples=2)
  for i in range(2):
    video_io.write_video(videos / f'clip{i}.mp4', frames[i]['video'], fps=8)
  (videos / 'clip0.txt').write_text('  A cat and a dog baking a cake\n', encoding='utf-8')

  # The sidecar becomes the example's caption, stripped; a video without one has none.
  spec = video_files.ClipSpec(**CLIP)
  source = video_files.VideoFiles(str(videos), spec)
  assert source.caption_paths == (str(videos / 'clip0.txt'), None)
  assert source[0]['caption'] == 'A cat and a dog baking a cake'
  assert 'caption' not in source[1]

  # A clip without a caption is named, before anything is written.
  with pytest.raises(ValueError, match=r'clip 1 \(.*clip1\.mp4\): its caption file .*clip1\.txt'
                     r'.* is missing.*--empty_caption_ok'):
    encode_latents.encode_latents(str(videos), folders.vae, tmp_path / 'refused',
                                  batch_size=BATCH, progress=None, text_encoder=folders.wan,
                                  text_max_length=MAX_LENGTH, **CLIP)
  assert not (tmp_path / 'refused' / shards.INDEX_NAME).exists()
  # ... or, with empty_caption_ok, gets the empty prompt's embedding (</s> alone).
  index = encode_latents.encode_latents(
      str(videos), folders.vae, tmp_path / 'empty', batch_size=BATCH, progress=None,
      text_encoder=folders.wan, text_max_length=MAX_LENGTH, text_dtype='float32',
      empty_caption_ok=True, **CLIP)
  assert index['text_encoder']['dtype'] == 'float32'
  empty = shards.ShardSource(tmp_path / 'empty')[1]
  embeds, lengths = _expected(folders, [''])
  assert empty['caption'] == '' and lengths[0] == 1
  np.testing.assert_allclose(empty['caption_embedding'], embeds[0, :1], rtol=1e-5, atol=1e-6)

  # Every clip captioned: float32 embeddings equal WanPipeline's to fp32 tolerance.
  texts = ['A cat and a dog baking a cake',
           'the kitchen is cozy, with sunlight streaming through the window and a red square']
  (videos / 'clip1.txt').write_text(texts[1] + '\n\n', encoding='utf-8')
  encode_latents.encode_latents(
      str(videos), folders.vae, tmp_path / 'latents', batch_size=BATCH, progress=None,
      text_encoder=folders.wan, text_max_length=MAX_LENGTH, text_dtype='float32', **CLIP)
  assert list(_expected(folders, texts)[1]) == [18, MAX_LENGTH]  # the second truncated
  _check_batches_hold_the_embeddings(folders, tmp_path / 'latents', texts, rtol=1e-5)


def _write_clip_shards(directory, clips, texts):
  """A make_shards-like folder of uint8 clips keyed v<i>.mp4, with caption texts[i] (None:
  no caption field)."""
  os.makedirs(directory)
  writer = array_record_module.ArrayRecordWriter(
      os.path.join(directory, shards.shard_name(0, 1)), shards.WRITER_OPTIONS)
  for i, (clip, text) in enumerate(zip(clips, texts)):
    writer.write(shards.encode_record(clip, label=0, caption=text, key=f'v{i}.mp4'))
  writer.close()
  shards.write_index(directory, {
      'format': shards.FORMAT, 'shards': [{'name': shards.shard_name(0, 1),
                                           'num_records': len(clips)}],
      'num_records': len(clips), 'clip_shape': list(clips.shape[1:]), 'dtype': 'uint8',
      'num_classes': 1})


def test_a_shard_clip_without_a_caption_is_named_by_the_command(folders, tmp_path):
  source = synthetic.SyntheticShapes(9, 16, 8, num_examples=2)
  clips = np.stack([source[i]['video'] for i in range(2)])  # [2, T, H, W, 3]
  folder = str(tmp_path / 'clips')
  _write_clip_shards(folder, clips, ['a red square moving left', None])
  result = subprocess.run(
      [sys.executable, '-m', 'vdit_jax.tools.encode_latents', f'--videos={folder}',
       f'--vae={folders.vae}', f'--out={tmp_path / "latents"}', f'--batch_size={BATCH}',
       f'--text_encoder={folders.wan}', f'--text_max_length={MAX_LENGTH}'],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2, result.stderr
  assert "clip 1 (key 'v1.mp4'): it has no 'caption'" in result.stderr
  assert not (tmp_path / 'latents' / shards.INDEX_NAME).exists()
