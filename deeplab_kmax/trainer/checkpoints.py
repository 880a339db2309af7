"""Trainer checkpoints in DeepLab2's layout, written and read by every worker.

A trainer checkpoint is `tf.train.Checkpoint` over
  global_step, the model's `checkpoint_items` (encoder, pixel_decoder, ...),
  optimizer and, when a backbone learning-rate multiplier is set,
  backbone_optimizer,
plus the `save_counter` the CheckpointManager adds. Nothing else may be added
to it, or DeepLab2 trainer checkpoints stop being interchangeable with ours.
(Initial checkpoints are read by `checkpoint_io.restore_model`.)
"""

import os
import shutil
from typing import Any, Callable, Dict, Mapping, Optional

from absl import logging
import tensorflow as tf



def trainer_checkpoint_items(global_step: tf.Variable,
                             model_items: Mapping[str, Any],
                             optimizer=None,
                             backbone_optimizer=None) -> Dict[str, Any]:
  """The objects a trainer checkpoint tracks, under DeepLab2's names."""
  reserved = {'global_step', 'optimizer', 'backbone_optimizer', 'save_counter'}
  clash = reserved.intersection(model_items)
  if clash:
    raise ValueError(f'Model checkpoint items use reserved names: {clash}.')
  items = dict(global_step=global_step)
  items.update(model_items)
  if optimizer is not None:
    items['optimizer'] = optimizer
  if backbone_optimizer is not None:
    items['backbone_optimizer'] = backbone_optimizer
  return items


class EvaluationCheckpoint(tf.train.Checkpoint):
  """A checkpoint whose restores are expected to be partial.

  Evaluation tracks the model only; restoring a trainer checkpoint leaves
  its optimizer state unread on purpose, which should not flood the log with
  warnings.
  """

  def restore(self, save_path, options=None):
    return super().restore(save_path, options=options).expect_partial()


def _worker_temp_dir(model_dir: str, task_id: int) -> str:
  return os.path.join(model_dir, f'.worker_{task_id}_tmp')


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """Whether this process writes checkpoints/summaries into model_dir."""
  resolver = getattr(strategy, 'cluster_resolver', None)
  if resolver is None or not isinstance(
      strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return True
  task_type, task_id = resolver.task_type, resolver.task_id
  if task_type in (None, 'chief'):
    return True
  if task_type == 'worker':
    has_chief = 'chief' in resolver.cluster_spec().as_dict()
    return not has_chief and task_id == 0
  return False


class _FollowerCheckpointManager(tf.train.CheckpointManager):
  """A non-chief worker's manager: saves to scratch, restores the chief's.

  It must decide to save at exactly the steps the chief does (a save reads
  distributed variables collectively), so after restoring it records the
  restored step as its last checkpoint step, as the chief's manager does.
  """

  def __init__(self, checkpoint, scratch_dir, chief_dir, step_counter,
               checkpoint_interval, init_fn):
    super().__init__(checkpoint, directory=scratch_dir, max_to_keep=1,
                     step_counter=step_counter,
                     checkpoint_interval=checkpoint_interval)
    self._chief_dir = chief_dir
    self._follower_init_fn = init_fn

  def restore_or_initialize(self):
    latest = tf.train.latest_checkpoint(self._chief_dir)
    if latest is None:
      if self._follower_init_fn is not None:
        self._follower_init_fn()
      return None
    logging.info('Worker restores the chief checkpoint %s.', latest)
    self.checkpoint.restore(latest)
    self._last_checkpoint_step = int(self._step_counter.numpy())
    return latest


def create_checkpoint_manager(
    checkpoint: tf.train.Checkpoint,
    model_dir: str,
    global_step: tf.Variable,
    max_to_keep: int,
    save_every_n_steps: int,
    strategy: Optional[tf.distribute.Strategy] = None,
    init_fn: Optional[Callable[[], None]] = None,
) -> tf.train.CheckpointManager:
  """A CheckpointManager that also behaves under multi-worker training.

  Every worker must take part in a save, but only the chief writes to
  `model_dir`: the others save into a private scratch folder. A non-chief
  worker restores from the chief's latest checkpoint (its own folder is
  empty), so all workers resume from the same state.
  """
  strategy = strategy or tf.distribute.get_strategy()
  if is_chief(strategy):
    return tf.train.CheckpointManager(
        checkpoint, directory=model_dir, max_to_keep=max_to_keep,
        step_counter=global_step, checkpoint_interval=save_every_n_steps,
        init_fn=init_fn)
  scratch = _worker_temp_dir(model_dir, strategy.cluster_resolver.task_id)
  shutil.rmtree(scratch, ignore_errors=True)
  return _FollowerCheckpointManager(checkpoint, scratch, model_dir,
                                    global_step, save_every_n_steps, init_fn)


def remove_worker_scratch(model_dir: str,
                          strategy: tf.distribute.Strategy) -> None:
  """Deletes a non-chief worker's scratch checkpoints once training ends."""
  if not is_chief(strategy):
    shutil.rmtree(_worker_temp_dir(model_dir, strategy.cluster_resolver.task_id),
                  ignore_errors=True)
