"""Grain input pipeline: source -> shuffle -> repeat -> normalise -> batch -> per-process rows.

    it = make_dataset(config.data, batch_size=per_process_batch, seed=config.seed)
    batch = next(it)   # {'video': float32 [b, T, H, W, C] in [-1, 1], 'label': int32 [b]}

The returned iterator is a grain `DatasetIterator`: `get_state()` / `set_state()` capture
exactly where it is, and Orbax checkpoints it next to the train state with

    ocp.args.Composite(state=..., data_iter=grain.checkpoint.CheckpointSave(it))
    ocp.args.Composite(state=..., data_iter=grain.checkpoint.CheckpointRestore(it))

so a resumed run sees the same batches the interrupted one would have seen next.

The global batch sequence depends on the seed and the global batch size only, not on the
number of processes: all processes shuffle the same stream, cut it into blocks of
`batch_size` (the per-process batch), and process i takes blocks i, i + P, i + 2P, ...
So global batch g is stream elements [g * B, (g + 1) * B) with process i holding rows
[i * b, (i + 1) * b) of it, which is where `jax.make_array_from_process_local_data` puts
them when each process's devices hold a contiguous block of the batch dim (as on CPU and
on meshes whose outer axes span processes); 1 and N processes then train on the same
batches. Each process decodes only its own rows. The state saved by a process restores
only that process's iterator (Orbax's grain handler writes one file per process).

Data config fields:
  source        'synthetic' (the built-in `SyntheticShapes`), 'files' (a folder or glob of
                video files, `video_files.VideoFiles`) or 'shards' (ArrayRecord shards
                made by `tools.make_shards`, `shards.ShardSource`)
  num_frames    T
  height, width H, W
  channels      C; must be 3 for 'synthetic' and 'files', the shards' C for 'shards'
  num_examples  clips in the 'synthetic' source (the other sources hold what is on disk)
  num_workers   0 reads in this process; N > 0 renders batches in N grain worker
                processes (`mp_prefetch`), still checkpointable
  time_stride   'synthetic': base-motion frames between consecutive clip frames
                (0.5 = double frame rate)
  source_seed   which clips the synthetic source holds, and the draws of `files`
                source[idx]; the `seed` argument only orders them
  colours       'synthetic': comma list of synthetic.COLOURS to paint the clips with
                ('' = all)
  path          'files': folder or glob of videos; 'shards': the folder holding index.json;
                local (a plain path or file://) or a bucket (gs://bucket/...); one that does
                not exist is reported naming data.path before anything compiles (`num_classes`)
  frame_stride  'files': source frames between consecutive clip frames
  clip_start    'files': 'random' or 'center' start of the clip in the video
  crop          'files': 'center' or 'random' crop after the short-side resize
  buckets, bucket_weights
                several clip shapes, bucket-pure batches; built by
                `buckets.make_dataset`, not here (see data/buckets.py)
Every field is present: the entry point completes the config (`config.resolve.complete`)
from config/defaults.py, which holds each default. A 'files' clip shorter than
(T - 1) * frame_stride + 1 frames is padded with its last frame; unreadable files are
skipped and logged (see video_files.py). 'shards' clips are used as stored: their shape
must equal [num_frames, height, width, channels]. uint8 clips are normalised to [-1, 1];
float clips (latents) reach the model unchanged.

With 'files' the random draws (clip start, crop) come from grain's `random_map`, seeded
from `seed` and the position in the shuffled, repeated stream: each epoch cuts new clips,
deterministically, and a restored iterator continues with the same draws.
"""

from __future__ import annotations

import functools
import numbers

from absl import flags
import grain
import jax
import numpy as np

from vdit_jax.data import audio as audio_lib
from vdit_jax.data import shards
from vdit_jax.data import synthetic
from vdit_jax.data import transforms
from vdit_jax.data import video_files

SOURCES = ('synthetic', 'files', 'shards')
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)
_REQUIRED_FIELDS = ('source', 'num_frames', 'height', 'width', 'channels', 'num_examples',
                    'num_workers', 'time_stride', 'path', 'frame_stride', 'clip_start', 'crop',
                    'source_seed')
_RGB_SOURCES = ('synthetic', 'files')


def _check_int(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}.')
  return int(value)


def sample_only(data_config) -> bool:
  """Latent shards with no data.path but a VAE (data.vae): a config that only samples (a
  pretrained model, e.g. configs/wan.py with train.init_from); training refuses it."""
  return (data_config.source == 'shards' and not data_config.path
          and bool(data_config.latents) and bool(data_config.vae))


def check_data_config(data_config) -> None:
  """The rules of the data config alone (no file system): fields, names, ranges.

  `validate.validate_config` runs this; `_validate` adds the checks against the source
  itself (channels, files on disk, the shards' clip shape).
  """
  missing = [f for f in _REQUIRED_FIELDS if f not in data_config]
  if missing:
    raise ValueError(f'data config is missing field(s) {missing}; it needs all of '
                     f'{list(_REQUIRED_FIELDS)} (start from config/defaults.py, or pass '
                     'the config through config.resolve.complete).')
  source = data_config.source
  if source not in SOURCES:
    raise ValueError(f'data.source={source!r} is not supported; allowed: {list(SOURCES)}.')
  _check_int('data.num_workers', data_config.num_workers, 0)
  if source == 'synthetic' or sample_only(data_config):
    return
  path = data_config.path
  if not isinstance(path, str) or not path:
    what = ('a folder or glob of video files' if source == 'files'
            else 'a folder made by python -m vdit_jax.tools.make_shards')
    raise ValueError(f'data.path={path!r} must name {what} for data.source={source!r}.')
  if source == 'files':
    _check_int('data.frame_stride', data_config.frame_stride, 1)
    _check_int('data.source_seed', data_config.source_seed, 0)
    if data_config.clip_start not in transforms.CLIP_STARTS:
      raise ValueError(f'data.clip_start={data_config.clip_start!r} is not one '
                       f'of {transforms.CLIP_STARTS}.')
    if data_config.crop not in transforms.CROPS:
      raise ValueError(f'data.crop={data_config.crop!r} is not one of '
                       f'{transforms.CROPS}.')


def _validate(data_config) -> None:
  """`check_data_config`, then the source: channels, the path on disk, the shards' shape."""
  check_data_config(data_config)
  source = data_config.source
  if source in _RGB_SOURCES and data_config.channels != 3:
    raise ValueError(f"data.channels must be 3 for source {source!r} (RGB clips), got "
                     f'{data_config.channels!r}.')
  if source == 'files':
    video_files.list_videos(data_config.path)  # raises naming the path if it holds none
  elif source == 'shards' and not sample_only(data_config):
    index = shards.read_index(data_config.path)
    shards.check_readable(data_config.path)  # a bucket: can array_record read it here?
    want = [data_config.num_frames, data_config.height, data_config.width,
            data_config.channels]
    # With data.buckets (data/buckets.py) clips are cut to each bucket's shape instead.
    if list(index['clip_shape']) != want and not data_config.buckets:
      raise ValueError(
          f'data.path={data_config.path!r} holds clips of shape [T, H, W, C] = '
          f'{index["clip_shape"]}, but the data config asks for {want} (data.num_frames, '
          'height, width, channels); set those to the shards\' shape or remake the shards.')


def num_classes(data_config) -> int:
  """Number of class labels the configured source produces (12 for 'synthetic').

  'files': the number of class folders (1 for a flat folder); 'shards': the index's
  num_classes.
  """
  _validate(data_config)
  if data_config.source == 'files':
    return video_files.list_videos(data_config.path).num_classes
  if data_config.source == 'shards':
    if sample_only(data_config):
      return 0
    return int(shards.read_index(data_config.path)['num_classes'])
  return synthetic.NUM_CLASSES


def audio_spec(config):
  """The clips' audio (data/audio.py AudioSpec) when config.audio.enabled, else None."""
  if 'audio' not in config or not config.audio.enabled:
    return None
  return audio_lib.AudioSpec.from_config(config.audio)


def _to_model_inputs(example: dict, captions=None, audio=None) -> dict:
  """Keeps what the model trains on: video as float32 (uint8 -> [-1, 1]), label as int32,
  with `captions` (data/captions.py) the caption's tokens or embedding and mask, and with
  `audio` (an AudioSpec) the soundtrack as normalised log-mel features float32 [F, M]."""
  video = example['video']  # [T, H, W, C]
  if video.dtype == np.uint8:
    video = video.astype(np.float32) * np.float32(1.0 / 127.5) - np.float32(1.0)
  else:  # latents: already the model's scale
    video = video.astype(np.float32)  # [T, H, W, C]
  inputs = {'video': video, 'label': np.int32(example['label'])}
  if captions is not None:
    inputs.update(captions(example))
  if audio is not None:
    if 'audio' not in example:
      raise ValueError('config.audio.enabled=True, but the data source gave a clip without '
                       "'audio' (shards written without --audio?).")
    inputs['audio'] = audio_lib.log_mel(example['audio'], audio).astype(np.float32)  # [F, M]
  return inputs


def _make_source(data_config, captions: bool = False, audio=None, missing_audio='skip'):
  """The configured source: `__len__` and `__getitem__(idx)` -> {'video', 'label', ...}
  (and 'audio' float32 [S] with `audio`, an AudioSpec)."""
  if data_config.source == 'files':
    spec = video_files.ClipSpec(
        num_frames=data_config.num_frames, height=data_config.height,
        width=data_config.width, frame_stride=data_config.frame_stride,
        clip_start=data_config.clip_start, crop=data_config.crop,
        **({} if audio is None else dict(audio=audio, missing_audio=missing_audio)))
    return video_files.VideoFiles(data_config.path, spec,
                                  seed=data_config.source_seed)
  if data_config.source == 'shards':
    return shards.ShardSource(data_config.path)
  return synthetic.from_data_config(data_config, num_examples=data_config.num_examples,
                                    seed=data_config.source_seed,
                                    captions=captions, audio=audio)


def _random_map_seed(seed: int) -> int:
  """A 32-bit seed for the per-element draws, distinct from the shuffle's stream."""
  return int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])


def make_dataset(data_config, batch_size: int, *, seed: int,
                 process_index: int | None = None, process_count: int | None = None,
                 captions=None, audio=None, missing_audio: str = 'skip'):
  """Builds this process's endless, shuffled, batched, checkpointable data iterator.

  Args:
    data_config: ConfigDict with the fields listed in the module docstring.
    batch_size: examples per batch on THIS process (global batch / process count).
    seed: shuffle seed, an integer in [0, 2**32); each epoch is reshuffled from it.
    process_index: this process's index; defaults to `jax.process_index()`.
    process_count: number of processes; defaults to `jax.process_count()`.
    captions: optional `captions.CaptionInputs`: each batch also holds 'tokens' int32
      [b, L] (or 'text_embed' float32 [b, L, E]) and 'text_mask' bool [b, L].
    audio: optional data/audio.py AudioSpec (`audio_spec(config)`): each batch also holds
      'audio' float32 [b, F, M], the clips' soundtracks as normalised log-mel features;
      `missing_audio` ('skip' | 'silence') says what files without audio give.

  Returns:
    A grain `DatasetIterator` yielding {'video': np.float32 [b, T, H, W, C] in [-1, 1],
    'label': np.int32 [b]} forever, with `get_state()` / `set_state()`.
  """
  if data_config.buckets:
    raise ValueError(f'data.buckets={tuple(data_config.buckets)!r} is set: build the bucketed '
                     'iterator with vdit_jax.data.buckets.make_dataset (one batch size per '
                     'bucket), or set data.buckets=() for one clip shape.')
  _validate(data_config)
  if sample_only(data_config):
    raise ValueError("data.path='' (data.source='shards'): training needs the latent shards "
                     '(python -m vdit_jax.tools.encode_latents); data.vae alone only samples.')
  batch_size = _check_int('batch_size', batch_size, 1)
  seed = _check_int('seed', seed, 0)
  if seed >= 2**32:
    raise ValueError(f'seed must be < 2**32 (grain shuffles with 32-bit seeds), got {seed}.')
  if process_count is None:
    process_count = jax.process_count()
  if process_index is None:
    process_index = jax.process_index()
  process_count = _check_int('process_count', process_count, 1)
  process_index = _check_int('process_index', process_index, 0)
  if process_index >= process_count:
    raise ValueError(f'process_index must be in [0, process_count={process_count}), got '
                     f'{process_index}.')

  source = _make_source(data_config, captions=captions is not None, audio=audio,
                        missing_audio=missing_audio)
  if len(source) < process_count:
    what = (f'data.num_examples={len(source)} is' if data_config.source == 'synthetic'
            else f'data.path={data_config.path!r} holds {len(source)} clip(s),')
    raise ValueError(f'{what} fewer than process_count={process_count}; a source must hold '
                     'at least one example per process.')

  if data_config.source == 'files':
    # Indices are shuffled and repeated, then each is decoded with a generator keyed on its
    # position in the stream: new clip starts / crops every epoch, all deterministic.
    ds = grain.MapDataset.range(len(source))
    ds = ds.shuffle(seed=seed)
    ds = ds.repeat(None)
    ds = ds.random_map(source.load, seed=_random_map_seed(seed))
  else:
    ds = grain.MapDataset.source(source)
    ds = ds.shuffle(seed=seed)  # reshuffled per epoch (grain seeds each epoch from `seed`)
    ds = ds.repeat(None)
  ds = ds.map(functools.partial(_to_model_inputs, captions=captions, audio=audio))
  ds = ds.batch(batch_size, drop_remainder=True)
  # This process's rows of each global batch: blocks i, i + P, ... (lazy: only these
  # blocks are ever read, so each process decodes 1/P of the data).
  ds = ds[process_index::process_count]
  # In-process reading prefetches a couple of batches on threads; the default read options
  # (16 threads, 500 elements) would hold hundreds of video batches in memory.
  iter_ds = ds.to_iter_dataset(_READ_OPTIONS)
  if data_config.num_workers > 0:
    # Grain's worker processes read absl flags; outside an absl app (tests, notebooks) they
    # are unparsed and grain would fail, so fall back to the flags' defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    iter_ds = iter_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=int(data_config.num_workers)))
  return iter(iter_ds)
