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
  source        'synthetic' (the built-in `SyntheticShapes`; more sources come later)
  num_frames    T
  height, width H, W
  channels      C; must be 3 for 'synthetic'
  num_examples  clips in the source
  num_workers   0 reads in this process; N > 0 renders batches in N grain worker
                processes (`mp_prefetch`), still checkpointable
  time_stride   base-motion frames between consecutive clip frames (0.5 = double frame rate)
  source_seed   optional, default 0: which clips the synthetic source holds; the `seed`
                argument only orders them
"""

from __future__ import annotations

import numbers

from absl import flags
import grain
import jax
import numpy as np

from vdit_jax.data import synthetic

SOURCES = ('synthetic',)
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)
_REQUIRED_FIELDS = ('source', 'num_frames', 'height', 'width', 'channels', 'num_examples',
                    'num_workers', 'time_stride')


def _check_int(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}.')
  return int(value)


def _validate(data_config) -> None:
  missing = [f for f in _REQUIRED_FIELDS if f not in data_config]
  if missing:
    raise ValueError(f'data config is missing field(s) {missing}; it needs all of '
                     f'{list(_REQUIRED_FIELDS)}.')
  if data_config.source not in SOURCES:
    raise ValueError(
        f'data.source={data_config.source!r} is not supported; allowed: {list(SOURCES)}.')
  if data_config.source == 'synthetic' and data_config.channels != 3:
    raise ValueError(f"data.channels must be 3 for source 'synthetic' (RGB clips), got "
                     f'{data_config.channels!r}.')
  _check_int('data.num_workers', data_config.num_workers, 0)


def num_classes(data_config) -> int:
  """Number of class labels the configured source produces (12 for 'synthetic')."""
  _validate(data_config)
  return synthetic.NUM_CLASSES


def _to_model_inputs(example: dict) -> dict:
  """Keeps what the model trains on: video as float32 in [-1, 1], label as int32."""
  video = example['video'].astype(np.float32)  # [T, H, W, C]
  video = video * np.float32(1.0 / 127.5) - np.float32(1.0)  # [T, H, W, C]
  return {'video': video, 'label': np.int32(example['label'])}


def _make_source(data_config):
  return synthetic.SyntheticShapes(
      num_frames=data_config.num_frames,
      height=data_config.height,
      width=data_config.width,
      num_examples=data_config.num_examples,
      seed=data_config.get('source_seed', 0),
      time_stride=data_config.time_stride,
  )


def make_dataset(data_config, batch_size: int, *, seed: int,
                 process_index: int | None = None, process_count: int | None = None):
  """Builds this process's endless, shuffled, batched, checkpointable data iterator.

  Args:
    data_config: ConfigDict with the fields listed in the module docstring.
    batch_size: examples per batch on THIS process (global batch / process count).
    seed: shuffle seed, an integer in [0, 2**32); each epoch is reshuffled from it.
    process_index: this process's index; defaults to `jax.process_index()`.
    process_count: number of processes; defaults to `jax.process_count()`.

  Returns:
    A grain `DatasetIterator` yielding {'video': np.float32 [b, T, H, W, C] in [-1, 1],
    'label': np.int32 [b]} forever, with `get_state()` / `set_state()`.
  """
  _validate(data_config)
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

  source = _make_source(data_config)
  if len(source) < process_count:
    raise ValueError(
        f'data.num_examples={len(source)} is smaller than process_count={process_count}; '
        'a source must hold at least one example per process.')

  ds = grain.MapDataset.source(source)
  ds = ds.shuffle(seed=seed)  # reshuffled per epoch (grain seeds each epoch from `seed`)
  ds = ds.repeat(None)
  ds = ds.map(_to_model_inputs)
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
