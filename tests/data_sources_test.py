"""The 'files' and 'shards' data sources, tools.make_shards, and training through both.

A module fixture writes a tiny class-folder dataset of clips rendered by the synthetic
source (8 frames of 32x32, so they hold moving shapes):

    videos/a/clip0.mp4  clip1.mp4  clip2.gif
    videos/b/clip3.mp4  short.mp4 (3 frames)  corrupt.mp4 (random bytes)
"""

import logging
import os
import re
import shutil
import subprocess
import sys

from array_record.python import array_record_module
import jax
import numpy as np
import pytest

from configs import tiny
from tests.conftest import shrink
from vdit_jax.config import defaults
from vdit_jax.config import validate
from vdit_jax.data import pipeline
from vdit_jax.data import shards
from vdit_jax.data import synthetic
from vdit_jax.data import transforms
from vdit_jax.data import video_files
from vdit_jax.data import video_io
from vdit_jax.tools import make_shards as make_shards_lib
from vdit_jax.train import loop
from vdit_jax.train import metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# file name -> index of the synthetic clip it holds (and how many of its 8 frames)
CLIPS = {'a/clip0.mp4': (0, 8), 'a/clip1.mp4': (1, 8), 'a/clip2.gif': (2, 8),
         'b/clip3.mp4': (3, 8), 'b/short.mp4': (4, 3)}
READABLE = sorted(CLIPS)  # the files source's order: sorted relative paths


@pytest.fixture(scope='module')
def originals():
  source = synthetic.SyntheticShapes(8, 32, 32, num_examples=8, seed=0)
  return {name: source[i]['video'][:n] for name, (i, n) in CLIPS.items()}  # [n, 32, 32, 3]


@pytest.fixture(scope='module')
def videos(tmp_path_factory, originals):
  root = tmp_path_factory.mktemp('videos')
  for name, frames in originals.items():
    video_io.write_video(root / name, frames, fps=8)
  (root / 'b' / 'corrupt.mp4').write_bytes(np.random.default_rng(0).bytes(4096))
  return str(root)


@pytest.fixture(scope='module')
def shard_dir(videos, tmp_path_factory):
  """Shards of 4 x 16 x 16 clips (stride 2), made by the command line with 2 workers."""
  out = str(tmp_path_factory.mktemp('shards'))
  result = subprocess.run(
      [sys.executable, '-m', 'vdit_jax.tools.make_shards', f'--videos={videos}', f'--out={out}',
       '--num_shards=2', '--num_frames=4', '--height=16', '--width=16', '--frame_stride=2',
       '--num_workers=2'], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  assert 'wrote 5 clips of [4, 16, 16, 3] in 2 shard(s), 2 class(es), 1 video(s) skipped' in (
      result.stdout)
  assert 'make_shards: 6/6 videos, 1 skipped' in result.stderr  # the final progress line
  return out


def _spec(**kwargs):
  args = dict(num_frames=4, height=32, width=32, frame_stride=2, clip_start='center',
              crop='center')
  args.update(kwargs)
  return video_files.ClipSpec(**args)


def _data_config(source, path, **overrides):
  config = defaults.base_config().data  # every field, then this test's values
  config.update(dict(
      source=source, path=path, num_frames=4, height=16, width=16, channels=3,
      num_examples=64, num_workers=0, time_stride=1.0, frame_stride=1, clip_start='random',
      crop='center', source_seed=0))
  config.update(overrides)
  return config


# ----------------------------------------------------------------------------- listing


def test_list_videos_labels_from_class_folders(videos, tmp_path):
  listing = video_files.list_videos(videos)
  assert [os.path.relpath(p, videos) for p in listing.paths] == sorted(
      READABLE + ['b/corrupt.mp4'])
  assert listing.class_names == ('a', 'b') and listing.num_classes == 2
  assert listing.labels == (0, 0, 0, 1, 1, 1)
  # A glob's root is its folder part before the first wildcard: same classes.
  globbed = video_files.list_videos(os.path.join(videos, '*', '*.mp4'))
  assert globbed.class_names == ('a', 'b')
  assert [os.path.basename(p) for p in globbed.paths] == [
      'clip0.mp4', 'clip1.mp4', 'clip3.mp4', 'corrupt.mp4', 'short.mp4']
  # A flat folder (or a glob inside one class) is one class, label 0.
  flat = video_files.list_videos(os.path.join(videos, 'b'))
  assert flat.class_names == () and flat.num_classes == 1 and set(flat.labels) == {0}
  # Videos both at the top and in class folders: the labels would be ambiguous.
  mixed = tmp_path / 'mixed'
  (mixed / 'cls').mkdir(parents=True)
  (mixed / 'top.mp4').write_bytes(b'x')
  (mixed / 'cls' / 'in.mp4').write_bytes(b'x')
  with pytest.raises(ValueError, match="mixes videos directly in .* 'top.mp4'"):
    video_files.list_videos(str(mixed))


def test_missing_and_empty_paths_name_the_path(tmp_path):
  missing = str(tmp_path / 'nope')
  with pytest.raises(FileNotFoundError, match=re.escape(f'data.path={missing!r} does not exist')):
    video_files.list_videos(missing)
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'notes.txt').write_text('not a video')
  with pytest.raises(FileNotFoundError,
                     match=re.escape(f'{str(empty)!r} is a folder with no video')):
    video_files.list_videos(str(empty))
  with pytest.raises(FileNotFoundError, match='matches no video files'):
    video_files.list_videos(str(tmp_path / '*.webm'))
  with pytest.raises(ValueError, match='data.path is empty'):
    video_files.list_videos('')
  with pytest.raises(FileNotFoundError, match=re.escape(f'data.path={missing!r} is not a folder')):
    shards.read_index(missing)
  with pytest.raises(FileNotFoundError, match='has no index.json'):
    shards.read_index(str(empty))
  # Through the pipeline, before any source is built.
  with pytest.raises(FileNotFoundError, match='does not exist'):
    pipeline.num_classes(_data_config('files', missing))
  with pytest.raises(FileNotFoundError, match='has no index.json'):
    pipeline.make_dataset(_data_config('shards', str(empty)), 2, seed=0)


# -------------------------------------------------------------------------- transforms


def test_clip_frame_indices():
  np.testing.assert_array_equal(transforms.clip_frame_indices(8, 4, 2, 'center'), [0, 2, 4, 6])
  np.testing.assert_array_equal(transforms.clip_frame_indices(20, 4, 2, 'center'),
                                [6, 8, 10, 12])  # span 7, starts 0..13, middle 6
  # Short videos: past the end is the last frame.
  np.testing.assert_array_equal(transforms.clip_frame_indices(3, 4, 1, 'center'), [0, 1, 2, 2])
  np.testing.assert_array_equal(transforms.clip_frame_indices(1, 3, 5, 'random',
                                                              np.random.default_rng(0)),
                                [0, 0, 0])
  starts = {int(transforms.clip_frame_indices(10, 4, 2, 'random',
                                              np.random.default_rng(s))[0]) for s in range(40)}
  assert starts == {0, 1, 2, 3}  # span 7 of 10 frames: every start 0..3 occurs, no other
  with pytest.raises(ValueError, match="clip start 'random' needs an rng"):
    transforms.clip_frame_indices(10, 4, 1, 'random')
  with pytest.raises(ValueError, match="clip start='middle' is not one of"):
    transforms.clip_frame_indices(10, 4, 1, 'middle')


def test_resize_and_crop():
  frames = np.random.default_rng(0).integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)
  # Same size: untouched.
  np.testing.assert_array_equal(transforms.resize_and_crop(frames, 32, 48), frames)
  # Short side already fits: a centre slice.
  np.testing.assert_array_equal(transforms.resize_and_crop(frames, 32, 32),
                                frames[:, :, 8:40])
  # Random crops are slices at offsets 0..16, chosen by the rng.
  crops = {transforms.resize_and_crop(frames, 32, 32, 'random',
                                      np.random.default_rng(s)).tobytes() for s in range(8)}
  assert len(crops) > 1 and all(
      any(c == frames[:, :, o:o + 32].tobytes() for o in range(17)) for c in crops)
  # Short-side resize: 32x48 -> 16x24, then the centre 16x16; a flat colour stays flat.
  flat = np.full((2, 32, 48, 3), 200, np.uint8)
  out = transforms.resize_and_crop(flat, 16, 16)
  assert out.shape == (2, 16, 16, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, 200)
  # A left/right split image, shrunk: the centre crop keeps the split in the middle.
  split = np.zeros((1, 32, 48, 1), np.uint8)
  split[:, :, 24:] = 255
  out = transforms.resize_and_crop(split, 16, 16)[0, :, :, 0]  # [16, 16]
  assert out[:, :7].max() == 0 and out[:, 9:].min() == 255
  with pytest.raises(ValueError, match='uint8 frames'):
    transforms.resize_and_crop(frames.astype(np.float32), 16, 16)


# ------------------------------------------------------------------------ files source


def test_files_source_clips_labels_and_skips(videos, originals, caplog):
  with caplog.at_level(logging.WARNING):
    source = video_files.VideoFiles(videos, _spec())
  assert len(source) == 5 and source.num_classes == 2
  assert [os.path.relpath(p, videos) for p in source.paths] == READABLE
  assert source.frame_counts == (8, 8, 8, 8, 3)
  assert [os.path.basename(p) for p, _ in source.skipped] == ['corrupt.mp4']
  assert 'skipped 1 unreadable file(s) of 6' in caplog.text and 'corrupt.mp4' in caplog.text
  for i, name in enumerate(READABLE):
    example = source[i]
    assert example['video'].shape == (4, 32, 32, 3) and example['video'].dtype == np.uint8
    assert example['label'].dtype == np.int32 and example['label'] == (name[0] == 'b')
    want = originals[name][np.minimum([0, 2, 4, 6], len(originals[name]) - 1)]  # [4, 32, ..]
    err = np.abs(example['video'].astype(np.float32) - want).mean()
    if name.endswith('.gif'):
      assert err == 0  # gif is lossless
    else:
      assert err < 2.5  # H.264 is lossy...
    if len(originals[name]) == 8:  # ...but far closer to these frames than to the odd ones
      odd = originals[name][[1, 3, 5, 7]]
      assert err < 0.5 * np.abs(example['video'].astype(np.float32) - odd).mean()
  short = source[READABLE.index('b/short.mp4')]['video']
  np.testing.assert_array_equal(short[2], short[1])  # frames 2, 2, 2 of a 3-frame clip
  np.testing.assert_array_equal(short[3], short[1])
  # Deterministic per index: a new source gives the same clips.
  again = video_files.VideoFiles(videos, _spec())
  for i in range(len(source)):
    np.testing.assert_array_equal(again[i]['video'], source[i]['video'])


def test_files_source_random_draws_are_deterministic(videos):
  spec = _spec(num_frames=2, frame_stride=1, height=16, width=16, clip_start='random',
               crop='random')
  a, b = video_files.VideoFiles(videos, spec, seed=1), video_files.VideoFiles(videos, spec, seed=1)
  for i in range(len(a)):
    np.testing.assert_array_equal(a[i]['video'], b[i]['video'])
  # Other seeds draw other starts / crops for the same file.
  clips = {video_files.VideoFiles(videos, spec, seed=s)[0]['video'].tobytes() for s in range(4)}
  assert len(clips) > 1


def test_nothing_readable_is_an_error(tmp_path):
  (tmp_path / 'bad.mp4').write_bytes(b'\x00' * 100)
  with pytest.raises(ValueError, match=r"none of its 1 video file\(s\) could be read"):
    video_files.VideoFiles(str(tmp_path), _spec())


# ----------------------------------------------------------------------------- shards


def test_make_shards_holds_the_files_source_clips(videos, shard_dir, tmp_path):
  index = shards.read_index(shard_dir)
  assert [s['num_records'] for s in index['shards']] == [3, 2]  # videos 0-2 | 3-5 of 6
  assert index['num_records'] == 5 and index['num_classes'] == 2
  assert index['class_names'] == ['a', 'b'] and index['clip_shape'] == [4, 16, 16, 3]
  assert [os.path.basename(s['path']) for s in index['skipped']] == ['corrupt.mp4']
  source = shards.ShardSource(shard_dir)
  files = video_files.VideoFiles(videos, _spec(height=16, width=16))
  assert len(source) == len(files) == 5
  for i in range(5):
    got, want = source[i], files[i]
    np.testing.assert_array_equal(got['video'], want['video'])
    assert got['label'] == want['label'] and got['key'] == READABLE[i]
  # In-process with no workers: the same records, byte for byte.
  index0 = make_shards_lib.make_shards(videos, tmp_path / 'in_process', num_shards=2,
                                       num_frames=4, height=16, width=16, frame_stride=2,
                                       num_workers=0, progress=None)
  assert index0['shards'] == index['shards']
  for shard in index['shards']:
    readers = [array_record_module.ArrayRecordReader(os.path.join(d, shard['name']))
               for d in (shard_dir, str(tmp_path / 'in_process'))]
    assert readers[0].read_all() == readers[1].read_all()
    for r in readers:
      r.close()
  # An existing shard folder is not overwritten by accident.
  with pytest.raises(ValueError, match='already holds shards'):
    make_shards_lib.make_shards(videos, shard_dir, num_shards=2, num_frames=4, height=16,
                                width=16, num_workers=0, progress=None)
  with pytest.raises(ValueError, match=r'num_shards=7 must be an integer in \[1, 6\]'):
    make_shards_lib.make_shards(videos, tmp_path / 'x', num_shards=7, num_frames=4,
                                height=16, width=16, num_workers=0, progress=None)


@pytest.mark.parametrize('damage, match', [
    ('truncated_shard', r'shard-00000-of-00002\.array_record is not a readable ArrayRecord shard'),
    ('foreign_shard', r'shard-00000-of-00002\.array_record is not a readable ArrayRecord shard '
                      r'\(ArrayRecord file should be'),
    ('truncated_index', r'index\.json is not the JSON index make_shards writes'),
])
def test_a_damaged_shard_folder_names_the_file(shard_dir, tmp_path, damage, match):
  """Issue 27: array_record's RuntimeError named no file (or had no message at all)."""
  folder = tmp_path / 'copy'
  shutil.copytree(shard_dir, folder)
  name = {'truncated_index': shards.INDEX_NAME}.get(damage, 'shard-00000-of-00002.array_record')
  path = folder / name
  data = path.read_bytes()
  path.write_bytes(b'not an array record' if damage == 'foreign_shard' else data[:len(data) // 2])
  with pytest.raises(ValueError, match=match) as e:
    shards.ShardSource(str(folder))
  assert str(path) in str(e.value) and 'make_shards' in str(e.value)


def _write_latent_shards(directory, latents, labels):
  os.makedirs(directory)
  writer = array_record_module.ArrayRecordWriter(
      os.path.join(directory, shards.shard_name(0, 1)), shards.WRITER_OPTIONS)
  for i, (latent, label) in enumerate(zip(latents, labels)):
    writer.write(shards.encode_record(latent, label=label, caption=f'clip {i}',
                                      caption_embedding=np.full((3, 8), i, np.float16)))
  writer.close()
  shards.write_index(directory, {
      'format': shards.FORMAT, 'shards': [{'name': shards.shard_name(0, 1),
                                           'num_records': len(latents)}],
      'num_records': len(latents), 'clip_shape': list(latents.shape[1:]), 'dtype': 'float32',
      'num_classes': 5})


def test_latent_shards_reach_the_model_unchanged(tmp_path):
  latents = np.random.default_rng(0).normal(size=(4, 2, 4, 4, 16)).astype(np.float32)
  directory = str(tmp_path / 'latents')
  _write_latent_shards(directory, latents, [0, 1, 2, 4])
  source = shards.ShardSource(directory)
  example = source[3]
  np.testing.assert_array_equal(example['video'], latents[3])
  assert example['label'] == 4 and example['caption'] == 'clip 3'
  np.testing.assert_array_equal(example['caption_embedding'], np.full((3, 8), 3, np.float16))
  config = _data_config('shards', directory, num_frames=2, height=4, width=4, channels=16)
  assert pipeline.num_classes(config) == 5
  batch = next(pipeline.make_dataset(config, 4, seed=0, process_index=0, process_count=1))
  assert batch['video'].dtype == np.float32 and batch['label'].dtype == np.int32
  order = np.argsort(batch['label'])  # one epoch, shuffled: sort back by label
  np.testing.assert_array_equal(batch['video'][order], latents)  # not rescaled
  with pytest.raises(ValueError, match=r'holds clips of shape \[T, H, W, C\] = \[2, 4, 4, 16\], '
                                       r'but the data config asks for \[2, 4, 4, 3\]'):
    pipeline.num_classes(_data_config('shards', directory, num_frames=2, height=4, width=4))


# --------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize('source', ['files', 'shards'])
def test_iterator_state_round_trip(source, videos, shard_dir):
  config = _data_config(source, videos if source == 'files' else shard_dir, frame_stride=2)
  it = pipeline.make_dataset(config, 2, seed=3, process_index=0, process_count=1)
  first = next(it)
  assert first['video'].shape == (2, 4, 16, 16, 3) and first['video'].dtype == np.float32
  assert first['video'].min() >= -1.0 and first['video'].max() <= 1.0
  assert set(first['label'].tolist()) <= {0, 1}
  state = it.get_state()
  want = [next(it) for _ in range(3)]
  fresh = pipeline.make_dataset(config, 2, seed=3, process_index=0, process_count=1)
  np.testing.assert_array_equal(next(fresh)['video'], first['video'])  # deterministic
  fresh.set_state(state)
  for w in want:
    got = next(fresh)
    np.testing.assert_array_equal(got['video'], w['video'])
    np.testing.assert_array_equal(got['label'], w['label'])


def test_files_pipeline_cuts_new_clips_each_epoch(videos):
  config = _data_config('files', videos, num_frames=2, height=32, width=32)
  it = pipeline.make_dataset(config, 5, seed=0, process_index=0, process_count=1)
  epochs = [next(it) for _ in range(2)]  # 5 readable videos: one batch is one epoch
  for e in epochs:
    np.testing.assert_array_equal(np.sort(e['label']), [0, 0, 0, 1, 1])
  clips = [{v.tobytes() for v in e['video']} for e in epochs]
  assert clips[0] != clips[1]  # random starts drawn again in epoch 1


def test_files_pipeline_with_workers_matches_in_process(videos):
  config = _data_config('files', videos)
  want = [next(pipeline.make_dataset(config, 2, seed=5, process_index=0, process_count=1))]
  config.num_workers = 1
  it = pipeline.make_dataset(config, 2, seed=5, process_index=0, process_count=1)
  got = next(it)
  it.close()
  np.testing.assert_array_equal(got['video'], want[0]['video'])
  np.testing.assert_array_equal(got['label'], want[0]['label'])


@pytest.mark.parametrize('overrides,match', [
    (dict(source='ucf101'), r"data.source='ucf101' is not supported; allowed: "
                            r"\['synthetic', 'files', 'shards'\]"),
    (dict(path=''), r"data.path='' must name a folder or glob of video files"),
    (dict(clip_start='middle'), r"data.clip_start='middle' is not one of"),
    (dict(crop='left'), r"data.crop='left' is not one of"),
    (dict(frame_stride=0), 'data.frame_stride must be an integer >= 1'),
])
def test_validate_config_checks_the_data_fields(overrides, match):
  config = tiny.get_config()
  config.data.source = 'files'
  config.data.path = '/some/videos'  # not read: validate_config does not touch the disk
  config.data.update(overrides)
  with pytest.raises(ValueError, match=match):
    validate.validate_config(config, num_devices=1)


def test_source_checks_channels_and_process_count(videos):
  with pytest.raises(ValueError, match="data.channels must be 3 for source 'files'"):
    pipeline.num_classes(_data_config('files', videos, channels=1))
  with pytest.raises(ValueError, match=r'holds 5 clip\(s\), fewer than process_count=6'):
    pipeline.make_dataset(_data_config('files', videos), 1, seed=0, process_index=0,
                          process_count=6)


# --------------------------------------------------------------------- train end to end


def _tiny_train_config(source, path):
  return shrink(tiny.get_config(),
                # 96 values per tubelet: width 32 is a test shape; one block, unrolled: it
                # compiles faster
                model=dict(width=32, mlp_dim=64, patch_size=(2, 4, 4), scan_layers=False),
                data=dict(source=source, path=path, frame_stride=2),
                train=dict(batch_size=2, num_steps=2))


@pytest.fixture
def fast_compile():
  """XLA without most optimisations: these runs check plumbing, and compiling is most of
  their time (about half the CPU time with this flag, measured)."""
  previous = jax.config.values['jax_disable_most_optimizations']
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)


@pytest.mark.parametrize('source', ['files', 'shards'])
def test_train_through_source(source, videos, shard_dir, tmp_path, fast_compile):
  config = _tiny_train_config(source, videos if source == 'files' else shard_dir)
  workdir = str(tmp_path / source)
  state = loop.train_and_evaluate(config, workdir)
  assert int(state.step) == 2
  records = metrics_lib.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  assert [r['step'] for r in records] == [1, 2]
  assert all(np.isfinite(r['loss']) and r['loss'] > 0 for r in records)
  assert '2' in os.listdir(os.path.join(workdir, 'checkpoints'))
  assert os.listdir(os.path.join(workdir, 'samples'))
