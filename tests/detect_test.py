"""tools/detect.py on synthetic clips, where colour, shape and direction are known."""

import numpy as np
import pytest

from vdit_jax.data import synthetic
from vdit_jax.tools import detect


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


def test_velocity_of_a_known_motion():
  source = synthetic.SyntheticShapes(16, 32, 32, num_examples=50, seed=2)
  ex = next(source[i] for i in range(50)
            if synthetic.SHAPES[source[i]['shape']] == 'square' and source[i]['direction'] == 0)
  d = detect.detect(ex['video'])
  assert d.direction == 'right' and d.velocity[0] >= 0.9 and abs(d.velocity[1]) < 0.2


def test_blank_and_bad_clips():
  d = detect.detect(np.zeros((4, 16, 16, 3), np.uint8))
  assert d.colour == d.shape == d.direction == 'unknown' and not d.found.any()
  with pytest.raises(ValueError, match=r'must be \[T, H, W, 3\]'):
    detect.detect(np.zeros((16, 16, 3), np.uint8))
