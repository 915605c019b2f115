"""Writing and reading clips: [-1, 1] floats -> uint8, grids of samples, mp4 / gif files.

    frames = make_grid(to_uint8(samples), ncols=4, scale=4)   # [T, H', W', C]
    write_video('samples/step_1000.mp4', frames, fps=8)
    n = count_frames('clip.webm')                             # decodes once, raises if broken
    clip = read_frames('clip.webm', [0, 2, 4, 6])             # [4, H, W, 3] uint8

Writing handles .mp4 and .gif; reading (`count_frames`, `read_frames`) handles every
extension in READ_EXTENSIONS: .gif through Pillow, the rest through the ffmpeg binary that
imageio-ffmpeg ships (run directly by `subprocess.run`, one process per call, never with a
`preexec_fn`: that would fork the multi-threaded JAX process, which JAX warns about).

Paths may be local or bucket URLs (gs://, through `parallel.paths`). ffmpeg needs a seekable
file (an mp4's index may sit at its end), so a bucket video is downloaded whole to a local
temporary file for each call and removed after it: the bytes ffmpeg would read anyway, plus
one local write. A video written to a bucket is encoded into a local temporary file and
uploaded as one object.

imageio-ffmpeg (for its ffmpeg binary) and Pillow are optional: they are imported only when
a file is written or read, and installed with `pip install 'vdit_jax[video]'`.
"""

from __future__ import annotations

import contextlib
import fractions
import math
import numbers
import os
import subprocess
from typing import Iterator, Optional

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
  """H.264 at CRF 5 (imageio's quality 9), the raw RGB frames piped to ffmpeg's stdin by
  `_run_ffmpeg`: imageio's writer starts ffmpeg with a preexec_fn, which forks the whole
  (multi-threaded) process and made JAX warn that os.fork() was called."""
  if frames.shape[-1] == 1:
    frames = np.repeat(frames, 3, axis=-1)  # [T, H, W, 3]
  frames = _pad_to_macro_block(frames)  # [T, H16, W16, 3]
  _, h, w, _ = frames.shape
  rate = str(fractions.Fraction(fps).limit_denominator())
  _run_ffmpeg(['-y', '-f', 'rawvideo', '-vcodec', 'rawvideo', '-s', f'{w}x{h}',
               '-pix_fmt', 'rgb24', '-r', rate, '-i', '-', '-an', '-vcodec', 'libx264',
               '-pix_fmt', 'yuv420p', '-crf', '5', path],
              stdin_bytes=np.ascontiguousarray(frames, np.uint8).tobytes())


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

  - .mp4: H.264 (libx264, yuv420p, CRF 5) through imageio-ffmpeg's binary. H and W are padded with
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
def _local_video(path: str) -> Iterator[str]:
  """A local file holding the video at `path`: the file itself, or for a bucket URL a
  download removed after the block. Raises FileNotFoundError naming `path` if it is none."""
  if not paths.is_remote(path) and not paths.isfile(path):
    raise FileNotFoundError(f'No video file at {path!r}.')
  with contextlib.ExitStack() as stack:
    try:
      local = stack.enter_context(paths.local_copy(path))  # a missing object raises here
    except FileNotFoundError:
      raise FileNotFoundError(f'No video file at {path!r}.') from None
    yield local


def read_video(path) -> np.ndarray:
  """Reads an .mp4 or .gif into uint8 [T, H, W, 3] (grey gifs come back as RGB)."""
  path = os.fspath(path)
  ext = _extension(path)
  with _local_video(path) as local:
    if ext == '.mp4':  # every frame as PPM images through `_run_ffmpeg` (no fork)
      frames = _parse_ppm_stream(_run_ffmpeg(['-i', local, '-map', '0:v:0',
                                              '-fps_mode', 'passthrough', '-f', 'image2pipe',
                                              '-c:v', 'ppm', '-']))
      if not frames:
        raise ValueError(f'Video file {path!r} holds no frames.')
    else:
      image_lib = _import_pil_image()
      frames = []
      with image_lib.open(local) as image:
        for i in range(getattr(image, 'n_frames', 1)):
          image.seek(i)
          frames.append(np.asarray(image.convert('RGB')))
  video = np.stack(frames)  # [T, H, W, 3]
  return video.astype(np.uint8)


def _read_extension(path: str) -> str:
  ext = os.path.splitext(path)[1].lower()
  if ext not in READ_EXTENSIONS:
    raise ValueError(f'Cannot read video file {path!r}: the extension must be one of '
                     f'{READ_EXTENSIONS}.')
  return ext


def _run_ffmpeg(args, stdin_bytes: Optional[bytes] = None) -> bytes:
  """Runs the ffmpeg binary of imageio-ffmpeg; returns stdout, raises with its error log.

  Called through plain `subprocess.run` (no `preexec_fn`, unlike imageio-ffmpeg's own
  readers and writer), so starting it from a multi-threaded process (JAX, grain threads)
  is safe. `stdin_bytes`: what ffmpeg reads as input `-` (else its stdin is closed).
  """
  try:
    import imageio_ffmpeg  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'Reading videos needs imageio-ffmpeg: {_INSTALL_HINT}') from e
  if stdin_bytes is None:
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), '-nostdin', '-hide_banner', '-v', 'error', *args]
    result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, check=False)
  else:
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), '-hide_banner', '-v', 'error', *args]
    result = subprocess.run(cmd, input=stdin_bytes, capture_output=True, check=False)
  if result.returncode != 0:
    log = result.stderr.decode(errors='replace').strip().splitlines()
    raise RuntimeError(f'ffmpeg exited with status {result.returncode}: '
                       f'{log[-1] if log else "(no message)"}')
  return result.stdout


def count_frames(path) -> int:
  """Number of frames of a video file, found by decoding it once (raises if it cannot).

  Serves as the readability probe of a file: a file that ffmpeg (or Pillow, for .gif)
  cannot open or decode raises (RuntimeError, OSError, ...), one with no frames raises
  ValueError.
  """
  path = os.fspath(path)
  ext = _read_extension(path)
  with _local_video(path) as local:
    if ext == '.gif':
      image_lib = _import_pil_image()
      with image_lib.open(local) as image:
        count = int(getattr(image, 'n_frames', 1))
        image.seek(count - 1)
        image.load()  # decodes the last frame: a truncated file fails here
    else:
      # -progress writes key=value lines; the last 'frame=' is the number decoded.
      out = _run_ffmpeg(['-i', local, '-map', '0:v:0', '-f', 'null', '-progress', 'pipe:1',
                         '-nostats', '-'])
      counts = [line[6:] for line in out.decode(errors='replace').splitlines()
                if line.startswith('frame=')]
      count = int(counts[-1]) if counts else 0
  if count < 1:
    raise ValueError(f'Video file {path!r} holds no frames.')
  return count


def _parse_ppm_stream(data: bytes) -> list:
  """Binary PPM images (P6, maxval 255) one after another -> list of uint8 [H, W, 3]."""
  frames, pos = [], 0
  while pos < len(data):
    fields = []
    while len(fields) < 4:  # magic, width, height, maxval, separated by whitespace
      while data[pos:pos + 1].isspace():
        pos += 1
      end = pos
      while end < len(data) and not data[end:end + 1].isspace():
        end += 1
      fields.append(data[pos:end])
      pos = end
    pos += 1  # the single whitespace byte before the pixels
    if fields[0] != b'P6' or fields[3] != b'255':
      raise ValueError(f'unexpected frame header {fields!r} from ffmpeg (wanted P6, 255).')
    width, height = int(fields[1]), int(fields[2])
    size = width * height * 3
    if pos + size > len(data):
      raise ValueError('ffmpeg output ends inside a frame.')
    frames.append(np.frombuffer(data, np.uint8, size, pos).reshape(height, width, 3))
    pos += size
  return frames


def read_frames(path, indices) -> np.ndarray:
  """Decodes the frames numbered `indices` of a video: uint8 [len(indices), H, W, 3].

  Indices may repeat and come in any order; every index must be < the file's frame count
  (`count_frames`), otherwise this raises. Decodes from the start up to the largest
  index; ffmpeg passes on only the frames asked for (its `select` filter), as PPM images.
  """
  path = os.fspath(path)
  ext = _read_extension(path)
  indices = np.asarray(indices, np.int64)  # [K]
  if indices.ndim != 1 or indices.size == 0 or indices.min() < 0:
    raise ValueError(f'read_frames needs a non-empty 1-D list of frame numbers >= 0, got '
                     f'{indices.tolist()!r}.')
  unique = sorted(set(indices.tolist()))
  with _local_video(path) as local:
    if ext == '.gif':
      image_lib = _import_pil_image()
      frames = []
      with image_lib.open(local) as image:
        available = int(getattr(image, 'n_frames', 1))
        for i in unique:
          if i >= available:
            break
          image.seek(i)
          frames.append(np.asarray(image.convert('RGB')))  # [H, W, 3]
    else:
      select = '+'.join(f'eq(n\\,{i})' for i in unique)
      out = _run_ffmpeg(['-i', local, '-map', '0:v:0', '-vf', f'select={select}',
                         '-fps_mode', 'passthrough', '-frames:v', str(len(unique)),
                         '-f', 'image2pipe', '-c:v', 'ppm', '-'])
      frames = _parse_ppm_stream(out)
  if len(frames) != len(unique):
    raise ValueError(f'Video file {path!r} has no frame {unique[len(frames)]} (it ended '
                     f'after {len(frames)} of the {len(unique)} frames asked for).')
  by_index = dict(zip(unique, frames))
  return np.stack([by_index[i] for i in indices.tolist()])  # [K, H, W, 3]
