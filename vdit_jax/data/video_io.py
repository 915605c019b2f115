"""Writing and reading clips: [-1, 1] floats -> uint8, grids of samples, mp4 / gif files.

    frames = make_grid(to_uint8(samples), ncols=4, scale=4)   # [T, H', W', C]
    write_video('samples/step_1000.mp4', frames, fps=8)
    n = count_frames('clip.webm')                             # decodes once, raises if broken
    clip = read_frames('clip.webm', [30, 32, 34, 36])         # [4, H, W, 3] uint8

Writing handles .mp4 and .gif; reading (`count_frames`, `read_frames`) handles every
extension in READ_EXTENSIONS: .gif through Pillow, the rest through PyAV (FFmpeg's
libraries inside this process: no ffmpeg binary, no subprocess, nothing forked).

`read_frames` seeks: for a clip that starts past the first keyframe it lists the stream's
packets (demuxing reads the file but decodes nothing), seeks to the last keyframe at or
before the first frame asked for, and decodes from there. Frame n is the n-th frame in
presentation order, as when decoding from the start; where the packets cannot say which
frame is which (no timestamps, repeated ones) it decodes from the start instead.

Paths may be local or bucket URLs (gs://, through `parallel.paths`). A bucket video is read
through the file object that `paths` opens: PyAV reads and seeks it (ranged reads), so no
local copy is made. A video written to a bucket is encoded into a local temporary file (the
mp4 muxer seeks back to write its index) and uploaded as one object.

Sound: `read_audio` cuts a window of a file's first audio stream, mono float at the rate
asked for, on the video's clock (time 0 is the first video frame); `write_video(...,
audio=...)` muxes a mono AAC track beside the frames of an mp4; `write_wav` / `read_wav`
keep 16-bit PCM, and `mix_audio` is the soundtrack of a `make_grid`:

    wave = read_audio('clip.mp4', start_s=2.0, num_samples=16000, sample_rate=16000)  # [S]
    write_video('samples/step_1000.mp4', frames, fps=16, audio=wave, sample_rate=16000)
    write_wav('samples/step_1000.wav', mix_audio(waves), 16000)   # waves [N, S] -> [S]

PyAV is required (its wheels carry FFmpeg with libx264). Pillow is optional: it is
imported only for .gif, and installed with `pip install 'vdit_jax[video]'`.
"""

from __future__ import annotations

import contextlib
import fractions
import io
import math
import numbers
import os
from typing import Iterator
import wave

import numpy as np

from vdit_jax.parallel import paths

VIDEO_EXTENSIONS = ('.mp4', '.gif')  # what write_video / read_video handle
READ_EXTENSIONS = ('.mp4', '.m4v', '.mov', '.mkv', '.webm', '.avi', '.gif')
_MACRO_BLOCK = 16  # H.264 encodes 16x16 blocks; players choke on other sizes
_INSTALL_HINT = "pip install 'vdit_jax[video]'"
_AUDIO_CODEC = 'aac'  # the sound track of written mp4s: FFmpeg's own AAC encoder, mono
# A window's decoding starts this long before it: the frame after a seek lacks the one it
# overlaps (AAC's MDCT, Opus' pre-roll), so its samples are not kept.
_AUDIO_SEEK_MARGIN_S = 0.5
_AUDIO_PROBE_S = 0.5  # probe_audio decodes (and resamples) this much of the stream


class NoAudioError(ValueError):
  """The video file holds no audio stream (gifs never do)."""


class AudioDecodeError(ValueError):
  """The video file's audio stream cannot be decoded (the message names the file)."""


def _import_pil_image():
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'Reading and writing gif needs Pillow: {_INSTALL_HINT}') from e
  return Image


def _import_av():
  try:
    import av  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('Reading and writing mp4 (and reading other videos) needs PyAV: '
                      'pip install av') from e
  return av


def _extension(path) -> str:
  ext = os.path.splitext(os.fspath(path))[1].lower()
  if ext not in VIDEO_EXTENSIONS:
    raise ValueError(f'Cannot handle video file {os.fspath(path)!r}: the extension must be one '
                     f'of {VIDEO_EXTENSIONS}.')
  return ext


def to_uint8(video) -> np.ndarray:
  """Maps floats in [-1, 1] (values outside are clipped) to uint8 in [0, 255], any shape."""
  video = np.asarray(video)
  if not np.issubdtype(video.dtype, np.floating):
    raise ValueError(f'to_uint8 expects floats in [-1, 1], got dtype {video.dtype}.')
  if not np.all(np.isfinite(video)):
    raise ValueError('to_uint8 got NaN or infinite values; a video must be finite.')
  video = np.clip(video.astype(np.float32), -1.0, 1.0)
  return np.rint((video + 1.0) * 127.5).astype(np.uint8)


def _check_positive_int(name: str, value, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}.')
  return int(value)


def make_grid(videos, ncols: int | None = None, pad: int = 1, scale: int = 1, *,
              pad_value=0) -> np.ndarray:
  """Tiles N clips into one clip: [N, T, H, W, C] -> [T, H', W', C].

  Clip n sits in row n // ncols, column n % ncols. Each tile is first upscaled by `scale`
  (nearest neighbour), then tiles are separated by `pad` pixels of `pad_value`; empty cells
  of the last row are `pad_value` too. With R = ceil(N / ncols) rows:
    H' = R * H * scale + (R - 1) * pad,   W' = ncols * W * scale + (ncols - 1) * pad.

  Args:
    videos: [N, T, H, W, C] array of any dtype (uint8 from `to_uint8` for files).
    ncols: columns; default ceil(sqrt(N)).
    pad: pixels between tiles, >= 0.
    scale: integer upscaling factor, >= 1.
    pad_value: value of padding pixels (0 is black for uint8 clips).
  """
  videos = np.asarray(videos)
  if videos.ndim != 5:
    raise ValueError(f'make_grid expects videos of shape [N, T, H, W, C], got shape '
                     f'{videos.shape}.')
  n, t, h, w, c = videos.shape
  if n == 0:
    raise ValueError('make_grid got N=0 videos; it needs at least one.')
  ncols = math.ceil(math.sqrt(n)) if ncols is None else _check_positive_int('ncols', ncols)
  ncols = min(ncols, n)
  pad = _check_positive_int('pad', pad, minimum=0)
  scale = _check_positive_int('scale', scale)
  nrows = math.ceil(n / ncols)

  if scale > 1:
    videos = np.repeat(np.repeat(videos, scale, axis=2), scale, axis=3)  # [N, T, sH, sW, C]
    h, w = h * scale, w * scale
  grid_h = nrows * h + (nrows - 1) * pad
  grid_w = ncols * w + (ncols - 1) * pad
  grid = np.full((t, grid_h, grid_w, c), pad_value, dtype=videos.dtype)  # [T, H', W', C]
  for i in range(n):
    row, col = divmod(i, ncols)
    y, x = row * (h + pad), col * (w + pad)
    grid[:, y:y + h, x:x + w, :] = videos[i]
  return grid


def _check_frames(frames) -> np.ndarray:
  frames = np.asarray(frames)
  if frames.dtype != np.uint8:
    raise ValueError(f'write_video expects uint8 frames (use to_uint8), got dtype '
                     f'{frames.dtype}.')
  if frames.ndim != 4 or frames.shape[-1] not in (1, 3) or frames.shape[0] == 0:
    raise ValueError(f'write_video expects frames of shape [T, H, W, C] with T >= 1 and C in '
                     f'(1, 3), got shape {frames.shape}.')
  return frames


def _pad_to_macro_block(frames: np.ndarray) -> np.ndarray:
  """Pads bottom/right with black so H and W are multiples of 16."""
  _, h, w, _ = frames.shape
  pad_h = -h % _MACRO_BLOCK
  pad_w = -w % _MACRO_BLOCK
  if pad_h or pad_w:
    frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))  # [T, H16, W16, C]
  return frames


def _write_mp4(path: str, frames: np.ndarray, fps: float, audio: np.ndarray | None = None,
               sample_rate: int | None = None) -> None:
  """H.264 (libx264, yuv420p, CRF 5: imageio's quality 9) through PyAV, in this process;
  with `audio` (float32 [S] in [-1, 1]) also a mono AAC track at `sample_rate`.

  RGB becomes yuv420p by swscale's bicubic filter, as the ffmpeg command's scale filter did
  (the same bytes); PyAV's default, bilinear, left 13% more error on a sample grid.

  Both tracks start at time 0: sample k of `audio` plays at k / sample_rate, with frame t
  at t / fps. The AAC encoder's priming (1024 samples that precede the first real one in
  the stream) is recorded by the muxer in the track's edit list, which decoders apply.
  Audio is encoded after each frame up to that frame's end, so the muxer interleaves the
  tracks as it goes."""
  av = _import_av()
  if frames.shape[-1] == 1:
    frames = np.repeat(frames, 3, axis=-1)  # [T, H, W, 3]
  frames = _pad_to_macro_block(frames)  # [T, H16, W16, 3]
  _, h, w, _ = frames.shape
  with av.open(path, mode='w', format='mp4') as container:
    stream = container.add_stream('libx264', rate=fractions.Fraction(fps).limit_denominator())
    stream.width, stream.height, stream.pix_fmt = w, h, 'yuv420p'
    stream.options = {'crf': '5'}
    sound = None
    if audio is not None:
      sound = container.add_stream(_AUDIO_CODEC, rate=sample_rate)
      sound.layout = 'mono'
      container.start_encoding()  # opens the encoders: the AAC frame size is known now
    written = 0  # audio samples encoded so far
    bicubic = av.video.reformatter.Interpolation.BICUBIC
    for t, frame in enumerate(frames):
      yuv = av.VideoFrame.from_ndarray(frame, format='rgb24').reformat(
          format='yuv420p', interpolation=bicubic)
      container.mux(stream.encode(yuv))
      if sound is not None:
        until = min(len(audio), math.ceil((t + 1) * sample_rate / fps))
        written = _encode_audio(container, sound, audio, written, until, final=False)
    container.mux(stream.encode())  # the frames the encoder still holds
    if sound is not None:
      _encode_audio(container, sound, audio, written, len(audio), final=True)
      container.mux(sound.encode())  # the audio frames the encoder still holds


def _encode_audio(container, sound, audio: np.ndarray, start: int, stop: int,
                  final: bool) -> int:
  """Encodes and muxes audio[start:stop] in frames of the encoder's frame size (a shorter
  last one only when `final`); returns the sample after the last one encoded."""
  av = _import_av()
  size = sound.codec_context.frame_size or 1024
  rate = sound.codec_context.sample_rate
  while start < stop and (final or stop - start >= size):
    chunk = audio[start:start + min(size, stop - start)]  # [n]
    frame = av.AudioFrame.from_ndarray(chunk[None, :], format='fltp', layout='mono')  # [1, n]
    frame.sample_rate, frame.pts = rate, start
    frame.time_base = fractions.Fraction(1, rate)
    container.mux(sound.encode(frame))
    start += len(chunk)
  return start


def _write_gif(path: str, frames: np.ndarray, fps: float) -> None:
  image_lib = _import_pil_image()
  if frames.shape[-1] == 1:
    images = [image_lib.fromarray(f[..., 0]) for f in frames]
  else:
    images = [image_lib.fromarray(f) for f in frames]
  duration_ms = max(int(round(1000.0 / fps)), 10)
  images[0].save(path, format='GIF', save_all=True, append_images=images[1:],
                 duration=duration_ms, loop=0, optimize=False)


def _check_audio(audio, sample_rate, what: str):
  """(float32 [S] clipped to [-1, 1], sample rate) of a mono track; raises naming `what`."""
  audio = np.asarray(audio)
  if not np.issubdtype(audio.dtype, np.floating) or audio.ndim != 1 or audio.size == 0:
    raise ValueError(f'{what} expects audio as mono floats [S] in [-1, 1] with S >= 1, got '
                     f'dtype {audio.dtype} shape {audio.shape}.')
  if not np.all(np.isfinite(audio)):
    raise ValueError(f'{what} got NaN or infinite audio samples; audio must be finite.')
  sample_rate = _check_positive_int('sample_rate', sample_rate)
  return np.clip(audio.astype(np.float32), -1.0, 1.0), sample_rate  # [S]


def _check_aac_rate(sample_rate: int) -> None:
  av = _import_av()
  rates = av.codec.Codec(_AUDIO_CODEC, 'w').audio_rates
  if rates and sample_rate not in rates:
    raise ValueError(f'sample_rate={sample_rate} cannot be written to an mp4 sound track: '
                     f'AAC takes the rates {sorted(rates)}; resample the audio first.')


def write_video(path, frames, fps: float = 8, audio=None, sample_rate: int | None = None) -> str:
  """Writes uint8 frames [T, H, W, C] (C = 1 or 3) to `path` (.mp4 or .gif); returns the path.

  - .mp4: H.264 (libx264, yuv420p, CRF 5) through PyAV. H and W are padded with
    black at the bottom/right up to multiples of 16 so every player opens the file (upscale
    small clips first with `make_grid(..., scale=k)` to make them watchable). With `audio`
    the file also gets a mono AAC track at `sample_rate`: both tracks start at time 0, so
    sample k plays at k / sample_rate and frame t at t / fps (the tracks may differ in
    length; a player plays the longer one out).
  - .gif: Pillow, looping forever. Pillow merges consecutive identical frames into one
    longer frame (the total duration is kept), so reading back may give fewer frames. A gif
    has no sound: `audio` is checked, then ignored.

  `path` may be local or a bucket URL (gs://). The file appears complete or not at all:
  locally it is written to a temporary file in the same directory (parents created), then
  renamed; for a bucket, encoded into a local temporary file, then uploaded as one object.

  Args:
    path: where to write; the extension picks the format.
    frames: uint8 [T, H, W, C].
    fps: frames per second, > 0.
    audio: optional float [S] mono samples in [-1, 1] (values outside are clipped).
    sample_rate: samples per second of `audio`; required with it. An mp4 takes AAC's rates
      (8000, 16000, 22050, 44100, 48000, ...).
  """
  path = os.fspath(path)
  ext = _extension(path)
  frames = _check_frames(frames)
  if (isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not math.isfinite(fps)
      or fps <= 0):
    raise ValueError(f'fps must be a finite number > 0, got {fps!r}.')
  if audio is not None:
    audio, sample_rate = _check_audio(audio, sample_rate, 'write_video')  # [S]
    if ext == '.mp4':
      _check_aac_rate(sample_rate)
  elif sample_rate is not None:
    raise ValueError(f'write_video got sample_rate={sample_rate!r} but no audio; pass both or '
                     'neither.')
  with paths.local_file_for_write(path, suffix=ext) as local:
    if ext == '.mp4':
      _write_mp4(local, frames, fps, audio, sample_rate)
    else:
      _write_gif(local, frames, fps)
  return path


def mix_audio(waves) -> np.ndarray:
  """The soundtrack of a grid of clips: float [N, S] -> float32 [S].

  The N tracks are summed, so every clip is heard; where the sum's peak exceeds 1 the whole
  mix is scaled down by that peak (one gain for all samples: no clipping, no change of
  shape), so it stays in [-1, 1]. A mix that already peaks at <= 1 is the plain sum.
  """
  waves = np.asarray(waves)
  if not np.issubdtype(waves.dtype, np.floating) or waves.ndim != 2 or 0 in waves.shape:
    raise ValueError(f'mix_audio expects float waves [N, S] with N, S >= 1, got dtype '
                     f'{waves.dtype} shape {waves.shape}.')
  if not np.all(np.isfinite(waves)):
    raise ValueError('mix_audio got NaN or infinite samples; audio must be finite.')
  mix = waves.astype(np.float32).sum(axis=0)  # [S]
  peak = float(np.max(np.abs(mix)))
  return mix / np.float32(peak) if peak > 1.0 else mix  # [S]


_WAV_FULL_SCALE = 32767  # 16-bit PCM: sample value / 32767 is the float, both ways


def write_wav(path, audio, sample_rate: int) -> str:
  """Writes float audio [S] (mono) or [S, ch] in [-1, 1] as 16-bit PCM wav; returns the path.

  Values are clipped to [-1, 1] and rounded to the nearest of the 65535 levels
  k / 32767. Written whole through `parallel.paths` (local or gs://).
  """
  audio = np.asarray(audio)
  if (not np.issubdtype(audio.dtype, np.floating) or audio.ndim not in (1, 2)
      or 0 in audio.shape):
    raise ValueError(f'write_wav expects float audio [S] or [S, channels] in [-1, 1], got '
                     f'dtype {audio.dtype} shape {audio.shape}.')
  if not np.all(np.isfinite(audio)):
    raise ValueError('write_wav got NaN or infinite samples; audio must be finite.')
  sample_rate = _check_positive_int('sample_rate', sample_rate)
  channels = 1 if audio.ndim == 1 else audio.shape[1]
  pcm = np.rint(np.clip(audio, -1.0, 1.0) * _WAV_FULL_SCALE).astype('<i2')  # [S] | [S, ch]
  buffer = io.BytesIO()
  with wave.open(buffer, 'wb') as out:
    out.setnchannels(channels)
    out.setsampwidth(2)
    out.setframerate(sample_rate)
    out.writeframes(pcm.tobytes())
  return paths.write_bytes(os.fspath(path), buffer.getvalue())


def read_wav(path):
  """Reads a PCM wav: (float32 [S] for mono or [S, channels], sample rate).

  16-bit samples come back as value / 32767 (what `write_wav` wrote, exactly); 8-, 24- and
  32-bit PCM are scaled to [-1, 1] by their own full scale.
  """
  path = os.fspath(path)
  try:
    with wave.open(io.BytesIO(paths.read_bytes(path)), 'rb') as source:
      channels, width = source.getnchannels(), source.getsampwidth()
      sample_rate, data = source.getframerate(), source.readframes(source.getnframes())
  except (wave.Error, EOFError) as e:
    raise ValueError(f'{path!r} is not a PCM wav file ({e}).') from e
  if width == 1:  # unsigned
    audio = (np.frombuffer(data, np.uint8).astype(np.float32) - 128.0) / 127.0
  elif width == 2:
    audio = np.frombuffer(data, '<i2').astype(np.float32) / _WAV_FULL_SCALE
  elif width == 3:
    raw = np.frombuffer(data, np.uint8).reshape(-1, 3).astype(np.int32)  # [S * ch, 3]
    value = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
    value = np.where(value >= 1 << 23, value - (1 << 24), value)
    audio = value.astype(np.float32) / ((1 << 23) - 1)
  elif width == 4:
    audio = (np.frombuffer(data, '<i4').astype(np.float64) / ((1 << 31) - 1)).astype(np.float32)
  else:
    raise ValueError(f'{path!r} holds {8 * width}-bit samples; read_wav reads 8-, 16-, 24- and '
                     '32-bit PCM.')
  audio = np.clip(audio, -1.0, 1.0)  # the most negative level lies just below -1
  if channels > 1:
    audio = audio.reshape(-1, channels)  # [S, ch]
  return audio.astype(np.float32), sample_rate


@contextlib.contextmanager
def _open_file(path: str) -> Iterator:
  """The video at `path`: a local file name, or for a bucket URL a file object that
  `paths` opens (read in ranges as the decoder asks). Raises FileNotFoundError naming
  `path` if there is none."""
  if not paths.is_remote(path):
    if not paths.isfile(path):
      raise FileNotFoundError(f'No video file at {path!r}.')
    yield paths.normalize(path)
    return
  try:
    f = paths.path(path).open('rb')  # a missing object raises here
  except FileNotFoundError:
    raise FileNotFoundError(f'No video file at {path!r}.') from None
  with f:
    yield f


@contextlib.contextmanager
def _open_video(path: str) -> Iterator:
  """(PyAV input container, its first video stream) of the video at `path`."""
  av = _import_av()
  with _open_file(path) as source:
    with av.open(source, mode='r') as container:
      if not container.streams.video:
        raise ValueError(f'Video file {path!r} holds no video stream.')
      yield container, container.streams.video[0]


def _rgb(frame) -> np.ndarray:
  return frame.to_ndarray(format='rgb24')  # [H, W, 3] uint8


def _decode_from_start(stream_frames, wanted: list) -> dict:
  """{index: [H, W, 3]} of the `wanted` (sorted, unique) frames, counted from frame 0."""
  last, want = wanted[-1], set(wanted)
  found = {}
  for n, frame in enumerate(stream_frames):
    if n in want:
      found[n] = _rgb(frame)
    if n >= last:
      break
  return found


def _packet_table(container, stream):
  """(every frame's pts in presentation order, the keyframes' pts), from the packets
  alone (nothing decoded); None when the packets cannot name the frames: one without a
  timestamp, or two with the same."""
  pts, keyframes = [], []
  for packet in container.demux(stream):
    if packet.size == 0:  # the demuxer's final empty packet
      continue
    if packet.pts is None:
      return None
    if packet.is_discard:  # the decoder drops its frame (an edit list cuts it)
      continue
    pts.append(packet.pts)
    if packet.is_keyframe:
      keyframes.append(packet.pts)
  if len(set(pts)) != len(pts):
    return None
  return sorted(pts), sorted(keyframes)


def _one_keyframe(container, stream) -> bool:
  """True when an mp4 / mov holds a single keyframe: a seek could only land on frame 0.
  Their demuxer reads every sample into its index with the header; others (Matroska,
  whose cues come later) may not, so for them this says False."""
  return ('mp4' in container.format.name.split(',')
          and sum(1 for entry in stream.index_entries if entry.is_keyframe) == 1)


def _decode_after_seek(container, stream, wanted: list):
  """{index: [H, W, 3]} of the `wanted` (sorted, unique) frames, decoded from the last
  keyframe at or before the first of them; None where that cannot be done exactly (the
  caller then decodes from the start).

  Each decoded frame is named by its pts's rank among all the packets' pts. Frames before
  the keyframe in presentation order (an open GOP's leading frames, which would be decoded
  from missing references) are dropped. A seek that lands past the first wanted frame (a
  demuxer that compares decode timestamps) is retried from the keyframe before."""
  table = _packet_table(container, stream)
  if table is None:
    return None
  order, keyframes = table
  if wanted[-1] >= len(order):
    return None  # asks past the end: decoding from the start says how far it got
  rank = {p: i for i, p in enumerate(order)}
  want = set(wanted)
  starts = [p for p in keyframes if p <= order[wanted[0]]]
  for start in reversed(starts[-4:]):  # the last keyframe first, then up to 3 before it
    if rank[start] == 0:
      return None  # that is decoding from the start
    container.seek(start, stream=stream, backward=True, any_frame=False)
    found, first = {}, None
    for frame in container.decode(stream):
      index = rank.get(frame.pts)
      if index is None:
        return None
      if index < rank[start]:
        continue
      if first is None:
        first = index
        if first > wanted[0]:
          break  # landed too late: try the keyframe before
      if index in want:
        found[index] = _rgb(frame)
      if index >= wanted[-1]:
        break
    if first is not None and first <= wanted[0]:
      return found if len(found) == len(wanted) else None
  return None


def read_video(path) -> np.ndarray:
  """Reads an .mp4 or .gif into uint8 [T, H, W, 3] (grey gifs come back as RGB)."""
  path = os.fspath(path)
  ext = _extension(path)
  if ext == '.mp4':
    with _open_video(path) as (container, stream):
      frames = [_rgb(frame) for frame in container.decode(stream)]
    if not frames:
      raise ValueError(f'Video file {path!r} holds no frames.')
  else:
    frames = _read_gif(path, None)
  video = np.stack(frames)  # [T, H, W, 3]
  return video.astype(np.uint8)


def _read_gif(path: str, wanted) -> list:
  """The frames of a gif as uint8 [H, W, 3]: all, or those numbered `wanted` (sorted,
  unique) that it holds."""
  image_lib = _import_pil_image()
  frames = []
  with _open_file(path) as source:
    with image_lib.open(source) as image:
      available = int(getattr(image, 'n_frames', 1))
      for i in range(available) if wanted is None else wanted:
        if i >= available:
          break
        image.seek(i)
        frames.append(np.asarray(image.convert('RGB')))  # [H, W, 3]
  return frames


def _read_extension(path: str) -> str:
  ext = os.path.splitext(path)[1].lower()
  if ext not in READ_EXTENSIONS:
    raise ValueError(f'Cannot read video file {path!r}: the extension must be one of '
                     f'{READ_EXTENSIONS}.')
  return ext


def count_frames(path) -> int:
  """Number of frames of a video file, found by decoding it once (raises if it cannot).

  Serves as the readability probe of a file: a file that PyAV (or Pillow, for .gif)
  cannot open or decode raises (av's errors, which are ValueError or OSError, ...), one
  with no frames raises ValueError.
  """
  path = os.fspath(path)
  ext = _read_extension(path)
  if ext == '.gif':
    image_lib = _import_pil_image()
    with _open_file(path) as source:
      with image_lib.open(source) as image:
        count = int(getattr(image, 'n_frames', 1))
        image.seek(count - 1)
        image.load()  # decodes the last frame: a truncated file fails here
  else:
    with _open_video(path) as (container, stream):
      count = sum(1 for _ in container.decode(stream))
  if count < 1:
    raise ValueError(f'Video file {path!r} holds no frames.')
  return count


def read_frames(path, indices) -> np.ndarray:
  """Decodes the frames numbered `indices` of a video: uint8 [len(indices), H, W, 3].

  Indices may repeat and come in any order; every index must be < the file's frame count
  (`count_frames`), otherwise this raises. Decodes from the last keyframe at or before the
  smallest index (see the module doc) up to the largest, converting only the frames asked
  for to RGB.
  """
  path = os.fspath(path)
  ext = _read_extension(path)
  indices = np.asarray(indices, np.int64)  # [K]
  if indices.ndim != 1 or indices.size == 0 or indices.min() < 0:
    raise ValueError(f'read_frames needs a non-empty 1-D list of frame numbers >= 0, got '
                     f'{indices.tolist()!r}.')
  unique = sorted(set(indices.tolist()))
  if ext == '.gif':
    frames = _read_gif(path, unique)
  else:
    with _open_video(path) as (container, stream):
      if unique[0] == 0 or _one_keyframe(container, stream):
        found = _decode_from_start(container.decode(stream), unique)
      else:
        found = _decode_after_seek(container, stream, unique)
    if found is None:  # the packets could not name the frames: count them from the start
      with _open_video(path) as (container, stream):
        found = _decode_from_start(container.decode(stream), unique)
    frames = [found[i] for i in unique if i in found]  # decoded in order: a prefix
  if len(frames) != len(unique):
    raise ValueError(f'Video file {path!r} has no frame {unique[len(frames)]} (it ended '
                     f'after {len(frames)} of the {len(unique)} frames asked for).')
  by_index = dict(zip(unique, frames))
  return np.stack([by_index[i] for i in indices.tolist()])  # [K, H, W, 3]


def frame_rate(path) -> float:
  """Frames per second of a video's first video stream, from the container (nothing
  decoded): the stream's average rate, else the rate FFmpeg guesses; a gif's from its first
  frame's duration. Raises ValueError when the file states none."""
  path = os.fspath(path)
  ext = _read_extension(path)
  if ext == '.gif':
    image_lib = _import_pil_image()
    with _open_file(path) as source:
      with image_lib.open(source) as image:
        duration_ms = image.info.get('duration')
    if not duration_ms:
      raise ValueError(f'Video file {path!r} states no frame duration, so no frame rate.')
    return 1000.0 / float(duration_ms)
  with _open_video(path) as (_, stream):
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
      if rate:
        return float(rate)
  raise ValueError(f'Video file {path!r} states no frame rate.')


@contextlib.contextmanager
def _open_audio(path: str) -> Iterator:
  """(PyAV input container, its first audio stream) of the video at `path`; raises
  NoAudioError if it has none. Errors opening the file are raised as PyAV gives them."""
  if os.path.splitext(path)[1].lower() == '.gif':
    raise NoAudioError(f'Video file {path!r} holds no audio stream (a gif has no sound).')
  av = _import_av()
  with _open_file(path) as source:
    with av.open(source, mode='r') as container:
      if not container.streams.audio:
        raise NoAudioError(f'Video file {path!r} holds no audio stream.')
      yield container, container.streams.audio[0]


def has_audio(path) -> bool:
  """Whether the video file holds an audio stream (opened, not decoded: see probe_audio).
  A file that cannot be opened raises as PyAV gives the error."""
  path = os.fspath(path)
  try:
    with _open_audio(path):
      return True
  except NoAudioError:
    return False


def _video_origin_s(container) -> float:
  """Time 0 of the audio clock, in the container's seconds: the first video stream's start
  time (that of its first frame), or 0 for a file without video or a stated start."""
  if container.streams.video:
    video = container.streams.video[0]
    if video.start_time is not None and video.time_base is not None:
      return float(video.start_time * video.time_base)
  return 0.0


def _resampled_frames(container, stream, path: str, sample_rate: int, stop_s: float):
  """Yields the audio stream's frames from where the demuxer stands, as mono float32 at
  `sample_rate` (PyAV frames: pts in 1 / sample_rate), up to past `stop_s` (container
  seconds). PyAV's errors while demuxing, decoding or resampling become AudioDecodeError."""
  av = _import_av()
  resampler = av.AudioResampler(format='flt', layout='mono', rate=sample_rate)
  try:
    for packet in container.demux(stream):
      past = False
      for frame in packet.decode():
        past = past or (frame.pts is not None and frame.time_base is not None
                        and float(frame.pts * frame.time_base) > stop_s)
        yield from resampler.resample(frame)
      if past:
        break
    yield from resampler.resample(None)  # what the resampler still holds
  except av.error.FFmpegError as e:
    raise AudioDecodeError(f'The audio stream of video file {path!r} cannot be decoded '
                           f'({type(e).__name__}: {str(e).strip()[:300]}).') from e


def _read_audio(path: str, start_s: float, num_samples: int, sample_rate: int):
  """(float32 [num_samples] window, number of decoded frames seen): see read_audio."""
  out = np.zeros(num_samples, np.float32)  # [S]; silence where the stream does not reach
  with _open_audio(path) as (container, stream):
    origin = _video_origin_s(container)
    first_s = origin + start_s  # the window in container seconds: [first_s, stop_s)
    stop_s = first_s + num_samples / sample_rate
    seek_s = first_s - _AUDIO_SEEK_MARGIN_S
    if seek_s > 0 and stream.time_base is not None:
      try:
        container.seek(int(math.floor(seek_s / stream.time_base)), stream=stream,
                       backward=True, any_frame=False)
      except _import_av().error.FFmpegError:
        pass  # an unseekable file: decode from where the demuxer stands (the start)
    seen, cursor = 0, None  # cursor: the window index after the last sample placed
    for frame in _resampled_frames(container, stream, path, sample_rate, stop_s):
      seen += 1
      samples = frame.to_ndarray().reshape(-1)  # [n] ('flt', mono: [1, n])
      if frame.pts is not None and frame.time_base is not None:
        at = int(round((float(frame.pts * frame.time_base) - first_s) * sample_rate))
      else:  # no timestamp: it follows the frame before
        at = cursor if cursor is not None else int(round((origin - first_s) * sample_rate))
      cursor = at + len(samples)
      lo, hi = max(at, 0), min(cursor, num_samples)
      if lo < hi:
        out[lo:hi] = samples[lo - at:hi - at]
  return np.clip(out, -1.0, 1.0), seen


def read_audio(path, start_s: float, num_samples: int, sample_rate: int) -> np.ndarray:
  """A window of a video's sound: mono float32 [num_samples] in [-1, 1].

  Sample k is the sound at time start_s + k / sample_rate on the video's clock, where time
  0 is the start of the first video stream (its first frame: frame n of a constant-rate
  video is at n / fps). The file's first audio stream is decoded with PyAV and resampled
  (`av.AudioResampler`: channels mixed down to mono, rate converted to `sample_rate`);
  each decoded frame is placed by its timestamp, so an encoder's priming samples (which
  the container's edit list drops) and a track that starts late or ends early land where
  they play. Parts of the window the stream does not cover are 0. The file is read from
  half a second before the window (a seek), not from its start.

  Args:
    path: a video file, local or gs://.
    start_s: start of the window in seconds (may be negative: silence before time 0).
    num_samples: length of the window, >= 1.
    sample_rate: samples per second of the result, >= 1.

  Raises:
    NoAudioError: the file holds no audio stream.
    AudioDecodeError: its audio stream cannot be decoded (damaged packets).
  """
  path = os.fspath(path)
  if (isinstance(start_s, bool) or not isinstance(start_s, numbers.Real)
      or not math.isfinite(start_s)):
    raise ValueError(f'start_s must be a finite number of seconds, got {start_s!r}.')
  num_samples = _check_positive_int('num_samples', num_samples)
  sample_rate = _check_positive_int('sample_rate', sample_rate)
  return _read_audio(path, float(start_s), num_samples, sample_rate)[0]


def probe_audio(path, seconds: float = _AUDIO_PROBE_S, sample_rate: int = 16000):
  """Whether a video's sound can be read: (True, None), or (False, why not).

  Opens the file's first audio stream and decodes and resamples its first `seconds`
  (`read_audio`'s path); fails when there is no audio stream, a stream that decodes to no
  frame at all, or an error on the way. Damage later in the stream is found only when a
  window over it is read (read_audio raises AudioDecodeError then).
  """
  path = os.fspath(path)
  try:
    _, seen = _read_audio(path, 0.0, max(1, int(round(seconds * sample_rate))), sample_rate)
  except (NoAudioError, AudioDecodeError) as e:
    return False, str(e)
  except Exception as e:  # pylint: disable=broad-except  # the file cannot even be opened
    return False, f'{type(e).__name__}: {str(e).strip()[:300]}'
  if not seen:
    return False, f'The audio stream of video file {path!r} decodes to no samples.'
  return True, None
