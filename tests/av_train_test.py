"""configs/tiny_av.py's road on one device: train, resume, sample mp4 with sound and wav;
the files source feeding soundtracks; the config rules that stop a bad audio run early."""

import os

import av as pyav
import numpy as np
import pytest

from configs import tiny_av
from tests.conftest import shrink
from vdit_jax import modes
from vdit_jax.config import resolve
from vdit_jax.data import audio as audio_lib
from vdit_jax.data import pipeline
from vdit_jax.data import synthetic
from vdit_jax.data import video_io
from vdit_jax.train import loop
from vdit_jax.train import metrics as metrics_lib


def small_av_config(variant=''):
  """configs/tiny_av.py at test size: 4 frames of 16x16 at 16 fps (32 mel frames, 8
  audio tokens of 4), width 32, one layer."""
  return shrink(tiny_av.get_config(variant), small=('train', 'checkpoint'),
                model=dict(variant=None, width=32, depth=1, num_heads=2, mlp_dim=64,
                           patch_size=(2, 4, 4)),
                data=dict(num_frames=4, height=16, width=16),
                train=dict(num_steps=2, batch_size=2),
                sample=dict(num_steps=2, num_samples=2, formats='mp4'))


def test_tiny_av_trains_resumes_and_samples_mp4_with_sound(tmp_path):
  workdir = str(tmp_path / 'run')
  config = small_av_config()
  loop.train_and_evaluate(config, workdir)
  samples = os.path.join(workdir, 'samples')
  grid = os.path.join(samples, 'step_0000002.mp4')
  spec = audio_lib.AudioSpec.from_config(config.audio)
  with pyav.open(grid) as container:
    assert len(container.streams.audio) == 1 and len(container.streams.video) == 1
  wave, rate = video_io.read_wav(os.path.join(samples, 'step_0000002.wav'))
  assert rate == 16000 and wave.shape == (spec.num_samples(4),)
  clip = os.path.join(samples, 'step_0000002_clips', '1.mp4')
  assert video_io.has_audio(clip)
  heard = video_io.read_audio(clip, 0.0, spec.num_samples(4), 16000)
  own, _ = video_io.read_wav(os.path.join(samples, 'step_0000002_clips', '1.wav'))
  # The clip's AAC track is its own wave (to the codec's error), not the grid's mix.
  assert np.corrcoef(heard, own)[0, 1] > 0.5
  # Resume: two more steps continue from step 2.
  config = small_av_config()
  config.train.num_steps = 4
  loop.train_and_evaluate(config, workdir)
  steps = [r['step'] for r in metrics_lib.read_metrics(os.path.join(workdir, 'metrics.jsonl'))]
  assert steps[-2:] == [3, 4]
  # --mode=sample: the newest checkpoint, mp4 with sound and wav.
  videos, written = modes.sample(small_av_config(), workdir)
  assert videos.shape == (2, 4, 16, 16, 3)
  assert any(p.endswith('sample_step_0000004.mp4') for p in written)
  assert any(p.endswith('sample_step_0000004.wav') for p in written)


def test_files_source_feeds_the_soundtrack_as_log_mel(tmp_path):
  """Two mp4s with sound (a click each at its own time) and one without: the pipeline's
  batches hold each clip's log-mel features, and the silent file is skipped ('skip')."""
  spec = audio_lib.AudioSpec(fps=16.0)
  folder = tmp_path / 'videos'
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i, click in enumerate((0.1, 0.3)):
    frames = rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
    wave = np.zeros(8000, np.float32)
    start = int(click * 16000)
    wave[start:start + 400] = 0.5 * np.sin(np.arange(400) * 2 * np.pi * 1000 / 16000)
    video_io.write_video(str(folder / f'v{i}.mp4'), frames, fps=16, audio=wave,
                         sample_rate=16000)
  video_io.write_video(str(folder / 'silent.mp4'),
                       rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8), fps=16)
  config = small_av_config()
  config.data.source = 'files'
  config.data.path = str(folder)
  config.data.num_frames = 8
  config.data.clip_start = 'center'
  config = resolve.complete(config)
  it = pipeline.make_dataset(config.data, 2, seed=0, process_index=0, process_count=1,
                             audio=pipeline.audio_spec(config),
                             missing_audio=config.audio.missing)
  batch = next(it)
  assert batch['audio'].shape == (2, spec.num_mel_frames(8), spec.mel_bins)
  # Each clip's loudest mel frame is where its click is (mel frame j at j * hop / rate).
  loudest = sorted(int(np.argmax(f.mean(axis=1))) * spec.hop / 16000 for f in batch['audio'])
  np.testing.assert_allclose(loudest, [0.1, 0.3], atol=0.03)


def test_synthetic_av_batches_hold_features_of_the_clips_audio():
  config = resolve.complete(small_av_config())
  spec = pipeline.audio_spec(config)
  it = pipeline.make_dataset(config.data, 2, seed=0, process_index=0, process_count=1,
                             audio=spec)
  batch = next(it)
  assert batch['audio'].shape == (2, spec.num_mel_frames(4), spec.mel_bins)
  assert batch['audio'].dtype == np.float32
  source = synthetic.from_data_config(config.data, num_examples=config.data.num_examples,
                                      seed=config.data.source_seed, audio=spec)
  features = {tuple(np.round(audio_lib.log_mel(source[i]['audio'], spec)[:, 0], 5))
              for i in range(64)}
  assert tuple(np.round(batch['audio'][0][:, 0], 5)) in features


@pytest.mark.parametrize('field, value, words', [
    ('diffusion.objective', 'v', "diffusion.objective='flow'"),
    ('model.scan_layers', True, 'model.scan_layers=False'),
    ('audio.patch', 3, 'audio.patch=3 must divide the 32 mel frames'),
    ('audio.hop', 300, 'hop'),
    ('audio.task', 'both', "audio.task='both'"),
    ('audio.task_probs', (0.6, 0.6, 0.0), 'audio.task_probs'),
    ('audio.missing', 'zeros', "audio.missing='zeros'"),
    ('model.pos_embed', 'sincos', "model.pos_embed='rope'"),
    ('lora.rank', 4, 'lora.rank=4'),
])
def test_bad_audio_configs_are_named_before_anything_compiles(field, value, words):
  config = small_av_config()
  section, key = field.split('.')
  config[section][key] = value
  with pytest.raises(ValueError, match=words.replace('(', r'\(').replace(')', r'\)')):
    resolve.resolve(config)


def test_video_only_variant_is_the_same_model_without_audio():
  config = resolve.resolve(small_av_config('video_only'))
  assert config.model.audio is None
  assert resolve.resolve(small_av_config()).model.audio.mel_frames_per_frame == 8


def test_text_av_model_trains_and_samples_a_prompt_with_sound(tmp_path):
  """model.conditioning='text': both streams cross-attend to the caption, trained with
  caption dropout; --mode=sample takes a prompt and writes mp4 with sound and wav."""
  config = small_av_config()
  config.model.conditioning = 'text'
  config.model.class_tokens = 0
  workdir = str(tmp_path / 'text')
  loop.train_and_evaluate(config, workdir)
  config = small_av_config()
  config.model.conditioning = 'text'
  config.model.class_tokens = 0
  videos, written = modes.sample(config, workdir, prompt='a red circle moving up')
  assert videos.shape == (2, 4, 16, 16, 3) and np.isfinite(videos).all()
  assert any(p.endswith('.wav') for p in written)
  assert video_io.has_audio([p for p in written if p.endswith('sample_step_0000002.mp4')][0])
