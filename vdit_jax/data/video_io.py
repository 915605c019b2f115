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

PyAV is required (its wheels carry FFmpeg with libx264). Pillow is optional: it is
imported only for .gif, and installed with `pip install 'vdit_jax[video]'`.
"""

from __future__ import annotations

import contextlib
import fractions
import math
import numbers
import os
from typing import Iterator

import numpy as np

from vdit_jax.parallel import paths

VIDEO_EXTENSIONS = ('.mp4', '.gif')  # what write_video / read_video handle
READ_EXTENSIONS = ('.mp4', '.m4v', '.mov', '.mkv', '.webm', '.avi', '.gif')
_MACRO_BLOCK = 16  # H.264 encodes 16x16 blocks; players choke on other sizes
_INSTALL_HINT = "pip install 'vdit_jax[video]'"


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


def _write_mp4(path: str, frames: np.ndarray, fps: float) -> None:
  """H.264 (libx264, yuv420p, CRF 5: imageio's quality 9) through PyAV, in this process.

  RGB becomes yuv420p by swscale's bicubic filter, as the ffmpeg command's scale filter did
  (the same bytes); PyAV's default, bilinear, left 13% more error on a sample grid."""
  av = _import_av()
  if frames.shape[-1] == 1:
    frames = np.repeat(frames, 3, axis=-1)  # [T, H, W, 3]
  frames = _pad_to_macro_block(frames)  # [T, H16, W16, 3]
  _, h, w, _ = frames.shape
  with av.open(path, mode='w', format='mp4') as container:
    stream = container.add_stream('libx264', rate=fractions.Fraction(fps).limit_denominator())
    stream.width, stream.height, stream.pix_fmt = w, h, 'yuv420p'
    stream.options = {'crf': '5'}
    bicubic = av.video.reformatter.Interpolation.BICUBIC
    for frame in frames:
      yuv = av.VideoFrame.from_ndarray(frame, format='rgb24').reformat(
          format='yuv420p', interpolation=bicubic)
      container.mux(stream.encode(yuv))
    container.mux(stream.encode())  # the frames the encoder still holds


def _write_gif(path: str, frames: np.ndarray, fps: float) -> None:
  image_lib = _import_pil_image()
  if frames.shape[-1] == 1:
    images = [image_lib.fromarray(f[..., 0]) for f in frames]
  else:
    images = [image_lib.fromarray(f) for f in frames]
  duration_ms = max(int(round(1000.0 / fps)), 10)
  images[0].save(path, format='GIF', save_all=True, append_images=images[1:],
                 duration=duration_ms, loop=0, optimize=False)


def write_video(path, frames, fps: float = 8) -> str:
  """Writes uint8 frames [T, H, W, C] (C = 1 or 3) to `path` (.mp4 or .gif); returns the path.

  - .mp4: H.264 (libx264, yuv420p, CRF 5) through PyAV. H and W are padded with
    black at the bottom/right up to multiples of 16 so every player opens the file (upscale
    small clips first with `make_grid(..., scale=k)` to make them watchable).
  - .gif: Pillow, looping forever. Pillow merges consecutive identical frames into one
    longer frame (the total duration is kept), so reading back may give fewer frames.

  `path` may be local or a bucket URL (gs://). The file appears complete or not at all:
  locally it is written to a temporary file in the same directory (parents created), then
  renamed; for a bucket, encoded into a local temporary file, then uploaded as one object.
  """
  path = os.fspath(path)
  ext = _extension(path)
  frames = _check_frames(frames)
  if (isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not math.isfinite(fps)
      or fps <= 0):
    raise ValueError(f'fps must be a finite number > 0, got {fps!r}.')
  with paths.local_file_for_write(path, suffix=ext) as local:
    if ext == '.mp4':
      _write_mp4(local, frames, fps)
    else:
      _write_gif(local, frames, fps)
  return path


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
