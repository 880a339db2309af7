"""Ground-truth masks on the prediction grid, as the mask losses consume them.

A panoptic ground truth is turned into a fixed-size list of G = max_thing_id +
num_stuff_classes masks so that shapes stay static (TPU/XLA): first one row
per possible thing instance id, then one row per stuff class, in ascending
stuff id order. Rows that are absent from the (downsampled) image are void:
they carry class -1 and take no part in matching or in the losses.
"""

from typing import NamedTuple, Sequence

import numpy as np
import tensorflow as tf

from deeplab_kmax.data import label_space as label_space_lib
from deeplab_kmax.losses import sampling


class MaskTargets(NamedTuple):
  """Ground truth per pixel (P = h * w of the prediction) and per mask row."""
  pixel_masks: tf.Tensor  # [B, P, G] float 0/1, the mask each pixel is in.
  pixel_mask_id: tf.Tensor  # [B, P] int32 mask row of each pixel, -1 if none.
  pixel_non_void: tf.Tensor  # [B, P] float, semantic label != ignore label.
  pixel_is_thing: tf.Tensor  # [B, P] float, pixel has a thing instance id.
  pixel_inverse_area: tf.Tensor  # [B, P] float, P / area of the pixel's mask.
  mask_class: tf.Tensor  # [B, G] int32 dataset class id, -1 for void rows.
  mask_class_index: tf.Tensor  # [B, G] int32 index in thing+stuff order or -1.
  mask_valid: tf.Tensor  # [B, G] bool, the row is a real, visible mask.
  mask_area: tf.Tensor  # [B, G] float, pixels on the prediction grid.


def _lookup(table: np.ndarray, ids: tf.Tensor) -> tf.Tensor:
  """table[ids] with -1 for ids outside the table."""
  inside = (ids >= 0) & (ids < len(table))
  found = tf.gather(tf.constant(table, tf.int32),
                    tf.clip_by_value(ids, 0, len(table) - 1))
  return tf.where(inside, found, -1)


def build_mask_targets(semantic_gt: tf.Tensor,
                       thing_id_mask_gt: tf.Tensor,
                       thing_id_class_gt: tf.Tensor,
                       output_size: Sequence[int],
                       label_space: label_space_lib.LabelSpace
                       ) -> MaskTargets:
  """Reads the ground truth on the output grid and lays out the mask rows.

  Args:
    semantic_gt: [B, H, W] int semantic ids.
    thing_id_mask_gt: [B, H, W] int thing instance ids 0..max_thing_id - 1,
      -1 elsewhere.
    thing_id_class_gt: [B, max_thing_id] semantic id of each instance id, -1
      for unused ids (any numeric dtype).
    output_size: Static [h, w] of the predictions.
    label_space: The dataset's ids: stuff rows follow its stuff ids, class
      indices its class-head order, void pixels its ignore label.

  Returns:
    The MaskTargets.
  """
  out_h, out_w = output_size
  num_pixels = out_h * out_w
  max_thing_id = thing_id_class_gt.shape[-1]
  if max_thing_id is None:
    raise ValueError('thing_id_class_gt needs a static last dimension (the '
                     f'maximum thing id), got shape {thing_id_class_gt.shape}.')
  stuff_ids = label_space.stuff_class_ids
  class_index = label_space.class_index_table()
  # Stuff rows come right after the thing classes in class-head order.
  stuff_index = np.where(class_index >= label_space.num_thing_classes,
                         class_index - label_space.num_thing_classes, -1)

  batch = tf.shape(semantic_gt)[0]
  semantic = tf.reshape(
      sampling.strided_downsample(tf.cast(semantic_gt, tf.int32), output_size),
      [batch, num_pixels])
  thing_id = tf.reshape(
      sampling.strided_downsample(tf.cast(thing_id_mask_gt, tf.int32),
                                  output_size), [batch, num_pixels])
  pixel_masks = tf.concat([
      tf.one_hot(thing_id, max_thing_id),
      tf.one_hot(_lookup(stuff_index, semantic), len(stuff_ids)),
  ], axis=-1)  # [B, P, G]
  mask_area = tf.reduce_sum(pixel_masks, axis=1)  # [B, G]
  in_some_mask = tf.reduce_any(pixel_masks > 0, axis=-1)
  pixel_mask_id = tf.where(
      in_some_mask, tf.argmax(pixel_masks, axis=-1, output_type=tf.int32), -1)
  pixel_area = tf.einsum('bpg,bg->bp', pixel_masks, mask_area)

  stuff_classes = tf.tile(tf.constant([list(stuff_ids)], tf.int32), [batch, 1])
  mask_class = tf.concat(
      [tf.cast(thing_id_class_gt, tf.int32), stuff_classes], axis=-1)
  mask_class = tf.where(mask_area > 0.5, mask_class, -1)  # Unseen rows: void.
  return MaskTargets(
      pixel_masks=pixel_masks,
      pixel_mask_id=pixel_mask_id,
      pixel_non_void=tf.cast(semantic != label_space.ignore_label,
                             tf.float32),
      pixel_is_thing=tf.cast(thing_id != -1, tf.float32),
      pixel_inverse_area=num_pixels / tf.maximum(pixel_area, 1.0),
      mask_class=mask_class,
      mask_class_index=_lookup(class_index, mask_class),
      mask_valid=mask_class > -1,
      mask_area=mask_area)
