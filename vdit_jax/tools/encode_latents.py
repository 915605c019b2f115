r"""Encode clips with a VAE into ArrayRecord shards of latents, for latent diffusion training.

python -m vdit_jax.tools.encode_latents --videos=data/shards --vae=runs/vae_tiny/vae \
    --out=data/latents [--num_shards=4] [--batch_size=8] [--overwrite]
python -m vdit_jax.tools.encode_latents --videos=synthetic --num_examples=2048 \
    --num_frames=9 --height=32 --width=32 --vae=runs/vae_tiny/vae --out=data/latents
python -m vdit_jax.tools.encode_latents --videos=data/clips --num_frames=17 --height=256 \
    --width=256 --vae=checkpoints/wan21_vae --out=data/latents [--tile=256,192]
python -m vdit_jax.tools.encode_latents --videos=data/clips --num_frames=81 --height=480 \
    --width=832 --vae=checkpoints/Wan2.1-T2V-1.3B-Diffusers \
    --text_encoder=checkpoints/Wan2.1-T2V-1.3B-Diffusers --out=data/latents

--videos is a shard folder made by tools.make_shards (its uint8 clips, labels and keys),
'synthetic' (the built-in shapes: --num_examples clips, --source_seed), or a folder or glob
of video files (cut as make_shards cuts them: centred clip and crop). A clip of
T = 1 + 4k frames of H x W becomes latents [1 + k, H/8, W/8, z] (Wan 2.1 layout), stored
as float16 and, by default, normalised per channel with the VAE's latents_mean / std
((z - mean) / std; --normalize=false stores them raw). --sample=mean stores the
posterior means (default); 'posterior' draws z from the posterior (seeded by --seed).

Train on them with the shards source: --config.data.source=shards
--config.data.path=OUT --config.data.num_frames=T' --config.data.height=H'
--config.data.width=W' --config.data.channels=z (index.json lists the shape and the VAE).

Captions (--text_encoder=FOLDER, a Wan pipeline folder holding text_encoder/ and
tokenizer/, see convert/umt5.py): every clip's caption is encoded once by that umT5, as
WanPipeline encodes a prompt (convert.umt5.encode_prompts, --text_max_length tokens),
and stored beside the clip's latents as its record's 'caption_embedding' [L, d_model]
(--text_dtype), with the caption text. L is the prompt's token count (with </s>): the
rows past it, zeros in Wan's embeddings, are not stored; data/captions.py pads them back
with zeros. Train on them with --config.model.text.encoder=precomputed
--config.model.text.max_length=<--text_max_length>. The captions come from the source:
the synthetic clips' (captions=True), the shard records' 'caption', or each video file's
sidecar (clip.mp4 -> clip.txt beside it, data/video_files.py). A clip with no caption (or
a blank one) is an error naming it, unless --empty_caption_ok: then it gets the empty
prompt's embedding, as Wan encodes ''. Without --text_encoder a caption the source has is
kept as text only.

Output: the same format as make_shards (vdit_jax/data/shards.py), dtype 'float16', with
index.json fields 'vae' (folder, config with the latent statistics, 'normalized',
'sample') and 'source_clip_shape', and with --text_encoder 'text_encoder' ({'path',
'max_length', 'd_model', 'dtype'}: the embeddings' dtype). Each shard gets its name only
when it is complete, and index.json is written last, so a folder with an index is
complete. Encoding runs in temporal chunks (vae/chunked.py), optionally in spatial tiles
(--tile=SIZE,STRIDE in pixels).

--videos, --vae and --out may be buckets (gs://bucket/...): shards are read in place,
videos downloaded to decode them, the VAE restored by Orbax, and each finished latent
shard uploaded whole from a local temporary file (shards.ShardWriter).

Exit status: 0 done, 2 bad input (the message says which).
"""

from __future__ import annotations

import glob
import sys
import time
from typing import Optional

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from vdit_jax.convert import umt5
from vdit_jax.data import shards
from vdit_jax.data import synthetic
from vdit_jax.data import video_files
from vdit_jax.parallel import fatal
from vdit_jax.parallel import paths
from vdit_jax.vae import checkpoint
from vdit_jax.vae import chunked
from vdit_jax.vae import config as vae_config

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command line's flags (defined only when run as a program, so that importing
  this module next to other tools defines no clashing flag names)."""
  flags.DEFINE_string('videos', None, "A make_shards folder, 'synthetic', or a folder/glob of "
                      'video files.')
  flags.DEFINE_string('vae', None, 'VAE folder (tools.convert_wan_vae or vae.train output).')
  flags.DEFINE_string('out', None, 'Output folder (or gs:// URL) for the latent shards and '
                      'index.json.')
  flags.DEFINE_integer('num_shards', 1, 'Number of shard files.')
  flags.DEFINE_integer('batch_size', 8, 'Clips encoded per call.')
  flags.DEFINE_integer('num_frames', None, 'Frames per clip (synthetic and video files).')
  flags.DEFINE_integer('height', None, 'Clip height (synthetic and video files).')
  flags.DEFINE_integer('width', None, 'Clip width (synthetic and video files).')
  flags.DEFINE_integer('num_examples', 1024, "Clips to encode with --videos=synthetic.")
  flags.DEFINE_integer('source_seed', 0, 'Seed of the synthetic clips.')
  flags.DEFINE_boolean('normalize', True, 'Store (z - latents_mean) / latents_std.')
  flags.DEFINE_enum('sample', 'mean', ['mean', 'posterior'], 'Posterior mean or a draw.')
  flags.DEFINE_integer('seed', 0, 'Seed of the posterior draws (--sample=posterior).')
  flags.DEFINE_list('tile', None, 'SIZE,STRIDE: encode frames larger than SIZE pixels in '
                    'tiles of SIZE x SIZE every STRIDE pixels, blended.')
  flags.DEFINE_boolean('overwrite', False, 'Replace the shards already in --out.')
  flags.DEFINE_string('text_encoder', '', 'Wan pipeline folder (text_encoder/, tokenizer/): '
                      "store each clip's umT5 caption embedding with its latents.")
  flags.DEFINE_integer('text_max_length', 512, 'Tokens per caption (as '
                       'model.text.max_length); longer captions are truncated.')
  flags.DEFINE_enum('text_dtype', 'float16', list(shards.EMBEDDING_DTYPES),
                    'dtype of the stored caption embeddings.')
  flags.DEFINE_boolean('empty_caption_ok', False, 'With --text_encoder: a clip without a '
                       "caption gets the empty prompt's embedding instead of an error.")


def open_clips(videos: str, *, num_frames: Optional[int] = None, height: Optional[int] = None,
               width: Optional[int] = None, num_examples: int = 1024, source_seed: int = 0,
               captions: bool = False):
  """(source with source[i] -> {'video': uint8 [T, H, W, 3], 'label', optional 'key' and
  'caption'}, index fields describing it: num_classes, class_names, source). `captions`:
  synthetic clips carry their captions (the other sources carry what they hold)."""
  if videos == 'synthetic':
    _require(num_frames=num_frames, height=height, width=width)
    source = synthetic.SyntheticShapes(num_frames, height, width, num_examples=num_examples,
                                       seed=source_seed, captions=captions)
    return source, {'num_classes': synthetic.NUM_CLASSES, 'class_names': [],
                    'source': f'synthetic(seed={source_seed})'}
  if not glob.has_magic(videos) and paths.isfile(paths.join(videos, shards.INDEX_NAME)):
    source = shards.ShardSource(videos)
    if source.dtype != 'uint8':
      raise ValueError(f'--videos={videos!r} holds {source.dtype} clips (latents?); encode '
                       'uint8 video shards.')
    got = list(source.clip_shape[:3])
    for name, want, value in (('num_frames', num_frames, got[0]), ('height', height, got[1]),
                              ('width', width, got[2])):
      if want is not None and want != value:
        raise ValueError(f'--{name}={want} but the shards in {videos!r} hold clips of '
                         f'{got} frames x height x width.')
    return source, {'num_classes': source.num_classes,
                    'class_names': source.index.get('class_names', []), 'source': videos}
  _require(num_frames=num_frames, height=height, width=width)
  spec = video_files.ClipSpec(num_frames, height, width, 1, clip_start='center',
                              crop='center')
  source = video_files.VideoFiles(videos, spec)
  return source, {'num_classes': source.num_classes,
                  'class_names': list(source.class_names), 'source': videos}


def _require(**values) -> None:
  missing = [f'--{k}' for k, v in values.items() if v is None]
  if missing:
    raise ValueError(f'{", ".join(missing)} must be given for this --videos.')


def _clip_name(source, i: int, example: dict) -> str:
  """How messages name clip i: its video file, its shard key, or its index."""
  if isinstance(source, video_files.VideoFiles):
    return f'clip {i} ({source.paths[i]})'
  if 'key' in example:
    return f'clip {i} (key {example["key"]!r})'
  return f'clip {i}'


def _missing_caption(source, i: int, example: dict) -> str:
  """The error for clip i, which has no caption (or a blank one)."""
  if isinstance(source, video_files.VideoFiles):
    where = (f'its caption file {video_files.caption_path(source.paths[i])!r} is '
             + ('blank' if source.caption_paths[i] else 'missing'))
  elif 'caption' in example:
    where = 'its caption is blank'
  else:
    where = "it has no 'caption'"
  return (f'{_clip_name(source, i, example)}: {where}, and --text_encoder encodes every '
          "clip's caption; add one, or pass --empty_caption_ok to give it the empty "
          "prompt's embedding.")


class _TextEncoder:
  """A Wan folder's umT5 and tokenizer: captions -> their embeddings [L_i, D], trimmed to
  each caption's token count (the rows past it are Wan's zeros)."""

  def __init__(self, folder: str, max_length: int, dtype: str, batch_size: int):
    if dtype not in shards.EMBEDDING_DTYPES:
      raise ValueError(f'text_dtype={dtype!r} must be one of {shards.EMBEDDING_DTYPES} (what '
                       'shard records store).')
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
      raise ValueError(f'text_max_length={max_length!r} must be an integer >= 2 (a token and '
                       '</s>).')
    self.folder = folder
    self.max_length = max_length
    self.dtype = dtype
    self.batch_size = batch_size
    self.spec, params = umt5.load_encoder(folder)
    self.params = jax.device_put(params)  # once, not with every batch
    self.tokenizer = umt5.load_tokenizer(folder)

  def describe(self) -> dict:
    return {'path': paths.normalize(self.folder), 'max_length': self.max_length,
            'd_model': self.spec.d_model, 'dtype': self.dtype}

  def __call__(self, captions, names) -> list:
    """Embeddings [L_i, D] in self.dtype of `captions` (at most batch_size); `names`
    name the clips in errors."""
    # Padded to one batch shape with empty prompts: the encoder compiles once.
    prompts = list(captions) + [''] * (self.batch_size - len(captions))
    embeds = umt5.encode_prompts(self.tokenizer, self.spec, self.params, prompts,
                                 self.max_length)  # [B, L, D]
    _, mask = umt5.tokenize(self.tokenizer, [umt5.prompt_clean(p) for p in prompts],
                            self.max_length)  # [B, L]
    out = []
    for embed, length, name in zip(embeds, mask.sum(axis=1), names):
      stored = embed[:length].astype(self.dtype)  # [L_i, D]
      if not np.isfinite(stored).all():
        raise ValueError(f'{name}: its caption embedding overflows {self.dtype} (largest '
                         f'magnitude {np.abs(embed).max():.4g}); pass --text_dtype=float32.')
      out.append(stored)
    return out


def encode_latents(videos: str, vae: str, out: str, *, num_shards: int = 1,
                   batch_size: int = 8, normalize: bool = True, sample: str = 'mean',
                   seed: int = 0, tiling: Optional[chunked.Tiling] = None,
                   overwrite: bool = False, text_encoder: str = '',
                   text_max_length: int = 512, text_dtype: str = 'float16',
                   empty_caption_ok: bool = False, progress=sys.stderr,
                   **clip_args) -> dict:
  """Writes latent shards of `videos` encoded by the VAE folder `vae`; returns the index.

  With `text_encoder` (a Wan pipeline folder) each clip's caption is encoded by its umT5
  (`text_max_length` tokens) and stored as the record's caption_embedding in
  `text_dtype`; `empty_caption_ok` gives clips without a caption the empty prompt's.
  """
  if sample not in ('mean', 'posterior'):
    raise ValueError(f"sample={sample!r} must be 'mean' or 'posterior'.")
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f'batch_size={batch_size!r} must be a positive integer.')
  text = (_TextEncoder(text_encoder, text_max_length, text_dtype, batch_size)
          if text_encoder else None)
  cfg, params = checkpoint.load(vae)
  source, described = open_clips(videos, captions=text is not None, **clip_args)
  total = len(source)
  if isinstance(num_shards, bool) or not isinstance(num_shards, int) or not (
      1 <= num_shards <= total):
    raise ValueError(f'num_shards={num_shards!r} must be an integer in [1, {total}] (the '
                     'number of clips).')
  if text is not None and not empty_caption_ok and isinstance(source, video_files.VideoFiles):
    # Known before any clip is decoded: the sidecars were found on construction.
    for i, sidecar in enumerate(source.caption_paths):
      if sidecar is None:
        raise ValueError(_missing_caption(source, i, {}))
  clip_shape = tuple(source[0]['video'].shape)  # [T, H, W, C]
  if clip_shape[-1] != cfg.in_channels:
    raise ValueError(f'the clips have {clip_shape[-1]} channels, the VAE takes '
                     f'{cfg.in_channels}.')
  latent_shape = cfg.latent_shape(*clip_shape[:3])  # raises if T, H, W do not fit
  writer = shards.ShardWriter(shards.prepare_output(out, overwrite), num_shards)
  rng = jax.random.PRNGKey(seed)
  start = time.perf_counter()
  try:
    for first in range(0, total, batch_size):
      examples = [source[i] for i in range(first, min(first + batch_size, total))]
      captions = [e.get('caption') for e in examples]
      embeddings = [None] * len(examples)
      if text is not None:
        names = [_clip_name(source, first + k, e) for k, e in enumerate(examples)]
        for k, caption in enumerate(captions):
          if caption is None or not str(caption).strip():
            if not empty_caption_ok:
              raise ValueError(_missing_caption(source, first + k, examples[k]))
            captions[k] = ''
        embeddings = text([str(c) for c in captions], names)
      video = np.stack([e['video'] for e in examples]).astype(np.float32)  # [B, T, H, W, C]
      video = video / np.float32(127.5) - np.float32(1.0)
      mean, logvar = chunked.encode_video(cfg, params, video, tiling=tiling)  # [B, T', ...]
      z = mean
      if sample == 'posterior':
        noise = np.asarray(jax.random.normal(jax.random.fold_in(rng, first), mean.shape))
        z = mean + np.exp(0.5 * logvar) * noise
      if normalize:
        z = vae_config.normalize_latents(cfg, z)
      z = z.astype(np.float16)
      for offset, example in enumerate(examples):
        i = first + offset
        caption = captions[offset]
        writer.write(i * num_shards // total,
                     shards.encode_record(z[offset], label=int(example['label']),
                                          caption=None if caption is None else str(caption),
                                          caption_embedding=embeddings[offset],
                                          key=str(example.get('key', i))))
      if progress is not None:
        done = first + len(examples)
        progress.write(f'\rencode_latents: {done}/{total} clips, '
                       f'{done / (time.perf_counter() - start):.1f} clips/s'
                       + ('\n' if done == total else ''))
        progress.flush()
    entries = writer.finish()  # every shard holds clips: num_shards <= total
  finally:
    writer.abort()
  index = {
      'format': shards.FORMAT,
      'shards': entries,
      'num_records': total,
      'clip_shape': list(latent_shape),
      'dtype': 'float16',
      'num_classes': described['num_classes'],
      'class_names': described['class_names'],
      'source': described['source'],
      'source_clip_shape': list(clip_shape),
      'vae': {'path': paths.normalize(vae), 'config': cfg.to_dict(),
              'normalized': bool(normalize), 'sample': sample},
  }
  if text is not None:
    index['text_encoder'] = text.describe()
  shards.write_index(out, index)
  return index


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every step of a save at INFO
  for name in ('videos', 'vae', 'out'):
    if FLAGS[name].value is None:
      raise app.UsageError(f'--{name} is required.')
  try:
    tiling = None
    if FLAGS.tile:
      if len(FLAGS.tile) != 2:
        raise ValueError(f'--tile={",".join(FLAGS.tile)} must be SIZE,STRIDE.')
      size, stride = (int(v) for v in FLAGS.tile)
      tiling = chunked.Tiling(size, size, stride, stride)
    index = encode_latents(
        FLAGS.videos, FLAGS.vae, FLAGS.out, num_shards=FLAGS.num_shards,
        batch_size=FLAGS.batch_size, normalize=FLAGS.normalize, sample=FLAGS.sample,
        seed=FLAGS.seed, tiling=tiling, overwrite=FLAGS.overwrite,
        text_encoder=FLAGS.text_encoder, text_max_length=FLAGS.text_max_length,
        text_dtype=FLAGS.text_dtype, empty_caption_ok=FLAGS.empty_caption_ok,
        num_frames=FLAGS.num_frames, height=FLAGS.height, width=FLAGS.width,
        num_examples=FLAGS.num_examples, source_seed=FLAGS.source_seed)
  except (ValueError, FileNotFoundError) as e:
    print(f'encode_latents: error: {e}', file=sys.stderr)
    return 2
  t, h, w, c = index['clip_shape']
  print(f'encode_latents: wrote {index["num_records"]} latent clips of [T, H, W, C] = '
        f'{index["clip_shape"]} in {len(index["shards"])} shard(s) to {FLAGS.out}; train with '
        f'--config.data.source=shards --config.data.path={FLAGS.out} '
        f'--config.data.num_frames={t} --config.data.height={h} --config.data.width={w} '
        f'--config.data.channels={c}'
        + (f' --config.model.text.encoder=precomputed --config.model.text.max_length='
           f'{index["text_encoder"]["max_length"]}' if 'text_encoder' in index else ''),
        flush=True)
  return 0


if __name__ == '__main__':
  _define_flags()
  fatal.run(main)
