"""The multi-stage pipeline's audio stage (issue 30): the windows over a clip longer than the
audio model's, their sound stitched in order, the soundtrack of a trained audio-video model
written as mp4 with sound and wav, the tool's --audio_workdir, and the errors for an fps
that differs from the model's and for a model without audio."""

import av as pyav
import jax
import numpy as np
import pytest

from configs import tiny_av
from tests import multistage_test
from tests.conftest import shrink
from vdit_jax import modes
from vdit_jax.config import resolve
from vdit_jax.data import video_io
from vdit_jax.generate import multistage
from vdit_jax.tools import generate_video
from vdit_jax.train import loop

FPS = 8                    # the audio model's audio.fps: the tiny pipeline's full rate
SAMPLE_RATE = 16000
SPF = SAMPLE_RATE // FPS   # 2000 samples per frame
CLIP = 4                   # the audio model's data.num_frames


def small_av_config(variant=''):
  """configs/tiny_av.py at test size: 4 frames of 16x16 at 8 fps (64 mel frames, 16 audio
  tokens of 4), width 32, one layer, two sampler steps."""
  config = shrink(tiny_av.get_config(variant), small=('train', 'checkpoint'),
                  model=dict(variant=None, width=32, depth=1, num_heads=2, mlp_dim=64,
                             patch_size=(2, 4, 4)),
                  data=dict(num_frames=CLIP, height=16, width=16),
                  train=dict(num_steps=2, batch_size=2),
                  sample=dict(num_steps=2, num_samples=2, formats='mp4', fps=FPS))
  config.audio.fps = float(FPS)
  config.audio.griffin_lim_iters = 4
  return config


@pytest.fixture(scope='module')
def av_workdir(tmp_path_factory):
  """A workdir of the small audio-video model after 2 train steps."""
  workdir = str(tmp_path_factory.mktemp('av') / 'run')
  loop.train_and_evaluate(small_av_config(), workdir)
  return workdir


@pytest.fixture(scope='module')
def audio_stage(av_workdir):
  return modes.load_audio_stage(small_av_config(), av_workdir)


def random_video(shape, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


@pytest.mark.parametrize('frames, starts, keep_from, last_kept', [
    (10, (0, 4, 6), (0, 0, 2), (2, 4)),   # the last window aligned to the end, overlapping
    (8, (0, 4), (0, 0), (0, 4)),          # windows fit exactly
    (4, (0,), (0,), (0, 4)),
    (3, (0,), (0,), (0, 3)),              # shorter than a window: padded, cut back
])
def test_windows_cover_the_clip_consecutively_the_last_one_at_its_end(
    frames, starts, keep_from, last_kept):
  plan = multistage.soundtrack_plan(frames, CLIP, SPF)
  assert plan.starts == starts and plan.keep_from == keep_from
  assert plan.kept(plan.num_windows - 1) == last_kept
  assert plan.num_samples == frames * SPF
  kept = [f + plan.starts[w] for w in range(plan.num_windows) for f in range(*plan.kept(w))]
  assert kept == list(range(frames))     # every frame's sound once, in order
  with pytest.raises(ValueError, match=r"window \(the audio model's data.num_frames\)=0 must"):
    multistage.soundtrack_plan(frames, 0, SPF)


def test_stitched_sound_follows_the_frames_in_order():
  """A fake window_fn whose sound under each frame is that frame's value: the stitched
  track is then frame k's value at samples k * spf .. (k + 1) * spf - 1, for each clip."""
  spf = 3
  clips = 100.0 * np.arange(2)[:, None] + np.arange(10)[None]        # [B, N] frame ids
  video = np.broadcast_to(clips[:, :, None, None, None], (2, 10, 2, 2, 3))
  plan = multistage.soundtrack_plan(10, CLIP, spf)
  seen = {}

  def window_fn(frames):  # [W*B, T, H, W, C] -> [W*B, T * spf]
    seen['rows'] = frames[:, :, 0, 0, 0]
    return np.repeat(frames[:, :, 0, 0, 0], spf, axis=1)

  waves = multistage.stitch_soundtrack(video, window_fn, plan)
  np.testing.assert_array_equal(waves, np.repeat(clips, spf, axis=1))
  # Window-major rows: window 2 of clip 1 (frames 6..9) is row 5.
  np.testing.assert_array_equal(seen['rows'][5], [106, 107, 108, 109])
  short = multistage.soundtrack_plan(3, CLIP, spf)                  # padded with frame 2
  waves = multistage.stitch_soundtrack(video[:, :3], window_fn, short)
  np.testing.assert_array_equal(seen['rows'][0], [0, 1, 2, 2])
  np.testing.assert_array_equal(waves, np.repeat(clips[:, :3], spf, axis=1))


def test_fit_frames_resizes_with_the_transforms_and_keeps_the_right_size():
  video = random_video((1, 3, 16, 16, 3))
  np.testing.assert_array_equal(multistage.fit_frames(video, 16, 16), video)
  wide = multistage.fit_frames(random_video((2, 3, 12, 24, 3)), 16, 16)
  assert wide.shape == (2, 3, 16, 16, 3) and wide.dtype == np.float32
  assert wide.min() >= -1 and wide.max() <= 1
  with pytest.raises(ValueError, match=r'RGB clips \[B, N, H, W, 3\], got \(3, 16, 16, 3\)'):
    multistage.fit_frames(video[0], 16, 16)


def test_soundtrack_of_a_longer_clip_is_stitched_written_and_read_back(audio_stage, tmp_path):
  video = random_video((2, 10, 16, 16, 3), seed=1)  # 10 frames: windows at 0, 4 and 6
  sound = multistage.soundtrack(audio_stage, video, FPS, rng=jax.random.key(0))
  assert sound.sample_rate == SAMPLE_RATE and sound.plan.starts == (0, 4, 6)
  assert sound.waves.shape == (2, 10 * SPF) and sound.waves.dtype == np.float32
  assert np.isfinite(sound.waves).all() and np.abs(sound.waves).max() <= 1
  # Window 0 is the sound a clip of exactly the model's 4 frames gets (same key, same call).
  first = multistage.soundtrack(audio_stage, video[:, :CLIP], FPS, rng=jax.random.key(0))
  assert first.plan.starts == (0,)
  np.testing.assert_array_equal(sound.waves[:, :CLIP * SPF], first.waves)
  # One clip [N, H, W, 3] is a batch of one.
  one = multistage.soundtrack(audio_stage, video[0, :CLIP], FPS, rng=jax.random.key(0))
  assert one.waves.shape == (1, CLIP * SPF)

  out = str(tmp_path / 'clip.mp4')
  assert generate_video.write(video[:1], out, FPS, sound.waves[:1], SAMPLE_RATE) == out
  wav = video_io.write_wav(generate_video.wav_path(out), sound.waves[0], SAMPLE_RATE)
  assert wav == str(tmp_path / 'clip.wav')
  heard, rate = video_io.read_wav(wav)
  assert rate == SAMPLE_RATE and heard.shape == (10 * SAMPLE_RATE // FPS,)
  with pyav.open(out) as container:
    stream = container.streams.audio[0]
    seconds = float(stream.duration * stream.time_base)
  # AAC pads its last frame of 1024 samples: the track lasts the clip's 1.25 s to a frame.
  assert video_io.count_frames(out) == 10 and abs(seconds - 10 / FPS) <= 1024 / SAMPLE_RATE
  track = video_io.read_audio(out, 0.0, 10 * SPF, SAMPLE_RATE)
  assert np.corrcoef(track, sound.waves[0])[0, 1] > 0.5


def test_the_audio_stage_refuses_another_fps_and_a_model_without_audio(
    audio_stage, av_workdir, tmp_path):
  video = random_video((1, 6, 16, 16, 3))
  with pytest.raises(ValueError, match=r"video is at fps=16 but the audio model's clips are "
                                       r'at audio.fps=8: .*Make the video at 8 fps'):
    multistage.soundtrack(audio_stage, video, 16, rng=jax.random.key(0))
  with pytest.raises(ValueError, match=r'audio.enabled=False: its model makes no sound'):
    modes.load_audio_stage(small_av_config('video_only'), av_workdir)
  # A workdir trained without audio, given with the audio-video config: refused from its
  # config.json before any weight is read.
  silent = tmp_path / 'silent'
  silent.mkdir()
  (silent / 'config.json').write_text(
      resolve.complete(small_av_config('video_only')).to_json_best_effort())
  with pytest.raises(ValueError, match=r"workdir .*silent holds a model trained without audio"):
    modes.load_audio_stage(small_av_config(), str(silent))
  with pytest.raises(ValueError, match=r'labels=\[0, 1\] must be 1 class ids'):
    multistage.soundtrack(audio_stage, video, FPS, rng=jax.random.key(0), labels=[0, 1])


def test_tool_adds_the_soundtrack_to_the_pipeline_clip(audio_stage, tmp_path, monkeypatch):
  """generate_video.run with --audio_workdir: the pipeline's 12 frames (8x8, resized to the
  audio model's 16x16) get 3 windows of sound, in the mp4 and the wav. The video stages are
  multistage_test's random-param stages and the audio stage the trained one, handed to the
  tool in place of their checkpoints (loading is load_stage's / the fixture's)."""
  keyframe, interp = multistage_test.stages()
  loaded = {'key': keyframe, 'interp': interp}
  monkeypatch.setattr(modes, 'load_stage', lambda config, workdir: loaded[workdir])
  monkeypatch.setattr(modes, 'load_audio_stage', lambda config, workdir: audio_stage)
  out = str(tmp_path / 'clip.mp4')
  common = dict(keyframe_workdir='key', interp_workdir='interp', audio_workdir='av',
                prompt='a blue circle moving up', out=out)
  configs = (multistage_test.keyframe_config(), multistage_test.interp_config())
  summary = generate_video.run(*configs, duration_s=1.5, fps=None,
                               audio_config=small_av_config(), **common)
  assert summary['frames'] == 12 and summary['path'] == out
  assert summary['audio'] == {'wav': str(tmp_path / 'clip.wav'), 'sample_rate': SAMPLE_RATE,
                              'samples': 12 * SPF, 'windows': [0, 4, 8]}
  assert video_io.count_frames(out) == 12 and video_io.has_audio(out)
  assert video_io.read_wav(summary['audio']['wav'])[0].shape == (12 * SPF,)
  # The frames are the pipeline's without the audio stage too (its own key).
  silent = multistage.generate('a blue circle moving up', 1.5, FPS, keyframe, interp,
                               rng=jax.random.key(0))
  with_audio = multistage.generate('a blue circle moving up', 1.5, FPS, keyframe, interp,
                                   rng=jax.random.key(0), audio=audio_stage)
  np.testing.assert_array_equal(with_audio.video, silent.video)
  assert silent.soundtrack is None and with_audio.soundtrack.waves.shape == (1, 12 * SPF)
  # Refused before any stage loads: another rate, a gif, a task other than v2a.
  with pytest.raises(ValueError, match=r"fps=4 but the audio model's clips are at "
                                       r'audio.fps=8'):
    generate_video.run(*configs, duration_s=1.0, fps=4, audio_config=small_av_config(),
                       **common)
  with pytest.raises(ValueError, match=r"fps=4 but the audio model's clips are at "
                                       r'audio.fps=8'):
    multistage.generate(None, 1.0, 4, keyframe, interp, rng=jax.random.key(0),
                        audio=audio_stage)
  with pytest.raises(ValueError, match=r'must end in .mp4 with --audio_workdir'):
    generate_video.run(*configs, duration_s=1.0, fps=None, audio_config=small_av_config(),
                       **{**common, 'out': str(tmp_path / 'clip.gif')})
  config = small_av_config()
  config.audio.task = 'a2v'
  with pytest.raises(ValueError, match=r"audio.task='a2v': the audio stage generates"):
    generate_video.run(*configs, duration_s=1.0, fps=None, audio_config=config, **common)
