"""PQ-style loss (MaX-DeepLab, Eq. 10): matching, class term and dice term.

Each ground-truth mask is matched one-to-one to a mask slot by maximising the
product (class probability of the mask's class) x (mask dice), a
differentiable stand-in for PQ = RQ x SQ. The loss then splits into
  * a class term: cross-entropy of every slot's class prediction, weighted by
    the matched dice (positives) or by how much of the slot lies in void
    (negatives, which should predict the void class), and
  * a dice term: 1 - dice of every matched mask, weighted by its matched class
    probability.
The weights are constants (no gradient), as in the paper. The matching is
done once, on the final prediction, and the resulting targets are reused for
the auxiliary predictions of earlier decoder layers.
"""

from typing import NamedTuple

import tensorflow as tf

from deeplab_kmax.losses import hungarian_matching
from deeplab_kmax.losses import mask_targets as targets_lib
from deeplab_kmax.losses import reduction

_DENOMINATOR_EPSILON = 1e-5
_MIN_LOSS_WEIGHT = 1e-5  # A zero weight would read as "void" when averaging.
_DICE_SMOOTH = 1.0


class Matching(NamedTuple):
  """Result of matching ground-truth masks (G rows) to mask slots (S)."""
  mask_similarity: tf.Tensor  # [B, G, S] dice of gt mask vs slot mask.
  class_similarity: tf.Tensor  # [B, G, S] slot probability of mask's class.
  slot_for_mask: tf.Tensor  # [B, G] int32 matched slot, -1 if none.

  @property
  def costs(self) -> tf.Tensor:
    """[B, G, S] matching costs; only rows of valid masks are used."""
    return -self.mask_similarity * self.class_similarity


class MatchedTargets(NamedTuple):
  """Targets derived from the main output's matching, shared by aux outputs."""
  slot_for_mask: tf.Tensor  # [B, G] int32 matched slot, -1 if none.
  dice_weight: tf.Tensor  # [B, G] per-mask weight of the dice term.
  class_target: tf.Tensor  # [B, S, C + 1] class labels, void class last.
  class_weight: tf.Tensor  # [B, S] per-slot weight of the class term.


def dice_similarity(gt_masks: tf.Tensor, pred_masks: tf.Tensor) -> tf.Tensor:
  """Soft dice between every gt mask [B, P, G] and predicted mask [B, P, S].

  Returns [B, G, S]: |g . p| / ((|g| + |p|) / 2 + eps).
  """
  intersection = tf.einsum('bpg,bps->bgs', gt_masks, pred_masks)
  half_sizes = (tf.reduce_sum(gt_masks, axis=1)[:, :, tf.newaxis] +
                tf.reduce_sum(pred_masks, axis=1)[:, tf.newaxis, :]) / 2
  return intersection / (half_sizes + _DENOMINATOR_EPSILON)


def fraction_in_region(region: tf.Tensor, pred_masks: tf.Tensor) -> tf.Tensor:
  """Share of each soft predicted mask [B, P, S] inside a region [B, P].

  Returns [B, S].
  """
  inside = tf.einsum('bp,bps->bs', region, pred_masks)
  return inside / (tf.reduce_sum(pred_masks, axis=1) + _DENOMINATOR_EPSILON)


def class_probability(class_logits: tf.Tensor,
                      mask_class_index: tf.Tensor) -> tf.Tensor:
  """Probability each slot gives to each gt mask's class: [B, G, S].

  Args:
    class_logits: [B, S, C + 1] logits, void class last.
    mask_class_index: [B, G] class index in 0..C - 1, or -1 (probability 0).
  """
  probs = tf.nn.softmax(class_logits, axis=-1)[:, :, :-1]  # [B, S, C]
  picked = tf.gather(probs, tf.maximum(mask_class_index, 0), axis=2,
                     batch_dims=1)  # [B, S, G]
  picked = tf.where(mask_class_index[:, tf.newaxis, :] >= 0, picked, 0.0)
  return tf.transpose(picked, [0, 2, 1])


def _masked_probs(mask_logits: tf.Tensor,
                  targets: targets_lib.MaskTargets) -> tf.Tensor:
  """Slot probabilities per pixel, zeroed on void pixels: [B, P, S]."""
  probs = tf.nn.softmax(mask_logits, axis=-1)
  return probs * targets.pixel_non_void[..., tf.newaxis]


MATCHERS = {
    # DeepLab2's float32 Munkres with +-999 sentinels: reproduces its choice
    # among matchings that tie once the costs are rounded.
    'deeplab2': hungarian_matching.deeplab2_assignment,
    # Exact optimum of the unrounded costs.
    'exact': hungarian_matching.linear_sum_assignment,
}


def match(mask_logits: tf.Tensor, class_logits: tf.Tensor,
          targets: targets_lib.MaskTargets,
          matcher: str = 'deeplab2') -> Matching:
  """Hungarian matching of valid gt masks to slots on -dice x class prob.

  Args:
    mask_logits: [B, P, S] mask logits of the output to match.
    class_logits: [B, S, C + 1] class logits, void class last.
    targets: The ground truth.
    matcher: A key of MATCHERS.
  """
  if matcher not in MATCHERS:
    raise ValueError(f'matcher must be one of {sorted(MATCHERS)}, got '
                     f'{matcher!r}.')
  mask_sim = dice_similarity(targets.pixel_masks,
                             _masked_probs(mask_logits, targets))
  class_sim = class_probability(class_logits, targets.mask_class_index)
  slot = MATCHERS[matcher](tf.stop_gradient(-mask_sim * class_sim),
                          targets.mask_valid)
  return Matching(mask_similarity=mask_sim, class_similarity=class_sim,
                  slot_for_mask=slot)


def matched_targets(mask_logits: tf.Tensor,
                    class_logits: tf.Tensor,
                    targets: targets_lib.MaskTargets,
                    matching: Matching,
                    exclude_unmatched: bool = False) -> MatchedTargets:
  """Builds the PQ-style targets and weights from a matching.

  Args:
    mask_logits: [B, P, S] logits of the output that was matched.
    class_logits: [B, S, C + 1] logits of the output that was matched.
    targets: The ground truth.
    matching: The matching of `mask_logits` / `class_logits`.
    exclude_unmatched: Only matters when an image has more valid gt masks than
      slots, so that some stay unmatched. DeepLab2 (False) then adds their
      classes to slot 0's class target (argmax of an all-zero permutation
      row) and gives their dice term a 1e-5 weight. True leaves them out.

  Returns:
    The MatchedTargets (all without gradient).
  """
  num_slots = mask_logits.shape[-1]
  slot = matching.slot_for_mask
  pairs = tf.one_hot(slot, num_slots)  # [B, G, S], zero rows when unmatched.
  matched_dice = tf.reduce_max(matching.mask_similarity * pairs, axis=1)
  matched_class_prob = tf.reduce_max(matching.class_similarity * pairs, axis=2)
  dice_weight = (tf.cast(targets.mask_valid, tf.float32) *
                 tf.maximum(matched_class_prob, _MIN_LOSS_WEIGHT))  # [B, G]

  if exclude_unmatched:
    target_slot = slot
    dice_weight *= tf.cast(slot >= 0, tf.float32)
  else:
    target_slot = tf.maximum(slot, 0)
  num_classes = class_logits.shape[-1] - 1
  mask_class_one_hot = tf.one_hot(targets.mask_class_index, num_classes)
  slot_classes = tf.einsum('bgs,bgc->bsc', tf.one_hot(target_slot, num_slots),
                           mask_class_one_hot)  # [B, S, C]
  positive = tf.cast(tf.reduce_max(slot_classes, axis=-1) == 1.0, tf.float32)
  negative = 1.0 - positive
  void_ratio = fraction_in_region(
      1.0 - targets.pixel_non_void, tf.nn.softmax(mask_logits, axis=-1))
  class_weight = (positive * tf.maximum(matched_dice, _MIN_LOSS_WEIGHT) +
                  negative * tf.maximum(void_ratio, _MIN_LOSS_WEIGHT))
  class_target = tf.concat([slot_classes, negative[..., tf.newaxis]], axis=-1)
  return MatchedTargets(
      slot_for_mask=slot,
      dice_weight=tf.stop_gradient(dice_weight),
      class_target=tf.stop_gradient(class_target),
      class_weight=tf.stop_gradient(class_weight))


def class_term(class_logits: tf.Tensor, matched: MatchedTargets,
               focal_loss_alpha: float) -> tf.Tensor:
  """Alpha-balanced class cross-entropy averaged over slots: [B].

  Slots with a thing/stuff target are weighted by alpha, void-target slots by
  1 - alpha (a focal loss with gamma 0).
  """
  loss = tf.nn.softmax_cross_entropy_with_logits(
      labels=matched.class_target, logits=class_logits)  # [B, S]
  is_void = matched.class_target[..., -1]
  alpha = (focal_loss_alpha * (1.0 - is_void) +
           (1.0 - focal_loss_alpha) * is_void)
  return reduction.average_nonzero_loss(alpha * loss * matched.class_weight)


def mask_probs_for_gt(mask_logits: tf.Tensor,
                      slot_for_mask: tf.Tensor) -> tf.Tensor:
  """Probability map of the slot matched to each gt mask: [B, P, G].

  Unmatched masks get an all-zero map.
  """
  probs = tf.nn.softmax(mask_logits, axis=-1)  # [B, P, S]
  picked = tf.gather(probs, tf.maximum(slot_for_mask, 0), axis=2,
                     batch_dims=1)  # [B, P, G]
  return tf.where(slot_for_mask[:, tf.newaxis, :] >= 0, picked, 0.0)


def mask_dice_term(mask_logits: tf.Tensor, targets: targets_lib.MaskTargets,
                   matched: MatchedTargets) -> tf.Tensor:
  """Weighted sum over gt masks of 1 - dice(matched slot, mask): [B].

  The smoothed dice (+1 on both sides) is measured on labelled pixels only
  (pixels inside some gt mask). Callers scale the result by alpha / S to
  balance it with the class term.
  """
  gt = targets.pixel_masks  # [B, P, G]
  labelled = tf.reduce_sum(gt, axis=-1, keepdims=True)  # [B, P, 1]
  pred = mask_probs_for_gt(mask_logits, matched.slot_for_mask) * labelled
  overlap = 2.0 * tf.reduce_sum(pred * gt, axis=1) + _DICE_SMOOTH  # [B, G]
  total = (tf.reduce_sum(pred, axis=1) + tf.reduce_sum(gt, axis=1) +
           _DICE_SMOOTH)
  dice_loss = 1.0 - tf.math.divide_no_nan(overlap, total)
  return tf.reduce_sum(dice_loss * matched.dice_weight, axis=-1)
