"""Tests for vdit_jax.data: synthetic clips, the grain pipeline, video files."""

import warnings

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vdit_jax.config import defaults
from vdit_jax.data import pipeline
from vdit_jax.data import synthetic
from vdit_jax.data import video_io

T, H, W = 8, 32, 32


def _source(**kwargs):
  args = dict(num_frames=T, height=H, width=W, num_examples=1000, seed=0)
  args.update(kwargs)
  return synthetic.SyntheticShapes(**args)


def _lit(video):
  """Per-pixel distance from the background colour: [T, H, W] float."""
  background = video[0, 0, 0].astype(np.float32)  # the border ring is never lit
  return np.abs(video.astype(np.float32) - background).max(axis=-1)


def _centroids(video):
  """Intensity-weighted shape centre per frame: [T, 2] as (x, y)."""
  weight = _lit(video)  # [T, H, W]
  ys, xs = np.mgrid[0:video.shape[1], 0:video.shape[2]]
  total = weight.sum(axis=(1, 2))
  return np.stack([(weight * xs).sum(axis=(1, 2)) / total,
                   (weight * ys).sum(axis=(1, 2)) / total], axis=-1)


def _data_config(**overrides):
  config = defaults.base_config().data  # every field, then this test's values
  config.update(dict(
      source='synthetic', num_frames=4, height=16, width=16, channels=3, num_examples=64,
      num_workers=0, time_stride=1.0))
  config.update(overrides)
  return config


# ---------------------------------------------------------------------------- synthetic


def test_constants():
  assert synthetic.SHAPES == ('square', 'circle', 'triangle')
  assert synthetic.DIRECTIONS == ('right', 'left', 'down', 'up')
  assert synthetic.NUM_CLASSES == 12
  assert len(synthetic.COLOURS) >= 5
  for rgb in synthetic.COLOURS.values():
    assert len(rgb) == 3 and all(0 <= c <= 255 for c in rgb)


@pytest.mark.parametrize('t,h,w', [(8, 32, 32), (3, 16, 24), (5, 40, 20)])
def test_shapes_and_dtypes(t, h, w):
  example = synthetic.SyntheticShapes(t, h, w, num_examples=10)[7]
  assert set(example) == {'video', 'label', 'shape', 'colour', 'direction'}
  assert example['video'].shape == (t, h, w, 3)
  assert example['video'].dtype == np.uint8
  for key in ('label', 'shape', 'colour', 'direction'):
    assert example[key].shape == () and example[key].dtype == np.int32


def test_deterministic_per_index_and_seed():
  a, b = _source(), _source()
  for idx in (0, 5, 999):
    np.testing.assert_array_equal(a[idx]['video'], b[idx]['video'])
    assert a[idx]['label'] == b[idx]['label']
  np.testing.assert_array_equal(a[-1]['video'], a[999]['video'])
  assert not np.array_equal(a[3]['video'], _source(seed=1)[3]['video'])


def test_different_indices_differ():
  source = _source()
  videos = [source[i]['video'] for i in range(20)]
  for i in range(20):
    for j in range(i + 1, 20):
      assert not np.array_equal(videos[i], videos[j]), (i, j)


def test_labels_cover_all_classes():
  source = _source()
  seen = set()
  for idx in range(300):
    example = source[idx]
    assert example['label'] == example['shape'] * 4 + example['direction']
    assert 0 <= example['label'] < synthetic.NUM_CLASSES
    assert 0 <= example['colour'] < len(synthetic.COLOURS)
    seen.add(int(example['label']))
  assert seen == set(range(synthetic.NUM_CLASSES))


def test_colour_and_dark_background():
  source = _source()
  for idx in range(30):
    example = source[idx]
    video = example['video']
    assert video[0, 0, 0].max() <= 30  # dark background
    rgb = np.array(list(synthetic.COLOURS.values())[example['colour']])
    brightest = video.reshape(-1, 3)[_lit(video).reshape(-1).argmax()]
    np.testing.assert_allclose(brightest, rgb, atol=2)  # fully covered pixel = its colour


def test_shape_stays_inside_frame():
  source = _source(num_frames=32)  # long clips: every shape bounces
  for idx in range(50):
    video = source[idx]['video']
    background = video[0, 0, 0]
    # The outer ring of pixels is always background: the shape never touches the border.
    for ring in (video[:, 0], video[:, -1], video[:, :, 0], video[:, :, -1]):
      assert np.all(ring == background), idx
    # Never clipped: the lit area (sum of coverage) is the same in every frame.
    area = _lit(video).sum(axis=(1, 2))  # [T]
    assert area.min() > 0.9 * area.max(), (idx, area)
    assert area.min() > 0.02 * H * W


def test_size_range():
  source = _source()
  for idx in range(50):
    lit = _lit(source[idx]['video'][0]) > 0
    ys, xs = np.nonzero(lit)
    extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
    assert 0.15 * H <= extent <= 0.42 * H, (idx, extent)


def test_moves_in_labelled_direction():
  source = _source()
  steps = {0: (1, 0), 1: (-1, 0), 2: (0, 1), 3: (0, -1)}
  for idx in range(60):
    example = source[idx]
    move = np.diff(_centroids(example['video'])[:2], axis=0)[0]  # [2] (dx, dy)
    want = np.array(steps[int(example['direction'])])
    along = move @ want
    across = move @ want[::-1]
    assert 0.8 <= along <= 2.7, (idx, move)  # 1..2.5 px per frame at 32x32
    assert abs(across) < 0.15, (idx, move)  # rasterisation noise only


def test_speed_scales_with_size():
  small = _source(height=32, width=32)
  large = _source(height=64, width=64)
  for idx in range(10):
    ds = np.abs(np.diff(_centroids(small[idx]['video'])[:2], axis=0)).sum()
    dl = np.abs(np.diff(_centroids(large[idx]['video'])[:2], axis=0)).sum()
    np.testing.assert_allclose(dl, 2 * ds, rtol=0.1)


def test_half_time_stride_is_double_frame_rate():
  base = _source(num_frames=16)
  fine = _source(num_frames=32, time_stride=0.5)
  for idx in range(40):
    np.testing.assert_array_equal(fine[idx]['video'][::2], base[idx]['video'])
    assert fine[idx]['label'] == base[idx]['label']


@pytest.mark.parametrize('kwargs,match', [
    (dict(num_frames=0), 'num_frames'),
    (dict(height=-3), 'height'),
    (dict(width=4), 'at least 8'),
    (dict(num_examples=0), 'num_examples'),
    (dict(seed=-1), 'seed'),
    (dict(time_stride=0.0), 'time_stride'),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _source(**kwargs)


def test_index_errors():
  source = _source(num_examples=5)
  with pytest.raises(IndexError, match='out of range'):
    source[5]
  with pytest.raises(IndexError, match='out of range'):
    source[-6]
  assert len(source) == 5
  assert 'num_examples=5' in repr(source)


def test_caption():
  assert synthetic.caption(0, 0, 1) == 'a red square moving left'
  assert synthetic.caption('triangle', 'blue', 'up') == 'a blue triangle moving up'
  example = _source()[0]
  text = synthetic.caption(example['shape'], example['colour'], example['direction'])
  assert text.startswith('a ') and ' moving ' in text
  with pytest.raises(ValueError, match='hexagon'):
    synthetic.caption('hexagon', 'red', 'up')
  with pytest.raises(ValueError, match='out of range'):
    synthetic.caption(0, 0, 4)


# ----------------------------------------------------------------------------- pipeline


def test_pipeline_batches():
  config = _data_config()
  it = pipeline.make_dataset(config, 5, seed=0, process_index=0, process_count=1)
  for _ in range(3):
    batch = next(it)
    assert set(batch) == {'video', 'label'}
    assert batch['video'].shape == (5, 4, 16, 16, 3) and batch['video'].dtype == np.float32
    assert batch['label'].shape == (5,) and batch['label'].dtype == np.int32
    assert batch['video'].min() >= -1.0 and batch['video'].max() <= 1.0
    assert batch['video'].max() > 0.5  # shapes are lit
    assert np.all((0 <= batch['label']) & (batch['label'] < 12))
  assert pipeline.num_classes(config) == 12


def test_pipeline_normalisation_matches_source():
  config = _data_config(num_examples=1)
  batch = next(pipeline.make_dataset(config, 1, seed=0, process_index=0, process_count=1))
  example = pipeline._make_source(config)[0]
  np.testing.assert_allclose(batch['video'][0], example['video'] / 127.5 - 1.0, atol=1e-6)
  assert batch['label'][0] == example['label']


def _epoch_videos(config, process_index, process_count, num_batches):
  it = pipeline.make_dataset(config, 4, seed=3, process_index=process_index,
                             process_count=process_count)
  videos = np.concatenate([next(it)['video'] for _ in range(num_batches)])
  return {v.tobytes() for v in videos}


def test_processes_read_disjoint_shares():
  config = _data_config(num_examples=32)
  share0 = _epoch_videos(config, 0, 2, 4)  # 16 examples = one epoch of the share
  share1 = _epoch_videos(config, 1, 2, 4)
  assert len(share0) == 16 and len(share1) == 16
  assert not share0 & share1
  assert share0 | share1 == _epoch_videos(config, 0, 1, 8)


def test_process_rows_make_the_single_process_batches():
  """P processes of batch b each hold rows [i*b, (i+1)*b) of the 1-process batch of P*b."""
  config = _data_config(num_examples=10)  # 3 global batches of 4 cross an epoch
  whole = pipeline.make_dataset(config, 4, seed=5, process_index=0, process_count=1)
  parts = [pipeline.make_dataset(config, 2, seed=5, process_index=i, process_count=2)
           for i in range(2)]
  for _ in range(3):
    want = next(whole)
    got = [next(p) for p in parts]
    for key in ('video', 'label'):
      np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])


def test_epochs_are_reshuffled_and_complete():
  config = _data_config(num_examples=8)
  it = pipeline.make_dataset(config, 4, seed=0, process_index=0, process_count=1)
  labels = [next(it)['label'] for _ in range(4)]
  epoch0, epoch1 = np.concatenate(labels[:2]), np.concatenate(labels[2:])
  np.testing.assert_array_equal(np.sort(epoch0), np.sort(epoch1))
  it = pipeline.make_dataset(config, 4, seed=0, process_index=0, process_count=1)
  videos = np.concatenate([next(it)['video'] for _ in range(4)])
  assert len({v.tobytes() for v in videos[:8]}) == 8
  assert not np.array_equal(videos[:8], videos[8:])  # new order in epoch 1


def test_shuffle_seed_changes_order():
  config = _data_config()
  a = next(pipeline.make_dataset(config, 8, seed=0, process_index=0, process_count=1))
  b = next(pipeline.make_dataset(config, 8, seed=1, process_index=0, process_count=1))
  assert not np.array_equal(a['video'], b['video'])


def _checkpoint_round_trip(tmp_path, config, k):
  it = pipeline.make_dataset(config, 3, seed=7, process_index=0, process_count=1)
  for _ in range(k):
    next(it)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    manager.save(k, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
  want = [next(it) for _ in range(2)]

  fresh = pipeline.make_dataset(config, 3, seed=7, process_index=0, process_count=1)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    assert manager.latest_step() == k
    manager.restore(k, args=ocp.args.Composite(
        data_iter=grain.checkpoint.CheckpointRestore(fresh)))
  got = [next(fresh) for _ in range(2)]
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g['video'], w['video'])
    np.testing.assert_array_equal(g['label'], w['label'])
  # A fresh iterator that was not restored starts elsewhere.
  unrestored = next(pipeline.make_dataset(config, 3, seed=7, process_index=0,
                                          process_count=1))
  assert not np.array_equal(unrestored['video'], want[0]['video'])


def test_iterator_state_round_trip():
  config = _data_config()
  it = pipeline.make_dataset(config, 3, seed=7, process_index=0, process_count=1)
  next(it)
  state = it.get_state()
  want = next(it)
  fresh = pipeline.make_dataset(config, 3, seed=7, process_index=0, process_count=1)
  fresh.set_state(state)
  np.testing.assert_array_equal(next(fresh)['video'], want['video'])


def test_orbax_checkpoint_round_trip(tmp_path):
  _checkpoint_round_trip(tmp_path, _data_config(num_examples=16), k=7)  # crosses an epoch


def test_orbax_checkpoint_round_trip_with_workers(tmp_path):
  """Grain worker processes change speed, not content, order or checkpointing."""
  config = _data_config(num_examples=16)
  reference = pipeline.make_dataset(config, 3, seed=7, process_index=0, process_count=1)
  want = [next(reference) for _ in range(5)]

  config.num_workers = 1
  it = pipeline.make_dataset(config, 3, seed=7, process_index=0, process_count=1)
  for i in range(3):
    np.testing.assert_array_equal(next(it)['video'], want[i]['video'])
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    manager.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
  it.close()

  fresh = pipeline.make_dataset(config, 3, seed=7, process_index=0, process_count=1)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    manager.restore(3, args=ocp.args.Composite(
        data_iter=grain.checkpoint.CheckpointRestore(fresh)))
  for i in range(3, 5):
    batch = next(fresh)
    np.testing.assert_array_equal(batch['video'], want[i]['video'])
    np.testing.assert_array_equal(batch['label'], want[i]['label'])
  fresh.close()


@pytest.mark.parametrize('overrides,match', [
    (dict(source='ucf101'), r"allowed: \['synthetic', 'files', 'shards'\]"),
    (dict(channels=1), 'channels must be 3'),
    (dict(num_workers=-1), 'num_workers'),
    (dict(num_examples=1), 'process_count'),
])
def test_bad_data_config(overrides, match):
  with pytest.raises(ValueError, match=match):
    pipeline.make_dataset(_data_config(**overrides), 2, seed=0, process_index=0,
                          process_count=2)


@pytest.mark.parametrize('kwargs,match', [
    (dict(batch_size=0), 'batch_size'),
    (dict(seed=-1), 'seed'),
    (dict(process_index=2, process_count=2), 'process_index'),
])
def test_bad_pipeline_arguments(kwargs, match):
  args = dict(batch_size=2, seed=0, process_index=0, process_count=1)
  args.update(kwargs)
  batch_size = args.pop('batch_size')
  with pytest.raises(ValueError, match=match):
    pipeline.make_dataset(_data_config(), batch_size, **args)


def test_missing_config_field():
  config = _data_config()
  del config['time_stride']
  with pytest.raises(ValueError, match='time_stride'):
    pipeline.num_classes(config)


# ----------------------------------------------------------------------------- video io


def test_to_uint8():
  video = np.array([-2.0, -1.0, 0.0, 1.0, 3.0], np.float32)
  np.testing.assert_array_equal(video_io.to_uint8(video), [0, 0, 128, 255, 255])
  with pytest.raises(ValueError, match='dtype'):
    video_io.to_uint8(np.zeros(3, np.uint8))
  with pytest.raises(ValueError, match='NaN'):
    video_io.to_uint8(np.array([np.nan]))


def test_make_grid_layout():
  n, t, h, w, c = 5, 2, 3, 4, 1
  videos = np.arange(1, n + 1, dtype=np.uint8)[:, None, None, None, None] * np.ones(
      (n, t, h, w, c), np.uint8)  # video i is filled with i + 1
  grid = video_io.make_grid(videos, ncols=3, pad=1)
  assert grid.shape == (t, 2 * h + 1, 3 * w + 2, c)
  for i in range(n):
    row, col = divmod(i, 3)
    y, x = row * (h + 1), col * (w + 1)
    assert np.all(grid[:, y:y + h, x:x + w] == i + 1)
  assert np.all(grid[:, h, :] == 0)  # padding row
  assert np.all(grid[:, :, w] == 0)  # padding column
  assert np.all(grid[:, h + 1:, 2 * (w + 1):] == 0)  # empty last cell

  scaled = video_io.make_grid(videos, ncols=3, pad=2, scale=2)
  assert scaled.shape == (t, 2 * 2 * h + 2, 3 * 2 * w + 4, c)
  np.testing.assert_array_equal(scaled[:, :2 * h:2, :2 * w:2], videos[0])
  assert video_io.make_grid(videos).shape == (t, 2 * h + 1, 3 * w + 2, c)  # ceil(sqrt(5))
  with pytest.raises(ValueError, match='shape'):
    video_io.make_grid(videos[0])


@pytest.mark.parametrize('ext', ['mp4', 'gif'])
def test_write_read_round_trip(tmp_path, ext):
  video = _source(num_frames=6)[4]['video']  # [6, 32, 32, 3], moving: no merged gif frames
  path = tmp_path / 'nested' / 'dir' / f'clip.{ext}'
  assert video_io.write_video(path, video, fps=8) == str(path)
  back = video_io.read_video(path)
  assert back.shape == video.shape and back.dtype == np.uint8
  error = np.abs(back.astype(np.float32) - video.astype(np.float32))
  assert error.mean() < (3.0 if ext == 'mp4' else 1.0), error.mean()
  assert sorted(p.name for p in path.parent.iterdir()) == [f'clip.{ext}']  # no temp left


def test_write_pads_mp4_and_handles_grey(tmp_path):
  video = _source(num_frames=4)[2]['video'][:, :20, :30, :1]  # [4, 20, 30, 1]
  back = video_io.read_video(video_io.write_video(tmp_path / 'grey.mp4', video))
  assert back.shape == (4, 32, 32, 3)
  assert back[:, 20:, :].max() < 10 and back[:, :, 30:].max() < 10  # black padding
  back = video_io.read_video(video_io.write_video(tmp_path / 'grey.gif', video))
  assert back.shape == (4, 20, 30, 3)
  np.testing.assert_array_equal(back[..., 0], video[..., 0])


def test_mp4_io_never_forks_the_jax_process(tmp_path):
  """imageio's ffmpeg writer and reader started ffmpeg with a preexec_fn, which forks the
  whole process: JAX's at-fork hook then warned on every sampled mp4. PyAV now reads and
  writes in process."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.numpy.zeros(1).block_until_ready()  # JAX's threads and its at-fork hook exist
  video = _source(num_frames=4)[1]['video']
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    back = video_io.read_video(video_io.write_video(tmp_path / 'clip.mp4', video))
    assert video_io.count_frames(tmp_path / 'clip.mp4') == 4
  assert back.shape == video.shape
  assert not [w for w in caught if 'fork' in str(w.message)], [str(w.message) for w in caught]


def test_write_video_errors(tmp_path):
  video = np.zeros((2, 16, 16, 3), np.uint8)
  with pytest.raises(ValueError, match=r"clip\.avi.*\('\.mp4', '\.gif'\)"):
    video_io.write_video(tmp_path / 'clip.avi', video)
  with pytest.raises(ValueError, match='uint8'):
    video_io.write_video(tmp_path / 'clip.gif', video.astype(np.float32))
  with pytest.raises(ValueError, match='shape'):
    video_io.write_video(tmp_path / 'clip.gif', video[0])
  with pytest.raises(ValueError, match='fps'):
    video_io.write_video(tmp_path / 'clip.gif', video, fps=0)
  assert not list(tmp_path.iterdir())


def _square_sides(source, n):
  """Side (pixels) of the lit box of every square clip among the first n, frame 0."""
  sides = []
  for idx in range(n):
    ex = source[idx]
    if synthetic.SHAPES[ex['shape']] == 'square':
      lit = _lit(ex['video'])[0] > 127  # pixels more than half covered
      rows, cols = np.flatnonzero(lit.any(axis=1)), np.flatnonzero(lit.any(axis=0))
      sides.append(max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1)
  return np.array(sides)


def test_shape_size_sets_the_box_side():
  default = _square_sides(_source(), 60)
  big = _square_sides(_source(shape_size=(0.5, 0.6)), 60)
  # Same clips (same draws), bigger boxes: 0.20-0.35 of 32 px against 0.5-0.6.
  assert default.min() >= 6 and default.max() <= 12
  assert big.min() >= 16 and big.max() <= 20
  fixed = _square_sides(_source(shape_size=(0.5, 0.5)), 60)
  assert set(fixed.tolist()) == {16}
  assert 'shape_size=(0.5, 0.6)' in repr(_source(shape_size=(0.5, 0.6)))
  for bad in ((0.0, 0.3), (0.4, 0.3), (0.2, 0.8), (0.2,), 'big', (0.2, float('nan'))):
    with pytest.raises(ValueError, match=r'shape_size=.* must be \(min, max\) fractions'):
      _source(shape_size=bad)


def test_shape_size_in_the_config():
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from vdit_jax.config import validate  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.data.shape_size = (0.5, 0.6)
  validate.validate_config(config, num_devices=1)
  source = pipeline._make_source(config.data)  # pylint: disable=protected-access
  assert source.shape_size == (0.5, 0.6)
  config.data.shape_size = (0.5, 0.9)
  with pytest.raises(ValueError, match=r'config.data.shape_size=\(0.5, 0.9\) must be'):
    validate.validate_config(config, num_devices=1)
  # Other sources do not read it (configs/tiny.py sets it and trains on shards too), but
  # a value out of range is still an error.
  config.data.source = 'shards'
  config.data.path = '/some/shards'  # not read: validate_config does not touch the disk
  with pytest.raises(ValueError, match=r'config.data.shape_size=\(0.5, 0.9\) must be'):
    validate.validate_config(config, num_devices=1)
  config.data.shape_size = (0.5, 0.6)
  validate.validate_config(config, num_devices=1)


def test_shape_weights_set_each_shapes_share_and_keep_the_rest_of_the_clip():
  n = 1200
  plain, weighted = _source(num_examples=n), _source(num_examples=n, shape_weights=(2, 1, 1))
  assert _source(shape_weights=()).shape_weights is None
  shares = np.bincount([int(weighted[i]['shape']) for i in range(n)], minlength=3) / n
  # Squares in half the clips: 0.5 +- 4 standard errors of a share over n clips.
  np.testing.assert_allclose(shares, [0.5, 0.25, 0.25], atol=4 * np.sqrt(0.25 / n))
  for i in range(40):
    a, b = plain[i], weighted[i]
    for key in ('colour', 'direction'):
      assert a[key] == b[key], (i, key)
    if a['shape'] == b['shape']:  # same draws: the same clip
      np.testing.assert_array_equal(a['video'], b['video'])
  # A zero weight removes the shape.
  only = _source(shape_weights=(0, 1, 0))
  assert {int(only[i]['shape']) for i in range(60)} == {1}
  assert 'shape_weights=(2.0, 1.0, 1.0)' in repr(weighted)
  for bad in ((1, 1), (1, -1, 1), (0, 0, 0), 'abc', (1, float('nan'), 1), (True, 1, 1)):
    with pytest.raises(ValueError, match=r'shape_weights=.* must be \(\) or 3 finite weights'):
      _source(shape_weights=bad)


def test_shape_weights_in_the_config():
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from vdit_jax.config import validate  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  assert tuple(config.data.shape_weights) == (2.0, 1.0, 1.0)  # squares in half the clips
  assert pipeline._make_source(config.data).shape_weights == (2.0, 1.0, 1.0)  # pylint: disable=protected-access
  config.data.shape_weights = (3, 1, 1)
  validate.validate_config(config, num_devices=1)
  source = pipeline._make_source(config.data)  # pylint: disable=protected-access
  assert source.shape_weights == (3.0, 1.0, 1.0)
  config.data.shape_weights = (1, 1)
  with pytest.raises(ValueError, match=r'config.data.shape_weights=\(1, 1\) must be'):
    validate.validate_config(config, num_devices=1)


def _steps_along(example):
  """Centroid steps [T-1] along the labelled direction, and the largest step across it."""
  unit = np.array({0: (1, 0), 1: (-1, 0), 2: (0, 1), 3: (0, -1)}[int(example['direction'])])
  moves = np.diff(_centroids(example['video']), axis=0)  # [T-1, 2]
  return moves @ unit, np.abs(moves @ unit[::-1]).max()


def test_direction_steps_and_opposites():
  assert [synthetic.direction_step(d).tolist() for d in synthetic.DIRECTIONS] == [
      [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]
  assert synthetic.direction_step(3).tolist() == [0.0, -1.0]  # an index works too
  assert [synthetic.opposite_direction(d) for d in synthetic.DIRECTIONS] == [
      'left', 'right', 'up', 'down']
  assert synthetic.opposite_direction(np.int32(1)) == 'right'
  with pytest.raises(ValueError, match="direction 'sideways' is not one of"):
    synthetic.direction_step('sideways')


def test_bounce_false_keeps_every_path_inside_and_in_the_labelled_direction():
  bouncing = _source(num_frames=16, shape_size=(0.4, 0.55))
  straight = _source(num_frames=16, shape_size=(0.4, 0.55), bounce=False)
  reversed_clips = 0
  for idx in range(60):
    along, across = _steps_along(bouncing[idx])
    reversed_clips += bool((along < -0.5).any())
    example = straight[idx]
    along, across = _steps_along(example)
    # Every step goes the labelled way, at one speed (rasterisation noise only).
    assert along.min() > 0.05, (idx, along)
    assert along.max() - along.min() < 0.15, (idx, along)
    assert across < 0.15, (idx, across)
    video = example['video']
    for ring in (video[:, 0], video[:, -1], video[:, :, 0], video[:, :, -1]):
      assert np.all(ring == video[0, 0, 0]), idx  # never reaches the border
    # The same draws otherwise: shape, colour and direction (hence label) of the clip.
    for key in ('label', 'shape', 'colour', 'direction'):
      assert example[key] == bouncing[idx][key]
  assert reversed_clips > 20  # with bounces, most 16-frame clips of big shapes turn back
  # Short clips keep the drawn speed (1..2.5 px per frame): the cap only binds when the
  # path would not fit.
  speeds = [_steps_along(_source(bounce=False)[idx])[0].mean() for idx in range(40)]
  assert min(speeds) > 0.8 and max(speeds) > 2.0, speeds
  assert 'bounce=False' in repr(straight) and 'bounce' not in repr(bouncing)
  with pytest.raises(ValueError, match="bounce must be True or False, got 'no'"):
    _source(bounce='no')


def test_bounce_in_the_config_and_the_held_out_clips():
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from vdit_jax.config import validate  # pylint: disable=g-import-not-at-top
  from vdit_jax.generate import conditional  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.data.bounce = False
  validate.validate_config(config, num_devices=1)
  assert pipeline._make_source(config.data).bounce is False  # pylint: disable=protected-access
  # Held-out clips (sampling, benches) are drawn with every option of config.data.
  held_out = synthetic.from_data_config(config.data, num_examples=4, seed=7, captions=True)
  direct = synthetic.SyntheticShapes(8, 32, 32, num_examples=4, seed=7, captions=True,
                                     shape_size=(0.4, 0.55), bounce=False)
  for idx in range(4):
    np.testing.assert_array_equal(held_out[idx]['video'], direct[idx]['video'])
  video, captions, _ = conditional.synthetic_clips(config, 4, seed=7)
  np.testing.assert_array_equal(
      video, np.stack([direct[i]['video'] for i in range(4)]) / np.float32(127.5) - 1.0)
  assert captions == [direct[i]['caption'] for i in range(4)]
  # ConfigDict refuses a str for the bool field; a config built with one reaches validate.
  bad = config.to_dict()
  bad['data']['bounce'] = 'no'
  with pytest.raises(ValueError, match="config.data.bounce='no' must be True or False"):
    validate.validate_config(ml_collections.ConfigDict(bad), num_devices=1)
  # Like shape_size, other sources leave it unread (configs/tiny_text.py sets it and may
  # train on shards of precomputed caption embeddings), so it is no error there.
  config.data.bounce = False
  config.data.source = 'shards'
  config.data.path = '/some/shards'  # not read: validate_config does not touch the disk
  validate.validate_config(config, num_devices=1)
