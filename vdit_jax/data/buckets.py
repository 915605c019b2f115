"""Multi-resolution / multi-duration training: bucket-pure batches of several clip shapes.

    config.data.buckets = ((16, 32, 32, 8), (8, 48, 48, 8))   # (T, H, W, global batch)
    it, plan = make_dataset(config.data, seed=config.seed)
    batch = next(it)   # {'video': float32 [b, T, H, W, C], 'label': int32 [b]}, one bucket

Config: `data.buckets` lists (T, H, W, B) per bucket: a clip shape and that bucket's GLOBAL
batch B (over all processes and devices; it replaces train.batch_size for that bucket's
steps). Batch sizes are given per bucket, not derived from a token budget: B = 8 at
16x32x32 and B = 8 at 8x48x48 are 8 * 512 and 8 * 576 tokens with (2, 4, 4) patches, and
picking B per bucket keeps every batch divisible by the mesh as the user intends. The empty
tuple (the default) is no bucketing: `pipeline.make_dataset` and today's behaviour.
`data.bucket_weights` ('synthetic' only): one positive weight per bucket (default equal).

Which clip goes to which bucket:
  'synthetic' renders any size, so clip idx goes to bucket b with probability
      weights[b] / sum(weights), decided by u_idx, element idx of the uniform stream
      np.random.default_rng([source_seed, ASSIGN_STREAM]): a pure function of
      (source_seed, idx, weights), the same for any num_examples > idx.
  'files' and 'shards' go by `best_bucket`: among the buckets whose clip span
      (T - 1) * frame_stride + 1 fits in the video, else among the shortest buckets, the
      one with the closest aspect ratio |log(W/H) - log(w/h)|, then the longest T, then
      the closest pixel count, then the first listed. The clip is then cut to the bucket's
      shape by `transforms` (frame sampling, short-side resize, crop). A shard folder
      stores one clip shape (index.json), so all its clips fit the same bucket; float
      (latent) shards are not resized: that bucket's shape must be the stored one.
A bucket that receives no clips raises ValueError here (before anything compiles); one
with fewer clips than its batch logs a warning (its batches repeat clips).

Order of batches: each bucket is its own grain pipeline (shuffle, repeat, decode, batch,
this process's rows), as in `pipeline.make_dataset`. Global batch g comes from the bucket
`Schedule.locate(g)` picks: a smooth, deterministic interleave with weights proportional
to each bucket's batches per epoch (clips / B), so every bucket runs through its clips at
the same pace; bucket 0 gives batch 0. The interleave is a grain `MapDataset` over the
bucket pipelines, so the iterator's state is one index: `get_state` / `set_state` and the
Orbax grain handler restore exactly, whatever bucket comes next, and
`Schedule.counts(step)` gives the batches each bucket has supplied before any step, also
after a resume. Processes take rows of the same global batches, as in `pipeline`.

Sampling after training uses the FIRST bucket's (T, H, W) (`sample_config`).
"""

from __future__ import annotations

# This module is the bucketed twin of pipeline.make_dataset and reuses its helpers
# (_make_source, _to_model_inputs, _check_int, _READ_OPTIONS), so the two stay in step.
# pylint: disable=protected-access

import concurrent.futures
import copy
import dataclasses
import functools
import math
import numbers
import sys
from typing import Sequence

from absl import flags
from absl import logging
import grain
import jax
import numpy as np

from vdit_jax.data import pipeline
from vdit_jax.data import shards
from vdit_jax.data import transforms
from vdit_jax.data import video_files
from vdit_jax.data import video_io

ASSIGN_STREAM = 0x6275636B  # 'buck': the synthetic assignment's stream, apart from others
_MIN_SYNTHETIC_SIDE = 8  # synthetic.SyntheticShapes' smallest frame side
_PROBE_THREADS = 8


@dataclasses.dataclass(frozen=True)
class Bucket:
  """One clip shape and its global batch."""
  num_frames: int
  height: int
  width: int
  batch_size: int  # global, over all processes and devices

  @property
  def shape(self) -> tuple[int, int, int]:
    return (self.num_frames, self.height, self.width)

  @property
  def name(self) -> str:
    return f'{self.num_frames}x{self.height}x{self.width}'

  def describe(self, index: int) -> str:
    return (f'data.buckets[{index}]=({self.num_frames}, {self.height}, {self.width}, '
            f'{self.batch_size})')


def _is_int(value) -> bool:
  return not isinstance(value, bool) and isinstance(value, numbers.Integral)


def parse(data_config) -> tuple[Bucket, ...]:
  """data.buckets as Buckets (() when unset); raises ValueError naming a bad entry."""
  raw = data_config.buckets or ()
  if not isinstance(raw, (tuple, list)):
    raise ValueError(f'config.data.buckets={raw!r} must be a tuple of (T, H, W, global_batch) '
                     'tuples, or () for no bucketing.')
  buckets = []
  for i, entry in enumerate(raw):
    if (not isinstance(entry, (tuple, list)) or len(entry) != 4
        or not all(_is_int(v) and v >= 1 for v in entry)):
      raise ValueError(f'config.data.buckets[{i}]={entry!r} must be (T, H, W, global_batch): '
                       'four positive integers.')
    buckets.append(Bucket(*(int(v) for v in entry)))
  for i, b in enumerate(buckets):
    for j in range(i):
      if buckets[j].shape == b.shape:
        raise ValueError(f'config.data.buckets[{i}] and [{j}] both have the clip shape '
                         f'(T, H, W)={b.shape}; each bucket needs its own shape.')
  return tuple(buckets)


def enabled(data_config) -> bool:
  return bool(data_config.buckets)


def weights(data_config, buckets: Sequence[Bucket]) -> tuple[float, ...]:
  """data.bucket_weights (synthetic only), checked; equal weights when unset."""
  raw = tuple(data_config.bucket_weights or ())
  if not raw:
    return (1.0,) * len(buckets)
  if data_config.source != 'synthetic':
    raise ValueError(f'config.data.bucket_weights={raw!r} only applies to '
                     f"data.source='synthetic'; {data_config.source!r} clips go to the bucket "
                     'that fits their shape (set bucket_weights=()).')
  if len(raw) != len(buckets):
    raise ValueError(f'config.data.bucket_weights={raw!r} has {len(raw)} entries; it needs '
                     f'one per bucket ({len(buckets)}).')
  for i, w in enumerate(raw):
    if (isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w)
        or w <= 0):
      raise ValueError(f'config.data.bucket_weights[{i}]={w!r} must be a finite number > 0 '
                       '(drop the bucket instead of weighting it 0).')
  return tuple(float(w) for w in raw)


def check_config(config, spec, process_count: int, batch_ways, length_ways) -> None:
  """The bucket rules of a config (validate.py runs this); nothing when unbucketed.

  `batch_ways` / `length_ways`: (mesh axes, size) that shard the batch dim and the token
  dim (the logical axes 'activation_batch' / 'activation_length').
  """
  # Imported here: model code is not needed to build a data pipeline.
  from vdit_jax.model import attention_patterns  # pylint: disable=g-import-not-at-top
  from vdit_jax.model import patching  # pylint: disable=g-import-not-at-top

  data = config.data
  buckets = parse(data)
  weights(data, buckets)
  if not buckets:
    return
  k_max = config.model.context_frames_max or 0
  accum = config.train.grad_accum_steps
  batch_axes, batch_n = batch_ways
  length_axes, length_n = length_ways
  for i, b in enumerate(buckets):
    what = b.describe(i)
    if data.source == 'synthetic' and min(b.height, b.width) < _MIN_SYNTHETIC_SIDE:
      raise ValueError(f'{what}: synthetic frames need H and W >= {_MIN_SYNTHETIC_SIDE} so a '
                       'shape fits inside.')
    try:
      patching.check_patch(b.shape, spec.patch_size)
      grid = patching.token_grid(b.shape, spec.patch_size)
      attention_patterns.check_grid(spec.pattern, grid)
    except ValueError as e:
      raise ValueError(f'{what}: {e}') from None
    if k_max >= b.num_frames:
      raise ValueError(f'{what}: model.context_frames_max={k_max} must be < the bucket\'s '
                       f'T={b.num_frames}, so every clip keeps a frame to generate.')
    if b.batch_size % process_count:
      raise ValueError(f'{what}: the global batch {b.batch_size} is not divisible by the '
                       f'process count {process_count}.')
    if b.batch_size % batch_n:
      raise ValueError(f'{what}: the global batch {b.batch_size} is not divisible by '
                       f'{batch_n}, the size of mesh axes {batch_axes} that shard the batch '
                       "(logical axis 'activation_batch').")
    if (b.batch_size // batch_n) % accum:
      raise ValueError(f'{what}: {b.batch_size // batch_n} clips per batch shard (split '
                       f'{batch_n} ways over {batch_axes}) is not divisible by '
                       f'train.grad_accum_steps={accum}; use a batch that is a multiple of '
                       f'{batch_n * accum}.')
    tokens = int(np.prod(grid))
    if tokens % length_n:
      raise ValueError(f'{what}: {tokens} tokens per clip (T/pt * H/ph * W/pw) is not '
                       f'divisible by {length_n}, the size of mesh axes {length_axes} that '
                       "shard the tokens (logical axis 'activation_length').")


def sample_config(config):
  """The config sampling uses: with buckets, data.(num_frames, height, width) are the
  first bucket's; unchanged (the same object) without buckets."""
  buckets = parse(config.data)
  if not buckets:
    return config
  config = config.copy_and_resolve_references()
  config.data.num_frames, config.data.height, config.data.width = buckets[0].shape
  return config


# --- which bucket a clip goes to ---------------------------------------------------------


def assign_synthetic(num_examples: int, bucket_weights: Sequence[float],
                     seed: int) -> np.ndarray:
  """Bucket of each synthetic clip: int64 [num_examples] (see the module doc)."""
  u = np.random.default_rng([int(seed), ASSIGN_STREAM]).random(int(num_examples))  # [N]
  edges = np.cumsum(np.asarray(bucket_weights, np.float64))  # [K]
  edges /= edges[-1]
  return np.minimum(np.searchsorted(edges, u, side='right'), len(edges) - 1)  # [N]


def best_bucket(num_available: int, height: int, width: int, buckets: Sequence[Bucket],
                frame_stride: int = 1) -> int:
  """The bucket a video of `num_available` frames of h x w fits best (module doc)."""
  fits = [i for i, b in enumerate(buckets)
          if transforms.clip_span(b.num_frames, frame_stride) <= num_available]
  if not fits:  # too short for every bucket: pad the fewest frames
    shortest = min(b.num_frames for b in buckets)
    fits = [i for i, b in enumerate(buckets) if b.num_frames == shortest]
  aspect, pixels = math.log(width / height), math.log(width * height)

  def key(i):
    b = buckets[i]
    # Rounded so that equal distances computed along different paths tie.
    return (round(abs(math.log(b.width / b.height) - aspect), 9), -b.num_frames,
            round(abs(math.log(b.width * b.height) - pixels), 9), i)

  return min(fits, key=key)


def _frame_size(path: str):
  """(h, w) of a video's first frame."""
  return video_io.read_frames(path, [0]).shape[1:3]


def probe_frame_sizes(paths: Sequence[str], num_threads: int = _PROBE_THREADS):
  """(h, w) of each video (one decoded frame each, on threads)."""
  if not paths:
    return []
  with concurrent.futures.ThreadPoolExecutor(min(num_threads, len(paths))) as pool:
    return list(pool.map(_frame_size, paths))


# --- the order of batches ----------------------------------------------------------------


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


class Schedule:
  """Which bucket each global batch comes from: a deterministic, smooth interleave.

  With integer weights w (total W), bucket 0 takes the batches g where ceil(g w0 / W)
  steps up, so it has supplied exactly ceil(g w0 / W) of the first g; the others share
  the rest by the same rule, recursively (bucket 1 with w1 / (W - w0), ...). Both
  `locate` and `counts` are closed forms: no state beyond the batch index.
  """

  def __init__(self, bucket_weights: Sequence[int]):
    if not bucket_weights or not all(_is_int(w) and w >= 1 for w in bucket_weights):
      raise ValueError(f'schedule weights must be positive integers, got {bucket_weights!r}.')
    self.weights = tuple(int(w) for w in bucket_weights)

  def __repr__(self) -> str:
    return f'Schedule({self.weights})'

  def locate(self, g: int) -> tuple[int, int]:
    """(bucket, index of the batch within that bucket's stream) of global batch g."""
    rest = sum(self.weights)
    for b, w in enumerate(self.weights[:-1]):
      before, through = _ceil_div(g * w, rest), _ceil_div((g + 1) * w, rest)
      if through > before:
        return b, before
      g -= before  # g's position among the batches of buckets b + 1, ...
      rest -= w
    return len(self.weights) - 1, g

  def counts(self, g: int) -> tuple[int, ...]:
    """Batches each bucket supplies among global batches [0, g)."""
    rest, out = sum(self.weights), []
    for w in self.weights[:-1]:
      n = _ceil_div(g * w, rest)
      out.append(n)
      g -= n
      rest -= w
    return tuple(out) + (g,)


def schedule_weights(buckets: Sequence[Bucket], clips: Sequence[int]) -> tuple[int, ...]:
  """Integer weights proportional to clips / batch (each bucket's batches per epoch)."""
  lcm = math.lcm(*(b.batch_size for b in buckets))
  raw = [int(n) * (lcm // b.batch_size) for b, n in zip(buckets, clips)]
  divisor = math.gcd(*raw)
  return tuple(w // divisor for w in raw)


class _Interleave(grain.MapDataset):
  """Global batch g = batch k of bucket b's pipeline, (b, k) = schedule.locate(g)."""

  def __init__(self, parents: Sequence[grain.MapDataset], schedule: Schedule):
    super().__init__(parents)
    self._schedule = schedule

  def __len__(self) -> int:
    return sys.maxsize  # endless: every bucket pipeline repeats

  def __str__(self) -> str:
    return f'BucketInterleave({self._schedule})'

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    bucket, k = self._schedule.locate(int(index))
    return self._parents[bucket][k]


# --- per-bucket sources ------------------------------------------------------------------


class _Members:
  """Random access to the clips of one bucket: item j is source[members[j]]; `load`
  passes an rng through (the 'files' source). Picklable for grain workers."""

  def __init__(self, source, members: np.ndarray):
    self.source = source
    self.members = np.asarray(members, np.int64)  # [n] source indices

  def __len__(self) -> int:
    return len(self.members)

  def __getitem__(self, j) -> dict:
    return self.source[int(self.members[j])]

  def load(self, j, rng) -> dict:
    return self.source.load(int(self.members[j]), rng)


class _ShardClips:
  """A shard folder's uint8 clips cut to one bucket's shape: center frames, center crop."""

  def __init__(self, source: shards.ShardSource, bucket: Bucket):
    self.source = source
    self.bucket = bucket

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, idx) -> dict:
    example = dict(self.source[idx])
    video = example['video']  # [T0, H0, W0, C]
    if video.shape[:3] != self.bucket.shape:
      frames = transforms.clip_frame_indices(video.shape[0], self.bucket.num_frames, 1,
                                             'center')  # [T]
      example['video'] = transforms.resize_and_crop(video[frames], self.bucket.height,
                                                    self.bucket.width, 'center')  # [T, H, W, C]
    return example


def _with_shape(data_config, bucket: Bucket):
  config = data_config.copy_and_resolve_references()
  config.num_frames, config.height, config.width = bucket.shape
  return config


def _check_source(data_config) -> None:
  pipeline.check_data_config(data_config)
  if data_config.source in ('synthetic', 'files') and data_config.channels != 3:
    raise ValueError(f'data.channels must be 3 for source {data_config.source!r} (RGB '
                     f'clips), got {data_config.channels!r}.')


def _assign(data_config, buckets, bucket_weights, captions: bool):
  """(bucket of each source index [N], per-bucket sources, a line on what was assigned)."""
  source = data_config.source
  if source == 'synthetic':
    seed = data_config.source_seed
    assignment = assign_synthetic(data_config.num_examples, bucket_weights, seed)
    sources = [pipeline._make_source(_with_shape(data_config, b), captions=captions)
               for b in buckets]
    return assignment, sources, f'{data_config.num_examples} synthetic clips'
  if source == 'files':
    base = pipeline._make_source(data_config)
    sizes = probe_frame_sizes(base.paths)
    stride = data_config.frame_stride
    assignment = np.array([best_bucket(n, h, w, buckets, stride)
                           for n, (h, w) in zip(base.frame_counts, sizes)], np.int64)  # [N]
    sources = []
    for b in buckets:
      clipped = copy.copy(base)  # shares the probed listing; cuts clips of this shape
      clipped.spec = dataclasses.replace(base.spec, num_frames=b.num_frames, height=b.height,
                                         width=b.width)
      sources.append(clipped)
    return assignment, sources, f'data.path={data_config.path!r}: {len(base)} videos'
  base = shards.ShardSource(data_config.path)
  t, h, w, c = base.clip_shape
  if c != data_config.channels:
    raise ValueError(f'data.path={data_config.path!r} holds clips with C={c}, but '
                     f'data.channels={data_config.channels}.')
  best = best_bucket(t, h, w, buckets)
  if base.dtype != 'uint8' and buckets[best].shape != (t, h, w):
    raise ValueError(
        f'data.path={data_config.path!r} holds {base.dtype} clips (latents) of [T, H, W] = '
        f'{[t, h, w]}, which fit {buckets[best].describe(best)} best; latents are not '
        'resized, so that bucket must have their shape.')
  assignment = np.full(len(base), best, np.int64)  # [N]
  return (assignment, [_ShardClips(base, b) for b in buckets],
          f'data.path={data_config.path!r}: {len(base)} clips of one stored shape '
          f'{[t, h, w]} (index.json)')


def _seed(seed: int, stream: int, bucket: int) -> int:
  """A 32-bit seed per bucket and purpose (1: per-element draws, 2: shuffle)."""
  return int(np.random.SeedSequence([seed, stream, bucket]).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class BucketPlan:
  """What `make_dataset` built: the buckets, their clips and the batch schedule."""
  buckets: tuple[Bucket, ...]
  clips: tuple[int, ...]  # clips assigned to each bucket
  schedule: Schedule

  def batch_counts(self, step: int) -> dict[str, int]:
    """{'bucket{i}_batches': batches of bucket i in the first `step` steps}."""
    return {f'bucket{i}_batches': n for i, n in enumerate(self.schedule.counts(step))}

  def describe(self) -> str:
    total = sum(self.schedule.weights)
    return 'buckets: ' + '; '.join(
        f'{i}: {b.name} batch {b.batch_size}, {n} clips, {100 * w / total:.1f}% of steps'
        for i, (b, n, w) in enumerate(zip(self.buckets, self.clips, self.schedule.weights)))

  def mean_step_cost(self, spec, channels: int) -> tuple[float, float]:
    """(tokens, model FLOPs) of the average step, weighted by the schedule."""
    from vdit_jax.model import flops as flops_lib  # pylint: disable=g-import-not-at-top
    from vdit_jax.model import patching  # pylint: disable=g-import-not-at-top
    total = sum(self.schedule.weights)
    tokens = flops = 0.0
    for b, w in zip(self.buckets, self.schedule.weights):
      tokens += w / total * b.batch_size * int(np.prod(patching.token_grid(b.shape,
                                                                           spec.patch_size)))
      flops += w / total * flops_lib.train_step_flops(spec, b.shape + (channels,),
                                                      b.batch_size).total
    return tokens, flops


def make_dataset(data_config, *, seed: int, process_index: int | None = None,
                 process_count: int | None = None, captions=None):
  """This process's endless iterator of bucket-pure batches, and the `BucketPlan`.

  Args: as `pipeline.make_dataset`, without `batch_size` (each bucket has its own).

  Returns:
    (iterator, plan): a grain `DatasetIterator` yielding {'video': float32 [b, T, H, W, C],
    'label': int32 [b], ...} with (T, H, W) and b = B / process_count of the bucket
    `plan.schedule` names for that batch; `get_state()` / `set_state()` restore exactly.

  Raises ValueError for a bad config or a bucket that receives no clips.
  """
  buckets = parse(data_config)
  if not buckets:
    raise ValueError('data.buckets is empty: use pipeline.make_dataset for unbucketed data.')
  bucket_weights = weights(data_config, buckets)
  _check_source(data_config)
  seed = pipeline._check_int('seed', seed, 0)
  if seed >= 2**32:
    raise ValueError(f'seed must be < 2**32 (grain shuffles with 32-bit seeds), got {seed}.')
  process_count = pipeline._check_int(
      'process_count', jax.process_count() if process_count is None else process_count, 1)
  process_index = pipeline._check_int(
      'process_index', jax.process_index() if process_index is None else process_index, 0)
  if process_index >= process_count:
    raise ValueError(f'process_index must be in [0, process_count={process_count}), got '
                     f'{process_index}.')
  for i, b in enumerate(buckets):
    if b.batch_size % process_count:
      raise ValueError(f'{b.describe(i)}: the global batch {b.batch_size} is not divisible '
                       f'by the process count {process_count}.')

  assignment, sources, what = _assign(data_config, buckets, bucket_weights,
                                      captions is not None)
  clips = tuple(int(n) for n in np.bincount(assignment, minlength=len(buckets)))  # [K]
  empty = [i for i, n in enumerate(clips) if n == 0]
  if empty:
    raise ValueError(
        f'{", ".join(buckets[i].describe(i) for i in empty)} receive(s) no clips of '
        f'data.source={data_config.source!r} ({what}; clips per bucket: {list(clips)}): '
        'a bucket without clips would never train. Remove it, change its shape, or '
        + ('change data.bucket_weights / data.num_examples.' if data_config.source ==
           'synthetic' else 'add videos of that shape and length.'))
  for i, (b, n) in enumerate(zip(buckets, clips)):
    if n < b.batch_size:
      logging.warning('%s receives %d clip(s), fewer than its batch %d: its batches repeat '
                      'clips.', b.describe(i), n, b.batch_size)

  to_inputs = functools.partial(pipeline._to_model_inputs, captions=captions)
  parents = []
  for i, (b, source) in enumerate(zip(buckets, sources)):
    members = _Members(source, np.flatnonzero(assignment == i))
    if data_config.source == 'files':  # per-position draws (clip start, crop), as pipeline
      ds = grain.MapDataset.range(len(members)).shuffle(seed=_seed(seed, 2, i)).repeat(None)
      ds = ds.random_map(members.load, seed=_seed(seed, 1, i))
    else:
      ds = grain.MapDataset.source(members).shuffle(seed=_seed(seed, 2, i)).repeat(None)
    ds = ds.map(to_inputs).batch(b.batch_size // process_count, drop_remainder=True)
    parents.append(ds[process_index::process_count])  # this process's rows of each batch
  plan = BucketPlan(buckets, clips, Schedule(schedule_weights(buckets, clips)))

  iter_ds = _Interleave(parents, plan.schedule).to_iter_dataset(pipeline._READ_OPTIONS)
  if data_config.num_workers > 0:  # as pipeline.make_dataset: absl flags for the workers
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    iter_ds = iter_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=int(data_config.num_workers)))
  return iter(iter_ds), plan
