"""Sound beside the frames: data/video_io.py's read_audio / write_video(audio=...) / wav,
video_files' ClipSpec.audio, and shards with sound through tools.make_shards.

The videos are written here with PyAV itself (H.264 frames at 16 fps, an AAC track), their
sound made of short clicks at known times: a click found at its sample says the window is
on the video's clock. FFmpeg's AAC encoder primes its stream with 1024 samples; the mp4
muxer records them in the edit list and the reader places decoded frames by their
timestamps, so the measured onset error is under a sample (0.06 ms at 44.1 and 48 kHz).
"""

import dataclasses
import fractions
import os
import subprocess
import sys

import av
import numpy as np
import pytest

from vdit_jax.data import shards
from vdit_jax.data import video_files
from vdit_jax.data import video_io
from vdit_jax.tools import make_shards as make_shards_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATE = 16000     # the sample rate read back
FPS = 16
NUM_FRAMES = 48  # 3 s of video
CLICKS = (0.25, 1.3, 2.2)  # seconds
ONSET_TOLERANCE_S = 0.002  # measured: under 0.1 ms


def _signal(sample_rate: int, seconds: float, clicks=CLICKS, tone_hz: float = 0.0):
  """float32 [S]: 3 ms pulses of 0.8 at `clicks`, or a 0.5 sine of `tone_hz`."""
  n = int(round(sample_rate * seconds))
  if tone_hz:
    return (0.5 * np.sin(2 * np.pi * tone_hz * np.arange(n) / sample_rate)).astype(np.float32)
  wave = np.zeros(n, np.float32)
  for c in clicks:
    start = int(round(c * sample_rate))
    wave[start:start + int(0.003 * sample_rate)] = 0.8
  return wave


def _write(path, sample_rate=44100, fps=FPS, num_frames=NUM_FRAMES, sound=None, audio=True):
  """An mp4 written with PyAV: 32x32 grey frames at `fps` and, with `audio`, an AAC track
  of `sound` (default: the clicks) starting at time 0, interleaved frame by frame."""
  seconds = num_frames / fps
  sound = _signal(sample_rate, seconds) if sound is None else sound
  with av.open(str(path), mode='w', format='mp4') as container:
    video = container.add_stream('libx264', rate=fps)
    video.width, video.height, video.pix_fmt = 32, 32, 'yuv420p'
    if audio:
      track = container.add_stream('aac', rate=sample_rate)
      track.layout = 'mono'
    container.start_encoding()
    done = 0
    for t in range(num_frames):
      grey = np.full((32, 32, 3), (4 * t) % 256, np.uint8)  # [H, W, 3]
      frame = av.VideoFrame.from_ndarray(grey, format='rgb24')
      container.mux(video.encode(frame))
      stop = len(sound) if t == num_frames - 1 else int((t + 1) * sample_rate / fps)
      while audio and done < stop:
        chunk = sound[done:min(done + 1024, stop)]
        piece = av.AudioFrame.from_ndarray(chunk[None], format='fltp', layout='mono')
        piece.sample_rate, piece.pts = sample_rate, done
        piece.time_base = fractions.Fraction(1, sample_rate)
        container.mux(track.encode(piece))
        done += len(chunk)
    container.mux(video.encode())
    if audio:
      container.mux(track.encode())
  return str(path)


def _damage_audio(path, after_s: float = -1.0) -> str:
  """Overwrites the bytes of every audio packet that starts after `after_s` with 0xff."""
  with av.open(path) as container:
    stream = container.streams.audio[0]
    spans = [(p.pos, p.size) for p in container.demux(stream)
             if p.size and p.pts is not None and float(p.pts * p.time_base) > after_s]
  data = bytearray(open(path, 'rb').read())
  for pos, size in spans:
    data[pos:pos + size] = b'\xff' * size
  with open(path, 'wb') as f:
    f.write(bytes(data))
  return path


def _onsets(wave, sample_rate=RATE, threshold=0.3) -> list:
  """Times (s) where |wave| first rises over `threshold` after 50 ms below it."""
  loud = np.abs(wave) > threshold
  gap = int(0.05 * sample_rate)
  return [i / sample_rate for i in np.flatnonzero(loud)
          if not loud[max(i - gap, 0):i].any()]


def _audio_spec():
  return make_shards_lib.audio_spec(RATE, float(FPS))


@pytest.mark.parametrize('sample_rate', [16000, 44100, 48000])
@pytest.mark.parametrize('start_s', [0.0, 1.2])  # 1.2: read after a seek
def test_clicks_land_on_their_samples(tmp_path, sample_rate, start_s):
  path = _write(tmp_path / 'clicks.mp4', sample_rate)
  wave = video_io.read_audio(path, start_s, int(1.5 * RATE), RATE)  # [S]
  assert wave.shape == (int(1.5 * RATE),) and wave.dtype == np.float32
  assert np.abs(wave).max() <= 1.0
  expected = [c - start_s for c in CLICKS if 0 <= c - start_s < 1.5]
  found = _onsets(wave)
  assert len(found) == len(expected), (found, expected)
  np.testing.assert_allclose(found, expected, atol=ONSET_TOLERANCE_S)


def test_a_tone_is_resampled_from_44k(tmp_path):
  path = _write(tmp_path / 'tone.mp4', 44100, sound=_signal(44100, 3.0, tone_hz=440.0))
  wave = video_io.read_audio(path, 0.5, RATE, RATE)  # [S]
  reference = 0.5 * np.sin(2 * np.pi * 440.0 * (0.5 + np.arange(RATE) / RATE))
  assert np.abs(wave - reference).max() < 0.05  # measured 0.017 (AAC at its default rate)


def test_windows_past_the_ends_are_zero_padded(tmp_path):
  path = _write(tmp_path / 'tone.mp4', 48000, sound=_signal(48000, 3.0, tone_hz=440.0))
  tail = video_io.read_audio(path, 2.5, RATE, RATE)  # [2.5 s, 3.5 s)
  assert np.abs(tail[:int(0.4 * RATE)]).max() > 0.4
  assert not tail[int(0.52 * RATE):].any()  # the stream ends at 3 s (plus the last frame)
  assert not video_io.read_audio(path, 10.0, 100, RATE).any()
  head = video_io.read_audio(path, -0.5, RATE, RATE)  # [-0.5 s, 0.5 s)
  assert not head[:RATE // 2].any() and np.abs(head[RATE // 2 + 100:]).max() > 0.4


def test_a_file_without_sound(tmp_path):
  path = _write(tmp_path / 'mute.mp4', audio=False)
  with pytest.raises(video_io.NoAudioError, match='mute.mp4.*no audio stream'):
    video_io.read_audio(path, 0.0, 100, RATE)
  assert not video_io.has_audio(path)
  assert video_io.probe_audio(path) == (False, f'Video file {path!r} holds no audio stream.')
  assert video_io.has_audio(_write(tmp_path / 'loud.mp4'))
  gif = video_io.write_video(tmp_path / 'x.gif', np.zeros((2, 8, 8, 3), np.uint8))
  with pytest.raises(video_io.NoAudioError, match='gif'):
    video_io.read_audio(gif, 0.0, 100, RATE)


def test_a_damaged_sound_track_raises_naming_the_file(tmp_path):
  path = _damage_audio(_write(tmp_path / 'broken.mp4'))
  with pytest.raises(video_io.AudioDecodeError, match='broken.mp4.*cannot be decoded'):
    video_io.read_audio(path, 0.0, RATE, RATE)
  ok, reason = video_io.probe_audio(path)
  assert not ok and 'broken.mp4' in reason
  assert video_io.count_frames(path) == NUM_FRAMES  # the frames are intact


def test_write_video_with_sound_plays_in_sync(tmp_path):
  frames = np.zeros((NUM_FRAMES, 32, 32, 3), np.uint8)
  for rate in (16000, 48000):
    path = video_io.write_video(tmp_path / f'sample{rate}.mp4', frames, fps=FPS,
                                audio=_signal(rate, 3.0), sample_rate=rate)
    with av.open(path) as container:
      assert [s.start_time for s in container.streams] == [0, 0]
      assert [s.type for s in container.streams] == ['video', 'audio']
    np.testing.assert_allclose(_onsets(video_io.read_audio(path, 0.0, 3 * RATE, RATE)), CLICKS,
                               atol=0.01)  # measured: 0 ms
    assert video_io.read_video(path).shape == (NUM_FRAMES, 32, 32, 3)
    assert video_io.frame_rate(path) == FPS
  silent = video_io.write_video(tmp_path / 'plain.mp4', frames, fps=FPS)
  assert not video_io.has_audio(silent)  # as before: no track without audio
  gif = video_io.write_video(tmp_path / 'g.gif', frames[:4], fps=FPS, audio=_signal(RATE, 0.25),
                             sample_rate=RATE)  # a gif has no sound: ignored
  assert video_io.read_video(gif).shape[1:] == (32, 32, 3)
  with pytest.raises(ValueError, match='sample_rate=10000 .*AAC takes the rates'):
    video_io.write_video(tmp_path / 'x.mp4', frames, audio=np.zeros(10, np.float32),
                         sample_rate=10000)
  with pytest.raises(ValueError, match='sample_rate must be an integer'):
    video_io.write_video(tmp_path / 'x.mp4', frames, audio=np.zeros(10, np.float32))
  with pytest.raises(ValueError, match='mono floats'):
    video_io.write_video(tmp_path / 'x.mp4', frames, audio=np.zeros((10, 2)), sample_rate=RATE)


def test_wav_round_trip_is_exact_to_16_bits(tmp_path):
  rng = np.random.default_rng(0)
  mono = rng.uniform(-1.2, 1.2, 1001).astype(np.float32)  # [S], some past full scale
  path = video_io.write_wav(tmp_path / 'sub' / 'a.wav', mono, 22050)
  back, rate = video_io.read_wav(path)
  assert rate == 22050 and back.shape == (1001,) and back.dtype == np.float32
  np.testing.assert_allclose(back, np.clip(mono, -1, 1), atol=0.5 / 32767 + 1e-7)
  video_io.write_wav(path, back, rate)
  np.testing.assert_array_equal(video_io.read_wav(path)[0], back)  # 16-bit values survive
  stereo = rng.uniform(-1, 1, (50, 2)).astype(np.float32)  # [S, 2]
  back, _ = video_io.read_wav(video_io.write_wav(tmp_path / 'b.wav', stereo, RATE))
  assert back.shape == (50, 2)
  np.testing.assert_allclose(back, stereo, atol=0.5 / 32767 + 1e-7)
  with pytest.raises(ValueError, match='not a PCM wav'):
    (tmp_path / 'c.wav').write_bytes(b'not a wav')
    video_io.read_wav(tmp_path / 'c.wav')


def test_mix_audio_keeps_the_peak_at_most_one():
  quiet = np.array([[0.1, -0.2, 0.3], [0.2, 0.1, -0.1]], np.float32)  # [N, S]
  np.testing.assert_allclose(video_io.mix_audio(quiet), [0.3, -0.1, 0.2], rtol=1e-6)
  loud = np.array([[0.9, -0.5, 0.0], [0.9, 0.2, 0.5]], np.float32)
  np.testing.assert_allclose(video_io.mix_audio(loud), np.array([1.8, -0.3, 0.5]) / 1.8,
                             rtol=1e-6)
  with pytest.raises(ValueError, match=r'\[N, S\]'):
    video_io.mix_audio(np.zeros(3, np.float32))


# The 'files' source: one folder of five videos (3 s at 16 fps unless said).
#   good.mp4   clicks            late.mp4   sound damaged after 1.5 s (passes the probe)
#   mute.mp4   no audio stream   broken.mp4 every audio packet damaged
#   fast.mp4   24 fps: its clips do not run at the spec's 16 fps
@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('sound')
  _write(root / 'good.mp4')
  _write(root / 'mute.mp4', audio=False)
  _damage_audio(_write(root / 'broken.mp4'))
  _damage_audio(_write(root / 'late.mp4'), after_s=1.5)
  _write(root / 'fast.mp4', fps=24, num_frames=72)
  return str(root)


def _clip_spec(missing_audio='skip', **kwargs):
  return video_files.ClipSpec(num_frames=16, height=16, width=16, clip_start='center',
                              crop='center', audio=_audio_spec(), missing_audio=missing_audio,
                              **kwargs)


def _name(path):
  return os.path.basename(path)


def test_files_source_skips_files_without_sound(folder):
  source = video_files.VideoFiles(folder, _clip_spec('skip'))
  assert [_name(p) for p in source.paths] == ['good.mp4', 'late.mp4']
  reasons = {_name(p): r for p, r in source.skipped}
  assert set(reasons) == {'broken.mp4', 'fast.mp4', 'mute.mp4'}
  assert 'no audio stream' in reasons['mute.mp4']
  assert 'cannot be decoded' in reasons['broken.mp4']
  assert '24 fps' in reasons['fast.mp4'] and 'fps=16' in reasons['fast.mp4']
  assert source.silent == () and source.frame_rates == (16.0, 16.0)
  example = source[0]
  assert example['video'].shape == (16, 16, 16, 3)
  assert example['audio'].shape == (RATE,) and example['audio'].dtype == np.float32
  # The centre clip of 48 frames starts at frame 16, 1 s: the click at 1.3 s is at 0.3 s.
  np.testing.assert_allclose(_onsets(example['audio']), [0.3], atol=ONSET_TOLERANCE_S)
  # late.mp4's sound breaks at read time: the next file stands in for it.
  np.testing.assert_array_equal(source[1]['audio'], example['audio'])
  np.testing.assert_array_equal(source[1]['video'], example['video'])


def test_files_source_gives_silence_when_asked(folder):
  source = video_files.VideoFiles(folder, _clip_spec('silence'))
  assert [_name(p) for p in source.paths] == ['broken.mp4', 'good.mp4', 'late.mp4', 'mute.mp4']
  assert [_name(p) for p in source.silent] == ['broken.mp4', 'mute.mp4']
  assert [_name(p) for p, _ in source.skipped] == ['fast.mp4']  # frame rates still must match
  for i in (0, 2, 3):  # late.mp4 (2) fails at read time: silence too
    assert source[i]['audio'].shape == (RATE,) and not source[i]['audio'].any()
  assert source[1]['audio'].any()


def test_frame_rate_rule():
  spec = _clip_spec(frame_stride=2)
  assert video_files.frame_rate_mismatch(32.0, spec) is None
  assert video_files.frame_rate_mismatch(32.3, spec) is None  # within 1%
  assert 'fps=16' in video_files.frame_rate_mismatch(33.0, spec)
  with pytest.raises(ValueError, match="missing_audio='loud' is not one of"):
    _clip_spec('loud')


def test_shards_carry_the_sound(folder, tmp_path):
  out = str(tmp_path / 'shards')
  index = make_shards_lib.make_shards(folder, out, num_shards=2, num_frames=16, height=16,
                                      width=16, num_workers=0, progress=None,
                                      audio=_audio_spec(), missing_audio='silence')
  assert index['audio'] == {'sample_rate': RATE, 'fps': 16.0, 'num_samples': RATE}
  assert [_name(p) for p in index['silent']] == ['broken.mp4', 'late.mp4', 'mute.mp4']
  assert [_name(s['path']) for s in index['skipped']] == ['fast.mp4']
  source = shards.ShardSource(out)
  files = video_files.VideoFiles(folder, _clip_spec('silence'))
  assert source.audio == index['audio'] and len(source) == len(files) == 4
  for i in range(len(source)):
    example, expected = source[i], files[i]
    assert example['key'] == _name(files.paths[i])
    np.testing.assert_array_equal(example['video'], expected['video'])
    np.testing.assert_array_equal(example['audio'], expected['audio'])  # [S]
  record = shards.decode_record(shards.encode_record(np.zeros((1, 2, 2, 3), np.uint8)))
  assert 'audio' not in record
  with pytest.raises(ValueError, match='audio dtype must be one of'):
    shards.encode_record(np.zeros((1, 2, 2, 3), np.uint8), audio=np.zeros(4, np.float64))


def test_shard_index_without_matching_sound_is_refused(tmp_path):
  out = str(tmp_path / 'shards')
  writer = shards.ShardWriter(shards.prepare_output(out, False), 1)
  writer.write(0, shards.encode_record(np.zeros((1, 2, 2, 3), np.uint8),
                                       audio=np.zeros(3, np.float32)))
  index = {'format': shards.FORMAT, 'shards': writer.finish(), 'clip_shape': [1, 2, 2, 3],
           'dtype': 'uint8', 'num_classes': 1,
           'audio': {'sample_rate': RATE, 'fps': 16.0, 'num_samples': 4}}
  shards.write_index(out, index)
  with pytest.raises(ValueError, match=r'record 0 holds audio \[3\], the index says \[4\]'):
    shards.ShardSource(out)[0]  # pylint: disable=expression-not-assigned
  shards.write_index(out, dict(index, audio={'sample_rate': 0, 'fps': 16.0, 'num_samples': 4}))
  with pytest.raises(ValueError, match='audio.sample_rate=0'):
    shards.ShardSource(out)


def test_make_shards_command_line_skips_files_without_sound(folder, tmp_path):
  spec = make_shards_lib.audio_spec(RATE, 16.0)
  assert (spec.sample_rate, spec.fps, spec.num_samples(16)) == (RATE, 16.0, RATE)
  assert dataclasses.is_dataclass(spec)
  with pytest.raises(ValueError, match='fps must be > 0'):
    make_shards_lib.audio_spec(RATE, 0)
  out = str(tmp_path / 'shards')
  result = subprocess.run(
      [sys.executable, '-m', 'vdit_jax.tools.make_shards', f'--videos={folder}', f'--out={out}',
       '--num_frames=16', '--height=16', '--width=16', '--num_workers=0', '--audio',
       f'--sample_rate={RATE}', '--fps=16', '--missing_audio=skip'],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  # late.mp4's centre clip reaches its damaged sound: skipped with the other three.
  assert 'wrote 1 clips of [16, 16, 16, 3] in 1 shard(s), 1 class(es), 4 video(s) skipped' in (
      result.stdout) and '(with sound, 0 silent)' in result.stdout
  source = shards.ShardSource(out)
  assert source[0]['key'] == 'good.mp4' and source[0]['audio'].shape == (RATE,)
