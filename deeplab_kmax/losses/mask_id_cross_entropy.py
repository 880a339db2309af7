"""Mask-ID cross-entropy (MaX-DeepLab): each pixel classifies its own mask.

Every pixel inside a matched ground-truth mask is asked to put its softmax
mass (over mask slots) on the slot that mask was matched to. It complements
the dice term with a per-pixel signal.
"""

import tensorflow as tf

from deeplab_kmax.losses import mask_targets as targets_lib
from deeplab_kmax.losses import reduction

# DeepLab2 scores gt masks left without a slot (more valid masks than slots)
# against a padded slot whose logit is this constant.
_PADDED_SLOT_LOGIT = -99999.0


def mask_id_cross_entropy(mask_logits: tf.Tensor,
                          targets: targets_lib.MaskTargets,
                          slot_for_mask: tf.Tensor,
                          top_k_percent: float = 1.0,
                          exclude_unmatched: bool = False) -> tf.Tensor:
  """Cross-entropy of each pixel's slot distribution vs its matched slot.

  Args:
    mask_logits: [B, P, S] per-pixel slot logits.
    targets: The ground truth (pixel -> mask row, void pixels).
    slot_for_mask: [B, G] int32 slot matched to each mask row, -1 if none.
    top_k_percent: Keep only this fraction of the hardest pixels.
    exclude_unmatched: Pixels of valid masks left without a slot get, as in
      DeepLab2 (False), a loss against a -99999 logit, i.e. about 1e5 each;
      True ignores those pixels instead.

  Returns:
    [B] loss averaged over non-void pixels with a non-zero loss.
  """
  has_mask = targets.pixel_mask_id >= 0
  slot = tf.gather(slot_for_mask, tf.maximum(targets.pixel_mask_id, 0),
                   batch_dims=1)  # [B, P]
  matched = has_mask & (slot >= 0)
  loss = tf.nn.sparse_softmax_cross_entropy_with_logits(
      labels=tf.maximum(slot, 0), logits=mask_logits)
  loss = tf.where(matched, loss, 0.0)
  if not exclude_unmatched:
    unmatched = has_mask & (slot < 0) & tf.gather(
        targets.mask_valid, tf.maximum(targets.pixel_mask_id, 0),
        batch_dims=1)
    padded_loss = tf.reduce_logsumexp(mask_logits, axis=-1) - _PADDED_SLOT_LOGIT
    loss = tf.where(unmatched, padded_loss, loss)
  return reduction.average_nonzero_loss(loss * targets.pixel_non_void,
                                        top_k_percent)
