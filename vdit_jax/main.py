r"""Entry point: train, sample or export a video DiT.

python -m vdit_jax.main --config=configs/tiny.py --workdir=/tmp/vdit_tiny \
    [--mode=train|sample|export|extend] [--config.train.num_steps=200 ...]

train: resumes from the newest checkpoint in WORKDIR; on SIGTERM it saves the
current step and exits 0. export: the newest checkpoint's EMA params and the config
to WORKDIR/export/<step>/. sample: from --checkpoint=EXPORT_DIR, else the newest
checkpoint, else the newest export in WORKDIR; --prompt='a blue circle moving up' for a
text model (configs/tiny_text.py). extend: continues --input=clip.mp4 (or an image:
image-to-video) to --num_frames frames, for a model trained with given frames
(configs/tiny_extend.py).

Latent DiT (configs/tiny_latent.py, --config.data.latents=True on tools.encode_latents
shards): train and sample as above; samples are un-normalised and decoded through the
VAE the shards record (or --config.data.vae=DIR) before the mp4/gif is written.

LoRA (configs/lora_finetune.py, --config.lora.base_checkpoint=BASE_WORKDIR_OR_EXPORT):
train freezes the base and trains rank-r adapters only (WORKDIR/checkpoints holds
them); export writes the adapters alone; sample and extend merge them into the base.

Several processes (one per host): add --coordinator_address=HOST:PORT
--num_processes=N --process_id=I on each (or set VDIT_COORDINATOR_ADDRESS,
VDIT_NUM_PROCESSES, VDIT_PROCESS_ID); on SLURM and Cloud TPU slices they are
detected. launch/ has scripts for a local run, a TPU pod and SLURM.

Host set-up (vdit_jax/runtime.py): before jax is imported, the process restarts itself
once with malloc settings that stop a CPU step re-faulting its buffers (glibc huge pages
on glibc >= 2.35, else jemalloc or tcmalloc if installed) and logs what it set;
VDIT_RUNTIME=0 keeps the environment as it is.
"""

from vdit_jax import runtime

if __name__ == '__main__':
  runtime.setup()  # before jax is imported; may re-exec this process once

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

from vdit_jax.parallel import fatal
from vdit_jax.parallel import distributed
from vdit_jax.parallel import liveness

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a configs/*.py file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and samples.')
flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'export', 'extend'], 'What to run.')
flags.DEFINE_string('prompt', None, '--mode=sample|extend, text models: the caption to '
                    "generate ('a; b' for several).")
flags.DEFINE_string('input', None, '--mode=extend: a video (or an image) to continue.')
flags.DEFINE_integer('num_frames', None, '--mode=extend: frames of the result, the '
                     "input's included.")
flags.DEFINE_string('checkpoint', None,
                    '--mode=sample: an export directory (WORKDIR/export/<step>) to sample from.')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0, for a multi-process run (env '
                    f'{distributed.ENV_COORDINATOR_ADDRESS}).')
flags.DEFINE_integer('num_processes', None,
                     f'Processes in the run (env {distributed.ENV_NUM_PROCESSES}).')
flags.DEFINE_integer('process_id', None,
                     f'This process, in [0, num_processes) (env {distributed.ENV_PROCESS_ID}).')
flags.DEFINE_float('peer_timeout_s', None,
                   'Multi-process runs: seconds without a beat from another process before '
                   'this one stops, naming it (default 30, 0: never; env '
                   f'{distributed.ENV_PEER_TIMEOUT_S}).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Before any other JAX call: joins the other processes of a multi-host run.
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                         peer_timeout_s=FLAGS.peer_timeout_s)
  if not FLAGS['verbosity'].present:
    # Orbax and grain log every save at INFO; keep the console to progress
    # lines unless the user asks for more (-v 0).
    logging.set_verbosity(logging.WARNING)
  from vdit_jax.train import compile_cache  # pylint: disable=g-import-not-at-top
  from vdit_jax import modes  # pylint: disable=g-import-not-at-top
  from vdit_jax.train import loop  # pylint: disable=g-import-not-at-top
  # Before the first compile, so that every program of the run is cached.
  compile_cache.configure(FLAGS.config.train.compilation_cache_dir)
  logging.info('config:\n%s', FLAGS.config)
  if FLAGS.checkpoint is not None and FLAGS.mode not in ('sample', 'extend'):
    raise app.UsageError(f'--checkpoint={FLAGS.checkpoint} is for --mode=sample or extend, '
                         f'not --mode={FLAGS.mode}.')
  for name, allowed in (('prompt', ('sample', 'extend')), ('input', ('extend',)),
                      ('num_frames', ('extend',))):
    if FLAGS[name].value is not None and FLAGS.mode not in allowed:
      raise app.UsageError(f'--{name} is for --mode={" or ".join(allowed)}, not '
                           f'--mode={FLAGS.mode}.')
  if FLAGS.mode == 'train':
    loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  elif FLAGS.mode == 'extend':
    if FLAGS.input is None or FLAGS.num_frames is None:
      raise app.UsageError('--mode=extend needs --input=VIDEO_OR_IMAGE and --num_frames=N.')
    modes.extend(FLAGS.config, FLAGS.workdir, FLAGS.input, FLAGS.num_frames,
                checkpoint=FLAGS.checkpoint, prompt=FLAGS.prompt)
  elif FLAGS.mode == 'export':
    modes.export(FLAGS.config, FLAGS.workdir)
  else:
    modes.sample(FLAGS.config, FLAGS.workdir, checkpoint=FLAGS.checkpoint, prompt=FLAGS.prompt)
  # Done: the other processes stop waiting for this one's beat (parallel/liveness.py).
  liveness.finish()


if __name__ == '__main__':
  fatal.run(main)
