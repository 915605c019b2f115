r"""Showed: the object mask reads the shape of damaged clips that the raw foreground misreads.

With 2 stray pixels per frame the shape accuracy is 1.000 against 0.353 (docs/results.md,
"Reading the shape: stray pixels, and the object mask"). How well does
vdit_jax/eval/detect.py read the shape of clips that are not clean? Data clips of known
shape are damaged the ways generated clips are (blur, pixel noise, stray pixels) and the
shape is read from the raw foreground (detect(..., clean=False), the reading before
2026-12-02) and from the object mask (the default).

python experiments/detector_robustness.py [--num_clips=150]

Each damaged clip is made once and read both ways. Both shape sizes of the configs are
used: 0.2-0.35 of the frame side (the default data) and 0.4-0.55 (configs/tiny.py and the
configs built on it). Prints the accuracies and the median fill ratio per shape, then one
JSON line. A measurement, not a test (tests/detect_test.py holds the tests).
"""

import json
import os
import sys

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vdit_jax.data import synthetic  # pylint: disable=g-import-not-at-top
from vdit_jax.eval import detect

FLAGS = flags.FLAGS
flags.DEFINE_integer('num_clips', 150, 'Data clips per shape size.')
flags.DEFINE_integer('seed', 11, 'Seed of the clips and of the damage.')

SIZES = {'small (0.2-0.35)': (0.2, 0.35), 'big (0.4-0.55)': (0.4, 0.55)}


def _blur(video, sigma):
  """Separable Gaussian blur over H and W of float [T, H, W, C] (edges padded by copy)."""
  radius = int(np.ceil(3 * sigma))
  kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  kernel /= kernel.sum()
  for axis in (1, 2):
    pad = [(0, 0)] * video.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(video, pad, mode='edge')
    video = sum(w * np.take(padded, np.arange(i, i + video.shape[axis]), axis=axis)
                for i, w in enumerate(kernel))
  return video


def _specks(video, count, rng):
  """`count` stray pixels of random bright colours in every frame."""
  video = video.copy()
  _, h, w, _ = video.shape
  for frame in video:
    ys, xs = rng.integers(0, h, count), rng.integers(0, w, count)
    frame[ys, xs] = rng.integers(100, 256, (count, 3))
  return video


DAMAGES = {
    'none': lambda v, rng: v,
    'blur 0.7 px': lambda v, rng: _blur(v, 0.7),
    'blur 1.2 px': lambda v, rng: _blur(v, 1.2),
    'noise std 25': lambda v, rng: v + rng.normal(0.0, 25.0, v.shape),
    'noise std 40': lambda v, rng: v + rng.normal(0.0, 40.0, v.shape),
    '2 specks/frame': lambda v, rng: _specks(v, 2, rng),
    '5 specks/frame': lambda v, rng: _specks(v, 5, rng),
    'blur 0.7 + noise 25 + 5 specks': lambda v, rng: _specks(
        _blur(v, 0.7) + rng.normal(0.0, 25.0, v.shape), 5, rng),
}


def main(argv):
  del argv
  out = {}
  for size_name, size in SIZES.items():
    source = synthetic.SyntheticShapes(8, 32, 32, num_examples=FLAGS.num_clips,
                                       seed=FLAGS.seed, shape_size=size)
    clips = [source[i] for i in range(len(source))]
    print(f'shape size {size_name}, {len(clips)} data clips of 8x32x32')
    for damage_name, damage in DAMAGES.items():
      rng = np.random.default_rng(FLAGS.seed)
      row = {}
      for clean in (False, True):
        row[clean] = {'hits': 0, 'fill': {s: [] for s in synthetic.SHAPES}}
      for c in clips:
        video = np.clip(damage(c['video'].astype(np.float32), rng), 0, 255).astype(np.uint8)
        truth = synthetic.SHAPES[c['shape']]
        for clean in (False, True):
          d = detect.detect(video, clean=clean)
          row[clean]['hits'] += d.shape == truth
          row[clean]['fill'][truth].append(d.fill)
      result = {}
      for clean, name in ((False, 'raw'), (True, 'object_mask')):
        result[name] = {'accuracy': row[clean]['hits'] / len(clips),
                        'median_fill': {s: float(np.median(f)) for s, f in
                                        row[clean]['fill'].items()}}
      out.setdefault(size_name, {})[damage_name] = result
      fills = lambda r: '/'.join(f'{v:.2f}' for v in r['median_fill'].values())
      print(f'  {damage_name:>31}: shape accuracy raw {result["raw"]["accuracy"]:.3f}, '
            f'object mask {result["object_mask"]["accuracy"]:.3f}   (median fill square/'
            f'circle/triangle raw {fills(result["raw"])}, object mask '
            f'{fills(result["object_mask"])})')
  print(json.dumps(out))


if __name__ == '__main__':
  app.run(main)
