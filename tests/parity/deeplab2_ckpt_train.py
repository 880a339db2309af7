"""Trains with DeepLab2's own trainer; optionally records the resumed state.

  TF_USE_LEGACY_KERAS=1 PYTHONPATH=../shared/bench \
  python tests/parity/deeplab2_ckpt_train.py CONFIG MODEL_DIR STEPS \
      [--restored_state=PREFIX]

Runs `deeplab2.trainer.train_lib.run_experiment('train', ...)` until the
global step reaches STEPS, with eager steps (see
deeplab2_ckpt_state.eager_trainer_init). With --restored_state, MODEL_DIR must hold a
checkpoint to resume from, and right after DeepLab2's checkpoint manager has
restored it (before any training step) the trainer's objects, optimizer
slots included, are written to PREFIX (see deeplab2_ckpt_state.py).
Run by test_checkpoint_interop.py, in DeepLab2's own process.
"""

import argparse
import os
import sys

from google.protobuf import text_format
import orbit
import tensorflow as tf

from deeplab2 import config_pb2
from deeplab2.trainer import distribution_utils
from deeplab2.trainer import train_lib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deeplab2_ckpt_state  # pylint: disable=g-import-not-at-top,wrong-import-position


def _record_created(module, name: str, store: dict) -> None:
  """Wraps module.name so that the object it returns is kept in store."""
  original = getattr(module, name)

  def wrapper(*args, **kwargs):
    store[name] = original(*args, **kwargs)
    return store[name]

  setattr(module, name, wrapper)


def _snapshot_after_restore(prefix: str, crop_size, created: dict) -> None:
  original = tf.train.CheckpointManager.restore_or_initialize

  def restore_or_initialize(manager):
    path = original(manager)
    if path is None:
      raise RuntimeError(f'--restored_state: no checkpoint to resume from in '
                         f'{manager.directory}.')
    model = created['create_deeplab_model']
    strategy = created['create_strategy']
    with strategy.scope():
      # DeepLab2 builds the model after the restore; its variables take the
      # queued checkpoint values as they are created.
      train_lib.build_deeplab_model(model, crop_size)
    deeplab2_ckpt_state.write_restored_state(
        manager.checkpoint, model, model.checkpoint_items['encoder'],
        strategy, prefix)
    return path

  tf.train.CheckpointManager.restore_or_initialize = restore_or_initialize


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('config')
  parser.add_argument('model_dir')
  parser.add_argument('steps', type=int)
  parser.add_argument('--restored_state', default='')
  args = parser.parse_args()

  config = config_pb2.ExperimentOptions()
  with open(args.config) as f:
    text_format.Parse(f.read(), config)
  config.trainer_options.solver_options.training_number_of_steps = args.steps
  orbit.StandardTrainer.__init__ = deeplab2_ckpt_state.eager_trainer_init(
      orbit.StandardTrainer.__init__)
  created = {}
  _record_created(train_lib, 'create_deeplab_model', created)
  _record_created(distribution_utils, 'create_strategy', created)
  if args.restored_state:
    _snapshot_after_restore(args.restored_state,
                            list(config.train_dataset_options.crop_size),
                            created)
  train_lib.run_experiment('train', config, args.model_dir, tpu=None,
                           num_gpus=0)


if __name__ == '__main__':
  main()
