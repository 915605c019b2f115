"""Multi-shape training with data.buckets: assignment, schedule, batches, resume, the loop."""
# pylint: disable=protected-access

import os

import jax
import numpy as np
import pytest
from array_record.python import array_record_module

from configs import tiny
from tests.conftest import shrink
from vdit_jax.config import defaults
from vdit_jax.config import validate
from vdit_jax.data import buckets
from vdit_jax.data import pipeline
from vdit_jax.data import shards
from vdit_jax.data import synthetic
from vdit_jax.data import transforms
from vdit_jax.data import video_io
from vdit_jax.train import loop
from vdit_jax.train import metrics as metrics_lib

B = buckets.Bucket
TWO = ((4, 16, 16, 4), (2, 16, 32, 2))  # (T, H, W, global batch)


def _data_config(**overrides):
  config = defaults.base_config().data  # every field, then this test's values
  config.update(dict(
      source='synthetic', num_frames=4, height=16, width=16, channels=3, num_examples=24,
      num_workers=0, time_stride=1.0, buckets=TWO, bucket_weights=()))
  config.update(overrides)
  return config


def _make(config, seed=3, process_index=0, process_count=1):
  return buckets.make_dataset(config, seed=seed, process_index=process_index,
                              process_count=process_count)


def _small_config(**data):
  """A tiny model (1 x 4 x 4 tubelets) on two synthetic buckets."""
  return shrink(tiny.get_config(), model=dict(width=64, depth=2, mlp_dim=128),
                data={'num_frames': 8,  # not a bucket's T: samples must take bucket 0's
                      'num_examples': 32, 'buckets': TWO, **data},
                train=dict(num_steps=5, warmup_steps=2, tensorboard=False),
                checkpoint=dict(every_steps=3))


# ------------------------------------------------------------------------- assignment


def test_best_bucket_prefers_a_fitting_duration_then_aspect_then_length():
  bs = [B(16, 32, 32, 8), B(8, 32, 64, 8), B(8, 32, 32, 4)]
  assert buckets.best_bucket(100, 240, 240, bs) == 0   # long, square: the long square one
  assert buckets.best_bucket(100, 180, 360, bs) == 1   # long, 2:1: aspect beats length
  assert buckets.best_bucket(10, 64, 64, bs) == 2      # too short for T=16: square T=8
  assert buckets.best_bucket(10, 100, 200, bs) == 1
  assert buckets.best_bucket(3, 64, 64, bs) == 2       # fits none: the shortest, square
  assert buckets.best_bucket(16, 64, 64, bs) == 0      # span 16 fits exactly
  assert buckets.best_bucket(20, 64, 64, bs, frame_stride=2) == 2  # span 31 > 20
  # Same aspect and length: the closest pixel count.
  sizes = [B(8, 32, 32, 4), B(8, 64, 64, 4)]
  assert buckets.best_bucket(8, 60, 60, sizes) == 1
  assert buckets.best_bucket(8, 20, 20, sizes) == 0
  # A 2:1 video between 1:1 and 4:1 buckets (equal log distance): the longer bucket.
  assert buckets.best_bucket(50, 50, 100, [B(4, 16, 16, 2), B(8, 16, 64, 2)]) == 1


def test_synthetic_assignment_is_per_index_and_follows_the_weights():
  a = buckets.assign_synthetic(4000, (1.0, 3.0), seed=5)
  np.testing.assert_array_equal(a[:100], buckets.assign_synthetic(100, (1.0, 3.0), seed=5))
  assert set(np.unique(a)) == {0, 1}
  assert abs(np.mean(a == 1) - 0.75) < 0.03
  assert not np.array_equal(a, buckets.assign_synthetic(4000, (1.0, 3.0), seed=6))
  three = buckets.assign_synthetic(3000, (1.0, 1.0, 2.0), seed=0)
  np.testing.assert_allclose(np.bincount(three) / 3000, [0.25, 0.25, 0.5], atol=0.03)


# --------------------------------------------------------------------------- schedule


def test_schedule_locate_and_counts_agree():
  schedule = buckets.Schedule((3, 5, 2))
  assert schedule.counts(0) == (0, 0, 0)
  assert schedule.locate(0) == (0, 0)  # the first batch is bucket 0's
  for g in range(300):
    b, k = schedule.locate(g)
    before, after = schedule.counts(g), schedule.counts(g + 1)
    assert k == before[b]
    assert [a - c for a, c in zip(after, before)] == [int(i == b) for i in range(3)]
  counts = schedule.counts(1000)
  np.testing.assert_allclose(counts, [300, 500, 200], atol=1)
  # Weights: batches per epoch (clips / batch), in lowest terms.
  assert buckets.schedule_weights([B(4, 16, 16, 4), B(2, 16, 32, 2)], (40, 10)) == (2, 1)
  assert buckets.schedule_weights([B(4, 16, 16, 3), B(2, 16, 32, 2)], (30, 30)) == (2, 3)


# ---------------------------------------------------------------------------- batches


def test_batches_are_bucket_pure_with_each_buckets_batch_size():
  config = _data_config()
  it, plan = _make(config)
  assert plan.buckets == (B(*TWO[0]), B(*TWO[1]))
  assert sum(plan.clips) == 24 and min(plan.clips) > 0
  assignment = buckets.assign_synthetic(24, (1.0, 1.0), seed=0)
  assert plan.clips == tuple(np.bincount(assignment))
  # Every clip a bucket can hold, rendered at that bucket's shape and normalised.
  allowed = []
  for i, b in enumerate(plan.buckets):
    source = synthetic.SyntheticShapes(*b.shape, num_examples=24)
    allowed.append([pipeline._to_model_inputs(source[int(j)])['video']
                    for j in np.flatnonzero(assignment == i)])
  seen = set()
  for g in range(8):
    batch = next(it)
    bucket, _ = plan.schedule.locate(g)
    b = plan.buckets[bucket]
    assert batch['video'].shape == (b.batch_size,) + b.shape + (3,)
    assert batch['label'].shape == (b.batch_size,) and batch['label'].dtype == np.int32
    for row in batch['video']:  # each row is a clip of this bucket, none of another
      assert any(np.array_equal(row, clip) for clip in allowed[bucket])
    seen.add(bucket)
  assert seen == {0, 1}


def test_processes_hold_the_rows_of_the_same_global_batches():
  config = _data_config(buckets=((4, 16, 16, 4), (2, 16, 32, 2)))
  single, _ = _make(config)
  procs = [_make(config, process_index=i, process_count=2)[0] for i in range(2)]
  for _ in range(6):
    want = next(single)
    got = [next(p) for p in procs]
    assert got[0]['video'].shape[0] * 2 == want['video'].shape[0]
    np.testing.assert_array_equal(np.concatenate([g['video'] for g in got]), want['video'])
    np.testing.assert_array_equal(np.concatenate([g['label'] for g in got]), want['label'])


def test_iterator_state_restores_the_next_batch_across_buckets():
  config = _data_config(num_examples=10)  # several epochs per bucket within 12 batches
  it, plan = _make(config)
  for _ in range(5):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(7)]
  assert {plan.schedule.locate(g)[0] for g in range(5, 12)} == {0, 1}
  fresh, _ = _make(config)
  fresh.set_state(state)
  for w in want:
    g = next(fresh)
    assert g['video'].shape == w['video'].shape
    np.testing.assert_array_equal(g['video'], w['video'])
    np.testing.assert_array_equal(g['label'], w['label'])
  other, _ = _make(config, seed=4)  # a different shuffle: the test can tell batches apart
  other.set_state(state)
  assert not all(np.array_equal(next(other)['video'], w['video']) for w in want)


def test_files_go_to_the_bucket_of_their_shape(tmp_path):
  rng = np.random.default_rng(0)
  videos = {'sq0.gif': (12, 24, 24), 'sq1.gif': (10, 20, 20),   # long enough for T=8, 1:1
            'wide0.gif': (5, 16, 32), 'wide1.gif': (4, 12, 24)}  # short, 2:1
  for name, shape in videos.items():
    video_io.write_video(tmp_path / name, rng.integers(0, 255, shape + (3,), np.uint8), fps=8)
  config = _data_config(source='files', path=str(tmp_path), clip_start='center',
                        frame_stride=1, crop='center', source_seed=0,
                        buckets=((8, 16, 16, 2), (4, 16, 32, 2)))
  it, plan = _make(config)
  assert plan.clips == (2, 2)
  for g in range(4):
    b = plan.buckets[plan.schedule.locate(g)[0]]
    assert next(it)['video'].shape == (2,) + b.shape + (3,)
  # A tall bucket fits none of these videos: reported, naming it.
  config.buckets = ((8, 16, 16, 2), (4, 16, 32, 2), (4, 32, 16, 2))
  with pytest.raises(ValueError, match=r'data.buckets\[2\]=\(4, 32, 16, 2\) receive\(s\) no '
                                       r'clips.*4 videos.*\[2, 2, 0\]'):
    _make(config)


def _write_shards(directory, clips, dtype):
  os.makedirs(directory)
  writer = array_record_module.ArrayRecordWriter(
      os.path.join(directory, shards.shard_name(0, 1)), shards.WRITER_OPTIONS)
  for i, clip in enumerate(clips):
    writer.write(shards.encode_record(clip, label=i))
  writer.close()
  shards.write_index(directory, {
      'format': shards.FORMAT, 'shards': [{'name': shards.shard_name(0, 1),
                                           'num_records': len(clips)}],
      'num_records': len(clips), 'clip_shape': list(clips.shape[1:]), 'dtype': dtype,
      'num_classes': len(clips)})


def test_shards_are_cut_to_the_bucket_that_fits_their_stored_shape(tmp_path):
  clips = np.random.default_rng(1).integers(0, 255, (4, 8, 24, 48, 3), np.uint8)
  directory = str(tmp_path / 'frames')
  _write_shards(directory, clips, 'uint8')
  config = _data_config(source='shards', path=directory, buckets=((4, 16, 32, 2),))
  it, plan = _make(config)
  assert plan.clips == (4,)
  batch = next(it)
  assert batch['video'].shape == (2, 4, 16, 32, 3)
  for row, label in zip(batch['video'], batch['label']):  # center frames, center crop
    clip = clips[label][transforms.clip_frame_indices(8, 4, 1, 'center')]
    want = pipeline._to_model_inputs(
        {'video': transforms.resize_and_crop(clip, 16, 32, 'center'), 'label': label})
    np.testing.assert_array_equal(row, want['video'])
  # One stored shape: a second bucket gets nothing, and says why.
  config.buckets = ((4, 16, 32, 2), (4, 16, 16, 2))
  with pytest.raises(ValueError, match=r'buckets\[1\].*no clips.*one stored shape'):
    _make(config)
  latents = str(tmp_path / 'latents')
  _write_shards(latents, np.zeros((2, 2, 4, 4, 8), np.float32), 'float32')
  config = _data_config(source='shards', path=latents, channels=8, buckets=((2, 8, 8, 2),))
  with pytest.raises(ValueError, match=r'float32 clips \(latents\).*not resized'):
    _make(config)


# ------------------------------------------------------------------------ empty / invalid


def test_an_empty_synthetic_bucket_is_reported_before_compiling(tmp_path, capsys):
  weights = (50.0, 1.0)
  assert not np.any(buckets.assign_synthetic(6, weights, seed=0) == 1)  # the premise
  config = _data_config(num_examples=6, bucket_weights=weights)
  with pytest.raises(ValueError, match=r'data.buckets\[1\]=\(2, 16, 32, 2\) receive\(s\) no '
                                       r'clips.*bucket_weights'):
    _make(config)
  train_config = _small_config(num_examples=6, bucket_weights=weights)
  with pytest.raises(ValueError, match=r'data.buckets\[1\].*no clips'):
    loop.train_and_evaluate(train_config, str(tmp_path))
  assert 'compiled the train step' not in capsys.readouterr().out


@pytest.mark.parametrize('overrides,devices,processes,match', [
    (dict(buckets=((4, 16, 16),)), 1, 1, r'buckets\[0\]=\(4, 16, 16\) must be \(T, H, W'),
    (dict(buckets=((4, 16, 16, 0),)), 1, 1, r'four positive integers'),
    (dict(buckets=((4, 16, 16, 4), (4, 16, 16, 8))), 1, 1, r'both have the clip shape'),
    (dict(buckets=((4, 16, 16, 4), (4, 18, 16, 4))), 1, 1,
     r'buckets\[1\]=\(4, 18, 16, 4\): .*patch'),
    (dict(buckets=((4, 16, 16, 4), (2, 16, 32, 3))), 1, 2,
     r'buckets\[1\]=\(2, 16, 32, 3\): the global batch 3 is not divisible by the process '
     r'count 2'),
    (dict(buckets=((4, 16, 16, 4), (2, 16, 32, 6))), 4, 1,
     r'buckets\[1\].*global batch 6 is not divisible by 4, the size of mesh axes'),
    (dict(buckets=((4, 4, 8, 4),)), 1, 1, r'buckets\[0\].*H and W >= 8'),
    (dict(bucket_weights=(1.0,)), 1, 1, r'bucket_weights=\(1.0,\) has 1 entries'),
    (dict(bucket_weights=(1.0, 0.0)), 1, 1, r'bucket_weights\[1\]=0.0 must be'),
    (dict(source='files', path='videos', bucket_weights=(1.0, 2.0)), 1, 1,
     r"only applies to data.source='synthetic'"),
])
def test_invalid_bucket_configs_raise_naming_the_bucket(overrides, devices, processes, match):
  config = _small_config(**overrides)
  with pytest.raises(ValueError, match=match):
    validate.validate_config(config, devices, processes)


def test_bucket_rules_against_grad_accum_and_given_frames():
  config = _small_config(buckets=((4, 16, 16, 4), (2, 16, 32, 2)))
  config.train.grad_accum_steps = 2
  with pytest.raises(ValueError, match=r'buckets\[1\].*1 clips per batch shard.*'
                                       r'grad_accum_steps=2'):
    validate.validate_config(config, 2, 1)
  config = _small_config()
  config.model.context_frames_max = 2
  with pytest.raises(ValueError, match=r'buckets\[1\].*context_frames_max=2 must be < '
                                       r"the bucket's T=2"):
    validate.validate_config(config, 1, 1)
  validate.validate_config(_small_config(), 2, 2)  # the default buckets are valid
  with pytest.raises(ValueError, match='data.buckets=.* is set: .*buckets.make_dataset'):
    pipeline.make_dataset(_data_config(), 4, seed=0)


def test_rate_meter_leaves_a_skipped_step_out(monkeypatch):
  clock = [0.0]
  monkeypatch.setattr(metrics_lib.time, 'perf_counter', lambda: clock[0])
  meter = metrics_lib.RateMeter(100)
  meter.start(0)
  clock[0] = 1.0            # steps 1 and 2: 0.5 s each
  clock[0] += 7.0           # step 3: a new bucket's first step, compiling, 7 s
  meter.skip(1, 7.0)
  clock[0] += 0.5           # step 4
  rates = meter.rates(4)
  assert rates['steps_per_s'] == pytest.approx(3 / 1.5)
  assert rates['tokens_per_s'] == pytest.approx(200.0)


# ------------------------------------------------------------------------------- loop


def test_bucketed_training_trains_both_shapes_and_resumes_exactly(tmp_path, capsys):
  config = _small_config()
  clips = np.bincount(buckets.assign_synthetic(32, (1.0, 1.0), seed=0))  # source_seed 0
  schedule = buckets.Schedule(buckets.schedule_weights([B(*b) for b in TWO], clips))
  assert schedule.counts(3) == (1, 2)  # both shapes within the first 3 steps
  resumed, straight = str(tmp_path / 'resumed'), str(tmp_path / 'straight')
  first = loop.train_and_evaluate(config, resumed, stop_at=3)
  assert int(first.step) == 3
  out = capsys.readouterr().out
  assert f'buckets: 0: 4x16x16 batch 4, {clips[0]} clips' in out
  assert f'1: 2x16x32 batch 2, {clips[1]} clips' in out
  assert out.count('compiled the train step') == 2  # once per bucket shape
  assert 'step 3/5' in out and 'batches/bucket 1,2' in out
  second = loop.train_and_evaluate(config, resumed)  # resumes at step 3
  assert int(second.step) == 5
  assert 'resumed from step 3' in capsys.readouterr().out

  records = metrics_lib.read_metrics(os.path.join(resumed, 'metrics.jsonl'))
  assert [r['step'] for r in records] == [1, 2, 3, 4, 5]
  for r in records:
    assert np.isfinite(r['loss'])
    assert (r['bucket0_batches'], r['bucket1_batches']) == schedule.counts(r['step'])
  assert records[-1]['bucket0_batches'] > 0 and records[-1]['bucket1_batches'] > 0
  # The final sample has bucket 0's shape (4 frames), not data.num_frames=8.
  gif = video_io.read_video(os.path.join(resumed, 'samples', 'step_0000005.gif'))
  assert gif.shape[0] == 4

  # An uninterrupted run takes the same batches: identical parameters and losses.
  whole = loop.train_and_evaluate(config, straight)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               whole.params, second.params)
  records_straight = metrics_lib.read_metrics(os.path.join(straight, 'metrics.jsonl'))
  assert [r['loss'] for r in records_straight] == [r['loss'] for r in records]
