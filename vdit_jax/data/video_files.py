"""A folder (or glob) of video files as a grain random-access source of uint8 clips.

    source = VideoFiles('data/clips', ClipSpec(num_frames=16, height=32, width=32))
    example = source[7]   # {'video': uint8 [16, 32, 32, 3], 'label': int32 []}

Which files: `path` is a folder (searched recursively) or a glob pattern (`**` allowed),
local or in a bucket (gs://...; file:// is a local path); files whose extension is in
`video_io.READ_EXTENSIONS` count, hidden names (starting with '.') do not. Files are sorted
by their path relative to the root, so the index of a file does not depend on the file
system's listing order. A bucket folder is listed folder by folder (one request per
folder, through etils.epath); a bucket glob lists the folder before its first wildcard the
same way and matches each name with glob's rules (`*`, `?`, `[...]` within a name, `**`
any number of folders; hidden folders are not searched). Bucket videos are read in place
(ranged reads through etils.epath, see video_io), but the probe below decodes every file
once on every host: for large data sets, make shards (tools/make_shards.py).

Labels: the root is the folder itself, or for a glob the folder part before the first
wildcard. A video in a sub-folder of the root belongs to the class named by that first
sub-folder (class ids are the sorted class names: 0, 1, ...); when every video lies
directly in the root the dataset is flat, with one class and label 0. A root that mixes
both is an error (the labels would be ambiguous).

Unreadable files: on construction every file is probed (`video_io.count_frames`: a full
decode, run on a few threads); files that fail are skipped, counted (`skipped`) and logged
as a warning, and the source indexes only readable files. If nothing readable is left, the
constructor raises. A file that passed the probe but fails when a clip is read is probed
again: if it is now unreadable or has another frame count (changed or removed during
training) the next index (idx + 1, idx + 2, ..., deterministically) is read instead and a
warning logged, so the run goes on; if it probes as before, the read error is raised (a
bug is not hidden behind substitutes).

Clips: see `transforms` (frame indices with `frame_stride`, start 'random' | 'center',
padding of short videos with their last frame, short-side resize and 'center' | 'random'
crop). `source[idx]` draws its randomness from (seed, idx), so it is deterministic per
index; `source.load(idx, rng)` takes the generator explicitly (the pipeline passes one
that differs per epoch).

Sound: with `ClipSpec.audio` (an `audio.AudioSpec`: sample_rate, fps, num_samples) each
example also gets 'audio', float32 [S] mono in [-1, 1] with S = audio.num_samples(T): the
file's sound over the clip's time span, from its first frame's time (first frame index /
the file's frame rate) on, resampled to audio.sample_rate (`video_io.read_audio`). The
clip's frame rate (the file's / frame_stride) must be audio.fps within 1%, or the file is
skipped with both rates in the reason. The probe decodes the first half second of each
file's sound (`video_io.probe_audio`); a file with no audio stream or one that fails to
decode is, by `missing_audio`: 'skip' -> skipped and counted with the reason; 'silence'
-> kept with zeros for sound, listed in `silent`. A stream damaged past the probe that
fails when a clip is read is, under 'skip', an unreadable file (the next index is used,
logged), under 'silence' zeros (logged).

Captions: a text file beside a video with its stem and `.txt` (`clip.mp4` -> `clip.txt`,
`caption_path`) is that video's caption sidecar: read as UTF-8 (a byte-order mark
allowed) and stripped, it becomes the example's 'caption'. Which videos have one is found
on construction (`caption_paths`); the text is read with each clip, so an edited caption
is seen. Folders without sidecars give examples without 'caption', as before.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fnmatch
import glob
import numbers
import os

from absl import logging
import numpy as np

from vdit_jax.data import transforms
from vdit_jax.data import video_io
from vdit_jax.parallel import paths

CAPTION_EXTENSION = '.txt'  # clip.mp4 -> clip.txt: the clip's caption sidecar
_MAX_SUBSTITUTES = 16  # read-time failures in a row before giving up
_PROBE_THREADS = 8     # probes overlap their bucket reads (and PyAV's decoding) on threads
MISSING_AUDIO = ('skip', 'silence')  # what a file without readable sound gives
FPS_TOLERANCE = 0.01   # a clip's frame rate may differ from audio.fps by this fraction
_AUDIO_ERRORS = (video_io.NoAudioError, video_io.AudioDecodeError)


@dataclasses.dataclass(frozen=True)
class ClipSpec:
  """What one clip is: T frames every `frame_stride` source frames, resized to H x W.

  With `audio` (an `audio.AudioSpec`, or any object with `sample_rate`, `fps` and
  `num_samples(num_frames)`) the clip carries its sound too; `missing_audio` says what a
  file without readable sound gives: 'skip' (left out) or 'silence' (zeros).
  """
  num_frames: int
  height: int
  width: int
  frame_stride: int = 1
  clip_start: str = 'random'  # random | center
  crop: str = 'center'        # center | random
  audio: object | None = None  # audio.AudioSpec
  missing_audio: str = 'skip'  # skip | silence

  def __post_init__(self):
    for name in ('num_frames', 'height', 'width', 'frame_stride'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f'{name} must be an integer >= 1, got {value!r}.')
    if self.clip_start not in transforms.CLIP_STARTS:
      raise ValueError(f'clip_start={self.clip_start!r} is not one of {transforms.CLIP_STARTS}.')
    if self.crop not in transforms.CROPS:
      raise ValueError(f'crop={self.crop!r} is not one of {transforms.CROPS}.')
    if self.missing_audio not in MISSING_AUDIO:
      raise ValueError(f'missing_audio={self.missing_audio!r} is not one of {MISSING_AUDIO}.')
    if self.audio is not None:
      lacking = [a for a in ('sample_rate', 'fps', 'num_samples') if not hasattr(self.audio, a)]
      if lacking:
        raise ValueError(f'audio={self.audio!r} lacks {lacking}: it must be an audio.AudioSpec '
                         '(sample_rate, fps, num_samples(num_frames)).')

  @property
  def num_audio_samples(self) -> int:
    """S, the samples of a clip's sound (audio.num_samples(num_frames)); needs `audio`."""
    return int(round(self.audio.num_samples(self.num_frames)))


@dataclasses.dataclass(frozen=True)
class VideoList:
  """The video files under a root: paths sorted, with their class labels."""
  root: str
  paths: tuple[str, ...]
  labels: tuple[int, ...]
  class_names: tuple[str, ...]  # () when flat
  relative: tuple[str, ...] = ()  # each path relative to the root (the sort key)

  @property
  def num_classes(self) -> int:
    return max(len(self.class_names), 1)


def _is_video(name: str) -> bool:
  return (not name.startswith('.')
          and os.path.splitext(name)[1].lower() in video_io.READ_EXTENSIONS)


def _glob_root(pattern: str, sep: str = os.sep) -> str:
  """The folder part of a glob before its first wildcard component."""
  parts = pattern.split(sep)
  fixed = []
  for part in parts[:-1]:
    if glob.has_magic(part):
      break
    fixed.append(part)
  root = sep.join(fixed)
  if not root and pattern.startswith(sep):
    return sep
  return root  # '' for a relative pattern with a wildcard in its first component


def _find_local(path: str):
  """(root, video paths) of a local folder or glob; raises naming `path` if none."""
  given = path
  if path.startswith('file://'):
    path = path[len('file://'):]
  if os.path.isdir(path):
    root = path
    found = []
    for folder, dirs, files in os.walk(path, followlinks=True):
      dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
      found.extend(os.path.join(folder, f) for f in files if _is_video(f))
    if not found:
      raise FileNotFoundError(
          f'data.path={given!r} is a folder with no video files in it (looked for '
          f'{video_io.READ_EXTENSIONS}, in sub-folders too).')
    return root, found
  root = _glob_root(path) if glob.has_magic(path) else os.path.dirname(path)
  found = [p for p in glob.glob(path, recursive=True)
           if os.path.isfile(p) and _is_video(os.path.basename(p))]
  if not found:
    if not glob.has_magic(path) and not os.path.exists(path):
      raise FileNotFoundError(f'data.path={given!r} does not exist.')
    raise FileNotFoundError(
        f'data.path={given!r} matches no video files (extensions {video_io.READ_EXTENSIONS}).')
  return root, found


def _walk_bucket(root: str):
  """Names of the objects under the bucket folder `root`, relative to it ('/'-separated),
  hidden folders left out."""
  prefix = root.split('://', 1)[1]
  for folder, dirs, files in paths.path(root).walk():
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    # epath's fsspec backend yields folders without the scheme (bucket/a/b).
    folder = os.fspath(folder).split('://', 1)[-1]
    sub = folder[len(prefix):].strip('/')
    yield from (f'{sub}/{f}' if sub else f for f in files)


def _glob_match(parts, pattern) -> bool:
  """Whether the name parts match the glob parts: fnmatch per name, '**' any number."""
  if not pattern:
    return not parts
  if pattern[0] == '**':
    return any(_glob_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
  return (bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0])
          and _glob_match(parts[1:], pattern[1:]))


def _find_in_bucket(path: str):
  """(root, video paths) of a bucket folder or glob (gs://...); raises naming `path`."""
  url = paths.normalize(path)
  if glob.has_magic(url):
    root = _glob_root(url, '/')
    if root.count('/') < 2:  # 'gs:/': a wildcard in the bucket name
      raise ValueError(f'data.path={path!r}: a glob must name its bucket without wildcards '
                       '(gs://bucket/folder/*.mp4).')
    pattern = url[len(root) + 1:].split('/')
    names = [n for n in _walk_bucket(root) if _glob_match(n.split('/'), pattern)]
    found = [f'{root}/{n}' for n in names if _is_video(n.rsplit('/', 1)[-1])]
    if not found:
      raise FileNotFoundError(
          f'data.path={path!r} matches no video files (extensions {video_io.READ_EXTENSIONS}).')
    return root, found
  if paths.isdir(url):
    found = [f'{url}/{n}' for n in _walk_bucket(url) if _is_video(n.rsplit('/', 1)[-1])]
    if not found:
      raise FileNotFoundError(
          f'data.path={path!r} is a folder with no video files in it (looked for '
          f'{video_io.READ_EXTENSIONS}, in sub-folders too).')
    return url, found
  root, name = url.rsplit('/', 1)
  if not paths.isfile(url):
    raise FileNotFoundError(
        f'data.path={path!r} does not exist: no object in the bucket has that name or '
        "prefix (is the bucket name right, and may this job's credentials list it?).")
  if not _is_video(name):
    raise FileNotFoundError(
        f'data.path={path!r} matches no video files (extensions {video_io.READ_EXTENSIONS}).')
  return root, [url]


def list_videos(path) -> VideoList:
  """Finds the video files of a folder or glob and their labels (see the module doc)."""
  path = os.fspath(path) if path is not None else ''
  if not path:
    raise ValueError("data.path is empty: set it to a folder or glob of video files "
                     "(e.g. --config.data.path=data/clips or 'data/**/*.mp4').")
  if paths.is_remote(path):
    root, found = _find_in_bucket(path)
    sep = '/'
    relative = sorted((p[len(root) + 1:], p) for p in found)
  else:
    root, found = _find_local(path)
    sep = os.sep
    relative = sorted((os.path.relpath(p, root or os.curdir), p) for p in found)

  folders = [rel.split(sep)[0] if sep in rel else None for rel, _ in relative]
  names = tuple(rel for rel, _ in relative)
  video_paths = tuple(p for _, p in relative)
  if all(f is None for f in folders):
    return VideoList(root, video_paths, (0,) * len(video_paths), (), names)
  if any(f is None for f in folders):
    top = next(rel for (rel, _), f in zip(relative, folders) if f is None)
    nested = next(rel for (rel, _), f in zip(relative, folders) if f is not None)
    raise ValueError(
        f'data.path={path!r} mixes videos directly in {root or os.curdir!r} (e.g. {top!r}) '
        f'with videos in class folders (e.g. {nested!r}); labels come from the first '
        'sub-folder, so put every video in a class folder, or none.')
  class_names = tuple(sorted(set(folders)))
  ids = {name: i for i, name in enumerate(class_names)}
  return VideoList(root, video_paths, tuple(ids[f] for f in folders), class_names, names)


def describe_error(error: Exception) -> str:
  """One line: the error's type, and the first and last lines of its message (decoders'
  errors can carry pages of log between the two)."""
  lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
  if not lines:
    return type(error).__name__
  text = lines[0] if len(lines) == 1 else f'{lines[0]} ... {lines[-1]}'
  return f'{type(error).__name__}: {text[:300]}'


def _probe(path: str):
  """(frame count, None) or (None, reason)."""
  try:
    return video_io.count_frames(path), None
  except Exception as e:  # pylint: disable=broad-except
    return None, describe_error(e)


def probe_videos(paths, num_threads: int = _PROBE_THREADS):
  """Frame count of each path (None if unreadable) and the reason it failed (or None)."""
  if not paths:
    return [], []
  with concurrent.futures.ThreadPoolExecutor(min(num_threads, len(paths))) as pool:
    results = list(pool.map(_probe, paths))
  return [r[0] for r in results], [r[1] for r in results]


def caption_path(video_path: str) -> str:
  """The caption sidecar of a video: the same path with `.txt` for its extension."""
  return os.path.splitext(video_path)[0] + CAPTION_EXTENSION


def _sidecar(video_path: str):
  """The video's caption sidecar if that file exists, else None."""
  candidate = caption_path(video_path)
  return candidate if paths.isfile(candidate) else None


def find_captions(video_paths, num_threads: int = _PROBE_THREADS) -> tuple:
  """For each video path, its caption sidecar's path, or None where it has none (on
  threads: in a bucket each check is a request)."""
  if not video_paths:
    return ()
  with concurrent.futures.ThreadPoolExecutor(min(num_threads, len(video_paths))) as pool:
    return tuple(pool.map(_sidecar, video_paths))


def read_caption(path: str) -> str:
  """A caption sidecar's text: UTF-8 (a byte-order mark allowed), stripped."""
  data = paths.read_bytes(path)
  try:
    return data.decode('utf-8-sig').strip()
  except UnicodeDecodeError as e:
    raise ValueError(f'caption file {path!r} is not UTF-8 text ({e}); save it as UTF-8.') from e


def _read_frames_clip(path: str, num_available: int, spec: ClipSpec, rng):
  """(uint8 [T, H, W, 3] clip, index of its first source frame)."""
  indices = transforms.clip_frame_indices(num_available, spec.num_frames, spec.frame_stride,
                                          spec.clip_start, rng)  # [T]
  frames = video_io.read_frames(path, indices)  # [T, h, w, 3]
  return transforms.resize_and_crop(frames, spec.height, spec.width, spec.crop, rng), int(
      indices[0])


def read_clip(path: str, num_available: int, spec: ClipSpec,
              rng: np.random.Generator | None = None) -> np.ndarray:
  """One clip of a video with `num_available` frames: uint8 [T, H, W, 3].

  `rng` is only needed when spec.clip_start or spec.crop is 'random'. spec.audio is not
  read here (see read_clip_with_audio).
  """
  return _read_frames_clip(path, num_available, spec, rng)[0]


def frame_rate_mismatch(file_fps: float, spec: ClipSpec) -> str | None:
  """None when the clip's frame rate (file_fps / frame_stride) is spec.audio.fps within
  FPS_TOLERANCE, else the reason (both rates named)."""
  clip_fps = file_fps / spec.frame_stride
  if abs(clip_fps - spec.audio.fps) <= FPS_TOLERANCE * spec.audio.fps:
    return None
  return (f'its clips run at {clip_fps:.4g} fps ({file_fps:.4g} fps / frame_stride '
          f'{spec.frame_stride}), but the audio spec is for fps={spec.audio.fps:.4g} (they must '
          f'agree within {FPS_TOLERANCE:.0%}); the sound would drift from the frames')


def read_clip_audio(path: str, first_frame: int, file_fps: float, spec: ClipSpec) -> np.ndarray:
  """The sound of a clip whose first frame is source frame `first_frame`: float32 [S].

  S = spec.audio.num_samples(T), from time first_frame / file_fps on, at
  spec.audio.sample_rate. Raises video_io.NoAudioError / AudioDecodeError as read_audio.
  """
  return video_io.read_audio(path, start_s=first_frame / file_fps,
                             num_samples=spec.num_audio_samples,
                             sample_rate=int(spec.audio.sample_rate))  # [S]


def read_clip_with_audio(path: str, num_available: int, file_fps: float, spec: ClipSpec,
                         rng: np.random.Generator | None = None, silent: bool = False):
  """(uint8 [T, H, W, 3] clip, float32 [S] sound) of a video with `num_available` frames
  at `file_fps`; the clip is read_clip's (the same draws from `rng`). `silent` gives zeros
  for sound without opening the audio. Under spec.missing_audio='silence' a sound that
  fails to read is zeros too (logged); under 'skip' the error is raised."""
  video, first = _read_frames_clip(path, num_available, spec, rng)
  if silent:
    return video, np.zeros(spec.num_audio_samples, np.float32)  # [S]
  try:
    return video, read_clip_audio(path, first, file_fps, spec)
  except _AUDIO_ERRORS as e:
    if spec.missing_audio != 'silence':
      raise
    logging.warning('video files: the sound of %s cannot be read (%s); using silence.', path,
                    describe_error(e))
    return video, np.zeros(spec.num_audio_samples, np.float32)  # [S]


def _probe_audio(path: str, spec: ClipSpec):
  """(frame rate or None, whether its sound is readable, reason it is skipped or None)."""
  try:
    fps = video_io.frame_rate(path)
  except Exception as e:  # pylint: disable=broad-except
    return None, False, describe_error(e)
  mismatch = frame_rate_mismatch(fps, spec)
  if mismatch is not None:
    return fps, False, mismatch
  ok, why = video_io.probe_audio(path)
  if ok or spec.missing_audio == 'silence':
    return fps, ok, None
  return fps, False, f'no readable sound: {why}'


def probe_audio_files(video_paths, spec: ClipSpec, num_threads: int = _PROBE_THREADS):
  """For each path: (frame rate, sound readable, reason to skip it or None); see _probe_audio."""
  if not video_paths:
    return []
  with concurrent.futures.ThreadPoolExecutor(min(num_threads, len(video_paths))) as pool:
    return list(pool.map(lambda p: _probe_audio(p, spec), video_paths))


def _sift_by_sound(video_paths, counts: list, reasons: list, spec: ClipSpec,
                   num_threads: int):
  """Probes the sound of the files that passed the video probe (counts[i] not None).

  A file to skip gets counts[i] = None and its reason in reasons[i] (both lists changed
  in place). Returns (frame rate of each file or None, indices of the files kept silent)."""
  readable = [i for i, n in enumerate(counts) if n is not None]
  sound = probe_audio_files([video_paths[i] for i in readable], spec, num_threads)
  rates, silent = [None] * len(counts), set()
  for i, (fps, ok, reason) in zip(readable, sound):
    rates[i] = fps
    if reason is not None:
      counts[i], reasons[i] = None, reason
    elif not ok:
      silent.add(i)
  return rates, silent


class VideoFiles:
  """Random-access source of clips from video files (grain `RandomAccessDataSource`).

  Args:
    path: folder or glob (see the module doc).
    spec: the clip to cut from each video.
    seed: non-negative integer; `source[idx]` depends only on (seed, idx) and the files.
    num_probe_threads: threads that probe files on construction.

  Attributes:
    paths, labels, frame_counts: readable files, their labels and frame counts.
    class_names: sorted class folder names (() when flat); num_classes >= 1.
    skipped: (path, reason) of every file the probe rejected.
    caption_paths: each readable file's caption sidecar (`caption_path`), or None.
    frame_rates: each readable file's frame rate (with spec.audio; else None).
    silent: paths of the files whose sound is zeros (spec.missing_audio='silence': no audio
      stream, or one that failed the probe); () without spec.audio.

  `source[idx]` returns {'video': uint8 [T, H, W, 3], 'label': int32 []}, 'caption'
  (str) when the video has a caption sidecar, and 'audio' (float32 [S]) with spec.audio.
  """

  def __init__(self, path, spec: ClipSpec, seed: int = 0,
               num_probe_threads: int = _PROBE_THREADS):
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
      raise ValueError(f'seed must be a non-negative integer, got {seed!r}.')
    self.spec = spec
    self.seed = int(seed)
    listing = list_videos(path)
    self.path = os.fspath(path)
    self.class_names = listing.class_names
    self.num_classes = listing.num_classes
    counts, reasons = probe_videos(listing.paths, num_probe_threads)
    self.frame_rates, self.silent = None, ()
    if spec.audio is not None:
      rates, silent = _sift_by_sound(listing.paths, counts, reasons, spec, num_probe_threads)
    keep = [i for i, n in enumerate(counts) if n is not None]
    self.paths = tuple(listing.paths[i] for i in keep)
    self.labels = tuple(listing.labels[i] for i in keep)
    self.frame_counts = tuple(counts[i] for i in keep)
    self.skipped = tuple((p, r) for p, r in zip(listing.paths, reasons) if r is not None)
    if spec.audio is not None:
      self.frame_rates = tuple(rates[i] for i in keep)
      self.silent = tuple(listing.paths[i] for i in keep if i in silent)
      logging.info('video files %r: %d file(s) with sound, %d silent, %d skipped', self.path,
                   len(self.paths) - len(self.silent), len(self.silent), len(self.skipped))
      if self.silent:
        logging.warning("video files %r: %d file(s) have no readable sound; missing_audio="
                        "'silence' gives them zeros: %s", self.path, len(self.silent),
                        ', '.join(self.silent[:5]) + (' ...' if len(self.silent) > 5 else ''))
    self._silent = frozenset(self.silent)
    self.caption_paths = find_captions(self.paths, num_probe_threads)
    if self.skipped:
      logging.warning('video files %r: skipped %d unreadable file(s) of %d: %s', self.path,
                      len(self.skipped), len(listing.paths),
                      '; '.join(f'{p} ({r})' for p, r in self.skipped[:5])
                      + (' ...' if len(self.skipped) > 5 else ''))
    if not self.paths:
      raise ValueError(
          f'data.path={self.path!r}: none of its {len(listing.paths)} video file(s) could be '
          f'read, e.g. {self.skipped[0][0]!r}: {self.skipped[0][1]}')

  def __len__(self) -> int:
    return len(self.paths)

  def __repr__(self) -> str:
    return (f'VideoFiles({self.path!r}, {self.spec}, seed={self.seed}: {len(self)} videos, '
            f'{self.num_classes} classes, {len(self.skipped)} skipped)')

  def _check_index(self, idx) -> int:
    if isinstance(idx, bool) or not isinstance(idx, numbers.Integral):
      raise TypeError(f'VideoFiles index must be an integer, got {idx!r}.')
    n = len(self)
    requested = int(idx)
    idx = requested + n if requested < 0 else requested
    if not 0 <= idx < n:
      raise IndexError(f'index {requested} is out of range for VideoFiles of length {n}.')
    return idx

  def read(self, idx: int, rng: np.random.Generator | None = None) -> dict:
    """Clip `idx` with randomness from `rng`; raises if the file cannot be decoded."""
    idx = self._check_index(idx)
    path = self.paths[idx]
    if self.spec.audio is None:
      video = read_clip(path, self.frame_counts[idx], self.spec, rng)
      example = {'video': video, 'label': np.int32(self.labels[idx])}
    else:
      video, sound = read_clip_with_audio(path, self.frame_counts[idx], self.frame_rates[idx],
                                          self.spec, rng, silent=path in self._silent)
      example = {'video': video, 'label': np.int32(self.labels[idx]), 'audio': sound}
    if self.caption_paths[idx] is not None:
      example['caption'] = read_caption(self.caption_paths[idx])
    return example

  def load(self, idx: int, rng: np.random.Generator | None = None) -> dict:
    """Like `read`, but a file that has become unreadable is replaced by the next index.

    A failing file is probed again: if the probe now fails or counts other frames, the
    file changed or went away since the source was built, and the next index is used
    (logged). If the file probes as before, the failure is not the file's, and it is
    raised rather than hidden behind substitutes. A sound that fails to decode
    (spec.missing_audio='skip': its stream is damaged past what the probe read) is the
    file's failure: the next index is used (logged).
    """
    idx = self._check_index(idx)
    attempts = min(_MAX_SUBSTITUTES, len(self))
    for attempt in range(attempts):
      candidate = (idx + attempt) % len(self)
      try:
        return self.read(candidate, rng)
      except Exception as e:  # pylint: disable=broad-except
        if (not isinstance(e, _AUDIO_ERRORS)
            and _probe(self.paths[candidate])[0] == self.frame_counts[candidate]):
          raise  # the file is as it was: the failure is not the file's
        logging.warning('video files: %s is no longer readable (%s); using the next index.',
                        self.paths[candidate], describe_error(e))
    raise RuntimeError(f'{attempts} video files in a row have become unreadable, starting '
                       f'at {self.paths[idx]!r}; check data.path={self.path!r}.')

  def __getitem__(self, idx) -> dict:
    idx = self._check_index(idx)
    return self.load(idx, np.random.default_rng([self.seed, idx]))
