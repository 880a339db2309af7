"""Tiny stand-ins with the kMaX model / loss / data contracts, for fast tests.

`TinySegmenter` has an `encoder` and heads exposed through `checkpoint_items`
(including a `semantic_last_layer`), uses sync batch norm like the real model,
returns `semantic_logits` in training and `semantic_pred` / `panoptic_pred`
at inference. `PixelCrossEntropy` returns per-example losses with
`total_loss`.
"""

from typing import Dict

import numpy as np
import tensorflow as tf
import tf_keras

NUM_CLASSES = 4
LABEL_DIVISOR = 256


class TinySegmenter(tf_keras.Model):
  """conv-bn-relu encoder, 1x1 head; stride 1 so labels need no resizing."""

  def __init__(self, num_classes: int = NUM_CLASSES, width: int = 8,
               sync_batchnorm: bool = True):
    super().__init__(name='tiny_segmenter')
    norm = (tf_keras.layers.experimental.SyncBatchNormalization
            if sync_batchnorm else tf_keras.layers.BatchNormalization)
    self._encoder = tf_keras.Sequential([
        tf_keras.layers.Conv2D(width, 3, padding='same', use_bias=False),
        norm(),
        tf_keras.layers.ReLU(),
    ], name='encoder')
    self._head = tf_keras.layers.Conv2D(width, 1, name='head')
    self._last = tf_keras.layers.Conv2D(num_classes, 1, name='last')

  def call(self, images, training=False):
    features = self._encoder(images / 127.5 - 1.0, training=training)
    logits = self._last(tf.nn.relu(self._head(features)))
    if training:
      return {'semantic_logits': logits}
    semantic = tf.argmax(logits, -1, output_type=tf.int32)
    # All pixels of the thing class form instance 1.
    instance = tf.cast(tf.equal(semantic, 1), tf.int32)
    confidence = tf.reduce_max(tf.nn.softmax(logits), -1)
    return {'semantic_logits': logits, 'semantic_pred': semantic,
            'panoptic_pred': semantic * LABEL_DIVISOR + instance,
            'semantic_scores': confidence, 'instance_scores': confidence}

  @property
  def checkpoint_items(self) -> Dict[str, tf.Module]:
    return dict(encoder=self._encoder, semantic_head_without_last_layer=self._head,
                semantic_last_layer=self._last)

  @property
  def backbone_variables(self):
    return self._encoder.trainable_variables


class PixelCrossEntropy:
  """Per-example mean pixel cross-entropy against `semantic_gt`."""

  def get_loss_names(self):
    return ['total_loss', 'semantic_loss']

  def __call__(self, y_true, y_pred):
    labels = tf.cast(y_true['semantic_gt'], tf.int32)
    per_pixel = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=labels, logits=y_pred['semantic_logits'])
    per_example = tf.reduce_mean(per_pixel, axis=[1, 2])
    return {'total_loss': per_example, 'semantic_loss': per_example}


def fixed_batch(batch_size: int = 4, size: int = 9, seed: int = 0):
  """A deterministic batch: images in 0..255 and labels tied to colour."""
  rng = np.random.default_rng(seed)
  images = rng.uniform(0, 255, (batch_size, size, size, 3)).astype(np.float32)
  labels = (images[..., 0] // 64).astype(np.int32)  # Learnable from pixels.
  return {'image': images, 'semantic_gt': labels}


def repeated_dataset(batch_size: int = 4, size: int = 9, seed: int = 0):
  """The fixed batch forever (global batch)."""
  return tf.data.Dataset.from_tensors(fixed_batch(batch_size, size,
                                                  seed)).repeat()


def dataset_info():
  """A 4-class dataset: void 0, thing 1, stuff 2 and 3."""
  from deeplab_kmax.data import dataset_info as dataset_info_lib  # pylint: disable=g-import-not-at-top
  return dataset_info_lib.from_json_dict({
      'name': 'tiny', 'ignore_label': 0, 'panoptic_label_divisor':
          LABEL_DIVISOR, 'num_classes': NUM_CLASSES,
      'classes': [{'id': 1, 'name': 'blob', 'isthing': True},
                  {'id': 2, 'name': 'sky', 'isthing': False},
                  {'id': 3, 'name': 'road', 'isthing': False}]})


def eval_examples(crop: int, num_examples: int = 3, seed: int = 5):
  """Batch-1 eval examples: content in the top-left, padding elsewhere,
  raw labels at the unpadded size (like the real eval pipeline)."""
  rng = np.random.default_rng(seed)
  examples = []
  for i in range(num_examples):
    height, width = crop - 2 * i - 1, crop - i - 3
    content = rng.uniform(0, 255, (height, width, 3)).astype(np.float32)
    image = np.full((crop, crop, 3), 127.5, np.float32)
    image[:height, :width] = content
    semantic = (content[..., 0] // 64).astype(np.int32)
    examples.append({
        'image': image[None], 'resized_image': content[None],
        'semantic_raw': semantic[None],
        'panoptic_raw': (semantic * LABEL_DIVISOR + (semantic == 1))[None],
    })
  return examples


def dataset(options, is_training, input_context=None, nan_after=None):
  """Stand-in for input_pipeline.create_dataset.

  Training: the fixed batch (global batch_size, crop from the options) split
  per replica; `nan_after` makes every batch after that many NaN.
  Evaluation: `eval_examples` one at a time.
  """
  crop = int(options.crop_size[0]) if options.crop_size else 9
  if not is_training:
    examples = eval_examples(crop)
    return tf.data.Dataset.from_generator(
        lambda: iter(examples),
        output_signature={
            'image': tf.TensorSpec([1, crop, crop, 3], tf.float32),
            'resized_image': tf.TensorSpec([1, None, None, 3], tf.float32),
            'semantic_raw': tf.TensorSpec([1, None, None], tf.int32),
            'panoptic_raw': tf.TensorSpec([1, None, None], tf.int32)})
  global_batch = int(options.batch_size)
  batch = fixed_batch(global_batch, crop)
  per_replica = global_batch
  if input_context is not None:
    # This pipeline's share of the global batch, in per-replica batches that
    # its replicas take in turn.
    per_replica = input_context.get_per_replica_batch_size(global_batch)
    share = global_batch // input_context.num_input_pipelines
    start = input_context.input_pipeline_id * share
    batch = {k: v[start:start + share] for k, v in batch.items()}
  bad = dict(batch, image=np.full_like(batch['image'], np.nan))

  def batches(content):
    return tf.data.Dataset.from_tensor_slices(content).batch(per_replica)

  good = batches(batch).repeat()
  if nan_after is None:
    return good
  steps_per_share = len(batch['image']) // per_replica
  return good.take(nan_after * steps_per_share).concatenate(
      batches(bad).repeat())


def builders(nan_after=None):
  """kmax_task.Builders with the stand-ins."""
  from deeplab_kmax.trainer import kmax_task  # pylint: disable=g-import-not-at-top
  return kmax_task.Builders(
      model=lambda config, info, crop_size: TinySegmenter(),
      loss=lambda config, info, model: PixelCrossEntropy(),
      dataset=lambda options, is_training, input_context=None: dataset(
          options, is_training, input_context, nan_after),
      dataset_info=lambda options: dataset_info())


def experiment_config(reference_dir, total_steps=6, checkpoint_every=3,
                      steps_per_loop=2, crop=33, batch_size=4):
  """The published COCO r50 config, shrunk for stand-in runs."""
  from deeplab_kmax import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(
      reference_dir / 'deeplab2_configs' / 'coco_kmax_meta_r50_os32.textproto')
  record = str(reference_dir / 'tfrecord' / 'val-00000-of-00001.tfrecord')
  return config_lib.override(config, {
      'experiment_name': 'standin',
      'model_options.initial_checkpoint': '',
      'train_dataset_options.file_pattern': [record],
      'eval_dataset_options.file_pattern': [record],
      'train_dataset_options.crop_size': [crop, crop],
      'eval_dataset_options.crop_size': [crop, crop],
      'train_dataset_options.batch_size': batch_size,
      'trainer_options.solver_options.training_number_of_steps': total_steps,
      'trainer_options.solver_options.warmup_steps': 0,
      'trainer_options.solver_options.base_learning_rate': 0.02,
      'trainer_options.save_checkpoints_steps': checkpoint_every,
      'trainer_options.save_summaries_steps': steps_per_loop,
      'trainer_options.steps_per_loop': steps_per_loop,
      'evaluator_options.eval_interval': total_steps,
      'evaluator_options.num_vis_samples': 2,
  })
