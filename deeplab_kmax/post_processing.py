"""Mask-wise panoptic inference for mask transformers (MaX-DeepLab, kMaX).

A mask transformer predicts N (mask, class) pairs that may overlap. Turning
them into a panoptic map, where every pixel has at most one segment, is a small
greedy algorithm (Cheng et al. 2021, Li et al. 2022, Yu et al. 2022):

1. Each slot gets a class, the argmax of its softmax over the non-void classes
   (void takes part in the softmax but can never win), and a confidence, the
   probability of that class.
2. Slots are ranked by confidence^a * mask_quality^b, where mask_quality is the
   mean probability over the pixels the slot confidently claims (at logit
   resolution).
3. The mask logits are upsampled to the output size (bilinear, corner aligned)
   and every slot is binarised with `pixel_confidence_threshold`.
4. In rank order, each slot whose class is confident enough (separate
   thresholds for thing and stuff) is pasted on the still-free part of a canvas,
   unless the free part is no more than `overlapping_threshold` of its mask.
5. Thing instances and stuff classes with fewer output pixels than the area
   limits become void.

A thing's instance id is 1 + its slot's rank, so ids are unique per image
(not per class) and do not depend on slot indices. The semantic prediction
comes from a separate, threshold-free double argmax (pixel -> slot -> class),
because mIoU is better served by a label at every pixel than by void.

This reproduces DeepLab2's `PostProcessor` in mask-wise mode bit for bit on
CPU, including its conventions for unassigned pixels (instance id 1) and its
"no confident slot" case (all void, zero scores, semantic id 0 in the
mask-wise semantic map).
"""

import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import tensorflow as tf
import tf_keras

from deeplab_kmax import keys
from deeplab_kmax.config import evaluator_pb2
from deeplab_kmax.data import label_space as label_space_lib
from deeplab_kmax.ops import resize

OutputSize = Union[Sequence[int], tf.Tensor]


def _options_of(evaluator_options: evaluator_pb2.EvaluatorOptions
                ) -> Dict[str, Any]:
  """The merge's knobs read from DeepLab2's `evaluator_options` fields."""
  maskwise = evaluator_options.maskwise_postprocessing
  return dict(
      pixel_confidence_threshold=evaluator_options.pixel_confidence_threshold,
      thing_confidence_threshold=(
          maskwise.transformer_class_confidence_threshold_thing),
      stuff_confidence_threshold=(
          maskwise.transformer_class_confidence_threshold_stuff),
      overlapping_threshold=maskwise.overlapping_threshold,
      reorder_class_weight=maskwise.reorder_class_weight,
      reorder_mask_weight=maskwise.reorder_mask_weight,
      thing_area_limit=evaluator_options.thing_area_limit,
      stuff_area_limit=evaluator_options.stuff_area_limit)


# The proto is the one home of the defaults (they equal DeepLab2's).
_PROTO_DEFAULTS = _options_of(evaluator_pb2.EvaluatorOptions())


@dataclasses.dataclass(frozen=True)
class MaskWiseOptions:
  """The knobs of mask-wise merging (DeepLab2's evaluator_options); the
  defaults are the proto's.

  Attributes:
    pixel_confidence_threshold: mask probability above which a slot claims
      a pixel.
    thing_confidence_threshold: minimum class confidence of a thing slot.
    stuff_confidence_threshold: minimum class confidence of a stuff slot.
    overlapping_threshold: a mask is dropped unless more than this fraction
      of it is unclaimed by higher-ranked masks.
    reorder_class_weight: exponent of class confidence in the ranking.
    reorder_mask_weight: exponent of mask quality in the ranking.
    thing_area_limit: minimum instance area in output pixels (0 = off).
    stuff_area_limit: minimum stuff-class area in output pixels (0 = off).
  """
  pixel_confidence_threshold: float = (
      _PROTO_DEFAULTS['pixel_confidence_threshold'])
  thing_confidence_threshold: float = (
      _PROTO_DEFAULTS['thing_confidence_threshold'])
  stuff_confidence_threshold: float = (
      _PROTO_DEFAULTS['stuff_confidence_threshold'])
  overlapping_threshold: float = _PROTO_DEFAULTS['overlapping_threshold']
  reorder_class_weight: float = _PROTO_DEFAULTS['reorder_class_weight']
  reorder_mask_weight: float = _PROTO_DEFAULTS['reorder_mask_weight']
  thing_area_limit: int = _PROTO_DEFAULTS['thing_area_limit']
  stuff_area_limit: int = _PROTO_DEFAULTS['stuff_area_limit']


def slot_class_predictions(
    transformer_class_logits: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
  """Class index and confidence per slot; void competes but never wins."""
  probs = tf.nn.softmax(transformer_class_logits, axis=-1)[..., :-1]
  classes = tf.argmax(probs, axis=-1, output_type=tf.int32)  # [B, N]
  confidence = tf.reduce_max(probs, axis=-1)  # [B, N]
  return classes, confidence


def mask_quality(pixel_space_mask_logits: tf.Tensor,
                 pixel_confidence_threshold: float) -> tf.Tensor:
  """Mean probability of each slot over the pixels it confidently claims.

  Zero for a slot that claims no pixel. Computed at logit resolution.
  """
  probs = tf.nn.softmax(pixel_space_mask_logits, axis=-1)  # [B, h, w, N]
  claimed = tf.cast(probs > pixel_confidence_threshold, tf.float32)
  shape = tf.shape(probs)
  flat = [shape[0], shape[1] * shape[2], shape[3]]
  probs = tf.reshape(probs, flat)  # [B, hw, N]
  claimed = tf.reshape(claimed, flat)
  return tf.math.divide_no_nan(tf.reduce_sum(probs * claimed, axis=1),
                               tf.reduce_sum(claimed, axis=1))  # [B, N]


def masks_in_rank_order(masks: tf.Tensor,
                        rank_to_slot: tf.Tensor) -> tf.Tensor:
  """[B, P, N] slot masks -> the same masks with slots in rank order.

  A plain gather over flattened (image, slot) rows: tf2onnx mistranslates a
  batched gather along the last axis of a rank-3 tensor.
  """
  shape = tf.shape(masks)
  batch, num_slots = shape[0], shape[2]
  rows = tf.reshape(tf.transpose(masks, [0, 2, 1]),
                    [batch * num_slots, -1])  # [B * N, P]
  offsets = num_slots * tf.range(batch)[:, tf.newaxis]  # [B, 1]
  ranked = tf.gather(rows, rank_to_slot + offsets)  # [B, N, P]
  return tf.transpose(ranked, [0, 2, 1])


def paste_masks_in_order(binary_masks: tf.Tensor, pasteable: tf.Tensor,
                         overlapping_threshold: float) -> tf.Tensor:
  """Greedy copy-paste of ranked masks onto an empty canvas.

  Args:
    binary_masks: [B, P, N] bool, slot masks already in rank order.
    pasteable: [B, N] bool, whether the slot of each rank may be pasted.
    overlapping_threshold: a mask is pasted only if more than this fraction of
      it is still free.

  Returns:
    [B, P] int32 canvas: 0 where free, otherwise 1 + rank of the owner.
  """
  masks_by_rank = tf.transpose(binary_masks, [2, 0, 1])  # [N, B, P]
  pasteable_by_rank = tf.transpose(pasteable)  # [N, B]
  num_ranks = tf.shape(masks_by_rank)[0]
  canvas = tf.zeros(tf.shape(masks_by_rank)[1:], tf.int32)  # [B, P]

  def paste_one(rank, canvas):
    mask = masks_by_rank[rank]  # [B, P]
    free_part = tf.logical_and(mask, tf.equal(canvas, 0))
    mask_area = tf.reduce_sum(tf.cast(mask, tf.float32), axis=-1)  # [B]
    free_area = tf.reduce_sum(tf.cast(free_part, tf.float32), axis=-1)
    accept = tf.logical_and(pasteable_by_rank[rank],
                            free_area > mask_area * overlapping_threshold)
    canvas = tf.where(tf.logical_and(free_part, accept[:, tf.newaxis]),
                      rank + 1, canvas)
    return rank + 1, canvas

  _, canvas = tf.while_loop(lambda rank, _: rank < num_ranks, paste_one,
                            (tf.constant(0), canvas))
  return canvas


# At or above this pixel threshold no pixel is claimed by more than two slots
# (three softmax probabilities above 1/3 would sum past 1; 0.34 leaves room
# for the softmax's rounding), so the paste can work on per-slot pixel counts
# instead of [B, P, N] masks.
TWO_CLAIMS_MIN_THRESHOLD = 0.34


def uses_two_claim_paste(pixel_confidence_threshold: float,
                         num_slots: Optional[int]) -> bool:
  """Whether `maskwise_panoptic_inference` takes the count-based paste."""
  return (pixel_confidence_threshold >= TWO_CLAIMS_MIN_THRESHOLD and
          num_slots is not None and num_slots >= 2)


def _flat_gather(params: tf.Tensor, indices: tf.Tensor) -> tf.Tensor:
  """`tf.gather(params, indices, batch_dims=1)` for [B, K] params, as one
  plain gather on flattened rows (the form ONNX converters translate)."""
  shape = tf.shape(params)
  offsets = shape[1] * tf.range(shape[0])  # [B]
  offsets = tf.reshape(offsets, [-1] + [1] * (indices.shape.rank - 1))
  return tf.gather(tf.reshape(params, [-1]), indices + offsets)


def top_two_slots(probs: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
  """The two most probable slots of each pixel and their probabilities.

  Two argmax passes instead of `tf.math.top_k(probs, k=2)`, whose per-row sort
  took 1.3-1.7x as long on CPU at full resolution. Which of two equal
  probabilities comes first may differ from top_k, which changes nothing
  downstream: the paste orders claimants by rank, and at a threshold of
  TWO_CLAIMS_MIN_THRESHOLD or more a tie for second place is never a claim
  (it would be at most 1/3).

  Args:
    probs: [B, P, N] softmax probabilities (non-negative).

  Returns:
    ([B, P, 2] float32 probabilities, [B, P, 2] int32 slots), best first.
  """
  first = tf.argmax(probs, axis=-1, output_type=tf.int32)  # [B, P]
  second, second_prob = _runner_up(probs, first)
  top_probs = tf.stack([tf.reduce_max(probs, axis=-1), second_prob], axis=-1)
  return top_probs, tf.stack([first, second], axis=-1)


def _runner_up(probs: tf.Tensor, first: tf.Tensor
               ) -> Tuple[tf.Tensor, tf.Tensor]:
  """[..., N] probabilities and the index of their maximum [...] -> slot
  and probability of the best other slot."""
  is_first = tf.equal(tf.range(_num_slots(probs)),
                      first[..., tf.newaxis])  # [..., N]
  others = tf.where(is_first, tf.constant(-1.0, probs.dtype), probs)
  # Maxima rather than a gather at the slot: no faster or slower here, and
  # no flattened index that could pass 2**31 for big batches.
  return (tf.argmax(others, axis=-1, output_type=tf.int32),
          tf.reduce_max(others, axis=-1))


# Slack for the softmax's rounding when bounding a second claimant's
# probability by 1 - p1 (a float32 softmax over 128 slots sums to 1 within
# ~1e-5).
_SUM_SLACK = 1e-3


def claiming_slots(probs: tf.Tensor, pixel_confidence_threshold: float
                   ) -> Tuple[tf.Tensor, tf.Tensor]:
  """`top_two_slots` where a second slot can claim, the best slot elsewhere.

  A second slot claims a pixel only if its probability p2 passes the
  threshold t; p2 <= p1 and p2 <= 1 - p1, so only pixels with
  t < p1 < 1 - t can have two claimants: in a trained model a thin band
  along mask borders. The second pass runs on those pixels only, gathered,
  instead of a masked copy of the whole [B, P, N] tensor and two more
  reductions over it (at 1281x1281 with 128 slots, 840 MB each). Under XLA,
  which needs static shapes, the dense `top_two_slots` runs instead.

  Args:
    probs: [B, P, N] softmax probabilities.
    pixel_confidence_threshold: t, at least TWO_CLAIMS_MIN_THRESHOLD.

  Returns:
    ([B, P, 2] float32 probabilities, [B, P, 2] int32 slots), best first.
    Where no second claim is possible the second entry is (0.0, slot 0): the
    claims (probability > t) are those of `top_two_slots`.
  """
  if _in_xla_context():
    return top_two_slots(probs)
  first = tf.argmax(probs, axis=-1, output_type=tf.int32)  # [B, P]
  first_prob = tf.reduce_max(probs, axis=-1)  # [B, P]
  shared = tf.logical_and(
      first_prob > pixel_confidence_threshold,
      first_prob < 1.0 - pixel_confidence_threshold + _SUM_SLACK)
  where = tf.where(shared)  # [K, 2] (image, pixel)
  second, second_prob = _runner_up(tf.gather_nd(probs, where),  # [K, N]
                                   tf.gather_nd(first, where))  # [K]
  shape = tf.shape(first, out_type=tf.int64)
  second = tf.scatter_nd(where, second, shape)  # [B, P]
  second_prob = tf.scatter_nd(where, second_prob, shape)
  return (tf.stack([first_prob, second_prob], axis=-1),
          tf.stack([first, second], axis=-1))


def _in_xla_context() -> bool:
  """Whether ops are being traced for XLA (jit_compile, TPU replicas)."""
  try:
    from tensorflow.python.ops import control_flow_util  # pylint: disable=g-import-not-at-top
  except ImportError:  # moved in a later TensorFlow: take the static path
    return True
  return control_flow_util.GraphOrParentsInXlaContext(
      tf.compat.v1.get_default_graph())


def paste_two_claim_masks(claim_slots: tf.Tensor, claimed: tf.Tensor,
                          rank_to_slot: tf.Tensor, pasteable: tf.Tensor,
                          overlapping_threshold: float) -> tf.Tensor:
  """`paste_masks_in_order` for masks of which at most two claim a pixel.

  Same canvas, computed from counts: a mask's free area when its turn comes
  is its area minus its overlaps with the masks already pasted (a pixel has
  at most one other claimant, so overlaps never double count). The greedy
  loop then runs over [B, N] counts, not over [B, P] masks; counts are
  integers below 2**24, so the float comparisons are the dense loop's.

  Args:
    claim_slots: [B, P, 2] int32, the two most probable slots of each pixel.
    claimed: [B, P, 2] bool, whether each of them claims the pixel (only the
      two most probable slots can).
    rank_to_slot: [B, N] int32, slot of each rank.
    pasteable: [B, N] bool, whether the slot of each rank may be pasted.
    overlapping_threshold: a mask is pasted only if more than this fraction of
      it is still free.

  Returns:
    [B, P] int32 canvas: 0 where free, otherwise 1 + rank of the owner.
  """
  shape = tf.shape(rank_to_slot)
  batch = shape[0]
  num_slots = rank_to_slot.shape[1]
  slot_to_rank = tf.argsort(rank_to_slot, axis=-1, stable=True)  # [B, N]
  # Rank of each claimant; N stands for "no claim" (sorts last).
  ranks = tf.where(claimed, _flat_gather(slot_to_rank, claim_slots),
                   num_slots)  # [B, P, 2]
  first = tf.reduce_min(ranks, axis=-1)  # [B, P]
  second = tf.reduce_max(ranks, axis=-1)
  image = tf.range(batch)[:, tf.newaxis, tf.newaxis]  # [B, 1, 1]

  def counts(ids, num_segments):  # rank-1 ids: what ONNX converters take
    flat = tf.reshape(ids, [-1])
    return tf.math.unsorted_segment_sum(tf.ones_like(flat), flat,
                                        num_segments)

  # Mask areas [B, N] (segment N of each image collects the non-claims).
  areas = tf.reshape(
      counts(ranks + (num_slots + 1) * image, batch * (num_slots + 1)),
      [batch, num_slots + 1])[:, :num_slots]
  # Pixels claimed by both ranks (earlier, later): [B, N, N]; the last
  # segment collects the pixels with fewer than two claims.
  pair_ids = tf.where(second < num_slots,
                      first * num_slots + second + num_slots**2 * image[..., 0],
                      batch * num_slots**2)
  overlaps = tf.reshape(
      counts(pair_ids, batch * num_slots**2 + 1)[:-1],
      [batch, num_slots, num_slots])
  areas = tf.cast(areas, tf.float32)
  # [N (later rank), B, N (earlier rank)]
  overlaps_by_rank = tf.transpose(tf.cast(overlaps, tf.float32), [2, 0, 1])
  pasteable_by_rank = tf.transpose(pasteable)  # [N, B]
  areas_by_rank = tf.transpose(areas)  # [N, B]

  def paste_one(rank, pasted):  # pasted: [B, N] 0/1 per rank
    mask_area = areas_by_rank[rank]  # [B]
    taken = tf.reduce_sum(pasted * overlaps_by_rank[rank], axis=-1)  # [B]
    free_area = mask_area - taken
    accept = tf.logical_and(pasteable_by_rank[rank],
                            free_area > mask_area * overlapping_threshold)
    pasted += tf.one_hot(rank, num_slots)[tf.newaxis] * tf.cast(
        accept, tf.float32)[:, tf.newaxis]
    return rank + 1, pasted

  _, pasted = tf.while_loop(
      lambda rank, _: rank < num_slots, paste_one,
      (tf.constant(0), tf.zeros([batch, num_slots], tf.float32)))
  # Rank N (no claim) is never pasted.
  pasted = tf.pad(pasted > 0.5, [[0, 0], [0, 1]])  # [B, N + 1]
  first_pasted = _flat_gather(pasted, first)  # [B, P]
  second_pasted = _flat_gather(pasted, second)
  return tf.where(first_pasted, first + 1,
                  tf.where(second_pasted, second + 1, 0))


def _area_of_own_segment(segment_ids: tf.Tensor,
                         num_segments: int) -> tf.Tensor:
  """Per pixel, the pixel count of its segment within its own image.

  segment_ids: [B, P] int32 in [0, num_segments).
  """
  batch = tf.shape(segment_ids)[0]
  global_ids = segment_ids + num_segments * tf.range(batch)[:, tf.newaxis]
  # Flattened to 1-D ids: ONNX converters only take rank-1 segment ids.
  flat_ids = tf.reshape(global_ids, [-1])  # [B * P]
  counts = tf.math.unsorted_segment_sum(
      tf.ones_like(flat_ids), flat_ids, batch * num_segments)
  return tf.reshape(tf.gather(counts, flat_ids), tf.shape(segment_ids))


def _num_slots(masks: tf.Tensor):
  """Slot count, static when known (keeps segment counts XLA-friendly)."""
  static = masks.shape[-1]
  return static if static is not None else tf.shape(masks)[-1]


def _passes_area_limit(segment_ids: tf.Tensor, num_segments: int,
                       area_limit: int) -> tf.Tensor:
  if area_limit <= 0:
    return tf.ones_like(segment_ids, dtype=tf.bool)
  return _area_of_own_segment(segment_ids, num_segments) >= area_limit


def maskwise_panoptic_inference(
    mask_logits: tf.Tensor,
    class_logits: tf.Tensor,
    output_size: OutputSize,
    label_space: label_space_lib.LabelSpace,
    options: MaskWiseOptions = MaskWiseOptions(),
) -> Dict[str, tf.Tensor]:
  """Runs mask-wise merging and the threshold-free semantic argmax.

  Args:
    mask_logits: [B, h, w, N] pixel-space mask logits at feature resolution.
    class_logits: [B, N, C + 1] transformer class logits; the last is void.
    output_size: (H, W) of the outputs, usually the padded input crop.
    label_space: maps class-head indices to dataset ids.
    options: thresholds, reordering weights and area limits.

  Returns:
    Dict of [B, H, W] tensors: panoptic_pred, instance_pred, semantic_pred,
    maskwise_semantic_pred, semantic_class_index (the class-head index whose
    id semantic_pred holds) (int32), instance_scores, semantic_scores
    (float32).
  """
  mask_logits = tf.cast(mask_logits, tf.float32)
  class_logits = tf.cast(class_logits, tf.float32)
  if mask_logits.shape.rank != 4 or class_logits.shape.rank != 3:
    raise ValueError(
        'Expected pixel_space_mask_logits [B, h, w, N] and '
        'transformer_class_logits [B, N, C + 1], got shapes '
        f'{mask_logits.shape} and {class_logits.shape}.')
  num_slots = mask_logits.shape[-1]
  if num_slots is not None and class_logits.shape[1] not in (None, num_slots):
    raise ValueError(f'The mask logits have {num_slots} slots but the class '
                     f'logits have {class_logits.shape[1]}.')
  if class_logits.shape[-1] not in (None, label_space.class_head_outputs):
    raise ValueError(
        f'transformer_class_logits has {class_logits.shape[-1]} classes; the '
        f'label space has {label_space.num_thing_stuff_classes} non-void '
        f'classes, so {label_space.class_head_outputs} were expected (void '
        'last).')

  classes, confidence = slot_class_predictions(class_logits)  # [B, N]
  quality = mask_quality(mask_logits, options.pixel_confidence_threshold)
  reorder_score = (
      tf.pow(confidence, options.reorder_class_weight) *
      tf.pow(quality, options.reorder_mask_weight))
  rank_to_slot = tf.argsort(reorder_score, axis=-1, direction='DESCENDING',
                            stable=True)  # [B, N]
  ranked_classes = tf.gather(classes, rank_to_slot, batch_dims=1)
  ranked_confidence = tf.gather(confidence, rank_to_slot, batch_dims=1)
  ranked_is_thing = ranked_classes < label_space.num_thing_classes
  pasteable = tf.where(
      ranked_is_thing,
      ranked_confidence >= options.thing_confidence_threshold,
      ranked_confidence >= options.stuff_confidence_threshold)  # [B, N]
  # A detection is any slot above either threshold, whatever its class kind.
  has_detection = tf.reduce_any(
      confidence >= min(options.thing_confidence_threshold,
                        options.stuff_confidence_threshold), axis=-1)  # [B]

  upsampled = resize.bilinear(mask_logits, output_size)  # [B, H, W, N]
  shape = tf.shape(upsampled)
  batch, height, width = shape[0], shape[1], shape[2]
  upsampled = tf.reshape(upsampled, [batch, height * width, -1])  # [B, P, N]
  probs = tf.nn.softmax(upsampled, axis=-1)
  if uses_two_claim_paste(options.pixel_confidence_threshold, num_slots):
    top_probs, claim_slots = claiming_slots(
        probs, options.pixel_confidence_threshold)  # [B, P, 2]
    pixel_confidence = top_probs[..., 0]  # = max over the slots
    # The softmax keeps the logits' order, so this is their argmax too (up
    # to logits so close that their probabilities round to the same float).
    best_slot = claim_slots[..., 0]  # [B, P]
    canvas = paste_two_claim_masks(
        claim_slots, top_probs > options.pixel_confidence_threshold,
        rank_to_slot, pasteable, options.overlapping_threshold)  # [B, P]
  else:
    pixel_confidence = tf.reduce_max(probs, axis=-1)  # [B, P]
    best_slot = tf.argmax(upsampled, axis=-1, output_type=tf.int32)
    binary_masks = masks_in_rank_order(
        probs > options.pixel_confidence_threshold, rank_to_slot)  # [B, P, N]
    canvas = paste_masks_in_order(binary_masks, pasteable,
                                  options.overlapping_threshold)  # [B, P]

  semantic_ids = tf.constant(label_space.semantic_ids, tf.int32)
  assigned = canvas > 0
  # Free pixels point at rank 0, as in DeepLab2; they are masked out below.
  owner_rank = tf.maximum(canvas - 1, 0)
  owner_class = tf.gather(ranked_classes, owner_rank, batch_dims=1)  # [B, P]
  owner_is_thing = owner_class < label_space.num_thing_classes
  is_thing = tf.logical_and(assigned, owner_is_thing)
  is_stuff = tf.logical_and(assigned, tf.logical_not(owner_is_thing))

  # Things are counted per instance, stuff per class (slots of one stuff class
  # merge into a single segment).
  thing_kept = tf.logical_and(is_thing, _passes_area_limit(
      tf.where(is_thing, canvas, 0), _num_slots(mask_logits) + 1,
      options.thing_area_limit))
  stuff_kept = tf.logical_and(is_stuff, _passes_area_limit(
      tf.where(is_stuff, owner_class + 1, 0),
      label_space.num_thing_stuff_classes + 1,
      options.stuff_area_limit))

  owner_semantic = tf.gather(semantic_ids, owner_class)  # [B, P]
  divisor = label_space.label_divisor
  panoptic = tf.where(
      thing_kept, owner_semantic * divisor + canvas,
      tf.where(stuff_kept, owner_semantic * divisor,
               label_space.ignore_label * divisor))
  semantic_scores = tf.where(
      assigned, tf.gather(ranked_confidence, owner_rank, batch_dims=1), 0.0)

  detected = has_detection[:, tf.newaxis]
  maskwise_semantic = tf.where(detected, owner_semantic, 0)
  instance_scores = tf.where(detected, pixel_confidence, 0.0)

  # Threshold-free semantic prediction: pixel -> best slot -> its class.
  semantic_class = tf.gather(classes, best_slot, batch_dims=1)  # [B, P]
  semantic = tf.gather(semantic_ids, semantic_class)

  def to_image(x):
    return tf.reshape(x, [batch, height, width])

  return {
      keys.PANOPTIC_PRED: to_image(panoptic),
      # Unassigned pixels get instance id 1 (rank 0), DeepLab2's convention.
      keys.INSTANCE_PRED: to_image(tf.maximum(canvas, 1)),
      keys.INSTANCE_SCORES: to_image(instance_scores),
      keys.SEMANTIC_PRED: to_image(semantic),
      keys.SEMANTIC_SCORES: to_image(semantic_scores),
      keys.MASKWISE_SEMANTIC_PRED: to_image(maskwise_semantic),
      keys.SEMANTIC_CLASS_INDEX: to_image(semantic_class),
  }


class MaskWisePostProcessor(tf_keras.layers.Layer):
  """Turns mask-transformer outputs into panoptic, instance and semantic maps.

  Call with `pixel_space_mask_logits` [B, h, w, N],
  `transformer_class_logits` [B, N, C + 1] and the output size (H, W) (or set
  `output_size` at construction). Returns a dict of [B, H, W] maps:
  panoptic_pred = semantic * label_divisor + instance (void where nothing
  survives), instance_pred, instance_scores, semantic_pred (threshold-free),
  semantic_scores. Batch, spatial size and slot count may be dynamic.
  """

  def __init__(self,
               label_space: Union[label_space_lib.LabelSpace,
                                  Mapping[str, Any]],
               output_size: Optional[Sequence[int]] = None,
               name: str = 'post_processor',
               **kwargs):
    """Initialises the post-processor.

    Args:
      label_space: the dataset's `LabelSpace` (or its fields, as
        `get_config` writes them): class-head order, void id, divisor.
      output_size: default (H, W) when `call` gets none.
      name: layer name.
      **kwargs: any `MaskWiseOptions` field by name (unset ones take its
        defaults, the proto's), then other Keras layer arguments.
    """
    options = {field.name: field.type(kwargs.pop(field.name))
               for field in dataclasses.fields(MaskWiseOptions)
               if field.name in kwargs}
    # The merge runs in float32 under any mixed-precision policy.
    kwargs.setdefault('dtype', 'float32')
    super().__init__(name=name, **kwargs)  # Keras layer arguments.
    if isinstance(label_space, Mapping):
      label_space = label_space_lib.LabelSpace(**label_space)
    self._label_space = label_space
    self._options = MaskWiseOptions(**options)
    if output_size is not None and len(output_size) != 2:
      raise ValueError(f'output_size must be (height, width), got '
                       f'{output_size}.')
    self._output_size = (None if output_size is None else
                         [int(s) for s in output_size])

  @classmethod
  def from_options(cls,
                   evaluator_options: evaluator_pb2.EvaluatorOptions,
                   label_space: label_space_lib.LabelSpace,
                   output_size: Optional[Sequence[int]] = None,
                   **kwargs) -> 'MaskWisePostProcessor':
    """Builds the layer from the config's `evaluator_options` (DeepLab2's
    fields; unset ones take the proto's defaults)."""
    mode = evaluator_options.transformer_post_processing
    if mode != 'maskwise':
      raise ValueError('Only transformer_post_processing "maskwise" is '
                       f'implemented, got {mode!r}.')
    return cls(label_space=label_space, output_size=output_size,
               **_options_of(evaluator_options), **kwargs)

  @property
  def options(self) -> MaskWiseOptions:
    return self._options

  @property
  def label_space(self) -> label_space_lib.LabelSpace:
    return self._label_space

  def call(self,
           pixel_space_mask_logits: tf.Tensor,  # [B, h, w, N]
           transformer_class_logits: tf.Tensor,  # [B, N, C + 1]
           output_size: Optional[OutputSize] = None,
           with_class_index: bool = False) -> Dict[str, tf.Tensor]:
    """The maps; `with_class_index` adds semantic_class_index (serving)."""
    if output_size is None:
      output_size = self._output_size
    if output_size is None:
      raise ValueError('MaskWisePostProcessor needs an output size: pass '
                       'output_size=(height, width) to the constructor or to '
                       'the call.')
    num_class_logits = transformer_class_logits.shape[-1]
    if num_class_logits is None:
      raise ValueError('transformer_class_logits needs a static last '
                       'dimension (number of classes + 1).')
    outputs = maskwise_panoptic_inference(
        pixel_space_mask_logits, transformer_class_logits, output_size,
        self._label_space, self._options)
    del outputs[keys.MASKWISE_SEMANTIC_PRED]
    if not with_class_index:
      del outputs[keys.SEMANTIC_CLASS_INDEX]
    return outputs

  def get_config(self) -> Dict[str, Any]:
    config = super().get_config()
    config.update(
        label_space=dataclasses.asdict(self._label_space),
        output_size=self._output_size,
        **dataclasses.asdict(self._options))
    return config
