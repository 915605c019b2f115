r"""Do a trained model's samples show one solid object per frame, or fragments?

python vdit_jax/eval/coherence.py --config=configs/tiny.py --workdir=runs/tiny \
    [--num_samples=16] [--config.x.y=... as the run was trained]

Samples --num_samples clips from the newest checkpoint (or export) in WORKDIR with the
config's sampler, exactly as `--mode=sample` would (it also writes them to
WORKDIR/samples/), and scores each with `vdit_jax.eval.detect.coherence`: foreground
components per frame, the share of the foreground in the largest one, the share of frames
that hold exactly one object, empty frames, and the IoU of the object between consecutive
frames; for class-conditioned models also the share of samples whose detected shape and
direction (tools/detect.py) are their label's (chance 1/3 and 1/4). The same scores of as
many real clips of the config's data come first, as the reference (one object in every
frame; the detector's accuracy on them is the ceiling of the sample accuracies). A
measurement, not a test: it never fails on a number. Ends with one JSON line.
"""

import json

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vdit_jax import modes

from vdit_jax.config import resolve
from vdit_jax.data import synthetic
from vdit_jax.eval import detect
from vdit_jax.generate import sampling

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'The config the model was trained with.')
flags.DEFINE_string('workdir', None, 'Workdir holding the trained checkpoints.')
flags.DEFINE_integer('num_samples', 16, 'Clips to sample and score.')
flags.DEFINE_float('threshold', 60.0, 'Foreground: distance from the background, 0..255.')


def _mean_scores(clips) -> dict:
  scores = [detect.coherence(c, FLAGS.threshold) for c in clips]
  return {k: round(float(np.mean([s[k] for s in scores])), 4) for k in scores[0]}


def _label_accuracy(videos, labels) -> dict:
  """Share of clips whose detected shape / direction is their class label's."""
  shape, direction = detect.label_hits(videos, labels, FLAGS.threshold)
  return {'shape_accuracy': round(float(shape.mean()), 4),
          'direction_accuracy': round(float(direction.mean()), 4)}


def main(_):
  if FLAGS.num_samples < 1:
    raise SystemExit(f'--num_samples={FLAGS.num_samples} must be at least 1.')
  config = resolve.complete(FLAGS.config)  # every default from config/defaults.py
  if config.data.source != 'synthetic' or config.data.latents:
    raise SystemExit(f'data.source={config.data.source!r}: the coherence score reads clips '
                     f'of one shape on a dark background: train on the synthetic data.')
  source = synthetic.from_data_config(config.data, num_examples=FLAGS.num_samples,
                                      seed=10_000 + config.seed)
  clips = [source[i] for i in range(FLAGS.num_samples)]
  data = _mean_scores([c['video'] for c in clips])
  data.update(_label_accuracy([c['video'] for c in clips], [c['label'] for c in clips]))
  print(json.dumps({'clips': 'data', **data}))
  with config.unlocked():
    config.sample.num_samples = FLAGS.num_samples
  videos, paths = modes.sample(config, FLAGS.workdir)
  videos = np.asarray(videos, np.float32)[..., :3]
  samples = _mean_scores(videos)
  if config.model.conditioning == 'class':
    # --mode=sample cycles the labels through the classes (sampling.sample_labels).
    labels = np.asarray(sampling.sample_labels(len(videos), synthetic.NUM_CLASSES))
    samples.update(_label_accuracy(videos, labels))
  print(json.dumps({'clips': 'samples', **samples, 'written': paths}))
  print(json.dumps({'num_samples': FLAGS.num_samples, 'data': data, 'samples': samples}))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
