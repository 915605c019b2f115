r"""Are a trained audio-video model's sounds where its bounces are? And its video as good?

python -m vdit_jax.eval.av_generation --config=configs/tiny_av.py --workdir=runs/tiny_av \
    [--num_samples=48] [--config.x.y=... as the run was trained]

On held-out clips of the built-in audio-visual data (source seed 10_000 + config.seed,
never trained on) and on samples of the newest checkpoint in WORKDIR, prints rows of the
sync metric of vdit_jax/eval/sync.py (visual bounce times from the detector against audio
onsets: median |offset| in ms, the share of events within 40 ms, missed and extra events,
the share of onsets whose pitch names the shape, the detector-free cross-correlation lag,
and the shuffled control: another clip's audio against each video) and the video scores
of eval/coherence.py (one object per frame, crisp clips, the label's shape and direction):

  data          the clips' own audio: the metric's ceiling
  data+vocoder  their log-mel features through the Griffin-Lim vocoder: what the
                feature-and-vocoder path costs before any model
  joint         sampled together from noise with labels cycling through the classes
  v2a           audio generated for the held-out clips' frames (video->audio, their labels)

A config without audio (configs/tiny_av.py:video_only, the baseline of equal compute)
gets the video scores of its samples only. A measurement, not a test: it never fails on a
number. Ends with one JSON line.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vdit_jax import modes
from vdit_jax.config import resolve
from vdit_jax.data import audio as audio_lib
from vdit_jax.data import pipeline
from vdit_jax.data import synthetic
from vdit_jax.eval import detect
from vdit_jax.eval import sync
from vdit_jax.generate import av_sampling
from vdit_jax.generate import sampling
from vdit_jax.train import loop

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'The config the model was trained with.')
flags.DEFINE_string('workdir', None, 'Workdir holding the trained checkpoints.')
flags.DEFINE_integer('num_samples', 48, 'Clips to sample and score per row.')
flags.DEFINE_integer('batch', 16, 'Clips per sampler call.')
flags.DEFINE_list('tasks', ['joint', 'v2a'], 'Rows to sample: joint and / or v2a.')


def video_scores(videos, labels) -> dict:
  """Mean coherence scores and the labels' shape / direction accuracy of [N, T, H, W, 3]."""
  scores = [detect.coherence(v) for v in videos]
  out = {k: round(float(np.mean([s[k] for s in scores])), 4)
         for k in ('one_object', 'empty', 'shape_iou', 'crisp')}
  shape, direction = detect.label_hits(videos, labels)
  out.update(shape_accuracy=round(float(shape.mean()), 4),
             direction_accuracy=round(float(direction.mean()), 4))
  return out


def _sync_row(name, videos, waves, fps, sample_rate, shapes) -> dict:
  report = sync.sync_report(videos, waves, fps, sample_rate, shapes=shapes)
  print(f'[{name}] ' + sync.format_report(report), flush=True)
  return report


def _batched(fn, n: int, batch: int):
  """Concatenated outputs of fn(start, stop) over [0, n) in slices of `batch`."""
  parts = [fn(i, min(i + batch, n)) for i in range(0, n, batch)]
  return tuple(np.concatenate(p) for p in zip(*parts))


def main(_):
  config = resolve.complete(FLAGS.config)
  if config.data.source != 'synthetic':
    raise SystemExit(f'data.source={config.data.source!r}: the sync metric reads the built-in '
                     'audio-visual clips (bounces and their sounds): train on synthetic data.')
  n = FLAGS.num_samples
  spec = pipeline.audio_spec(config) or audio_lib.AudioSpec(fps=config.audio.fps)
  source = synthetic.from_data_config(config.data, num_examples=n, seed=10_000 + config.seed,
                                      audio=spec)
  clips = [source[i] for i in range(n)]
  frames = np.stack([c['video'] for c in clips])  # [N, T, H, W, 3] uint8
  labels = np.array([c['label'] for c in clips], np.int32)
  shapes = np.array([c['shape'] for c in clips], np.int32)
  fps, rate = spec.fps, spec.sample_rate
  results = {'num_samples': n, 'data': {'video': video_scores(frames, labels)}}
  print(json.dumps({'row': 'data', **results['data']['video']}), flush=True)

  if not config.audio.enabled:  # the video-only baseline: its samples' video scores
    with config.unlocked():
      config.sample.num_samples = n
    videos, _ = modes.sample(config, FLAGS.workdir)
    videos = np.asarray(videos, np.float32)[..., :3]
    sampled = np.asarray(sampling.sample_labels(n, synthetic.NUM_CLASSES))
    results['video_only'] = {'video': video_scores(videos, sampled)}
    print(json.dumps({'row': 'video_only', **results['video_only']['video']}), flush=True)
    print(json.dumps(results))
    return

  waves = np.stack([c['audio'] for c in clips])  # [N, S]
  results['data']['sync'] = _sync_row('data', frames, waves, fps, rate, shapes)
  vocoded = np.stack([audio_lib.griffin_lim(audio_lib.log_mel(w, spec), spec, len(w),
                                            iters=config.audio.griffin_lim_iters, seed=i)
                      for i, w in enumerate(waves)])
  results['data+vocoder'] = {'sync': _sync_row('data+vocoder', frames, vocoded, fps, rate,
                                               shapes)}

  s = loop.build(config, FLAGS.workdir)
  try:
    params, step, _ = modes.params_to_sample(s, FLAGS.workdir, None)
  finally:
    s.checkpointer.close()
  results['step'] = int(step)
  rng = jax.random.key(config.sample.seed)
  cycled = np.asarray(sampling.sample_labels(n, synthetic.NUM_CLASSES))
  b = FLAGS.batch
  if n % b:
    raise SystemExit(f'--num_samples={n} must be a multiple of --batch={b}.')
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    def compiled(task):  # one compile per task, called on every batch
      return jax.jit(av_sampling.make_sample_fn(s.model, s.diffusion, config, s.num_classes,
                                                b, task=task))

    def run(fn, offset, labels_, **given):
      def one(i, j):
        kw = {k: jnp.asarray(v[i:j]) for k, v in given.items()}
        video, features = fn(params, jax.random.fold_in(rng, offset + i),
                             {'label': jnp.asarray(labels_[i:j])}, **kw)
        return (np.asarray(jax.device_get(video), np.float32),
                av_sampling.to_waves(features, config))
      return _batched(one, n, b)

    if 'joint' in FLAGS.tasks:
      videos, gen_waves = run(compiled('joint'), 0, cycled)
      gen_frames = ((videos + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
      results['joint'] = {'video': video_scores(gen_frames, cycled)}
      print(json.dumps({'row': 'joint', **results['joint']['video']}), flush=True)
      results['joint']['sync'] = _sync_row('joint', gen_frames, gen_waves, fps, rate,
                                           cycled // len(synthetic.DIRECTIONS))
    if 'v2a' in FLAGS.tasks:
      given = frames.astype(np.float32) / 127.5 - 1.0  # [N, T, H, W, 3] in [-1, 1]
      _, v2a_waves = run(compiled('v2a'), 10_000, labels, video=given)
      results['v2a'] = {'sync': _sync_row('v2a', frames, v2a_waves, fps, rate, shapes)}
  print(json.dumps(results, default=float))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
