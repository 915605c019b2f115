r"""Runs an exported video sampler with jax and numpy only: no flax, no vdit_jax training code.

`python -m vdit_jax.tools.export --workdir=WORKDIR` writes WORKDIR/export/<step>/sampler/:

  sampler.jax_export   the whole compiled sampling loop (model, CFG, DDPM/DDIM/Euler steps)
                       as serialised StableHLO (jax.export), weights as its first argument
  weights.npz          the weights in bfloat16 (stored as uint16 bit patterns), one array per
                       parameter, named by its path ('blocks/attn/query_kernel', ...)
  sampler.json         what the function takes and returns: video shape, weight order, class
                       names, sampler settings, PRNG implementation

Serve it anywhere jax runs (the export names its platforms, cpu, cuda and tpu by default):

  from vdit_jax.generate import serving
  sampler = serving.load('runs/tiny/export/600/sampler')
  videos = sampler.sample(['square moving left', 3], seed=0)  # float32 [2, T, H, W, C] in [-1, 1]

  python -m vdit_jax.generate.serving --sampler=runs/tiny/export/600/sampler \
      --labels='square moving left,circle moving up' --seed=0 --out=left.gif

The exported function is `fn(weights, noise [B, T, H, W, C] float32, labels [B] int32,
seed [] uint32) -> videos [B, T, H, W, C] float32`, B fixed at export time. With the noise
from `initial_noise(seed)` (the default) it returns exactly what the training code's sampler
(vdit_jax.generate.sampling) returns for `jax.random.key(seed)`: the noise is drawn from the first
half of `jax.random.split(key)` and the steps' noise (DDPM, DDIM with eta > 0) from the second,
as in vdit_jax.diffusion.samplers.sample.
"""

import argparse
import io
import json
import os
import zipfile
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

SAMPLER_FILENAME = 'sampler.jax_export'
WEIGHTS_FILENAME = 'weights.npz'
MANIFEST_FILENAME = 'sampler.json'
FORMAT_VERSION = 1
_STORED_AS = {'bfloat16': (np.uint16, jnp.bfloat16), 'float32': (np.float32, jnp.float32)}


class _Files:
  """An export folder, local or in a bucket. Local folders need nothing beyond the
  standard library; bucket URLs (gs://, s3://) are read through etils.epath, imported
  only then, so that serving a local export keeps to jax and numpy."""

  def __init__(self, directory: str):
    directory = os.fspath(directory)
    self.remote = '://' in directory and not directory.startswith('file://')
    if directory.startswith('file://'):
      directory = directory[len('file://'):]
    self.root = directory.rstrip('/') if self.remote else os.path.abspath(directory)

  def __str__(self) -> str:
    return self.root

  def join(self, name: str) -> str:
    return f'{self.root}/{name}' if self.remote else os.path.join(self.root, name)

  def isfile(self, path: str) -> bool:
    if self.remote:
      from etils import epath  # pylint: disable=g-import-not-at-top
      return epath.Path(path).is_file()
    return os.path.isfile(path)

  def read(self, path: str) -> bytes:
    if self.remote:
      from etils import epath  # pylint: disable=g-import-not-at-top
      return epath.Path(path).read_bytes()
    with open(path, 'rb') as f:
      return f.read()


def _unreadable(path: str, expected: str, error: Exception) -> str:
  reason = (str(error).strip().splitlines() or [''])[0][:200]
  return (f'{path} is not readable as {expected} ({type(error).__name__}: {reason}): the file '
          'is truncated or damaged, or is not part of this export. Export it again with '
          '`python -m vdit_jax.tools.export --workdir=WORKDIR`.')


class ExportedSampler:
  """A deserialised sampler and its weights (on the default device)."""

  def __init__(self, directory: str):
    self.directory = _Files(directory)
    files = {name: self.directory.join(name)
             for name in (MANIFEST_FILENAME, SAMPLER_FILENAME, WEIGHTS_FILENAME)}
    missing = [name for name, path in files.items() if not self.directory.isfile(path)]
    if missing:
      raise FileNotFoundError(
          f'{self.directory} is not an exported sampler: it lacks {missing}. Write one with '
          '`python -m vdit_jax.tools.export --workdir=WORKDIR`.')
    try:
      self.manifest = json.loads(self.directory.read(files[MANIFEST_FILENAME]))
    except (ValueError, UnicodeDecodeError) as e:
      raise ValueError(_unreadable(files[MANIFEST_FILENAME], 'the JSON manifest', e)) from e
    if not isinstance(self.manifest, dict) or self.manifest.get('format') != FORMAT_VERSION:
      found = self.manifest.get('format') if isinstance(self.manifest, dict) else self.manifest
      raise ValueError(f'{files[MANIFEST_FILENAME]} has format {found!r}; '
                       f'this loader reads format {FORMAT_VERSION}. Export it again.')
    try:
      self.exported = jax.export.deserialize(bytearray(self.directory.read(
          files[SAMPLER_FILENAME])))
    except Exception as e:  # pylint: disable=broad-except  # flatbuffer / struct errors
      raise ValueError(_unreadable(files[SAMPLER_FILENAME], 'a serialised jax.export '
                                   'sampler', e)) from e
    try:
      self.weights = self._load_weights(files[WEIGHTS_FILENAME])
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, ValueError) as e:
      if isinstance(e, ValueError) and str(e).startswith(files[WEIGHTS_FILENAME]):
        raise  # a weight of the wrong shape: already says so
      raise ValueError(_unreadable(files[WEIGHTS_FILENAME], 'the .npz of the weights the '
                                   f'manifest lists ({len(self.manifest["weights"])})', e)) from e
    self.video_shape = tuple(self.manifest['video_shape'])  # (B, T, H, W, C)
    self.num_classes = int(self.manifest['num_classes'])
    self.label_names = self.manifest.get('label_names')

  def _load_weights(self, path):
    stored, dtype = _STORED_AS[self.manifest['weights_dtype']]
    want = self.exported.in_avals[:len(self.manifest['weights'])]
    weights = []
    source = io.BytesIO(self.directory.read(path)) if self.directory.remote else path
    with np.load(source) as arrays:
      for name, aval in zip(self.manifest['weights'], want):
        array = arrays[name]
        if array.dtype != stored or array.shape != aval.shape:
          raise ValueError(f'{path}: weight {name!r} is {array.dtype} {array.shape}, but the '
                           f'exported sampler takes {aval.dtype} {aval.shape}.')
        weights.append(jax.device_put(array.view(dtype)))
    return weights

  @property
  def batch_size(self) -> int:
    return self.video_shape[0]

  def label_id(self, label: Union[int, str]) -> int:
    """A class id from its id or its name (e.g. 'square moving left')."""
    if isinstance(label, str):
      names = self.label_names or []
      if label not in names:
        raise ValueError(f'label {label!r} is not a class name of this sampler; the names are '
                         f'{names} (ids 0..{self.num_classes - 1} work too).')
      return names.index(label)
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
      raise ValueError(f'label {label!r} must be a class id or a class name.')
    if not 0 <= int(label) < max(self.num_classes, 1):
      raise ValueError(f'label {label} is not in [0, {max(self.num_classes, 1)}) (the '
                       f'{self.num_classes} classes the model was trained on).')
    return int(label)

  def initial_noise(self, seed: int) -> np.ndarray:
    """The noise [B, T, H, W, C] that the training code's sampler draws for key(seed)."""
    key = jax.random.key(_check_seed(seed), impl=self.manifest['prng_impl'])
    init_key, _ = jax.random.split(key)
    return np.asarray(jax.random.normal(init_key, self.video_shape, jnp.float32))

  def sample(self, labels: Sequence[Union[int, str]], seed: int = 0,
             noise: Optional[np.ndarray] = None) -> np.ndarray:
    """Videos float32 [n, T, H, W, C] in [-1, 1] for n <= batch_size labels.

    `noise` [B, T, H, W, C] replaces `initial_noise(seed)`; `seed` still drives the steps'
    noise. Fewer labels than the exported batch run as a full batch (the rest repeat the
    last label) and only the first n clips come back.
    """
    ids = [self.label_id(label) for label in labels]
    n, batch = len(ids), self.batch_size
    if not 1 <= n <= batch:
      raise ValueError(f'{n} labels given; this sampler was exported for 1 to {batch} clips '
                       'per call (tools.export --num_samples sets it).')
    ids = np.asarray(ids + [ids[-1]] * (batch - n), np.int32)  # [B]
    if noise is None:
      noise = self.initial_noise(seed)
    noise = np.asarray(noise, np.float32)
    if noise.shape != self.video_shape:
      raise ValueError(f'noise shape {noise.shape} must be the exported {self.video_shape}.')
    videos = self.exported.call(self.weights, noise, ids, np.uint32(_check_seed(seed)))
    return np.asarray(videos)[:n]  # [n, T, H, W, C]


def _check_seed(seed) -> int:
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not (
      0 <= int(seed) < 2 ** 32):
    raise ValueError(f'seed={seed!r} must be an integer in [0, 2**32).')
  return int(seed)


def load(directory: str) -> ExportedSampler:
  return ExportedSampler(directory)


def _parse_labels(text: str):
  return [int(part) if part.strip().isdigit() else part.strip()
          for part in text.split(',') if part.strip()]


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description='Sample videos from an exported sampler.')
  parser.add_argument('--sampler', required=True, help='directory written by tools.export')
  parser.add_argument('--labels', required=True,
                      help="comma-separated class names or ids, e.g. 'square moving left,3'")
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', required=True,
                      help='.npy (float32 [n, T, H, W, C]), or .gif / .mp4 (a grid; needs '
                           "pip install 'vdit_jax[video]')")
  args = parser.parse_args(argv)
  sampler = load(args.sampler)
  videos = sampler.sample(_parse_labels(args.labels), seed=args.seed)
  out = os.path.abspath(args.out)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  if out.endswith('.npy'):
    np.save(out, videos)
  else:
    from vdit_jax.data import video_io  # pylint: disable=g-import-not-at-top  # numpy only
    grid = video_io.make_grid(video_io.to_uint8(videos), scale=max(1, 128 // videos.shape[2]))
    video_io.write_video(out, grid, fps=sampler.manifest.get('fps', 8))
  print(f'wrote {videos.shape} to {out}')
  return out


if __name__ == '__main__':
  main()
