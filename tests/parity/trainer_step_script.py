"""Runs one side's own training experiment on one fixed batch.

  python tests/parity/trainer_step_script.py SIDE CONFIG BATCH_NPZ MODEL_DIR \
      [--deterministic]

SIDE is `ours` (this project; the checkout must be on PYTHONPATH) or
`deeplab2` (run with TF_USE_LEGACY_KERAS=1 PYTHONPATH=../shared/bench).
CONFIG is that side's textproto (mode `train`; its initial_checkpoint names
the starting weights), BATCH_NPZ the arrays of one training batch. What
changes on either side: the dataset factory yields BATCH_NPZ over and over
instead of reading TFRecords, and the random layers are switched off (the
ASPP dropout on both sides, DeepLab2's hard-coded decoder drop path:
deeplab2_determinism.py). The rest -- model, loss, optimizers, schedule,
backbone split, Orbit loop and checkpoint manager -- is the side's own
`train_lib.run_experiment`. Checkpoints and summaries land in MODEL_DIR for
test_train_step_parity.py to compare.

With --deterministic (and TF_ENABLE_ONEDNN_OPTS=0 in the environment, read
at import) every op runs deterministically on one thread, so that a
gradient that is zero in exact arithmetic comes out the same in every run
(in a multi-threaded run its float noise differs from run to run, and Adam
turns that noise into steps of +-lr). With --reverse the batch's examples
come in reverse order: the same objective in exact arithmetic, summed in
another order, which shows how far a side's own rounding moves each value.
"""

from typing import Dict

import numpy as np
import tensorflow as tf

import eager_gradient_script  # Beside this script.


def fixed_dataset(batch: Dict[str, np.ndarray]) -> tf.data.Dataset:
  tensors = {name: tf.constant(value) for name, value in batch.items()}
  return tf.data.Dataset.from_tensors(tensors).repeat()


def run_ours(config_path: str, batch: Dict[str, np.ndarray],
             model_dir: str) -> None:
  import tf_keras  # pylint: disable=g-import-not-at-top
  from deeplab_kmax import config as config_lib  # pylint: disable=g-import-not-at-top
  from deeplab_kmax.trainer import train_lib  # pylint: disable=g-import-not-at-top

  # As deeplab2_determinism.disable_dropout does on DeepLab2's side.
  tf_keras.layers.Dropout.call = lambda self, inputs, training=None: inputs
  config = config_lib.load_config(config_path)
  create = lambda *unused_args, **unused_kwargs: fixed_dataset(batch)
  train_lib.run_experiment('train', config, model_dir,
                           builders=train_lib.Builders(dataset=create))


def run_deeplab2(config_path: str, batch: Dict[str, np.ndarray],
                 model_dir: str) -> None:
  from google.protobuf import text_format  # pylint: disable=g-import-not-at-top
  from deeplab2 import config_pb2  # pylint: disable=g-import-not-at-top
  from deeplab2.trainer import runner_utils  # pylint: disable=g-import-not-at-top
  from deeplab2.trainer import train_lib  # pylint: disable=g-import-not-at-top
  import deeplab2_determinism  # pylint: disable=g-import-not-at-top

  with open(config_path) as f:
    config = text_format.Parse(f.read(), config_pb2.ExperimentOptions())
  runner_utils.create_dataset = (
      lambda *unused_args, **unused_kwargs: fixed_dataset(batch))
  deeplab2_determinism.remove_randomness()
  train_lib.run_experiment('train', config, model_dir, tpu=None, num_gpus=0)


def main() -> None:
  parser = eager_gradient_script.side_parser(__doc__, 'model_dir')
  parser.add_argument('--reverse', action='store_true',
                      help="Train on the batch's examples in reverse order.")
  args = parser.parse_args()
  if args.deterministic:
    eager_gradient_script.configure_determinism()
  with np.load(args.batch) as arrays:
    batch = {name: arrays[name] for name in arrays.files}
  if args.reverse:
    batch = {name: value[::-1].copy() for name, value in batch.items()}
  run = run_ours if args.side == 'ours' else run_deeplab2
  run(args.config, batch, args.model_dir)


if __name__ == '__main__':
  main()
