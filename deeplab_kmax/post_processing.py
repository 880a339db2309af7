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

PANOPTIC_PRED = 'panoptic_pred'
INSTANCE_PRED = 'instance_pred'
INSTANCE_SCORES = 'instance_scores'
SEMANTIC_PRED = 'semantic_pred'
SEMANTIC_SCORES = 'semantic_scores'
# The mask-wise semantic map before area filtering; DeepLab2 computes and then
# discards it. Exposed by `maskwise_panoptic_inference` for inspection.
MASKWISE_SEMANTIC_PRED = 'maskwise_semantic_pred'

OutputSize = Union[Sequence[int], tf.Tensor]


@dataclasses.dataclass(frozen=True)
class PanopticLabelSpace:
  """How class-head indices map to dataset labels.

  The class head lists thing classes first, then stuff classes, then void.
  With COCO (void 0, things 1..80) index i is semantic id i + 1; with
  Cityscapes (void 255, things 11..18) indices 0..7 are the things and 8..18
  are the stuff ids 0..10.
  """
  thing_class_ids: Tuple[int, ...]
  stuff_class_ids: Tuple[int, ...]
  ignore_label: int
  label_divisor: int

  @classmethod
  def derive(cls, num_classes: int, thing_class_ids: Sequence[int],
             ignore_label: int, label_divisor: int,
             stuff_class_ids: Optional[Sequence[int]] = None
            ) -> 'PanopticLabelSpace':
    """Builds the space for a head with `num_classes` non-void outputs.

    Without explicit stuff ids, stuff is every id in 0..num_classes (skipping
    the ignore label when it lies in that range) that is not a thing, sorted.
    """
    things = tuple(int(c) for c in thing_class_ids)
    if stuff_class_ids is None:
      if ignore_label >= num_classes:
        candidates = range(num_classes)
      else:
        candidates = (c for c in range(num_classes + 1) if c != ignore_label)
      stuff = tuple(sorted(set(candidates) - set(things)))
    else:
      stuff = tuple(int(c) for c in stuff_class_ids)
    space = cls(things, stuff, int(ignore_label), int(label_divisor))
    if space.num_classes != num_classes:
      raise ValueError(
          f'The class head has {num_classes} non-void classes, but '
          f'{len(things)} thing ids + {len(stuff)} stuff ids were given '
          f'(ignore_label={ignore_label}); expected them to add up.')
    return space

  def __post_init__(self):
    ids = self.semantic_ids
    if len(set(ids)) != len(ids):
      raise ValueError(f'Thing and stuff ids must be distinct, got {ids}.')
    if self.ignore_label in ids:
      raise ValueError(
          f'ignore_label {self.ignore_label} is also a thing or stuff id.')
    if self.label_divisor <= 0:
      raise ValueError(f'label_divisor must be positive, got '
                       f'{self.label_divisor}.')

  @property
  def semantic_ids(self) -> Tuple[int, ...]:
    """Dataset semantic id of each class-head index."""
    return self.thing_class_ids + self.stuff_class_ids

  @property
  def num_classes(self) -> int:
    return len(self.thing_class_ids) + len(self.stuff_class_ids)

  @property
  def num_thing_classes(self) -> int:
    return len(self.thing_class_ids)


@dataclasses.dataclass(frozen=True)
class MaskWiseOptions:
  """The knobs of mask-wise merging (DeepLab2's evaluator_options)."""
  pixel_confidence_threshold: float = 0.4
  thing_confidence_threshold: float = 0.7
  stuff_confidence_threshold: float = 0.5
  overlapping_threshold: float = 0.8
  reorder_class_weight: float = 1.0
  reorder_mask_weight: float = 1.0
  thing_area_limit: int = 0
  stuff_area_limit: int = 0


def upsample_mask_logits(mask_logits: tf.Tensor,
                         output_size: OutputSize) -> tf.Tensor:
  """Bilinear resize with aligned corners.

  Crops are (stride * k + 1) pixels wide, so corner alignment puts the first
  and last logit exactly on the first and last output pixel.
  """
  size = tf.convert_to_tensor(output_size, dtype=tf.int32)
  return tf.raw_ops.ResizeBilinear(images=mask_logits, size=size,
                                   align_corners=True,
                                   half_pixel_centers=False)


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


def _area_of_own_segment(segment_ids: tf.Tensor,
                         num_segments: int) -> tf.Tensor:
  """Per pixel, the pixel count of its segment within its own image.

  segment_ids: [B, P] int32 in [0, num_segments).
  """
  batch = tf.shape(segment_ids)[0]
  global_ids = segment_ids + num_segments * tf.range(batch)[:, tf.newaxis]
  counts = tf.math.unsorted_segment_sum(
      tf.ones_like(global_ids), global_ids, batch * num_segments)
  return tf.gather(counts, global_ids)  # [B, P]


def _num_slots(binary_masks: tf.Tensor):
  """Slot count, static when known (keeps segment counts XLA-friendly)."""
  static = binary_masks.shape[-1]
  return static if static is not None else tf.shape(binary_masks)[-1]


def _passes_area_limit(segment_ids: tf.Tensor, num_segments: int,
                       area_limit: int) -> tf.Tensor:
  if area_limit <= 0:
    return tf.ones_like(segment_ids, dtype=tf.bool)
  return _area_of_own_segment(segment_ids, num_segments) >= area_limit


def maskwise_panoptic_inference(
    mask_logits: tf.Tensor,
    class_logits: tf.Tensor,
    output_size: OutputSize,
    label_space: PanopticLabelSpace,
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
    maskwise_semantic_pred (int32), instance_scores, semantic_scores
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
  if class_logits.shape[-1] not in (None, label_space.num_classes + 1):
    raise ValueError(
        f'Expected {label_space.num_classes} + 1 (void) class logits, got '
        f'{class_logits.shape[-1]}.')

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

  upsampled = upsample_mask_logits(mask_logits, output_size)  # [B, H, W, N]
  shape = tf.shape(upsampled)
  batch, height, width = shape[0], shape[1], shape[2]
  upsampled = tf.reshape(upsampled, [batch, height * width, -1])  # [B, P, N]
  probs = tf.nn.softmax(upsampled, axis=-1)
  binary_masks = tf.gather(probs > options.pixel_confidence_threshold,
                           rank_to_slot, axis=-1, batch_dims=1)  # [B, P, N]
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
      tf.where(is_thing, canvas, 0), _num_slots(binary_masks) + 1,
      options.thing_area_limit))
  stuff_kept = tf.logical_and(is_stuff, _passes_area_limit(
      tf.where(is_stuff, owner_class + 1, 0), label_space.num_classes + 1,
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
  instance_scores = tf.where(detected, tf.reduce_max(probs, axis=-1), 0.0)

  # Threshold-free semantic prediction: pixel -> best slot -> its class.
  best_slot = tf.argmax(upsampled, axis=-1, output_type=tf.int32)  # [B, P]
  semantic = tf.gather(semantic_ids,
                       tf.gather(classes, best_slot, batch_dims=1))

  def to_image(x):
    return tf.reshape(x, [batch, height, width])

  return {
      PANOPTIC_PRED: to_image(panoptic),
      # Unassigned pixels get instance id 1 (rank 0), DeepLab2's convention.
      INSTANCE_PRED: to_image(tf.maximum(canvas, 1)),
      INSTANCE_SCORES: to_image(instance_scores),
      SEMANTIC_PRED: to_image(semantic),
      SEMANTIC_SCORES: to_image(semantic_scores),
      MASKWISE_SEMANTIC_PRED: to_image(maskwise_semantic),
  }


def _option(options: Any, name: str, default: Any) -> Any:
  """Reads a field from a mapping or an attribute-style (e.g. proto) object."""
  if options is None:
    return default
  if isinstance(options, Mapping):
    return options.get(name, default)
  return getattr(options, name, default)


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
               thing_class_ids: Sequence[int],
               ignore_label: int,
               label_divisor: int,
               stuff_class_ids: Optional[Sequence[int]] = None,
               pixel_confidence_threshold: float = 0.4,
               thing_confidence_threshold: float = 0.7,
               stuff_confidence_threshold: float = 0.5,
               overlapping_threshold: float = 0.8,
               reorder_class_weight: float = 1.0,
               reorder_mask_weight: float = 1.0,
               thing_area_limit: int = 0,
               stuff_area_limit: int = 0,
               output_size: Optional[Sequence[int]] = None,
               name: str = 'post_processor',
               **kwargs):
    """Initialises the post-processor.

    Args:
      thing_class_ids: dataset ids of the thing classes, in class-head order.
      ignore_label: the void id written to unassigned / filtered pixels.
      label_divisor: panoptic = semantic * label_divisor + instance.
      stuff_class_ids: dataset ids of the stuff classes in class-head order;
        derived from the head width as DeepLab2 does when omitted.
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
      output_size: default (H, W) when `call` gets none.
      name: layer name.
      **kwargs: other Keras layer arguments.
    """
    super().__init__(name=name, **kwargs)  # Keras layer arguments.
    self._thing_class_ids = [int(c) for c in thing_class_ids]
    self._stuff_class_ids = (None if stuff_class_ids is None else
                             [int(c) for c in stuff_class_ids])
    self._ignore_label = int(ignore_label)
    self._label_divisor = int(label_divisor)
    self._options = MaskWiseOptions(
        pixel_confidence_threshold=float(pixel_confidence_threshold),
        thing_confidence_threshold=float(thing_confidence_threshold),
        stuff_confidence_threshold=float(stuff_confidence_threshold),
        overlapping_threshold=float(overlapping_threshold),
        reorder_class_weight=float(reorder_class_weight),
        reorder_mask_weight=float(reorder_mask_weight),
        thing_area_limit=int(thing_area_limit),
        stuff_area_limit=int(stuff_area_limit))
    if output_size is not None and len(output_size) != 2:
      raise ValueError(f'output_size must be (height, width), got '
                       f'{output_size}.')
    self._output_size = (None if output_size is None else
                         [int(s) for s in output_size])
    if self._stuff_class_ids is not None:
      # Validates the ids early when the label space is fully specified.
      self._label_space_for(len(self._thing_class_ids) +
                            len(self._stuff_class_ids))

  @classmethod
  def from_options(cls,
                   evaluator_options: Any,
                   thing_class_ids: Sequence[int],
                   ignore_label: int,
                   label_divisor: int,
                   stuff_class_ids: Optional[Sequence[int]] = None,
                   output_size: Optional[Sequence[int]] = None,
                   **kwargs) -> 'MaskWisePostProcessor':
    """Builds the layer from DeepLab2-named evaluator options.

    `evaluator_options` may be a proto, an attribute object or a dict with
    DeepLab2's field names (pixel_confidence_threshold, thing_area_limit,
    stuff_area_limit, transformer_post_processing and a nested
    maskwise_postprocessing with transformer_class_confidence_threshold_thing,
    ..._stuff, overlapping_threshold, reorder_class_weight,
    reorder_mask_weight). Missing fields take this layer's defaults.
    """
    mode = _option(evaluator_options, 'transformer_post_processing',
                   'maskwise')
    if mode != 'maskwise':
      raise ValueError('Only transformer_post_processing "maskwise" is '
                       f'implemented, got {mode!r}.')
    maskwise = _option(evaluator_options, 'maskwise_postprocessing', None)
    defaults = MaskWiseOptions()
    return cls(
        thing_class_ids=thing_class_ids,
        ignore_label=ignore_label,
        label_divisor=label_divisor,
        stuff_class_ids=stuff_class_ids,
        pixel_confidence_threshold=_option(
            evaluator_options, 'pixel_confidence_threshold',
            defaults.pixel_confidence_threshold),
        thing_confidence_threshold=_option(
            maskwise, 'transformer_class_confidence_threshold_thing',
            defaults.thing_confidence_threshold),
        stuff_confidence_threshold=_option(
            maskwise, 'transformer_class_confidence_threshold_stuff',
            defaults.stuff_confidence_threshold),
        overlapping_threshold=_option(maskwise, 'overlapping_threshold',
                                      defaults.overlapping_threshold),
        reorder_class_weight=_option(maskwise, 'reorder_class_weight',
                                     defaults.reorder_class_weight),
        reorder_mask_weight=_option(maskwise, 'reorder_mask_weight',
                                    defaults.reorder_mask_weight),
        thing_area_limit=_option(evaluator_options, 'thing_area_limit',
                                 defaults.thing_area_limit),
        stuff_area_limit=_option(evaluator_options, 'stuff_area_limit',
                                 defaults.stuff_area_limit),
        output_size=output_size,
        **kwargs)

  @property
  def options(self) -> MaskWiseOptions:
    return self._options

  def _label_space_for(self, num_classes: int) -> PanopticLabelSpace:
    return PanopticLabelSpace.derive(num_classes, self._thing_class_ids,
                                     self._ignore_label, self._label_divisor,
                                     self._stuff_class_ids)

  def call(self,
           pixel_space_mask_logits: tf.Tensor,  # [B, h, w, N]
           transformer_class_logits: tf.Tensor,  # [B, N, C + 1]
           output_size: Optional[OutputSize] = None) -> Dict[str, tf.Tensor]:
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
    label_space = self._label_space_for(num_class_logits - 1)
    outputs = maskwise_panoptic_inference(
        pixel_space_mask_logits, transformer_class_logits, output_size,
        label_space, self._options)
    del outputs[MASKWISE_SEMANTIC_PRED]
    return outputs

  def get_config(self) -> Dict[str, Any]:
    config = super().get_config()
    config.update(
        thing_class_ids=list(self._thing_class_ids),
        ignore_label=self._ignore_label,
        label_divisor=self._label_divisor,
        stuff_class_ids=self._stuff_class_ids,
        output_size=self._output_size,
        **dataclasses.asdict(self._options))
    return config
