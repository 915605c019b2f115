r"""Entry point: train, sample or export a video DiT.

python -m vdit_jax.main --config=configs/tiny.py --workdir=/tmp/vdit_tiny \
    [--mode=train|sample|export] [--config.train.num_steps=200 ...]

train: resumes from the newest checkpoint in WORKDIR; on SIGTERM it saves the
current step and exits 0. export: the newest checkpoint's EMA params and the config
to WORKDIR/export/<step>/. sample: from --checkpoint=EXPORT_DIR, else the newest
checkpoint, else the newest export in WORKDIR.

Several processes (one per host): add --coordinator_address=HOST:PORT
--num_processes=N --process_id=I on each (or set VDIT_COORDINATOR_ADDRESS,
VDIT_NUM_PROCESSES, VDIT_PROCESS_ID); on SLURM and Cloud TPU slices they are
detected. launch/ has scripts for a local run, a TPU pod and SLURM.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from vdit_jax.parallel import distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a configs/*.py file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and samples.')
flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'export'], 'What to run.')
flags.DEFINE_string('checkpoint', None,
                    '--mode=sample: an export directory (WORKDIR/export/<step>) to sample from.')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0, for a multi-process run (env '
                    f'{distributed.ENV_COORDINATOR_ADDRESS}).')
flags.DEFINE_integer('num_processes', None,
                     f'Processes in the run (env {distributed.ENV_NUM_PROCESSES}).')
flags.DEFINE_integer('process_id', None,
                     f'This process, in [0, num_processes) (env {distributed.ENV_PROCESS_ID}).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Before any other JAX call: joins the other processes of a multi-host run.
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if not FLAGS['verbosity'].present:
    # Orbax and grain log every save at INFO; keep the console to progress
    # lines unless the user asks for more (-v 0).
    logging.set_verbosity(logging.WARNING)
  from vdit_jax.train import loop  # pylint: disable=g-import-not-at-top
  logging.info('config:\n%s', FLAGS.config)
  if FLAGS.checkpoint is not None and FLAGS.mode != 'sample':
    raise app.UsageError(f'--checkpoint={FLAGS.checkpoint} is for --mode=sample, '
                         f'not --mode={FLAGS.mode}.')
  if FLAGS.mode == 'train':
    loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  elif FLAGS.mode == 'export':
    loop.export(FLAGS.config, FLAGS.workdir)
  else:
    loop.sample(FLAGS.config, FLAGS.workdir, checkpoint=FLAGS.checkpoint)


if __name__ == '__main__':
  app.run(main)
