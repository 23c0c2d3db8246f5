"""Fine-tune a robust classifier with TWINS (or evaluate one).

  python main.py --config=configs/cifar10.py --workdir=runs/cifar10 [--config.key=value ...]

Re-running the same command resumes from the workdir's latest checkpoint. On several
hosts, start the same command on each with --coordinator_address, --num_processes and
--process_id (or --distributed where JAX detects the cluster itself, e.g. TPU pods).

An expected failure (a bad config value, missing data, weights that are not a checkpoint,
a workdir made by another run...) ends with one line, ``error: <what and how to fix it>``,
and exit status 2; ``--verbose`` adds the traceback. A run stopped by SIGTERM saves a
checkpoint, says so and exits with status 143; the same command resumes it.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'A configs/*.py preset.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and results go.')
flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() (auto-detected '
    'cluster, e.g. TPU pods, SLURM).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-host).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host).')
flags.DEFINE_integer('process_id', None, 'This process (multi-host).')
flags.DEFINE_bool('verbose', False, 'Print the traceback of expected failures too '
                  '(also TWINS_VERBOSE=1).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from twins_jax import errors
  errors.drop_closed_loop_noise()
  import jax
  if FLAGS.coordinator_address or FLAGS.distributed:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax and JAX are chatty at INFO
  handler = logging.StreamHandler()
  handler.setFormatter(logging.Formatter('%(asctime)s twins_jax: %(message)s', '%H:%M:%S'))
  logger = logging.getLogger('twins_jax')
  logger.setLevel(logging.INFO)
  logger.addHandler(handler)
  logger.propagate = False
  if (FLAGS.coordinator_address or FLAGS.distributed) and jax.process_count() > 1:
    logger.info('jax.distributed: process %d of %d, %d local of %d devices.', jax.process_index(),
                jax.process_count(), jax.local_device_count(), jax.device_count())
    if jax.default_backend() == 'cpu':
      # On CPU the persistent compilation cache's keys differ between processes and
      # only process 0 writes, so on a re-run process 0 would load its programs at
      # once while the others compile them for minutes, and the first collective
      # (Gloo, whose rendezvous times out after 30 s) would fail. Compile everywhere.
      jax.config.update('jax_enable_compilation_cache', False)
      logger.info('Multi-process CPU run: persistent compilation cache disabled.')
    if jax.process_index() != 0:  # process 0 logs and writes the results
      logger.setLevel(logging.WARNING)
  config = FLAGS.config
  try:
    if config.get('mode') == 'demo':
      from twins_jax import demo
      demo.run_demo(config, FLAGS.workdir)
    else:
      from twins_jax import train
      train.train_and_evaluate(config, FLAGS.workdir)
  except errors.UserError as e:
    sys.exit(errors.report(e, show_traceback=FLAGS.verbose or errors.verbose()))


def parse_flags(argv):
  """absl's flag parsing, with one clear line for a bad flag or ``--config.*`` override."""
  try:
    return FLAGS(argv)
  except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
    from twins_jax import errors
    sys.exit(
        errors.report(
            errors.ConfigError(
                f'bad flag: {e}. Unknown --config keys and wrongly typed values are rejected; '
                'configs/default.py lists every key.'), show_traceback=errors.verbose(argv)))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
