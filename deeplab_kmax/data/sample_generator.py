"""Decoded example -> augmented image + the training targets of the losses.

From a panoptic label `semantic * divisor + instance` it derives (sample keys
as in DeepLab2):

  semantic_gt               [H, W] int32    semantic id per pixel
  panoptic_gt               [H, W] int32    the (augmented) panoptic label
  is_crowd_gt               [H, W] bool     thing class with instance 0
  semantic_loss_weight      [H, W] float32  1, or small_instance_weight on
                                            thing instances below the area
                                            threshold (when enabled)
  thing_id_mask_gt          [H, W] int32    0..K-1 per thing instance, in
                                            raster order of first appearance,
                                            -1 elsewhere (kMaX mask targets)
  thing_id_class_gt         [max_thing_id]  semantic id of each of the K
                                            float32         instances, -1 after
  center_loss_weight, regression_loss_weight, instance_center_gt,
  instance_regression_gt    Panoptic-DeepLab centre / offset targets; only
                            with center_targets=True (samples then match
                            DeepLab2's key for key). kMaX's losses do not read
                            them, and they take ~40% of the per-image CPU
                            time (demo data: 2.2 vs 1.3 ms an image).

Evaluation samples also carry resized_image, image_name, size_raw and the
labels at the original size (semantic_raw, panoptic_raw, is_crowd_raw).
Crowd pixels count as void for instances but keep their class in
semantic_gt, exactly as DeepLab2 does.
"""

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import tensorflow as tf

from deeplab_kmax import keys
from deeplab_kmax.config import dataset_pb2
from deeplab_kmax.data import copy_paste
from deeplab_kmax.data import dataset_info as dataset_info_lib
from deeplab_kmax.data import preprocessing


@dataclasses.dataclass(frozen=True)
class CopyPasteOptions:
  scale: float = 0.5
  thing_option: str = 'all'
  stuff_option: str = 'random'
  void_option: str = 'none'

  @classmethod
  def from_proto(cls, message) -> 'CopyPasteOptions':
    """From `augmentations.panoptic_copy_paste` (validated by the config)."""
    return cls(
        scale=message.panoptic_copy_paste_scale,
        thing_option=message.panoptic_copy_paste_thing_option,
        stuff_option=message.panoptic_copy_paste_stuff_option,
        void_option=message.panoptic_copy_paste_void_option)


def split_panoptic(label: tf.Tensor, info: dataset_info_lib.DatasetInfo):
  """-> (semantic, panoptic with crowd as void, thing mask, crowd mask)."""
  divisor = info.panoptic_label_divisor
  semantic = label // divisor
  # Class lookup table instead of comparing against every thing id.
  size = max(info.num_classes, info.ignore_label + 1)
  table = np.zeros(size, bool)
  table[list(info.thing_class_ids)] = True
  in_range = (semantic >= 0) & (semantic < size)
  is_thing = in_range & tf.gather(tf.constant(table),
                                  tf.clip_by_value(semantic, 0, size - 1))
  is_crowd = is_thing & (label % divisor == 0)
  panoptic = tf.where(is_crowd, info.panoptic_ignore_label, label)
  return semantic, panoptic, is_thing, is_crowd


def _gaussian_window(sigma: float) -> Tuple[np.ndarray, int, int]:
  """The centre blob: (flat values, window side, offset of its peak)."""
  side = int(6 * sigma + 3)
  peak = 3 * sigma + 1
  grid = np.arange(side, dtype=np.float64)
  blob = np.exp(-((grid[np.newaxis] - peak) ** 2 +
                  (grid[:, np.newaxis] - peak) ** 2) / (2 * sigma ** 2))
  return blob.reshape(-1).astype(np.float32), side, int(round(peak))


class InstanceTargets:
  """Per-instance targets from a panoptic label (crowd already void)."""

  def __init__(self, info: dataset_info_lib.DatasetInfo, sigma: float = 8.0,
               small_instance_threshold: int = 0,
               small_instance_weight: float = 1.0, max_thing_id: int = 128,
               center_targets: bool = True):
    self._info = info
    self._center_targets = center_targets
    self._sigma = sigma
    self._small_threshold = small_instance_threshold
    self._small_weight = small_instance_weight
    self._max_thing_id = max_thing_id
    self._blob, self._side, self._pad_before = _gaussian_window(sigma)
    self._pad_after = int(round(3 * sigma + 2))

  def _instances(self, panoptic: tf.Tensor):
    """Unique ids in raster order of first appearance, and which are things."""
    divisor = self._info.panoptic_label_divisor
    flat = tf.reshape(panoptic, [-1])
    ids, index_of_pixel, area = tf.unique_with_counts(flat)
    is_instance = ((ids // divisor != self._info.ignore_label) &
                   (ids % divisor != 0))
    return ids, index_of_pixel, area, is_instance

  def __call__(self, panoptic: tf.Tensor) -> Dict[str, tf.Tensor]:
    """panoptic: [H, W] int32 -> dict of [H, W] targets (+ thing classes)."""
    height, width = tf.shape(panoptic)[0], tf.shape(panoptic)[1]
    ids, index_of_pixel, area, is_instance = self._instances(panoptic)
    pixel_is_instance = tf.gather(is_instance, index_of_pixel)  # [HW]
    targets = self._thing_targets(ids, index_of_pixel, area, is_instance,
                                  pixel_is_instance, height, width)
    if self._center_targets:
      targets.update(self._center_and_offset(
          ids, index_of_pixel, area, is_instance, pixel_is_instance, height,
          width))
    return targets

  def _center_and_offset(self, ids, index_of_pixel, area, is_instance,
                         pixel_is_instance, height, width):
    """Panoptic-DeepLab's centre heatmap and centre offsets."""
    num_ids = tf.shape(ids)[0]
    # Centres: rounded mean coordinate of each instance, from per-row and
    # per-column pixel counts of every id (exact integer sums).
    index_map = tf.reshape(index_of_pixel, [height, width])
    per_row = tf.math.bincount(index_map, minlength=num_ids,
                               maxlength=num_ids, axis=-1)  # [H, N]
    per_col = tf.math.bincount(tf.transpose(index_map), minlength=num_ids,
                               maxlength=num_ids, axis=-1)  # [W, N]
    sum_y = tf.linalg.matvec(tf.cast(per_row, tf.float64),
                             tf.range(height, dtype=tf.float64),
                             transpose_a=True)  # [N]
    sum_x = tf.linalg.matvec(tf.cast(per_col, tf.float64),
                             tf.range(width, dtype=tf.float64),
                             transpose_a=True)  # [N]
    centers = tf.cast(tf.round(tf.stack([sum_y, sum_x], -1) /
                               tf.cast(area, tf.float64)[:, None]),
                      tf.int32)  # [N, 2] (y, x)
    ys, xs = tf.meshgrid(tf.range(height), tf.range(width), indexing='ij')
    pixel_center = tf.gather(centers, index_map)  # [H, W, 2]
    offsets = tf.where(
        tf.reshape(pixel_is_instance, [height, width, 1]),
        pixel_center - tf.stack([ys, xs], -1), 0)

    # Heatmap: max of truncated Gaussians drawn on a padded canvas.
    instance_centers = tf.boolean_mask(centers, is_instance)  # [K, 2]
    window = tf.stack(tf.meshgrid(tf.range(self._side), tf.range(self._side),
                                  indexing='ij'), -1)
    window = tf.reshape(window, [1, -1, 2])
    indices = tf.reshape(instance_centers[:, None, :] + window, [-1, 2])
    num_instances = tf.shape(instance_centers)[0]
    canvas = tf.zeros([height + self._pad_before + self._pad_after,
                       width + self._pad_before + self._pad_after])
    canvas = tf.tensor_scatter_nd_max(
        canvas, indices, tf.tile(tf.constant(self._blob), [num_instances]))
    heatmap = canvas[self._pad_before:self._pad_before + height,
                     self._pad_before:self._pad_before + width]
    return {keys.GT_INSTANCE_CENTER: heatmap,
            keys.GT_INSTANCE_REGRESSION: tf.cast(offsets, tf.float32)}

  def _thing_targets(self, ids, index_of_pixel, area, is_instance,
                     pixel_is_instance, height, width):
    """Thing-id masks and classes (kMaX's mask targets), loss weights."""
    # Thing ids for the mask losses: instance rank in first-appearance order.
    num_things = tf.reduce_sum(tf.cast(is_instance, tf.int32))
    check = tf.debugging.assert_less_equal(
        num_things, self._max_thing_id,
        message=f'More thing instances than max_thing_id={self._max_thing_id} '
        'in one crop; raise max_thing_id.')
    with tf.control_dependencies([check]):
      num_things = tf.identity(num_things)
      rank = tf.cumsum(tf.cast(is_instance, tf.int32)) - 1
    thing_id_of_id = tf.where(is_instance, rank, -1)
    thing_id_mask = tf.gather(thing_id_of_id, index_of_pixel)
    classes = tf.cast(tf.boolean_mask(ids, is_instance) //
                      self._info.panoptic_label_divisor, tf.float32)
    thing_id_class = tf.concat(
        [classes, -tf.ones([self._max_thing_id - num_things])], 0)
    thing_id_class.set_shape([self._max_thing_id])

    weight = tf.ones([height * width])
    if self._small_threshold > 0 and self._small_weight != 1.0:
      small = pixel_is_instance & (tf.gather(area, index_of_pixel) <
                                   self._small_threshold)
      weight = tf.where(small, tf.cast(self._small_weight, tf.float32), weight)

    shape2d = tf.stack([height, width])
    return {
        keys.SEMANTIC_LOSS_WEIGHT: tf.reshape(weight, shape2d),
        keys.GT_THING_ID_MASK: tf.reshape(thing_id_mask, shape2d),
        keys.GT_THING_ID_CLASS: thing_id_class,
    }


class PanopticSampleGenerator:
  """Preprocesses one decoded example (plus an optional copy-paste partner)."""

  def __init__(self, info: dataset_info_lib.DatasetInfo, is_training: bool,
               crop_size, min_resize_value=None, max_resize_value=None,
               resize_factor: Optional[int] = None,
               min_scale_factor: float = 1.0, max_scale_factor: float = 1.0,
               scale_factor_step_size: float = 0.0,
               autoaugment_policy_name: Optional[str] = None,
               only_semantic: bool = False,
               thing_id_mask_annotations: bool = False,
               max_thing_id: int = 128, sigma: float = 8.0,
               small_instance_threshold: int = 0,
               small_instance_weight: float = 1.0,
               copy_paste_options: Optional[CopyPasteOptions] = None,
               center_targets: bool = True):
    crop_size = tuple(int(c) for c in crop_size)
    if len(crop_size) != 2 or min(crop_size) <= 0:
      raise ValueError(f'crop_size must be [height, width], got {crop_size}.')
    self._info = info
    self._is_training = is_training
    self._only_semantic = only_semantic
    self._thing_id_masks = thing_id_mask_annotations
    self._center_targets = center_targets
    self._copy_paste = copy_paste_options if is_training else None
    if self._copy_paste and self._copy_paste.scale <= 0:
      self._copy_paste = None
    self._resize = dict(
        crop_size=crop_size, is_training=is_training,
        min_resize_value=min_resize_value, max_resize_value=max_resize_value,
        resize_factor=resize_factor or None,
        scale_factor_step_size=scale_factor_step_size,
        autoaugment_policy_name=autoaugment_policy_name or None)
    self._scales = (min_scale_factor, max_scale_factor)
    self._targets = InstanceTargets(
        info, sigma=sigma, small_instance_threshold=small_instance_threshold,
        small_instance_weight=small_instance_weight, max_thing_id=max_thing_id,
        center_targets=center_targets)
    # The partner crop pads with void + 1 so padding and real void differ.
    self._paste_padding = info.panoptic_ignore_label + 1

  @property
  def uses_copy_paste(self) -> bool:
    return self._copy_paste is not None

  def _preprocess(self, image, label, scale_multiplier=1.0, pad_value=None):
    return preprocessing.preprocess(
        image, label,
        label_pad_value=(self._info.panoptic_ignore_label
                         if pad_value is None else pad_value),
        min_scale_factor=self._scales[0] * scale_multiplier,
        max_scale_factor=self._scales[1] * scale_multiplier,
        **self._resize)

  def __call__(self, example: Mapping[str, Any],
               paste_example: Optional[Mapping[str, Any]] = None
               ) -> Dict[str, tf.Tensor]:
    label = example.get(keys.EXAMPLE_LABEL)
    if label is not None:
      label.shape.assert_is_compatible_with([None, None, 1])
      label = tf.cast(label, tf.int32)
    original_label = label
    resized_image, image, label = self._preprocess(example[keys.IMAGE], label)

    if self._copy_paste is not None:
      if paste_example is None:
        raise ValueError('Copy-paste is enabled: pass a second example.')
      _, paste_image, paste_label = self._preprocess(
          paste_example[keys.IMAGE],
          tf.cast(paste_example[keys.EXAMPLE_LABEL], tf.int32),
          scale_multiplier=self._copy_paste.scale,
          pad_value=self._paste_padding)
      image, label = copy_paste.panoptic_copy_paste(
          image, label, paste_image, paste_label, self._info,
          self._paste_padding, self._copy_paste.thing_option,
          self._copy_paste.stuff_option, self._copy_paste.void_option)

    sample = {keys.IMAGE: image}
    if label is not None:
      sample.update(self._label_targets(label[..., 0]))
    if not self._is_training:
      sample[keys.RESIZED_IMAGE] = resized_image
      sample[keys.IMAGE_NAME] = example[keys.IMAGE_NAME]
      sample[keys.GT_SIZE_RAW] = tf.stack([example[keys.EXAMPLE_HEIGHT],
                                           example[keys.EXAMPLE_WIDTH]])
      if original_label is not None:
        semantic, _, _, crowd = split_panoptic(original_label[..., 0],
                                               self._info)
        sample[keys.GT_SEMANTIC_RAW] = semantic
        if not self._only_semantic:
          sample[keys.GT_PANOPTIC_RAW] = original_label[..., 0]
          sample[keys.GT_IS_CROWD_RAW] = crowd
    return sample

  def _label_targets(self, label: tf.Tensor) -> Dict[str, tf.Tensor]:
    semantic, panoptic, is_thing, is_crowd = split_panoptic(label, self._info)
    targets = {
        keys.GT_SEMANTIC: semantic,
        keys.SEMANTIC_LOSS_WEIGHT: tf.ones_like(semantic, tf.float32),
        keys.GT_IS_CROWD: is_crowd,
    }
    if self._only_semantic:
      return targets
    instance = self._targets(panoptic)
    targets.update({
        keys.GT_PANOPTIC: label,
        keys.SEMANTIC_LOSS_WEIGHT: instance[keys.SEMANTIC_LOSS_WEIGHT],
    })
    if self._center_targets:
      targets.update({
          keys.CENTER_LOSS_WEIGHT: tf.cast(
              ~is_crowd & (semantic != self._info.ignore_label), tf.float32),
          keys.REGRESSION_LOSS_WEIGHT: tf.cast(~is_crowd & is_thing,
                                               tf.float32),
          keys.GT_INSTANCE_CENTER: instance[keys.GT_INSTANCE_CENTER],
          keys.GT_INSTANCE_REGRESSION: instance[keys.GT_INSTANCE_REGRESSION],
      })
    if self._thing_id_masks:
      targets[keys.GT_THING_ID_MASK] = instance[keys.GT_THING_ID_MASK]
      targets[keys.GT_THING_ID_CLASS] = instance[keys.GT_THING_ID_CLASS]
    return targets


def generator_from_options(options: dataset_pb2.DatasetOptions,
                           info: dataset_info_lib.DatasetInfo,
                           is_training: bool,
                           only_semantic_annotations: bool = False,
                           center_targets: bool = True
                           ) -> PanopticSampleGenerator:
  """Builds the generator from a DatasetOptions message (DeepLab2 fields)."""
  augment = (options.augmentations if options.HasField('augmentations') else
             None)
  copy_paste_options = None
  if augment is not None and augment.HasField('panoptic_copy_paste'):
    copy_paste_options = CopyPasteOptions.from_proto(
        augment.panoptic_copy_paste)
  small = options.increase_small_instance_weights
  return PanopticSampleGenerator(
      info, is_training=is_training, crop_size=list(options.crop_size),
      min_resize_value=list(options.min_resize_value),
      max_resize_value=list(options.max_resize_value),
      resize_factor=options.resize_factor or None,  # 0: unset.
      min_scale_factor=augment.min_scale_factor if augment else 1.0,
      max_scale_factor=augment.max_scale_factor if augment else 1.0,
      scale_factor_step_size=augment.scale_factor_step_size if augment else 0,
      autoaugment_policy_name=(augment.autoaugment_policy_name
                               if augment else None),
      only_semantic=only_semantic_annotations,
      thing_id_mask_annotations=options.thing_id_mask_annotations,
      max_thing_id=options.max_thing_id,
      sigma=options.sigma,
      small_instance_threshold=(options.small_instance_threshold
                                if small else 0),
      small_instance_weight=options.small_instance_weight if small else 1.0,
      copy_paste_options=copy_paste_options,
      center_targets=center_targets)
