r"""A simple detector for clips of one coloured shape on a dark background (the synthetic
data, and what models trained on it generate): dominant colour, a shape guess, and the
centroid's motion.

python -m vdit_jax.eval.detect clip.mp4      # prints one JSON line

Per frame, the background colour is the median of the border pixels; foreground pixels
differ from it by more than `threshold` (0..255 units, summed over RGB as a Euclidean
distance). Then
  colour     the palette colour (synthetic.COLOURS) nearest to the median foreground RGB
  shape      from the fill ratio area / bounding-box area of the object mask (below),
             median over frames: square ~1, circle ~pi/4, triangle ~1/2 (0.59-0.66 on
             the object mask, whose vote trims the apex)
  centroids  [T, 2] (x, y) in pixels, NaN where a frame has no foreground
  velocity   (vx, vy) px/frame: the mean displacement over the first `lead` frames
             (the synthetic label is the direction at frame 0; the shape may bounce
             off a wall from the second frame on, so `lead` is short)
  direction  right | left | down | up: the larger component of the velocity, by sign
             (synthetic.direction_step's table); 'unknown' for a still or unseen object

The object mask, which the shape is read from, is each frame's foreground after a 3x3
majority vote (a pixel stays when at least 5 of the 9 pixels at and around it are
foreground), then only its largest 8-connected component. A bounding box is set by its
outermost pixels, so on the raw foreground two stray pixels per frame, or pixel noise of
std 25, turn most squares and circles into 'triangles' (measured on data clips, see
BUILD_NOTES.md); the vote removes specks and one-pixel spurs and keeps solid regions.
detect(..., clean=False) reads the shape from the raw foreground, as before 2026-12-02.
Colour and centroids are read from the raw foreground in both cases.

`coherence` scores whether a clip shows one solid object per frame (connected components
of the foreground) rather than scattered fragments: what an undertrained model makes.
"""

import dataclasses
import json
import sys
from typing import Tuple

import numpy as np

from vdit_jax.data import synthetic

_PALETTE = np.array(list(synthetic.COLOURS.values()), np.float32)  # [K, 3]
# Fill-ratio boundaries. Raw foreground, halfway between the shapes' values: square 1 > 0.89
# > circle 0.785 > 0.64 > triangle 0.5. The object mask's vote trims corners and a triangle's
# apex, the more so the smaller the shape: on data clips (shapes 0.2-0.35 and 0.4-0.55 of
# the frame side) its medians are square 0.96-0.98, circle 0.79-0.80, triangle 0.59-0.66,
# and 0.72 lies above nine in ten triangles and below nine in ten circles at both sizes.
_SQUARE_MIN_FILL = 0.89
_CIRCLE_MIN_FILL = {False: 0.64, True: 0.72}  # by `clean`
CRISP_SHAPE_IOU = 0.85  # coherence's 'crisp': every frame's object fits its shape this well


@dataclasses.dataclass
class Detection:
  colour: str
  colour_rgb: Tuple[float, float, float]  # median foreground RGB, 0..255
  shape: str
  fill: float                             # median area / box of the mask shape is read from
  box: Tuple[float, float]                # median (height, width) px of that mask's box
  direction: str
  velocity: Tuple[float, float]           # (vx, vy) px/frame over the first frames
  centroids: np.ndarray                   # [T, 2] (x, y), NaN where nothing was found
  found: np.ndarray                       # bool [T]

  def summary(self) -> dict:
    return {'colour': self.colour, 'shape': self.shape, 'direction': self.direction,
            'velocity': [round(v, 3) for v in self.velocity], 'fill': round(self.fill, 3),
            'colour_rgb': [round(c, 1) for c in self.colour_rgb],
            'frames_found': int(self.found.sum())}


def to_uint8_range(frames) -> np.ndarray:
  """uint8 [T, H, W, 3] or float in [-1, 1] -> float32 in 0..255."""
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or min(frames.shape) < 1:
    raise ValueError(f'frames must be [T, H, W, 3] RGB, got shape {frames.shape}.')
  if frames.dtype == np.uint8:
    return frames.astype(np.float32)
  return (np.clip(frames.astype(np.float32), -1.0, 1.0) + 1.0) * 127.5


def foreground(frames, threshold: float = 60.0) -> np.ndarray:
  """bool [T, H, W]: pixels farther than `threshold` from their frame's border median."""
  return _foreground(to_uint8_range(frames), threshold)


def _foreground(x, threshold):  # x float32 [T, H, W, 3] in 0..255
  border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1)  # [T, P, 3]
  background = np.median(border, axis=1)  # [T, 3]
  return np.linalg.norm(x - background[:, None, None, :], axis=-1) > threshold


def object_mask(mask) -> np.ndarray:
  """bool [T, H, W]: per frame, the foreground `mask` [T, H, W] after a 3x3 majority vote
  (at least 5 of the 9 pixels at and around a pixel, counting outside the frame as
  background), then its largest 8-connected component. A frame that the vote empties
  keeps the largest component of its raw foreground."""
  mask = np.asarray(mask, bool)
  if mask.ndim != 3:
    raise ValueError(f'mask must be [T, H, W], got shape {mask.shape}.')
  _, h, w = mask.shape
  padded = np.pad(mask, ((0, 0), (1, 1), (1, 1))).astype(np.int32)
  votes = sum(padded[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))
  voted = votes >= 5  # [T, H, W]
  out = np.zeros_like(mask)
  for i, (m, v) in enumerate(zip(mask, voted)):
    source = v if v.any() else m
    if not source.any():
      continue
    labels = components(source)
    out[i] = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
  return out


def velocity_of(centroids, found, lead: int = 2) -> Tuple[float, float]:
  """Mean displacement (vx, vy) per frame between the first `lead` + 1 found frames;
  (nan, nan) with fewer than two."""
  idx = np.flatnonzero(found)[:lead + 1]
  if len(idx) < 2:
    return float('nan'), float('nan')
  vx, vy = (centroids[idx[-1]] - centroids[idx[0]]) / (idx[-1] - idx[0])  # px/frame
  return float(vx), float(vy)


def direction_of(velocity) -> str:
  """The synthetic direction whose unit step is closest to `velocity` (vx, vy): the one
  with the largest dot product. A diagonal tie goes to the horizontal direction; a
  non-finite velocity, or a zero one, is 'unknown'."""
  v = np.asarray(velocity, np.float64)
  if not np.all(np.isfinite(v)) or not np.any(v):
    return 'unknown'
  def score(direction):  # (dot product, then horizontal first)
    step = synthetic.direction_step(direction)
    return float(step @ v), step[0] != 0
  return max(synthetic.DIRECTIONS, key=score)


def detect(frames, threshold: float = 60.0, lead: int = 2, clean: bool = True) -> Detection:
  """Detects the shape in a clip [T, H, W, 3] (uint8, or float in [-1, 1]). clean=False:
  the shape from the raw foreground instead of the object mask."""
  x = to_uint8_range(frames)
  mask = _foreground(x, threshold)  # [T, H, W]
  t, h, w = mask.shape
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5  # pixel centres
  area = mask.sum(axis=(1, 2))  # [T]
  found = area > 0
  safe = np.maximum(area, 1)
  centroids = np.stack([(mask * xs).sum(axis=(1, 2)) / safe,
                        (mask * ys).sum(axis=(1, 2)) / safe], axis=-1)  # [T, 2]
  centroids[~found] = np.nan
  shape_mask = object_mask(mask) if clean else mask
  fills, boxes = [], []
  for i in np.flatnonzero(found):
    m = shape_mask[i]
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    boxes.append((rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1))
    fills.append(m.sum() / (boxes[-1][0] * boxes[-1][1]))
  fill = float(np.median(fills)) if fills else float('nan')
  box = tuple(float(v) for v in np.median(boxes, axis=0)) if boxes else (np.nan, np.nan)
  if not found.any():
    rgb = np.full(3, np.nan, np.float32)
    colour = shape = 'unknown'
  else:
    rgb = np.median(x[mask], axis=0)  # [3]
    colour = list(synthetic.COLOURS)[int(np.argmin(np.linalg.norm(_PALETTE - rgb, axis=-1)))]
    shape = ('square' if fill >= _SQUARE_MIN_FILL else
             'circle' if fill >= _CIRCLE_MIN_FILL[clean] else 'triangle')
  velocity = velocity_of(centroids, found, lead)
  return Detection(colour=colour, colour_rgb=tuple(float(c) for c in rgb), shape=shape,
                   fill=fill, box=box, direction=direction_of(velocity), velocity=velocity,
                   centroids=centroids, found=found)


def label_hits(videos, labels, threshold: float = 60.0) -> Tuple[np.ndarray, np.ndarray]:
  """Per clip, whether the detected shape and direction are its class label's
  (shape * len(DIRECTIONS) + direction, as the synthetic source labels): two bool [N]."""
  found = [detect(v, threshold) for v in videos]
  n = len(synthetic.DIRECTIONS)
  shape = np.array([d.shape == synthetic.SHAPES[l // n] for d, l in zip(found, labels)], bool)
  direction = np.array([d.direction == synthetic.DIRECTIONS[l % n]
                        for d, l in zip(found, labels)], bool)
  return shape, direction


def ideal_masks(box_mask) -> dict:
  """{shape name: bool [H, W]}: the ideal square, circle (an ellipse) and apex-up triangle
  that fill the bounding box of the bool [H, W] `box_mask` (pixel centres inside)."""
  m = np.asarray(box_mask, bool)
  h, w = m.shape
  rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
  top, bottom, left, right = rows[0], rows[-1] + 1.0, cols[0], cols[-1] + 1.0
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
  cx, cy = (left + right) / 2, (top + bottom) / 2
  half_w, half_h = (right - left) / 2, (bottom - top) / 2
  in_box = (xs >= left) & (xs <= right) & (ys >= top) & (ys <= bottom)
  return {'square': in_box,
          'circle': ((xs - cx) / half_w) ** 2 + ((ys - cy) / half_h) ** 2 <= 1.0,
          'triangle': in_box & (np.abs(xs - cx) <= half_w * (ys - top) / (2 * half_h))}


def shape_fit(mask) -> Tuple[str, float]:
  """(shape, IoU): the ideal shape (`ideal_masks`) that best fits a bool [H, W] object
  mask, and its IoU with the mask; ('unknown', 0.0) for an empty mask. Data clips fit
  with IoU 0.9 and more; ragged or fading objects fit worse."""
  m = np.asarray(mask, bool)
  if not m.any():
    return 'unknown', 0.0
  ious = {k: float((m & v).sum() / (m | v).sum()) for k, v in ideal_masks(m).items()}
  best = max(ious, key=ious.get)
  return best, ious[best]


def components(mask) -> np.ndarray:
  """int32 [H, W] labels of the 8-connected components of a bool [H, W] mask: 0 is
  background, the components are 1, 2, ... in raster order of their first pixel."""
  mask = np.asarray(mask, bool)
  if mask.ndim != 2:
    raise ValueError(f'mask must be [H, W], got shape {mask.shape}.')
  h, w = mask.shape
  labels = np.zeros((h, w), np.int32)
  count = 0
  for y0, x0 in zip(*np.nonzero(mask)):
    if labels[y0, x0]:
      continue
    count += 1
    labels[y0, x0] = count
    stack = [(y0, x0)]
    while stack:
      y, x = stack.pop()
      for ny in range(max(y - 1, 0), min(y + 2, h)):
        for nx in range(max(x - 1, 0), min(x + 2, w)):
          if mask[ny, nx] and not labels[ny, nx]:
            labels[ny, nx] = count
            stack.append((ny, nx))
  return labels


def coherence(frames, threshold: float = 60.0, min_pixels: int = 3) -> dict:
  """How much a clip looks like ONE solid object per frame (the synthetic data) rather
  than scattered fragments. Per frame: the foreground's 8-connected components of at
  least `min_pixels` pixels (smaller ones are counted as specks, not objects). Returns
    components       mean number of components per frame (data: 1)
    largest_share    mean share of the foreground pixels in the largest component
                     (frames with foreground only; data: 1)
    one_object       share of frames with exactly one component holding >= 90% of the
                     foreground (data: 1)
    empty            share of frames with no foreground
    iou              mean IoU of the largest component between consecutive frames
                     where both have one (data: high, < 1 as the shape moves)
    shape_iou        mean over frames of the IoU of the largest component with the ideal
                     shape that fits it best (`shape_fit`; 0 for an empty frame). Data
                     clips: 0.93-1.0 per shape; every frame >= 0.875 at configs/tiny.py's
                     sizes, >= 0.75 at the default (smaller) ones
    crisp            1.0 when every frame holds one object whose shape_iou is >= 0.85
                     (the issue-26 goal per clip), else 0.0
  """
  mask = foreground(frames, threshold)  # [T, H, W]
  counts, shares, single, biggest = [], [], [], []
  for m in mask:
    labels = components(m)
    sizes = np.bincount(labels.ravel())[1:]  # [components]
    kept = np.flatnonzero(sizes >= min_pixels)
    counts.append(len(kept))
    total = int(m.sum())
    if total == 0 or len(kept) == 0:
      shares.append(np.nan)
      single.append(False)
      biggest.append(None)
      continue
    top = int(np.argmax(sizes))
    share = float(sizes[top]) / total
    shares.append(share)
    single.append(len(kept) == 1 and share >= 0.9)
    biggest.append(labels == top + 1)
  ious = [float((a & b).sum() / (a | b).sum()) for a, b in zip(biggest, biggest[1:])
          if a is not None and b is not None]
  fits = [0.0 if b is None else shape_fit(b)[1] for b in biggest]
  shares = np.asarray(shares, np.float64)
  return {'components': float(np.mean(counts)),
          'largest_share': float(np.nanmean(shares)) if np.isfinite(shares).any() else 0.0,
          'one_object': float(np.mean(single)),
          'empty': float(np.mean(~mask.any(axis=(1, 2)))),
          'iou': float(np.mean(ious)) if ious else 0.0,
          'shape_iou': float(np.mean(fits)),
          'crisp': float(all(single) and min(fits) >= CRISP_SHAPE_IOU)}


def main(argv):
  if len(argv) != 2:
    raise SystemExit('usage: python -m vdit_jax.eval.detect CLIP.(mp4|gif)')
  from vdit_jax.data import video_io  # pylint: disable=g-import-not-at-top
  print(json.dumps(detect(video_io.read_video(argv[1])).summary()))


if __name__ == '__main__':
  main(sys.argv)
