"""Instance discrimination: pixel features that tell masks apart.

kMaX-DeepLab uses the pixel-contrastive form from CMT-DeepLab: k pixels are
sampled (Gumbel-top-k, biased towards small masks by the inverse mask area),
and each sampled pixel's feature must pick out, by softmax over the other
samples' similarities, the samples of its own mask. MaX-DeepLab's original
form (each pixel vs the mean feature of every thing mask) is used when no
sampling is configured.
"""

import tensorflow as tf

from deeplab_kmax.losses import mask_targets as targets_lib
from deeplab_kmax.losses import reduction
from deeplab_kmax.losses import sampling

# Added to the logits of excluded choices so that a softmax ignores them.
_EXCLUDED_LOGIT = -99999.0


def pixel_contrastive_loss(features: tf.Tensor,
                           targets: targets_lib.MaskTargets,
                           sample_k: int,
                           sample_temperature: float,
                           temperature: float,
                           top_k_percent: float = 1.0,
                           seed=None) -> tf.Tensor:
  """Contrastive loss among k sampled pixels: [B].

  Args:
    features: [B, P, D] pixel embeddings (L2-normalised by the model).
    targets: The ground truth.
    sample_k: Pixels to sample; clipped to P (DeepLab2 fails when k > P).
    sample_temperature: Exponent on the inverse mask area of the sampling
      distribution: larger values favour pixels of small masks.
    temperature: Softmax temperature of the feature similarities.
    top_k_percent: Keep only this fraction of the hardest sampled pixels.
    seed: Optional op seed for the sampling noise.
  """
  num_pixels = features.shape[1]
  k = sample_k if num_pixels is None else min(sample_k, num_pixels)
  sample_logits = (tf.math.log(targets.pixel_inverse_area) * sample_temperature
                   + (1.0 - targets.pixel_non_void) * _EXCLUDED_LOGIT)
  index = sampling.gumbel_top_k(sample_logits, k, seed=seed)  # [B, K]

  mask_id = tf.gather(targets.pixel_mask_id, index, batch_dims=1)  # [B, K]
  labelled = mask_id >= 0
  same_mask = ((mask_id[:, :, tf.newaxis] == mask_id[:, tf.newaxis, :]) &
               labelled[:, :, tf.newaxis] & labelled[:, tf.newaxis, :])
  same_mask = tf.cast(same_mask, tf.float32)  # [B, K, K]
  # Each row becomes a distribution over the samples of the pixel's own mask.
  same_mask /= tf.maximum(tf.reduce_sum(same_mask, -1, keepdims=True), 1.0)

  sampled = tf.gather(features, index, batch_dims=1)  # [B, K, D]
  logits = tf.einsum('bkd,bjd->bkj', sampled, sampled) / temperature
  loss = tf.nn.softmax_cross_entropy_with_logits(labels=same_mask,
                                                 logits=logits)  # [B, K]
  return reduction.average_nonzero_loss(loss, top_k_percent)


def mask_average_loss(features: tf.Tensor,
                      targets: targets_lib.MaskTargets,
                      temperature: float,
                      top_k_percent: float = 1.0) -> tf.Tensor:
  """MaX-DeepLab's original form: thing pixels vs mean mask features: [B].

  Args:
    features: [B, P, D] pixel embeddings.
    targets: The ground truth.
    temperature: Softmax temperature of the similarities.
    top_k_percent: Keep only this fraction of the hardest pixels.
  """
  masks = targets.pixel_masks  # [B, P, G]
  centers = tf.einsum('bpd,bpg->bgd', features, masks) / tf.maximum(
      targets.mask_area, 1.0)[..., tf.newaxis]
  centers = tf.math.l2_normalize(centers, axis=-1)  # [B, G, D]
  logits = tf.einsum('bpd,bgd->bpg', features, centers) / temperature
  valid = tf.cast(targets.mask_valid, tf.float32)[:, tf.newaxis, :]
  logits = valid * logits + (1.0 - valid) * _EXCLUDED_LOGIT
  loss = tf.nn.softmax_cross_entropy_with_logits(labels=masks, logits=logits)
  return reduction.average_nonzero_loss(loss * targets.pixel_is_thing,
                                        top_k_percent)
