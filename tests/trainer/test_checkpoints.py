"""Trainer checkpoints: DeepLab2 key layout, resume state, initial checkpoints."""

import numpy as np
import orbit
import pytest
import tensorflow as tf

from deeplab_kmax import checkpoint_io
from deeplab_kmax import config as config_lib
from deeplab_kmax.trainer import checkpoints
from deeplab_kmax.trainer import kmax_task
from deeplab_kmax.trainer import kmax_trainer
from deeplab_kmax.trainer import optimizer as optimizer_lib
from tests.trainer import standins

_MANIFEST = 'coco_kmax_meta_r50_os32_trainer_checkpoint.tsv'


def _manifest_with_dtypes(path):
  entries = {}
  with open(path) as f:
    for line in f:
      key, shape, dtype = line.rstrip('\n').split('\t')
      entries[key] = (tuple(int(d) for d in shape.split(',')) if shape else (),
                      dtype)
  return entries


def test_real_model_trains_and_checkpoints_like_deeplab2(tmp_path,
                                                        reference_dir):
  """kMaX r50 + KMaXLoss + input pipeline (train_lib's default builders).

  A few eager steps on one fixed batch of the reference TFRecord must lower
  the loss, and the trainer checkpoint must have exactly the keys, shapes and
  dtypes of DeepLab2's (2630 keys, both AdamW optimizers).
  """
  record = str(reference_dir / 'tfrecord' / 'val-00000-of-00001.tfrecord')
  config = config_lib.load_config(
      reference_dir / 'deeplab2_configs' / 'coco_kmax_meta_r50_os32.textproto')
  config = config_lib.override(config, {
      'model_options.initial_checkpoint': '',
      'train_dataset_options.file_pattern': [record],
      'train_dataset_options.crop_size': [129, 129],
      'train_dataset_options.min_resize_value': [129],
      'train_dataset_options.max_resize_value': [129],
      'train_dataset_options.batch_size': 2,
      'trainer_options.solver_options.warmup_steps': 0,
      'trainer_options.solver_options.base_learning_rate': 1e-4,
  })
  builders = kmax_task.Builders()
  options = config.train_dataset_options
  info = builders.dataset_info(options)
  batch = next(iter(builders.dataset(options, True)))
  strategy = tf.distribute.OneDeviceStrategy('CPU:0')
  with strategy.scope():
    model = builders.model(config, info, [129, 129])
    loss = builders.loss(config, info, model)
    optimizers = optimizer_lib.build_optimizers(
        config.trainer_options.solver_options)
    global_step = tf.Variable(0, dtype=tf.int64)
    trainer = kmax_trainer.KMaXTrainer(
        model, loss, tf.data.Dataset.from_tensors(batch).repeat(),
        optimizers.main, global_step, backbone_optimizer=optimizers.backbone,
        backbone_variables=lambda: model.backbone_variables,
        strategy=strategy,
        # Eager: tracing the full model costs more than a few steps.
        options=orbit.StandardTrainerOptions(use_tf_function=False,
                                             use_tf_while_loop=False))
  losses = []
  for _ in range(3):
    logs = trainer.train(tf.constant(1))
    losses.append(float(logs['losses/train_total_loss']))
  assert 'losses/train_aux_5pq_style_loss_class_term' in logs
  assert losses[2] < losses[1] < losses[0], losses

  checkpoint = tf.train.Checkpoint(**checkpoints.trainer_checkpoint_items(
      global_step, model.checkpoint_items, optimizers.main,
      optimizers.backbone))
  manager = checkpoints.create_checkpoint_manager(
      checkpoint, str(tmp_path), global_step, max_to_keep=1,
      save_every_n_steps=10)
  path = manager.save(checkpoint_number=global_step)
  saved = {key: tuple(shape) for key, shape in tf.train.list_variables(path)
           if key != '_CHECKPOINTABLE_OBJECT_GRAPH'}
  expected = _manifest_with_dtypes(reference_dir / 'manifests' / _MANIFEST)
  assert set(saved) == set(expected), sorted(set(saved) ^ set(expected))[:10]
  dtypes = tf.train.load_checkpoint(path).get_variable_to_dtype_map()
  for key, (shape, dtype) in expected.items():
    assert saved[key] == shape, key
    assert dtypes[key].name == dtype, key
  backbone_slots = [k for k in saved if '/.OPTIMIZER_SLOT/backbone_optimizer/m/'
                    in k]
  assert len(backbone_slots) == 159
  assert all(k.startswith('encoder/') for k in backbone_slots)


def _trained_trainer(steps):
  strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
  solver = config_lib.trainer_pb2.SolverOptions(
      optimizer='adamw', adamw_weight_decay=0.01, base_learning_rate=0.01,
      training_number_of_steps=100, backbone_learning_rate_multiplier=0.1)
  with strategy.scope():
    model = standins.TinySegmenter()
    optimizers = optimizer_lib.build_optimizers(solver)
    global_step = tf.Variable(0, dtype=tf.int64)
    trainer = kmax_trainer.KMaXTrainer(
        model, standins.PixelCrossEntropy(), standins.repeated_dataset(),
        optimizers.main, global_step, backbone_optimizer=optimizers.backbone,
        backbone_variables=(
            lambda: model.checkpoint_items['encoder'].trainable_variables),
        strategy=strategy)
    if steps:
      trainer.train(tf.constant(steps))
    else:
      model(standins.fixed_batch()['image'])
  checkpoint = tf.train.Checkpoint(**checkpoints.trainer_checkpoint_items(
      global_step, model.checkpoint_items, optimizers.main,
      optimizers.backbone))
  return trainer, checkpoint


def test_resume_restores_step_weights_and_optimizer_slots(tmp_path):
  trainer, checkpoint = _trained_trainer(steps=3)
  path = checkpoint.write(str(tmp_path / 'ckpt'))
  expected_weights = [v.numpy() for v in trainer.model.variables]
  encoder = trainer.model.checkpoint_items['encoder']
  kernel = encoder.trainable_variables[0]
  expected_m = trainer.backbone_optimizer.get_slot(kernel, 'm').numpy()

  fresh, fresh_checkpoint = _trained_trainer(steps=0)
  fresh_checkpoint.read(path).assert_existing_objects_matched()
  assert int(fresh.global_step.numpy()) == 3
  for value, var in zip(expected_weights, fresh.model.variables):
    np.testing.assert_array_equal(value, var.numpy(), err_msg=var.name)
  # Slots are restored as soon as the optimizer creates them.
  fresh_encoder = fresh.model.checkpoint_items['encoder']
  fresh.backbone_optimizer._create_all_weights(  # pylint: disable=protected-access
      fresh_encoder.trainable_variables)
  fresh_kernel = fresh_encoder.trainable_variables[0]
  np.testing.assert_array_equal(
      fresh.backbone_optimizer.get_slot(fresh_kernel, 'm').numpy(), expected_m)
  assert int(fresh.backbone_optimizer.iterations.numpy()) == 3
  logs = fresh.train(tf.constant(1))
  assert int(fresh.global_step.numpy()) == 4
  assert int(fresh.optimizer.iterations.numpy()) == 4
  assert np.isfinite(float(logs['losses/train_total_loss']))


@pytest.mark.parametrize('restore_last_layer', [False, True])
def test_initial_checkpoint_restore(tmp_path, restore_last_layer):
  source, _ = _trained_trainer(steps=2)
  # A trainer checkpoint (with optimizer state) is a valid initial checkpoint.
  path = tf.train.Checkpoint(**checkpoints.trainer_checkpoint_items(
      source.global_step, source.model.checkpoint_items, source.optimizer,
      source.backbone_optimizer)).write(str(tmp_path / 'init'))

  target = standins.TinySegmenter()
  target(standins.fixed_batch()['image'])
  before_last = [v.numpy() for v in
                 target.checkpoint_items['semantic_last_layer'].variables]
  report = checkpoint_io.restore_model(
      target.checkpoint_items, path,
      checkpoint_io.RestoreMode.fine_tune(
          restore_semantic_last_layer=restore_last_layer,
          restore_class_last_layer=True))
  for name in ('encoder', 'semantic_head_without_last_layer'):
    for a, b in zip(source.model.checkpoint_items[name].variables,
                    target.checkpoint_items[name].variables):
      np.testing.assert_array_equal(a.numpy(), b.numpy())
  last = target.checkpoint_items['semantic_last_layer'].variables
  source_last = source.model.checkpoint_items['semantic_last_layer'].variables
  for kept, var, src in zip(before_last, last, source_last):
    expected = src.numpy() if restore_last_layer else kept
    np.testing.assert_array_equal(expected, var.numpy())
  assert bool(report.skipped) != restore_last_layer
  assert not report.missing


def test_initial_checkpoint_errors(tmp_path):
  target = standins.TinySegmenter()
  target(standins.fixed_batch()['image'])
  fine_tune = checkpoint_io.RestoreMode.fine_tune(False, True)
  with pytest.raises(FileNotFoundError, match='not found'):
    checkpoint_io.restore_model(target.checkpoint_items,
                                str(tmp_path / 'nothing'), fine_tune)
  unrelated = tf.train.Checkpoint(other=tf.Variable(1.0)).write(
      str(tmp_path / 'other'))
  with pytest.raises(ValueError, match='shares no variable'):
    checkpoint_io.restore_model(target.checkpoint_items, unrelated, fine_tune)


def test_restore_modes(tmp_path):
  """What each mode restores and refuses, on a checkpoint without the last
  layer."""
  source = standins.TinySegmenter()
  source(standins.fixed_batch()['image'])
  items = dict(source.checkpoint_items)
  full = tf.train.Checkpoint(**items).write(str(tmp_path / 'full'))
  del items['semantic_last_layer']
  partial = tf.train.Checkpoint(**items).write(str(tmp_path / 'partial'))
  target = standins.TinySegmenter()
  target(standins.fixed_batch()['image'])
  modes = checkpoint_io.RestoreMode

  report = checkpoint_io.restore_model(target.checkpoint_items, full,
                                       modes.resume_or_evaluate())
  assert not report.skipped and not report.missing
  np.testing.assert_array_equal(
      target.checkpoint_items['semantic_last_layer'].variables[0].numpy(),
      source.checkpoint_items['semantic_last_layer'].variables[0].numpy())
  report = checkpoint_io.restore_model(target.checkpoint_items, partial,
                                       modes.resume_or_evaluate())
  assert report.missing and all(k.startswith('semantic_last_layer/')
                                for k in report.missing)
  with pytest.raises(checkpoint_io.IncompleteCheckpointError,
                     match='semantic_last_layer'):
    checkpoint_io.restore_model(target.checkpoint_items, partial,
                                modes.strict_inference())
  report = checkpoint_io.restore_model(
      target.checkpoint_items, partial,
      modes.strict_inference(allow_partial=True))
  assert report.restored and report.missing
  assert not checkpoint_io.restore_model(target.checkpoint_items, full,
                                         modes.strict_inference()).missing


def test_reserved_names_are_rejected():
  with pytest.raises(ValueError, match='reserved'):
    checkpoints.trainer_checkpoint_items(tf.Variable(0), {'optimizer': None})
