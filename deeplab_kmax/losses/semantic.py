"""Auxiliary semantic segmentation loss (softmax cross-entropy per pixel)."""

from typing import Optional

import tensorflow as tf

from deeplab_kmax.losses import mask_targets as targets_lib
from deeplab_kmax.losses import reduction
from deeplab_kmax.losses import sampling

_EXCLUDED_LOGIT = -99999.0


def semantic_cross_entropy(logits: tf.Tensor,
                           semantic_gt: tf.Tensor,
                           pixel_weight: tf.Tensor,
                           num_classes: int,
                           ignore_label: int,
                           top_k_percent: float = 1.0,
                           sample_k: int = 0,
                           sample_temperature: float = 1.0,
                           targets: Optional[targets_lib.MaskTargets] = None,
                           seed=None) -> tf.Tensor:
  """Per-pixel cross-entropy on the prediction grid, averaged per image: [B].

  Args:
    logits: [B, h, w, num_classes] semantic logits.
    semantic_gt: [B, H, W] semantic ids; read on the h x w grid by striding.
    pixel_weight: [B, H, W] per-pixel loss weights.
    num_classes: Number of semantic classes (logit channels).
    ignore_label: Pixels with this id (or any id outside [0, num_classes))
      contribute nothing.
    top_k_percent: Keep only this fraction of the hardest pixels.
    sample_k: If > 0, the loss uses only sample_k pixels drawn with
      Gumbel-top-k from the inverse mask area (needs `targets`). DeepLab2's
      loss builder never enables this, whatever the config says.
    sample_temperature: Exponent on the inverse mask area when sampling.
    targets: Mask targets at the logits' resolution (for sampling only).
    seed: Optional op seed for the sampling noise.
  """
  height, width, channels = logits.shape[1:]
  if channels != num_classes:
    raise ValueError(f'semantic logits have {channels} channels, expected '
                     f'num_classes={num_classes}.')
  batch = tf.shape(logits)[0]
  labels = tf.reshape(
      sampling.strided_downsample(tf.cast(semantic_gt, tf.int32),
                                  [height, width]), [batch, height * width])
  weight = tf.reshape(
      sampling.strided_downsample(tf.cast(pixel_weight, tf.float32),
                                  [height, width]), [batch, height * width])
  logits = tf.reshape(logits, [batch, height * width, num_classes])
  if sample_k > 0:
    if targets is None:
      raise ValueError('Semantic pixel sampling needs the mask targets.')
    sample_logits = (
        tf.math.log(targets.pixel_inverse_area) * sample_temperature +
        (1.0 - targets.pixel_non_void) * _EXCLUDED_LOGIT)
    index = sampling.gumbel_top_k(sample_logits,
                                  min(sample_k, height * width), seed=seed)
    labels = tf.gather(labels, index, batch_dims=1)
    weight = tf.gather(weight, index, batch_dims=1)
    logits = tf.gather(logits, index, batch_dims=1)
  valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
  loss = tf.nn.sparse_softmax_cross_entropy_with_logits(
      labels=tf.where(valid, labels, 0), logits=logits)
  loss = tf.where(valid, loss, 0.0) * weight
  return reduction.average_nonzero_loss(loss, top_k_percent)
