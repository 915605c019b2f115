r"""Clips per second of the input pipeline for each data source and worker count.

python bench/input_pipeline.py [--num_videos=64 --batch_size=8 --num_batches=12]

Writes a temporary folder of --num_videos mp4 clips (synthetic moving shapes,
--video_frames frames of --video_height x --video_width, in 4 class folders), converts
it to shards with tools.make_shards, then times `pipeline.make_dataset` at the tiny
config's clip shape (16 x 32 x 32) for the sources synthetic, files and shards with
num_workers 0 and 2: one batch to warm up (worker start-up, first decode), then
--num_batches timed batches. Prints one line per case and a final JSON line. A
measurement, not a test: it never fails on a number; on a shared machine the figures move
with the load, so compare cases of the same run.
"""

import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vdit_jax.config import defaults  # pylint: disable=g-import-not-at-top
from vdit_jax.data import pipeline
from vdit_jax.data import synthetic
from vdit_jax.data import video_io
from vdit_jax.tools import make_shards as make_shards_lib

FLAGS = flags.FLAGS
flags.DEFINE_integer('num_videos', 64, 'Video files to generate.')
flags.DEFINE_integer('video_frames', 32, 'Frames per generated video.')
flags.DEFINE_integer('video_height', 48, 'Generated video height (resized to 32).')
flags.DEFINE_integer('video_width', 64, 'Generated video width (resized, then cropped).')
flags.DEFINE_integer('batch_size', 8, 'Clips per batch.')
flags.DEFINE_integer('num_batches', 12, 'Timed batches per case.')
flags.DEFINE_list('workers', ['0', '2'], 'num_workers values to time.')
flags.DEFINE_string('tmpdir', None, 'Where to write the videos and shards (default: a '
                    'temporary folder, removed afterwards).')

T, H, W = 16, 32, 32


def _write_videos(root: str) -> float:
  source = synthetic.SyntheticShapes(FLAGS.video_frames, FLAGS.video_height, FLAGS.video_width,
                                     num_examples=FLAGS.num_videos, seed=0)
  t0 = time.perf_counter()
  for i in range(FLAGS.num_videos):
    video_io.write_video(os.path.join(root, f'class{i % 4}', f'clip{i:04d}.mp4'),
                         source[i]['video'], fps=8)
  return time.perf_counter() - t0


def _data_config(source: str, path: str, num_workers: int):
  """The trainer's data defaults (every field the pipeline reads) with this case's values."""
  data = defaults.base_config().data
  data.update(dict(source=source, path=path, num_frames=T, height=H, width=W, channels=3,
                   num_examples=FLAGS.num_videos, num_workers=num_workers, time_stride=1.0,
                   frame_stride=1, clip_start='random', crop='center', source_seed=0))
  return data


def _time_case(source: str, path: str, num_workers: int) -> dict:
  t0 = time.perf_counter()
  it = pipeline.make_dataset(_data_config(source, path, num_workers), FLAGS.batch_size, seed=0,
                             process_index=0, process_count=1)
  next(it)  # warm-up: source set-up, worker start-up, first batch
  first_s = time.perf_counter() - t0
  t1 = time.perf_counter()
  for _ in range(FLAGS.num_batches):
    batch = next(it)
  elapsed = time.perf_counter() - t1
  if hasattr(it, 'close'):
    it.close()
  assert batch['video'].shape == (FLAGS.batch_size, T, H, W, 3)
  clips = FLAGS.num_batches * FLAGS.batch_size
  return {'source': source, 'num_workers': num_workers, 'clips_per_s': clips / elapsed,
          'first_batch_s': first_s}


def main(argv):
  del argv
  workers = [int(w) for w in FLAGS.workers]
  with tempfile.TemporaryDirectory(dir=FLAGS.tmpdir) as tmp:
    videos, shard_dir = os.path.join(tmp, 'videos'), os.path.join(tmp, 'shards')
    write_s = _write_videos(videos)
    t0 = time.perf_counter()
    index = make_shards_lib.make_shards(videos, shard_dir, num_shards=4, num_frames=T,
                                        height=H, width=W, num_workers=2, progress=None)
    shards_s = time.perf_counter() - t0
    print(f'wrote {FLAGS.num_videos} videos of {FLAGS.video_frames}x{FLAGS.video_height}x'
          f'{FLAGS.video_width} in {write_s:.1f}s; make_shards (2 workers): '
          f'{index["num_records"]} clips in {shards_s:.1f}s = '
          f'{index["num_records"] / shards_s:.1f} clips/s', flush=True)
    results = []
    for source, path in (('synthetic', ''), ('files', videos), ('shards', shard_dir)):
      for num_workers in workers:
        r = _time_case(source, path, num_workers)
        results.append(r)
        print(f'{source:9s} num_workers={num_workers}: {r["clips_per_s"]:8.1f} clips/s '
              f'(batch {FLAGS.batch_size} of {T}x{H}x{W}; first batch '
              f'{r["first_batch_s"]:.1f}s)', flush=True)
  print(json.dumps({'clip_shape': [T, H, W, 3], 'batch_size': FLAGS.batch_size,
                    'num_batches': FLAGS.num_batches, 'num_videos': FLAGS.num_videos,
                    'video_shape': [FLAGS.video_frames, FLAGS.video_height,
                                    FLAGS.video_width, 3],
                    'make_shards_clips_per_s': index['num_records'] / shards_s,
                    'cases': results}, sort_keys=True))


if __name__ == '__main__':
  app.run(main)
