"""Command line: train / evaluate kMaX-DeepLab from a DeepLab2-style config.

  python -m deeplab_kmax.trainer.train \
      --config_file=configs/coco/kmax_meta_r50.textproto \
      --mode=train_and_eval --model_dir=/tmp/kmax --num_gpus=8

Checkpoints and summaries go to <model_dir>/<experiment_name> (DeepLab2's
layout). `${VAR}` placeholders in the config are read from the environment.
Multi-machine runs use TF_CONFIG, or --worker_hosts with --task_index.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging

from deeplab_kmax import cli_errors
from deeplab_kmax.config import validation

flags.DEFINE_string('config_file', None,
                    'ExperimentOptions textproto (DeepLab2 format).')
flags.DEFINE_enum('mode', None, list(validation.TRAINING_MODES),
                  'What to run.')
flags.DEFINE_string('model_dir', None,
                    'Base folder; the experiment writes into '
                    '<model_dir>/<experiment_name>.')
flags.DEFINE_integer('num_gpus', 0,
                     'GPUs on this machine (0: CPU; >1: MirroredStrategy).')
flags.DEFINE_string('tpu', None,
                    'TPU name or grpc:// address ("local" on a TPU VM).')
flags.DEFINE_string('master', None, 'Alias of --tpu, as in DeepLab2.')
flags.DEFINE_list('worker_hosts', None,
                  'host:port of every worker, for multi-machine training '
                  'without TF_CONFIG.')
flags.DEFINE_integer('task_index', 0, 'This worker\'s index in worker_hosts.')
flags.DEFINE_multi_string(
    'config_override', None,
    'Config overrides, either FIELD.PATH=VALUE (e.g. '
    'train_dataset_options.batch_size=8) or a textproto snippet '
    '(e.g. "trainer_options { steps_per_loop: 10 }"). Repeatable.')
flags.DEFINE_integer(
    'seed', None,
    'Global random seed (Python, NumPy, TensorFlow): fixes the weight '
    'initialisation and the unseeded random ops of the input pipeline, so '
    'two runs with different seeds measure run-to-run spread. Default: '
    'unseeded.')

cli_errors.define_verbose_flag()

FLAGS = flags.FLAGS
# Exit status of a run stopped by a NaN/Inf loss.
NON_FINITE_LOSS_STATUS = 3


def main(argv):
  del argv
  if not FLAGS.config_file or not FLAGS.mode or not FLAGS.model_dir:
    raise app.UsageError('--config_file, --mode and --model_dir are required.')
  from deeplab_kmax.trainer import distribution  # pylint: disable=g-import-not-at-top
  if FLAGS.worker_hosts:
    distribution.set_tf_config(FLAGS.worker_hosts, FLAGS.task_index)

  from deeplab_kmax import config as config_lib  # pylint: disable=g-import-not-at-top
  from deeplab_kmax.trainer import kmax_trainer  # pylint: disable=g-import-not-at-top
  from deeplab_kmax.trainer import train_lib  # pylint: disable=g-import-not-at-top

  if FLAGS.seed is not None:
    import tf_keras  # pylint: disable=g-import-not-at-top
    tf_keras.utils.set_random_seed(FLAGS.seed)
  config = config_lib.load_experiment(
      FLAGS.config_file, FLAGS.config_override or (), mode=FLAGS.mode)
  model_dir = FLAGS.model_dir
  if config.experiment_name:
    model_dir = os.path.join(model_dir, config.experiment_name)
  logging.info('Running %s for experiment %r in %s.', FLAGS.mode,
               config.experiment_name, model_dir)
  try:
    train_lib.run_prepared(FLAGS.mode, config, model_dir,
                           distribution.create_strategy(
                               FLAGS.tpu or FLAGS.master, FLAGS.num_gpus))
  except kmax_trainer.NonFiniteLossError as e:
    logging.error('%s', e)
    print(f'ERROR: {e}', file=sys.stderr)
    sys.exit(NON_FINITE_LOSS_STATUS)


def run():
  from deeplab_kmax.config import loader  # pylint: disable=g-import-not-at-top
  cli_errors.run(main, expected=(loader.ConfigError,))


if __name__ == '__main__':
  run()
