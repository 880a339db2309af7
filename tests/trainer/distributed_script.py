"""Child-process driver for the distribution tests (not collected by pytest).

Logical CPU devices and TF_CONFIG must be set before TensorFlow initialises,
so these runs happen in fresh processes:

  python -m tests.trainer.distributed_script mirrored
      -> JSON: per-step losses and final weights, one device vs. Mirrored over
         two logical CPUs, plus eval metrics under both.
  python -m tests.trainer.distributed_script worker MODEL_DIR REF_DIR STEPS
      -> one MultiWorkerMirrored worker (TF_CONFIG set by the caller) running
         train_lib.run_experiment with the stand-ins.
  python -m tests.trainer.distributed_script train MODEL_DIR REF_DIR STEPS
      -> one-device stand-in training, a checkpoint every step.
"""

import json
import os
import pathlib
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top


def _split_cpu(count: int) -> None:
  cpu = tf.config.list_physical_devices('CPU')[0]
  tf.config.set_logical_device_configuration(
      cpu, [tf.config.LogicalDeviceConfiguration()] * count)


def _train(strategy, initial_weights, steps, batch_size):
  from deeplab_kmax.config import trainer_pb2  # pylint: disable=g-import-not-at-top
  from deeplab_kmax.trainer import kmax_trainer  # pylint: disable=g-import-not-at-top
  from deeplab_kmax.trainer import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from tests.trainer import standins  # pylint: disable=g-import-not-at-top
  solver = trainer_pb2.SolverOptions(
      optimizer='adamw', adamw_weight_decay=0.05, base_learning_rate=0.02,
      training_number_of_steps=100, warmup_steps=2,
      backbone_learning_rate_multiplier=0.5, use_gradient_clipping=True,
      clip_gradient_norm=0.5)

  class Options:
    crop_size = [9, 9]
    batch_size = 0

  Options.batch_size = batch_size
  with strategy.scope():
    model = standins.TinySegmenter()
    model(tf.zeros([1, 9, 9, 3]))
    if initial_weights is not None:
      model.set_weights(initial_weights)
    optimizers = optimizer_lib.build_optimizers(solver)
    trainer = kmax_trainer.KMaXTrainer(
        model, standins.PixelCrossEntropy(),
        lambda input_context: standins.dataset(Options, True, input_context),
        optimizers.main, tf.Variable(0, dtype=tf.int64),
        backbone_optimizer=optimizers.backbone,
        backbone_variables=(
            lambda: model.checkpoint_items['encoder'].trainable_variables),
        clip_gradient_norm=solver.clip_gradient_norm, strategy=strategy)
  losses = []
  for _ in range(steps):
    logs = trainer.train(tf.constant(1))
    losses.append(float(logs['losses/train_total_loss']))
  return model, losses


def _evaluate(strategy, model):
  from deeplab_kmax.trainer import kmax_evaluator  # pylint: disable=g-import-not-at-top
  from tests.trainer import standins  # pylint: disable=g-import-not-at-top

  class Options:
    crop_size = [9, 9]

  with strategy.scope():
    evaluator = kmax_evaluator.KMaXEvaluator(
        model, standins.dataset(Options, False), standins.dataset_info(),
        tf.Variable(0, dtype=tf.int64), strategy=strategy, write_files=False)
  return {k: float(v) for k, v in evaluator.evaluate(tf.constant(-1)).items()}


def mirrored():
  _split_cpu(2)
  single = tf.distribute.OneDeviceStrategy('/cpu:0')
  mirrored_strategy = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])
  with single.scope():
    from tests.trainer import standins  # pylint: disable=g-import-not-at-top
    probe = standins.TinySegmenter()
    probe(tf.zeros([1, 9, 9, 3]))
    weights = probe.get_weights()
  model_1, losses_1 = _train(single, weights, steps=4, batch_size=4)
  model_2, losses_2 = _train(mirrored_strategy, weights, steps=4,
                             batch_size=4)
  weight_diff = max(float(np.abs(a - b).max()) for a, b in
                    zip(model_1.get_weights(), model_2.get_weights()))
  moved = max(float(np.abs(a - b).max()) for a, b in
              zip(weights, model_2.get_weights()))
  # Every replica's copy must have received the same update (weight decay
  # decisions by name must not depend on the replica suffix).
  replica_diff = max(
      float(np.abs(v.values[0].numpy() - v.values[1].numpy()).max())
      for v in model_2.trainable_variables)
  print(json.dumps({
      'replicas': mirrored_strategy.num_replicas_in_sync,
      'losses_single': losses_1, 'losses_mirrored': losses_2,
      'max_weight_diff': weight_diff, 'max_weight_change': moved,
      'max_replica_diff': replica_diff,
      'eval_single': _evaluate(single, model_1),
      'eval_mirrored': _evaluate(mirrored_strategy, model_2),
  }))


def worker(model_dir: str, reference_dir: str, total_steps: str):
  from deeplab_kmax.trainer import train_lib  # pylint: disable=g-import-not-at-top
  from tests.trainer import standins  # pylint: disable=g-import-not-at-top
  config = standins.experiment_config(pathlib.Path(reference_dir),
                                      total_steps=int(total_steps),
                                      checkpoint_every=4, steps_per_loop=2)
  train_lib.run_experiment('train', config, model_dir,
                           builders=standins.builders())
  print(json.dumps({'done': True}))


def standin_train(model_dir: str, reference_dir: str, total_steps: str):
  """One-device stand-in training that checkpoints every step (kill test)."""
  from deeplab_kmax.trainer import train_lib  # pylint: disable=g-import-not-at-top
  from tests.trainer import standins  # pylint: disable=g-import-not-at-top
  config = standins.experiment_config(pathlib.Path(reference_dir),
                                      total_steps=int(total_steps),
                                      checkpoint_every=1, steps_per_loop=1)
  train_lib.run_experiment('train', config, model_dir,
                           strategy=tf.distribute.OneDeviceStrategy('/cpu:0'),
                           builders=standins.builders())
  print(json.dumps({'done': True}))


if __name__ == '__main__':
  if sys.argv[1] == 'mirrored':
    mirrored()
  elif sys.argv[1] == 'worker':
    worker(*sys.argv[2:5])
  elif sys.argv[1] == 'train':
    standin_train(*sys.argv[2:5])
  else:
    raise SystemExit(f'unknown command {sys.argv[1]!r}')
