r"""Exports the trained sampler as serialised StableHLO (jax.export) with bfloat16 weights.

python -m vdit_jax.tools.export --workdir=runs/tiny [--out=DIR] [--config=configs/tiny.py]
    [--num_samples=8] [--compute_dtype=bfloat16] [--platforms=cpu,cuda,tpu]

Builds on `--mode=export` (train/export.py): when WORKDIR holds a checkpoint newer than its
newest export, that export is written first (EMA params + config in WORKDIR/export/<step>/),
then the sampler goes beside it, in WORKDIR/export/<step>/sampler/ unless --out says where.
`vdit_jax.generate.serving` runs it with jax and numpy only (see that module for the files).

What is exported: the whole sampling loop of `diffusion.samplers.sample` (the `fori_loop`
over the steps, classifier-free guidance on the doubled batch, x0 clipping), with the model
inside, as one function fn(weights, noise, labels, seed) -> videos. The weights are
arguments, not constants: the StableHLO stays small (kilobytes, whatever the model size),
the weights live in a plain .npz beside it, and other weights of the same shapes (a later
checkpoint, a fine-tune) run through the same export.

Precision: the weights are cast to bfloat16 (half the bytes), and by default the model
computes in bfloat16 as well (`--compute_dtype=bfloat16`, the model's `dtype`): that is what
makes bf16 pay on accelerators (bf16 matmuls on TPU MXUs and GPU tensor cores, half the
activation memory). What needs the range stays float32 either way: the sampler's state z and
its per-step coefficients, the timestep, the softmax logits, QK-norm and LayerNorm
statistics, and the model's output. `--compute_dtype=float32` keeps bf16-stored weights but
computes in float32 (weights upcast on use), for CPUs without fast bf16 or for comparisons.

Portability: lowered for every platform in --platforms (default cpu, cuda and tpu), so an
export made on a laptop serves on a GPU or TPU. Attention runs as `--attention_impl`
('xla' by default; 'blockwise' for long clips); platform kernels (cudnn, splash) lower only
for their own platform. Sequence-parallel attention and remat are training concerns and are
off in the export; the batch (--num_samples) is fixed.
"""

import json
import os
import time
from typing import Optional, Sequence

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np


from vdit_jax.config import resolve
from vdit_jax.parallel import fatal
from vdit_jax.generate import serving
from vdit_jax.data import pipeline
from vdit_jax.data import shards
from vdit_jax.data import synthetic
from vdit_jax.data import video_files
from vdit_jax.diffusion import objectives
from vdit_jax.diffusion import samplers
from vdit_jax.model import spec as spec_lib
from vdit_jax.model import dit
from vdit_jax.parallel import paths
from vdit_jax.train import checkpoint as ckpt_lib
from vdit_jax.generate import export as export_lib
from vdit_jax.train import state as state_lib

SAMPLER_DIRNAME = 'sampler'
DEFAULT_PLATFORMS = ('cpu', 'cuda', 'tpu')
COMPUTE_DTYPES = ('bfloat16', 'float32')

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags, defined only when run as a program: importing this module
  (tests, other tools) must not claim --config / --workdir in absl's global registry."""
  config_flags.DEFINE_config_file(
      'config', None, 'A configs/*.py file (default: WORKDIR/config.json, else the config '
      "saved with the export).", lock_config=True)
  flags.DEFINE_string('workdir', None, 'The training run\'s directory.')
  flags.DEFINE_string('export_dir', None,
                      'An export (WORKDIR/export/<step>) to use instead of the newest one.')
  flags.DEFINE_string('out', None, 'Where to write the sampler (default EXPORT_DIR/sampler).')
  flags.DEFINE_integer('num_samples', None, 'Clips per call (default config.sample.num_samples).')
  flags.DEFINE_integer('num_classes', None,
                       'Class count of the trained model (default: ask the data source).')
  flags.DEFINE_enum('compute_dtype', 'bfloat16', list(COMPUTE_DTYPES),
                    'The model\'s compute dtype; the weights are bfloat16 either way.')
  flags.DEFINE_list('platforms', list(DEFAULT_PLATFORMS), 'Platforms to lower for.')
  flags.DEFINE_string('attention_impl', 'xla', 'Attention kernel of the exported model.')


def config_from_json(path: str) -> ml_collections.ConfigDict:
  """A config saved as JSON (config.json of a run or an export), completed over today's
  defaults (config/resolve.py): keys the saved config lacks keep their defaults, keys this
  version no longer reads are skipped, and JSON lists become the tuples the defaults hold.
  """
  return resolve.complete(json.loads(paths.read_text(path)), strict=False)


def _workdir_config(workdir: str) -> Optional[ml_collections.ConfigDict]:
  path = paths.join(workdir, export_lib.CONFIG_FILENAME)
  return config_from_json(path) if paths.isfile(path) else None


def _newest_checkpoint_step(workdir: str) -> Optional[int]:
  directory = paths.join(workdir, 'checkpoints')
  if not paths.isdir(directory):
    return None
  checkpointer = ckpt_lib.Checkpointer(directory, keep=1, every_steps=1, async_save=False)
  try:
    return checkpointer.latest_step()
  finally:
    checkpointer.close()


def newest_export(workdir: str, config) -> str:
  """The newest export of WORKDIR, first writing one when a newer checkpoint exists."""
  path = export_lib.latest(workdir)
  exported_step = int(os.path.basename(path)) if path else None
  checkpoint_step = _newest_checkpoint_step(workdir)
  if checkpoint_step is not None and (exported_step is None or checkpoint_step > exported_step):
    if config is None:
      raise ValueError(
          f'{workdir} has checkpoint {checkpoint_step} but no export of it, and no config to '
          f'build the model for the export: pass --config, or keep WORKDIR/config.json.')
    from vdit_jax import modes  # pylint: disable=g-import-not-at-top (imports the trainer)
    return modes.export(config, workdir)
  if path is None:
    raise FileNotFoundError(
        f'{paths.normalize(workdir)} has no checkpoint and no export: train first '
        f'(python -m vdit_jax.main --config=... --workdir={workdir}).')
  return path


def class_names(data_cfg, num_classes: int) -> Optional[list]:
  """Names of the class ids, where the data source has them (None otherwise).

  synthetic: 'square moving left' for label = shape * len(DIRECTIONS) + direction (the
  colour is drawn at random per clip and is not part of the label); files: the class folder
  names; shards: the index's class_names.
  """
  try:
    if data_cfg.source == 'synthetic':
      names = [f'{shape} moving {direction}'
               for shape in synthetic.SHAPES for direction in synthetic.DIRECTIONS]
    elif data_cfg.source == 'files':
      names = list(video_files.list_videos(data_cfg.path).class_names)
    else:
      names = list(shards.read_index(data_cfg.path).get('class_names') or [])
  except (OSError, ValueError):  # the data is not on this machine (--num_classes given)
    return None
  return names if len(names) == num_classes else None


def sampler_model(config, num_classes: int, *, compute_dtype: str = 'bfloat16',
                  attention_impl: str = 'xla') -> dit.VideoDiT:
  """The config's model as the export runs it: bf16 params, single device, no remat."""
  model_cfg = config.model.copy_and_resolve_references()
  model_cfg.dtype = compute_dtype
  model_cfg.param_dtype = 'bfloat16'
  model_cfg.attention_impl = attention_impl
  model_cfg.sequence_parallel = 'none'
  model_cfg.remat_policy = 'none'
  return dit.build_model(spec_lib.from_config(model_cfg), config.data.channels, num_classes)


def to_bfloat16(params):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)


def make_sampler_fn(model, diffusion, sample_cfg, shape, num_classes: int, treedef,
                    prng_impl: str):
  """fn(weights [leaves of treedef], noise [*shape], labels [B], seed []) -> [*shape].

  The same call of `samplers.sample` that `train.sampling.make_sample_fn` makes, with the
  initial noise as an input and the key made from a uint32 seed.
  """
  null_label = num_classes if num_classes > 0 else None
  cfg_scale = sample_cfg.cfg_scale if num_classes > 0 else 1.0
  diffusion = diffusion.for_sampling(sample_cfg.shift)
  cfg_interval = samplers.cfg_interval_of(sample_cfg)

  def fn(weights, noise, labels, seed):
    params = jax.tree.unflatten(treedef, weights)

    def model_fn(z, t, y, **kw):
      return model.apply({'params': params}, z, t, y, **kw)

    rng = jax.random.key(seed, impl=prng_impl)
    return samplers.sample(diffusion, model_fn, rng, shape, labels,
                           sampler=sample_cfg.sampler, num_steps=sample_cfg.num_steps,
                           eta=sample_cfg.eta, cfg_scale=cfg_scale, null_label=null_label,
                           init_noise=noise, self_condition=model.spec.self_condition,
                           cfg_interval=cfg_interval)

  return fn


def restore_params(export_path: str, config, num_classes: int):
  """(params as saved, on one device; export.json) from an export written on any mesh."""
  model_cfg = config.model.copy_and_resolve_references()
  model_cfg.sequence_parallel = 'none'  # the same params; init runs plain attention
  model = dit.build_model(spec_lib.from_config(model_cfg), config.data.channels, num_classes)
  shapes = jax.eval_shape(lambda: nn.unbox(
      model.init(jax.random.key(0), *state_lib.model_inputs(config.data, 1))['params']))
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                          shapes)
  return export_lib.read(export_path, abstract)


def _weight_names(params) -> list:
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return ['/'.join(str(getattr(k, 'key', k)) for k in path) for path, _ in leaves]


def check_supported(config) -> None:
  """The export takes class labels: text / given-frame conditioning and LoRA runs are not
  exported yet (their sampler takes a condition pytree; a LoRA export holds adapters)."""
  conditioning = config.model.conditioning
  context_frames = int(config.model.context_frames_max or 0)
  if conditioning != 'class' or context_frames > 0:
    raise ValueError(
        f'tools.export exports class-conditioned samplers; this model has '
        f'model.conditioning={conditioning!r}, model.context_frames_max={context_frames} '
        '(text or given-frame conditions are not exported yet).')
  if config.lora.rank > 0:
    raise ValueError(f'config.lora.rank={config.lora.rank}: a LoRA run\'s export holds the '
                     'adapters, not a whole model; tools.export does not merge them yet.')


def export_sampler(export_path: str, out: str, config, *, num_samples: Optional[int] = None,
                   num_classes: Optional[int] = None, compute_dtype: str = 'bfloat16',
                   platforms: Sequence[str] = DEFAULT_PLATFORMS,
                   attention_impl: str = 'xla') -> str:
  """Writes the sampler of the export at `export_path` to `out`; returns `out`."""
  check_supported(config)
  if compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f'compute_dtype={compute_dtype!r} is not one of {COMPUTE_DTYPES}.')
  batch = config.sample.num_samples if num_samples is None else num_samples
  if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
    raise ValueError(f'num_samples={batch!r} must be a positive integer.')
  if num_classes is None:
    num_classes = pipeline.num_classes(config.data)
  params, info = restore_params(export_path, config, num_classes)
  weights_tree = to_bfloat16(params)
  weights, treedef = jax.tree.flatten(weights_tree)
  names = _weight_names(weights_tree)

  model = sampler_model(config, num_classes, compute_dtype=compute_dtype,
                        attention_impl=attention_impl)
  diffusion = objectives.Diffusion.from_config(config.diffusion)
  shape = (batch, config.data.num_frames, config.data.height, config.data.width,
           config.data.channels)
  prng_impl = str(jax.config.jax_default_prng_impl)
  fn = make_sampler_fn(model, diffusion, config.sample, shape, num_classes, treedef, prng_impl)
  specs = ([jax.ShapeDtypeStruct(w.shape, w.dtype) for w in weights],
           jax.ShapeDtypeStruct(shape, jnp.float32),  # noise [B, T, H, W, C]
           jax.ShapeDtypeStruct((batch,), jnp.int32),  # labels [B]
           jax.ShapeDtypeStruct((), jnp.uint32))  # seed
  exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(*specs)

  paths.makedirs(out)
  manifest_path = paths.join(out, serving.MANIFEST_FILENAME)
  paths.remove(manifest_path)  # written last: a half-written export is never loaded
  paths.write_bytes(paths.join(out, serving.SAMPLER_FILENAME), exported.serialize())
  with paths.local_file_for_write(paths.join(out, serving.WEIGHTS_FILENAME),
                                  suffix='.npz') as local:
    np.savez(local, **{name: np.asarray(w).view(np.uint16)
                       for name, w in zip(names, weights)})
  manifest = {
      'format': serving.FORMAT_VERSION,
      'step': info['step'],
      'params': info['params'],
      'export_dir': paths.normalize(export_path),
      'jax_version': jax.__version__,
      'platforms': list(exported.platforms),
      'weights_dtype': 'bfloat16',
      'compute_dtype': compute_dtype,
      'attention_impl': attention_impl,
      'weights': names,
      'video_shape': list(shape),
      'num_classes': num_classes,
      'label_names': class_names(config.data, num_classes),
      'prng_impl': prng_impl,
      'sampler': {'name': config.sample.sampler, 'num_steps': config.sample.num_steps,
                  'eta': config.sample.eta, 'cfg_scale': config.sample.cfg_scale,
                  'cfg_interval': list(samplers.cfg_interval_of(config.sample) or (0.0, 1.0)),
                  'shift': diffusion.for_sampling(config.sample.shift).shift},
      'fps': config.sample.fps,
      'inputs': 'weights (list, order of "weights"), noise float32 [B, T, H, W, C], '
                'labels int32 [B], seed uint32 []',
  }
  paths.write_text(manifest_path, json.dumps(manifest, indent=2))
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.workdir is None and FLAGS.export_dir is None:
    raise app.UsageError('--workdir (or --export_dir) is required.')
  t0 = time.perf_counter()
  config = FLAGS.config
  if config is not None:
    config = resolve.complete(config)  # every default from config/defaults.py
  elif FLAGS.workdir is not None:
    config = _workdir_config(FLAGS.workdir)
  export_path = FLAGS.export_dir or newest_export(FLAGS.workdir, config)
  if not export_lib.is_complete(export_path):
    found = paths.listdir(export_path) if paths.isdir(export_path) else 'no such folder'
    raise app.UsageError(
        f'--export_dir={export_path} is not a complete export (it lacks '
        f'{export_lib.INFO_FILENAME}; contents: {found}): pass a folder '
        f'WORKDIR/{export_lib.EXPORT_DIRNAME}/<step> written by --mode=export, or '
        '--workdir=WORKDIR to export its newest checkpoint.')
  if config is None:
    config = config_from_json(paths.join(export_path, export_lib.CONFIG_FILENAME))
  out = FLAGS.out or paths.join(export_path, SAMPLER_DIRNAME)
  export_sampler(export_path, out, config, num_samples=FLAGS.num_samples,
                 num_classes=FLAGS.num_classes, compute_dtype=FLAGS.compute_dtype,
                 platforms=FLAGS.platforms, attention_impl=FLAGS.attention_impl)
  manifest = json.loads(paths.read_text(paths.join(out, serving.MANIFEST_FILENAME)))
  print(f'exported the sampler of step {manifest["step"]} ({manifest["sampler"]["name"]}, '
        f'{manifest["sampler"]["num_steps"]} steps, batch {manifest["video_shape"][0]}, '
        f'{manifest["compute_dtype"]} compute, platforms {manifest["platforms"]}) to {out} '
        f'in {time.perf_counter() - t0:.1f}s\n'
        f'run it: python -m vdit_jax.generate.serving --sampler={out} --labels=0 --out=sample.gif',
        flush=True)


if __name__ == '__main__':
  define_flags()
  fatal.run(main)
