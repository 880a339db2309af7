"""The Orbit trainer on a tiny stand-in model (fast, single device)."""

import numpy as np
import pytest
import tensorflow as tf

from deeplab_kmax.config import trainer_pb2
from deeplab_kmax.trainer import kmax_trainer
from deeplab_kmax.trainer import optimizer as optimizer_lib
from tests.trainer import standins


def _solver(**fields):
  solver = trainer_pb2.SolverOptions(
      optimizer='adamw', base_learning_rate=0.05, training_number_of_steps=100,
      adamw_weight_decay=0.01)
  for name, value in fields.items():
    setattr(solver, name, value)
  return solver


def _trainer(solver, dataset=None, clip=None, model=None):
  strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
  with strategy.scope():
    model = model or standins.TinySegmenter()
    optimizers = optimizer_lib.build_optimizers(solver)
    global_step = tf.Variable(0, dtype=tf.int64, trainable=False)
    trainer = kmax_trainer.KMaXTrainer(
        model, standins.PixelCrossEntropy(),
        dataset or standins.repeated_dataset(), optimizers.main, global_step,
        backbone_optimizer=optimizers.backbone,
        backbone_variables=(
            lambda: model.checkpoint_items['encoder'].trainable_variables),
        clip_gradient_norm=clip, total_steps=solver.training_number_of_steps,
        strategy=strategy)
  return trainer, model


def _eval_loss(model, batch):
  outputs = model(batch['image'], training=False)
  return float(tf.reduce_mean(standins.PixelCrossEntropy()(
      batch, outputs)['total_loss']))


def test_training_lowers_the_loss_on_a_fixed_batch():
  trainer, model = _trainer(_solver())
  batch = standins.fixed_batch()
  first = trainer.train(tf.constant(1))
  assert int(trainer.global_step.numpy()) == 1
  before = float(first['losses/train_total_loss'])
  logs = trainer.train(tf.constant(40))
  assert int(trainer.global_step.numpy()) == 41
  after = float(logs['losses/train_total_loss'])
  assert after < 0.7 * before, (before, after)
  assert _eval_loss(model, batch) < before
  assert set(logs) >= {'losses/train_total_loss', 'losses/train_semantic_loss',
                       'learning_rate', 'gradient_norm'}
  assert float(logs['learning_rate']) == pytest.approx(
      float(trainer.optimizer.learning_rate(41)))


def test_backbone_multiplier_applies_only_to_encoder_variables():
  # A zero multiplier freezes exactly the encoder's trainable variables.
  trainer, model = _trainer(_solver(backbone_learning_rate_multiplier=0.0))
  trainer.train(tf.constant(1))  # Builds the model.
  encoder_vars = model.checkpoint_items['encoder'].trainable_variables
  encoder_ids = {id(v) for v in encoder_vars}
  others = [v for v in model.trainable_variables if id(v) not in encoder_ids]
  before_encoder = [v.numpy().copy() for v in encoder_vars]
  before_others = [v.numpy().copy() for v in others]
  logs = trainer.train(tf.constant(3))
  assert float(logs['backbone_learning_rate']) == 0.0
  for value, var in zip(before_encoder, encoder_vars):
    np.testing.assert_array_equal(value, var.numpy(), err_msg=var.name)
  for value, var in zip(before_others, others):
    assert np.abs(value - var.numpy()).max() > 0, var.name
  # Each optimizer holds slots for its own variables only.
  backbone_slots = {id(trainer.backbone_optimizer.get_slot(v, 'm'))
                    for v in encoder_vars}
  assert len(backbone_slots) == len(encoder_vars)
  for var in others:
    with pytest.raises(KeyError):
      trainer.backbone_optimizer.get_slot(var, 'm')
    trainer.optimizer.get_slot(var, 'm')
  assert int(trainer.optimizer.iterations.numpy()) == 4
  assert int(trainer.backbone_optimizer.iterations.numpy()) == 4


def test_gradient_clipping_bounds_the_update():
  # With a tiny clip norm and SGD, one step moves weights by at most lr*clip.
  solver = _solver(optimizer='sgd', base_learning_rate=1.0)
  trainer, model = _trainer(solver, clip=1e-3)
  with trainer.strategy.scope():
    model(standins.fixed_batch()['image'])
  before = [v.numpy().copy() for v in model.trainable_variables]
  logs = trainer.train(tf.constant(1))
  assert float(logs['gradient_norm']) > 1e-2  # Unclipped norm is reported.
  delta = np.sqrt(sum(np.sum((b - v.numpy())**2) for b, v in
                      zip(before, model.trainable_variables)))
  assert delta == pytest.approx(1e-3, rel=1e-3)


def test_nonfinite_loss_stops_training_with_a_clear_message():
  batch = standins.fixed_batch()
  batch['image'][0, 0, 0, 0] = np.nan
  dataset = tf.data.Dataset.from_tensors(batch).repeat()
  trainer, _ = _trainer(_solver(), dataset=dataset)
  with pytest.raises(kmax_trainer.NonFiniteLossError,
                     match=r'NaN/Inf between steps 0 and 2.*last good'):
    trainer.train(tf.constant(2))


def test_loss_without_total_is_rejected():
  class BadLoss(standins.PixelCrossEntropy):

    def __call__(self, y_true, y_pred):
      return {'semantic_loss': super().__call__(y_true, y_pred)['total_loss']}

  strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
  with strategy.scope():
    model = standins.TinySegmenter()
    trainer = kmax_trainer.KMaXTrainer(
        model, BadLoss(), standins.repeated_dataset(),
        optimizer_lib.build_optimizer(_solver()),
        tf.Variable(0, dtype=tf.int64), strategy=strategy)
  with pytest.raises(Exception, match="expected a 'total_loss' entry"):
    trainer.train(tf.constant(1))
