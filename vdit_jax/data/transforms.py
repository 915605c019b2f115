"""Clip transforms on uint8 frames: which frames make a clip, and resize + crop to H x W.

    idx = clip_frame_indices(num_available=120, num_frames=16, frame_stride=2,
                             start='random', rng=rng)                  # [T] frame numbers
    clip = resize_and_crop(frames, height=32, width=32, crop='center')  # [T, 32, 32, C]

Temporal rule: a clip is frames start, start + s, ..., start + (T - 1) * s of the video
(s = frame_stride). `start` is the middle of the valid range ('center') or uniform in it
('random'). A video shorter than the span (T - 1) * s + 1 starts at 0 and every frame past
its end is its LAST frame repeated (the clip is padded; it is not skipped).

Spatial rule: the frame is scaled by max(H / h, W / w), so the short side (relative to the
target aspect) fits exactly and the other side covers the target, then cropped to H x W
in the middle ('center') or at a uniform offset ('random'). Crop and scale happen in one
Pillow resize over the source box (bilinear, antialiased when shrinking); where no scaling
is needed (one side already fits exactly) the crop is a plain array slice, so same-size
frames pass through unchanged.

Randomness comes only from the `rng` argument (a `np.random.Generator`), so a caller that
derives it from (seed, index) gets the same clip every time.
"""

from __future__ import annotations

import numbers

import numpy as np

CLIP_STARTS = ('random', 'center')
CROPS = ('center', 'random')


def _check_int(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}.')
  return int(value)


def _check_choice(name: str, value, choices) -> str:
  if value not in choices:
    raise ValueError(f'{name}={value!r} is not one of {choices}.')
  return value


def clip_span(num_frames: int, frame_stride: int) -> int:
  """Source frames one clip covers: (T - 1) * s + 1."""
  return (num_frames - 1) * frame_stride + 1


def clip_frame_indices(num_available: int, num_frames: int, frame_stride: int = 1,
                       start: str = 'center', rng: np.random.Generator | None = None
                       ) -> np.ndarray:
  """Frame numbers of one clip from a video of `num_available` frames: int64 [T].

  Indices past the end of a short video are clamped to its last frame (the padding rule).
  `rng` is needed for start='random' only.
  """
  num_available = _check_int('num_available', num_available, 1)
  num_frames = _check_int('num_frames', num_frames, 1)
  frame_stride = _check_int('frame_stride', frame_stride, 1)
  _check_choice('clip start', start, CLIP_STARTS)
  max_start = max(num_available - clip_span(num_frames, frame_stride), 0)
  if start == 'center':
    first = max_start // 2
  else:
    if rng is None:
      raise ValueError("clip start 'random' needs an rng (np.random.Generator).")
    first = int(rng.integers(0, max_start + 1))
  indices = first + frame_stride * np.arange(num_frames, dtype=np.int64)  # [T]
  return np.minimum(indices, num_available - 1)  # [T]


def _import_pil_image():
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("Resizing video frames needs Pillow: pip install 'vdit_jax[video]'") from e
  return Image


def resize_and_crop(frames, height: int, width: int, crop: str = 'center',
                    rng: np.random.Generator | None = None) -> np.ndarray:
  """Short-side resize then crop: uint8 [T, h, w, C] -> uint8 [T, height, width, C].

  C is 1 or 3. `rng` is needed for crop='random' only.
  """
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] not in (1, 3):
    raise ValueError(f'resize_and_crop expects uint8 frames [T, h, w, C] with C in (1, 3), '
                     f'got dtype {frames.dtype} shape {frames.shape}.')
  if min(frames.shape[:3]) < 1:
    raise ValueError(f'resize_and_crop got an empty clip of shape {frames.shape}.')
  height = _check_int('height', height, 1)
  width = _check_int('width', width, 1)
  _check_choice('crop', crop, CROPS)
  if crop == 'random' and rng is None:
    raise ValueError("crop 'random' needs an rng (np.random.Generator).")
  _, h, w, _ = frames.shape
  scale = max(height / h, width / w)
  # The source box that maps onto the target, in source pixels.
  box_h, box_w = min(height / scale, h), min(width / scale, w)
  u = rng.random(2) if crop == 'random' else np.full(2, 0.5)  # [2] offset fractions

  if scale == 1.0:  # one side fits exactly and the other is at least as large: slice
    top = int(np.floor(u[0] * (h - height + 1))) if crop == 'random' else (h - height) // 2
    left = int(np.floor(u[1] * (w - width + 1))) if crop == 'random' else (w - width) // 2
    return np.ascontiguousarray(frames[:, top:top + height, left:left + width])

  top, left = u[0] * (h - box_h), u[1] * (w - box_w)
  box = (left, top, left + box_w, top + box_h)
  image_lib = _import_pil_image()
  out = np.empty((frames.shape[0], height, width, frames.shape[-1]), np.uint8)  # [T, H, W, C]
  for i, frame in enumerate(frames):
    image = image_lib.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame)
    resized = np.asarray(image.resize((width, height), image_lib.Resampling.BILINEAR, box=box))
    out[i] = resized.reshape(height, width, -1)
  return out
