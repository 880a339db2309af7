"""Runs DeepLab2's own training experiment on one fixed batch.

  TF_USE_LEGACY_KERAS=1 PYTHONPATH=../shared/bench \
  python tests/parity/deeplab2_step_script.py CONFIG BATCH_NPZ MODEL_DIR

CONFIG is a DeepLab2 textproto (mode `train`; its initial_checkpoint names
the starting weights), BATCH_NPZ the arrays of one training batch. The changes to
DeepLab2: its dataset factory yields BATCH_NPZ over and over instead of
reading TFRecords, and its two random layers are switched off
(deeplab2_determinism.py); the rest -- model, loss, optimizers, schedule,
backbone split, Orbit loop and checkpoint manager -- is DeepLab2's
`train_lib.run_experiment`. Its checkpoints and summaries land in MODEL_DIR
for test_train_step_parity.py to compare with this project's.
"""

import argparse
from typing import Dict

import numpy as np
from google.protobuf import text_format
import tensorflow as tf

from deeplab2 import config_pb2
from deeplab2.trainer import runner_utils
from deeplab2.trainer import train_lib
import deeplab2_determinism  # Beside this script.


def fixed_dataset_factory(batch: Dict[str, np.ndarray]):
  """A stand-in for runner_utils.create_dataset that repeats `batch`."""

  def create_dataset(*unused_args, **unused_kwargs) -> tf.data.Dataset:
    tensors = {name: tf.constant(value) for name, value in batch.items()}
    return tf.data.Dataset.from_tensors(tensors).repeat()

  return create_dataset


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('config')
  parser.add_argument('batch')
  parser.add_argument('model_dir')
  args = parser.parse_args()

  with open(args.config) as f:
    config = text_format.Parse(f.read(), config_pb2.ExperimentOptions())
  with np.load(args.batch) as arrays:
    batch = {name: arrays[name] for name in arrays.files}
  runner_utils.create_dataset = fixed_dataset_factory(batch)
  deeplab2_determinism.remove_randomness()
  train_lib.run_experiment('train', config, args.model_dir, tpu=None,
                           num_gpus=0)


if __name__ == '__main__':
  main()
