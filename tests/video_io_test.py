"""data/video_io.py's PyAV reader: a clip from the middle of a long video, found by seeking,
is exactly the frames that decoding from frame 0 gives (the old ffmpeg reader's way), in
several containers, constant and variable frame rates, local and in a bucket; and no
subprocess is started to read or write."""

import fractions
import shutil
import subprocess

import av
import numpy as np
import pytest

from tests.gcs_emulator import gcs  # pylint: disable=unused-import  # the fixture
from vdit_jax.data import video_io
from vdit_jax.parallel import paths

NUM_FRAMES, SIZE, GOP = 72, 32, 8
MIDDLE = [41, 43, 45, 47]  # a stride-2 clip: past several keyframes, not on one


def _known_frames() -> np.ndarray:
  """[T, 32, 32, 3] uint8: frame t is a bright block at column t % 8, row t // 8 on a grey
  level of its own, so that even H.264 at CRF 5 leaves each nearest its own original."""
  frames = np.zeros((NUM_FRAMES, SIZE, SIZE, 3), np.uint8)
  for t in range(NUM_FRAMES):
    frames[t] = 20 + 2 * t
    y, x = (t // 8) * 3, (t % 8) * 4
    frames[t, y:y + 3, x:x + 4] = (255, 64, 128)
  return frames


def _encode(path, frames, codec='libx264', pts=None, gop=GOP) -> str:
  """Writes `frames` with a keyframe every `gop` frames (write_video keeps x264's 250: a
  seek in such short files lands on frame 0); `pts` in 1/1000 s gives a variable rate."""
  with av.open(str(path), mode='w') as container:
    stream = container.add_stream(codec, rate=8)
    stream.width, stream.height = SIZE, SIZE
    stream.pix_fmt = 'yuv420p'
    stream.options = {'g': str(gop), 'crf': '5'} if codec == 'libx264' else {'g': str(gop)}
    if pts is not None:
      stream.codec_context.time_base = fractions.Fraction(1, 1000)
    for i, rgb in enumerate(frames):
      frame = av.VideoFrame.from_ndarray(rgb, format='rgb24')
      if pts is not None:
        frame.pts, frame.time_base = int(pts[i]), fractions.Fraction(1, 1000)
      container.mux(stream.encode(frame))
    container.mux(stream.encode())
  return str(path)


def _nearest(frames, originals) -> list:
  err = np.abs(frames[:, None].astype(np.int32) - originals[None].astype(np.int32))
  return err.mean(axis=(2, 3, 4)).argmin(axis=1).tolist()  # [K]


def _no_decoding_from_the_start(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError('decoded from frame 0 where a seek could serve')
  monkeypatch.setattr(video_io, '_decode_from_start', refuse)


@pytest.mark.parametrize('ext,codec', [('mp4', 'libx264'), ('mkv', 'libx264'),
                                       ('webm', 'libvpx-vp9')])
def test_middle_clip_by_seeking_equals_decoding_from_the_start(tmp_path, monkeypatch, ext,
                                                                codec):
  originals = _known_frames()
  path = _encode(tmp_path / f'long.{ext}', originals, codec)
  assert video_io.count_frames(path) == NUM_FRAMES
  with av.open(path) as container:  # decoded from frame 0, every frame in order
    stream = container.streams.video[0]
    from_start = np.stack([f.to_ndarray(format='rgb24') for f in container.decode(stream)])
  assert _nearest(from_start, originals) == list(range(NUM_FRAMES))  # the content is known
  with monkeypatch.context() as patch:
    _no_decoding_from_the_start(patch)
    for indices in (MIDDLE, [GOP], [NUM_FRAMES - 1], [50, 44, 44, 60]):
      np.testing.assert_array_equal(video_io.read_frames(path, indices), from_start[indices])
  # Frame 0, and indices past the end, still decode from the start.
  np.testing.assert_array_equal(video_io.read_frames(path, [0, 45]), from_start[[0, 45]])
  with pytest.raises(ValueError, match=r'has no frame 72 \(it ended after 1 of the 2 frames'):
    video_io.read_frames(path, [45, NUM_FRAMES])


def test_variable_frame_rate_frames_are_counted_not_timed(tmp_path, monkeypatch):
  """Frame n is the n-th in presentation order, whatever the gaps between timestamps."""
  originals = _known_frames()
  gaps = np.where(np.arange(NUM_FRAMES) % 3 == 0, 250, 40)  # ms: no constant rate
  path = _encode(tmp_path / 'vfr.mp4', originals, pts=np.cumsum(gaps) - gaps[0])
  from_start = video_io.read_frames(path, range(NUM_FRAMES))
  assert _nearest(from_start, originals) == list(range(NUM_FRAMES))
  _no_decoding_from_the_start(monkeypatch)
  np.testing.assert_array_equal(video_io.read_frames(path, MIDDLE), from_start[MIDDLE])


def test_middle_clip_equals_the_old_ffmpeg_reader(tmp_path):
  """The ffmpeg command the reader ran before PyAV (select by frame number, RGB out) gives
  the same bytes, where the imageio-ffmpeg binary is installed."""
  imageio_ffmpeg = pytest.importorskip('imageio_ffmpeg')
  path = _encode(tmp_path / 'long.mp4', _known_frames())
  select = '+'.join(f'eq(n\\,{i})' for i in MIDDLE)
  out = subprocess.run(
      [imageio_ffmpeg.get_ffmpeg_exe(), '-nostdin', '-v', 'error', '-i', path, '-map', '0:v:0',
       '-vf', f'select={select}', '-fps_mode', 'passthrough', '-frames:v', str(len(MIDDLE)),
       '-f', 'rawvideo', '-pix_fmt', 'rgb24', '-'], capture_output=True, check=True).stdout
  old = np.frombuffer(out, np.uint8).reshape(len(MIDDLE), SIZE, SIZE, 3)
  np.testing.assert_array_equal(video_io.read_frames(path, MIDDLE), old)


def test_bucket_video_is_read_in_place_with_the_same_frames(gcs, tmp_path, monkeypatch):
  local = _encode(tmp_path / 'long.mp4', _known_frames())
  url = f'gs://{gcs.new_bucket()}/videos/long.mp4'
  paths.upload(local, url)
  want = video_io.read_frames(local, MIDDLE)

  def no_copy(*args, **kwargs):
    raise AssertionError('a bucket video was copied to a local file to be read')
  monkeypatch.setattr(paths, 'local_copy', no_copy)
  assert video_io.count_frames(url) == NUM_FRAMES
  np.testing.assert_array_equal(video_io.read_frames(url, MIDDLE), want)
  with pytest.raises(FileNotFoundError, match='No video file at'):
    video_io.read_frames(url.replace('long', 'gone'), [0])


def test_reading_and_writing_start_no_process(tmp_path, monkeypatch):
  """PyAV runs FFmpeg's libraries in this process: no ffmpeg binary, no fork."""
  def refuse(*args, **kwargs):
    raise AssertionError('a subprocess was started')
  monkeypatch.setattr(subprocess.Popen, '__init__', refuse)
  monkeypatch.setattr(shutil, 'which', lambda *a, **k: None)  # no ffmpeg on PATH either
  frames = _known_frames()[:12]
  path = video_io.write_video(tmp_path / 'clip.mp4', frames, fps=8)
  assert video_io.count_frames(path) == 12
  back = video_io.read_video(path)
  assert back.shape == frames.shape and _nearest(back, frames) == list(range(12))
  np.testing.assert_array_equal(video_io.read_frames(path, [3, 5]), back[[3, 5]])
