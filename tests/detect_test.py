"""tools/detect.py on synthetic clips, where colour, shape and direction are known."""

import numpy as np
import pytest

from vdit_jax.data import synthetic
from vdit_jax.eval import detect


def test_detector_recovers_the_synthetic_labels():
  source = synthetic.SyntheticShapes(16, 32, 32, num_examples=120, seed=11)
  hits = {'colour': 0, 'shape': 0, 'direction': 0}
  noise = np.random.default_rng(0)
  for i in range(len(source)):
    ex = source[i]
    video = ex['video'].astype(np.float32) / 127.5 - 1.0  # the model's [-1, 1] scale
    video += noise.normal(0.0, 0.05, video.shape).astype(np.float32)  # sampler-like noise
    d = detect.detect(video)
    hits['colour'] += d.colour == list(synthetic.COLOURS)[ex['colour']]
    hits['shape'] += d.shape == synthetic.SHAPES[ex['shape']]
    hits['direction'] += d.direction == synthetic.DIRECTIONS[ex['direction']]
    assert d.found.all()
  assert hits['colour'] == len(source)
  assert hits['direction'] >= 0.97 * len(source)  # a bounce at frame 1 can hide in noise
  assert hits['shape'] >= 0.95 * len(source)


def test_object_mask_drops_specks_and_bumps_and_keeps_the_object():
  mask = np.zeros((2, 16, 16), bool)
  mask[0, 4:12, 4:12] = True   # an 8x8 square
  mask[0, 8, 12] = True        # a one-pixel bump on its edge
  mask[0, 1, 1] = True         # a stray pixel
  mask[0, 14:16, 0:2] = True   # a 2x2 speck in a corner
  mask[1, 2, 2] = True         # a frame with nothing but a speck keeps it
  out = detect.object_mask(mask)
  want = np.zeros((16, 16), bool)
  want[4:12, 4:12] = True
  want[[4, 4, 11, 11], [4, 11, 4, 11]] = False  # the vote trims each corner pixel
  np.testing.assert_array_equal(out[0], want)
  np.testing.assert_array_equal(out[1], mask[1])
  with pytest.raises(ValueError, match=r'must be \[T, H, W\]'):
    detect.object_mask(np.zeros((16, 16), bool))


@pytest.mark.parametrize('damage', ['specks', 'pixel_noise'])
def test_shape_survives_stray_pixels_that_break_the_raw_reading(damage):
  """Two stray pixels per frame, or pixel noise of std 25 (0..255), are enough to make the
  raw foreground's bounding box read most squares and circles as triangles; the object
  mask reads the shape as on the clean clip."""
  source = synthetic.SyntheticShapes(8, 32, 32, num_examples=45, seed=4, shape_size=(0.4, 0.55))
  rng = np.random.default_rng(1)
  hits = {True: 0, False: 0}
  for i in range(len(source)):
    ex = source[i]
    video = ex['video'].astype(np.float32)
    if damage == 'specks':
      for frame in video:
        ys, xs = rng.integers(0, 32, (2, 2))
        frame[ys, xs] = 230.0
    else:
      video += rng.normal(0.0, 25.0, video.shape)
    video = np.clip(video, 0, 255).astype(np.uint8)
    for clean in (True, False):
      hits[clean] += detect.detect(video, clean=clean).shape == synthetic.SHAPES[ex['shape']]
  assert hits[True] >= 0.95 * len(source)
  assert hits[False] <= 0.6 * len(source)


def test_velocity_of_a_known_motion():
  source = synthetic.SyntheticShapes(16, 32, 32, num_examples=50, seed=2)
  ex = next(source[i] for i in range(50)
            if synthetic.SHAPES[source[i]['shape']] == 'square' and source[i]['direction'] == 0)
  d = detect.detect(ex['video'])
  assert d.direction == 'right' and d.velocity[0] >= 0.9 and abs(d.velocity[1]) < 0.2


def test_direction_of_each_step_and_of_ties():
  for name in synthetic.DIRECTIONS:
    step = synthetic.direction_step(name)
    assert detect.direction_of(1.7 * step) == name
    assert detect.direction_of(1.7 * step + 0.5 * step[::-1]) == name  # off-axis part
  assert detect.direction_of((1.0, 1.0)) == 'right'    # a diagonal tie: horizontal
  assert detect.direction_of((-1.0, -1.0)) == 'left'
  assert detect.direction_of((0.0, 0.0)) == 'unknown'  # a still object has no direction
  assert detect.direction_of((np.nan, 1.0)) == 'unknown'


def test_blank_and_bad_clips():
  d = detect.detect(np.zeros((4, 16, 16, 3), np.uint8))
  assert d.colour == d.shape == d.direction == 'unknown' and not d.found.any()
  with pytest.raises(ValueError, match=r'must be \[T, H, W, 3\]'):
    detect.detect(np.zeros((16, 16, 3), np.uint8))


def test_components_of_a_known_mask():
  mask = np.zeros((8, 8), bool)
  mask[1:3, 1:3] = True        # a 2x2 block
  mask[3, 3] = True            # touches it diagonally: same 8-connected component
  mask[6, 0:4] = True          # a separate bar
  labels = detect.components(mask)
  assert labels.max() == 2
  assert (labels[1:3, 1:3] == 1).all() and labels[3, 3] == 1
  assert (labels[6, 0:4] == 2).all() and (labels[~mask] == 0).all()
  with pytest.raises(ValueError, match=r'must be \[H, W\]'):
    detect.components(np.zeros((2, 8, 8), bool))


def test_coherence_tells_one_object_from_fragments():
  source = synthetic.SyntheticShapes(8, 32, 32, num_examples=20, seed=5)
  for i in range(len(source)):
    c = detect.coherence(source[i]['video'])
    assert c['components'] == 1.0 and c['one_object'] == 1.0 and c['largest_share'] == 1.0
    assert c['empty'] == 0.0 and 0.2 < c['iou'] < 1.0
  # Fragments: four separate 4x4 red blocks per frame, moving about from frame to frame.
  video = np.full((6, 32, 32, 3), 15, np.uint8)
  for t in range(6):
    for y, x in ((2, 3), (20, 5), (9, 18), (20, 24)):
      video[t, y + t:y + t + 4, x:x + 4] = (230, 40, 40)
  broken = detect.coherence(video)
  assert broken['components'] == 4.0 and broken['one_object'] == 0.0
  assert broken['largest_share'] == 0.25
  blank = detect.coherence(np.zeros((3, 16, 16, 3), np.uint8))
  assert blank['components'] == 0.0 and blank['empty'] == 1.0 and blank['one_object'] == 0.0


def test_shape_fit_scores_data_shapes_as_crisp_and_ragged_blobs_as_not():
  source = synthetic.SyntheticShapes(8, 32, 32, num_examples=24, seed=7,
                                     shape_size=(0.4, 0.55))  # configs/tiny.py's sizes
  for i in range(len(source)):
    c = detect.coherence(source[i]['video'])
    assert c['crisp'] == 1.0 and c['shape_iou'] >= 0.85, (i, c)
  small = synthetic.SyntheticShapes(8, 32, 32, num_examples=24, seed=7)  # default sizes
  assert np.mean([detect.coherence(small[i]['video'])['shape_iou'] for i in range(24)]) > 0.9
  # The ideal masks themselves: each fits itself exactly, and is its own best fit.
  box = np.zeros((20, 20), bool)
  box[4:16, 3:15] = True
  for name, ideal in detect.ideal_masks(box).items():  # (the apex row of a triangle is
    fit, iou = detect.shape_fit(ideal)                 # empty: its own box is shorter)
    assert fit == name and iou >= (0.9 if name == 'triangle' else 1.0), (name, iou)
  # A square with a bite out of one side and a spur: one object, but not a crisp shape.
  video = np.full((4, 32, 32, 3), 10, np.uint8)
  video[:, 8:24, 8:24] = (230, 40, 40)
  video[:, 12:20, 8:15] = 10
  video[:, 15:17, 24:30] = (230, 40, 40)
  ragged = detect.coherence(video)
  assert ragged['one_object'] == 1.0 and ragged['shape_iou'] < 0.8
  assert ragged['crisp'] == 0.0
  # An empty frame counts 0 and makes the clip not crisp.
  video = np.full((2, 32, 32, 3), 10, np.uint8)
  video[0, 8:24, 8:24] = (230, 40, 40)
  half = detect.coherence(video)
  assert half['shape_iou'] == 0.5 and half['crisp'] == 0.0
  assert detect.shape_fit(np.zeros((8, 8), bool)) == ('unknown', 0.0)
