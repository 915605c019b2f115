r"""Convert a folder (or glob) of videos into ArrayRecord shards of fixed-size clips.

python -m vdit_jax.tools.make_shards --videos=data/clips --out=data/shards \
    --num_shards=8 --num_frames=16 --height=32 --width=32 [--frame_stride=2] \
    [--num_workers=8] [--overwrite] \
    [--audio --sample_rate=16000 --fps=16 --missing_audio=skip]

Train on them with `--config.data.source=shards --config.data.path=data/shards` (the
config's num_frames / height / width must match; channels is 3).

One clip per video, cut exactly as the `files` source cuts it with clip_start='center'
and crop='center' (same frame indices, same padding of short videos with their last
frame, same resize and crop), labels from class folders as there. Worker processes decode
and encode in parallel; the parent writes records in file order, video i to shard
i * num_shards // num_videos, so the shards concatenated hold the readable videos in the
`files` source's order. Files that fail to decode are skipped, counted and listed in the
index ('skipped').

With --audio each record also holds the clip's sound (float32 [S] mono at --sample_rate,
S = num_frames * sample_rate / fps, from the clip's first frame on), read as the `files`
source reads it with ClipSpec.audio: a video whose clips' frame rate (its own /
frame_stride) is not --fps within 1% is skipped, and one without readable sound is skipped
(--missing_audio=skip) or gets zeros (=silence, listed in the index as 'silent'). The
index then holds "audio": {"sample_rate", "fps", "num_samples"}.

Each shard gets its name only when it is complete, and `index.json` is written last, so a
folder with an index is complete. See vdit_jax/data/shards.py for the formats.

--videos and --out may be buckets (gs://bucket/...): videos are downloaded to decode them,
and each finished shard is uploaded whole from a local temporary file (shards.ShardWriter).

Exit status: 0 done, 2 bad input (a ValueError or missing file: the message says which).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import sys
import time

import numpy as np

from absl import app
from absl import flags

from vdit_jax.parallel import fatal
from vdit_jax.data import audio as audio_lib
from vdit_jax.data import shards
from vdit_jax.data import video_files
from vdit_jax.data import video_io

FLAGS = flags.FLAGS
flags.DEFINE_string('videos', None, 'Folder or glob of video files (class sub-folders give '
                    'labels).')
flags.DEFINE_string('out', None, 'Output folder (or gs:// URL) for the shards and '
                    'index.json.')
flags.DEFINE_integer('num_shards', 1, 'Number of shard files.')
flags.DEFINE_integer('num_frames', None, 'Frames per clip, T.')
flags.DEFINE_integer('height', None, 'Clip height H.')
flags.DEFINE_integer('width', None, 'Clip width W.')
flags.DEFINE_integer('frame_stride', 1, 'Source frames between consecutive clip frames.')
flags.DEFINE_integer('num_workers', None, 'Decoding processes (default: the CPU count; 0 '
                     'decodes in this process).')
flags.DEFINE_boolean('overwrite', False, 'Replace the shards already in --out.')
flags.DEFINE_boolean('audio', False, "Store each clip's sound beside its frames.")
flags.DEFINE_integer('sample_rate', 16000, 'With --audio: samples per second of the sound.')
flags.DEFINE_float('fps', 16.0, "With --audio: the clips' frame rate (a video's own divided "
                   'by --frame_stride must match it within 1%).')
flags.DEFINE_enum('missing_audio', 'skip', list(video_files.MISSING_AUDIO),
                  'With --audio: what a video without readable sound gives: skip it, or '
                  'silence (zeros).')

_PROGRESS_EVERY_S = 0.5


def audio_spec(sample_rate: int, fps: float) -> audio_lib.AudioSpec:
  """The AudioSpec of --sample_rate and --fps, its mel fields at their defaults (records
  hold samples; the spec's own checks apply, as they will when training on them)."""
  return audio_lib.AudioSpec(sample_rate=sample_rate, fps=fps)


def _clip_and_sound(path: str, spec):
  """(uint8 [T, H, W, 3] clip, float32 [S] sound, whether the sound is silence for want of
  a readable one); raises (a reason to skip the video) as video_files would skip it."""
  count = video_io.count_frames(path)
  fps = video_io.frame_rate(path)
  mismatch = video_files.frame_rate_mismatch(fps, spec)
  if mismatch is not None:
    raise ValueError(mismatch)
  try:
    clip, sound = video_files.read_clip_with_audio(
        path, count, fps, dataclasses.replace(spec, missing_audio='skip'))
    return clip, sound, False
  except (video_io.NoAudioError, video_io.AudioDecodeError):
    if spec.missing_audio != 'silence':
      raise
  clip = video_files.read_clip(path, count, spec)  # [T, H, W, 3]
  return clip, np.zeros(spec.num_audio_samples, np.float32), True  # [S]


def _encode(task):
  """Worker: (i, path, label, key, spec) -> (i, record bytes or None, failure or None,
  whether the record's sound is silence for want of a readable one)."""
  i, path, label, key, spec = task
  try:
    if spec.audio is None:
      clip = video_files.read_clip(path, video_io.count_frames(path), spec)  # [T, H, W, 3]
      return i, shards.encode_record(clip, label=label, key=key), None, False
    clip, sound, silent = _clip_and_sound(path, spec)
    return i, shards.encode_record(clip, label=label, key=key, audio=sound), None, silent
  except Exception as e:  # pylint: disable=broad-except
    return i, None, video_files.describe_error(e), False


class _Progress:
  """One self-overwriting status line on a stream (None: silent)."""

  def __init__(self, stream, total: int):
    self.stream, self.total = stream, total
    self.start = self.last = time.perf_counter()

  def update(self, done: int, skipped: int, final: bool = False) -> None:
    now = time.perf_counter()
    if self.stream is None or (not final and now - self.last < _PROGRESS_EVERY_S):
      return
    self.last = now
    rate = done / max(now - self.start, 1e-9)
    self.stream.write(f'\rmake_shards: {done}/{self.total} videos, {skipped} skipped, '
                      f'{rate:.1f} videos/s' + ('\n' if final else ''))
    self.stream.flush()


def make_shards(videos, out, *, num_shards: int, num_frames: int, height: int, width: int,
                frame_stride: int = 1, num_workers: int | None = None,
                overwrite: bool = False, progress=sys.stderr, audio=None,
                missing_audio: str = 'skip') -> dict:
  """Writes the shards and index.json of `videos` into `out`; returns the index.

  `audio` (an audio.AudioSpec, see `audio_spec`) stores each clip's sound too;
  `missing_audio` ('skip' | 'silence') is what a video without readable sound gives.
  """
  spec = video_files.ClipSpec(num_frames, height, width, frame_stride, clip_start='center',
                              crop='center', audio=audio, missing_audio=missing_audio)
  listing = video_files.list_videos(videos)
  total = len(listing.paths)
  if isinstance(num_shards, bool) or not isinstance(num_shards, int) or not (
      1 <= num_shards <= total):
    raise ValueError(f'num_shards={num_shards!r} must be an integer in [1, {total}] (the '
                     f'number of video files under {os.fspath(videos)!r}).')
  if num_workers is None:
    num_workers = os.cpu_count() or 1
  if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
    raise ValueError(f'num_workers={num_workers!r} must be an integer >= 0.')
  writer = shards.ShardWriter(shards.prepare_output(out, overwrite), num_shards)

  tasks = [(i, p, listing.labels[i], listing.relative[i], spec)
           for i, p in enumerate(listing.paths)]
  skipped, silent = [], []
  meter = _Progress(progress, total)
  pool = None
  try:
    if num_workers == 0:
      results = map(_encode, tasks)
    else:
      # spawn: the caller may have started threads (JAX does) that fork would copy.
      pool = concurrent.futures.ProcessPoolExecutor(
          num_workers, mp_context=multiprocessing.get_context('spawn'))
      results = pool.map(_encode, tasks, chunksize=max(1, min(16, total // (4 * num_workers))))
    for done, (i, record, failure, no_sound) in enumerate(results, start=1):
      if record is None:
        skipped.append({'path': listing.paths[i], 'reason': failure})
      else:
        writer.write(i * num_shards // total, record)
        if no_sound:
          silent.append(listing.paths[i])
      meter.update(done, len(skipped), final=done == total)
    entries = writer.finish()  # shards every video of which was skipped are left out
  finally:
    writer.abort()
    if pool is not None:
      pool.shutdown(cancel_futures=True)

  if progress is not None:
    for item in skipped:
      progress.write(f'make_shards: skipped {item["path"]}: {item["reason"]}\n')
  if not entries:
    raise ValueError(f'none of the {total} video file(s) under {os.fspath(videos)!r} could '
                     f'be decoded, e.g. {skipped[0]["path"]!r}: {skipped[0]["reason"]}')
  index = {
      'format': shards.FORMAT,
      'shards': entries,
      'num_records': sum(writer.counts),
      'clip_shape': [num_frames, height, width, 3],
      'dtype': 'uint8',
      'num_classes': listing.num_classes,
      'class_names': list(listing.class_names),
      'frame_stride': frame_stride,
      'clip_start': spec.clip_start,
      'crop': spec.crop,
      'source': os.fspath(videos),
      'num_videos': total,
      'num_skipped': len(skipped),
      'skipped': skipped,
  }
  if audio is not None:
    index['audio'] = {'sample_rate': int(audio.sample_rate), 'fps': float(audio.fps),
                      'num_samples': spec.num_audio_samples}
    index['missing_audio'] = missing_audio
    index['num_silent'] = len(silent)
    index['silent'] = silent
  shards.write_index(out, index)
  return index


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  for name in ('videos', 'out', 'num_frames', 'height', 'width'):
    if FLAGS[name].value is None:
      raise app.UsageError(f'--{name} is required.')
  try:
    audio = audio_spec(FLAGS.sample_rate, FLAGS.fps) if FLAGS.audio else None
    index = make_shards(FLAGS.videos, FLAGS.out, num_shards=FLAGS.num_shards,
                        num_frames=FLAGS.num_frames, height=FLAGS.height, width=FLAGS.width,
                        frame_stride=FLAGS.frame_stride, num_workers=FLAGS.num_workers,
                        overwrite=FLAGS.overwrite, audio=audio,
                        missing_audio=FLAGS.missing_audio)
  except (ValueError, FileNotFoundError) as e:
    print(f'make_shards: error: {e}', file=sys.stderr)
    return 2
  print(f'make_shards: wrote {index["num_records"]} clips of {index["clip_shape"]} in '
        f'{len(index["shards"])} shard(s), {index["num_classes"]} class(es), '
        f'{index["num_skipped"]} video(s) skipped, to {FLAGS.out}'
        + (f' (with sound, {index["num_silent"]} silent)' if 'audio' in index else ''),
        flush=True)
  return 0


if __name__ == '__main__':
  fatal.run(main)
