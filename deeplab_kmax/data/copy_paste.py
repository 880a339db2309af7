"""Panoptic copy-paste (kMaX-DeepLab, ECCV 2022, Sec. 4).

Extends instance copy-paste (InstaBoost, Simple Copy-Paste) to panoptic
labels: a random subset of the segments of a second, already augmented,
training crop is pasted over the current one. Which segments are candidates
is decided per category group by an option:

  'none'   never paste segments of the group,
  'random' paste them when drawn into the random subset,
  'all'    always paste them.

Groups: things (a thing class, crowd included), stuff (a stuff class) and void
(exactly the panoptic void id). Pixels padded when the second crop was made
carry a dedicated padding value and are never pasted. The kMaX configs use
thing 'all', stuff 'random', void 'none'.

Pasted instance ids are renumbered downward from divisor - 1, so they cannot
collide with the canvas' own ids (which count up from 1). This needs both
inputs to have fewer than divisor / 2 instances per class.
"""

from typing import Tuple

import tensorflow as tf

from deeplab_kmax.data import dataset_info as dataset_info_lib

OPTIONS = ('none', 'random', 'all')


def _member_of(values: tf.Tensor, candidates) -> tf.Tensor:
  """[N] bool: values[i] in candidates."""
  candidates = tf.constant(list(candidates), tf.int32)
  if candidates.shape[0] == 0:
    return tf.zeros_like(values, tf.bool)
  return tf.reduce_any(values[:, tf.newaxis] == candidates[tf.newaxis, :], -1)


def _apply_option(keep: tf.Tensor, in_group: tf.Tensor, option: str
                  ) -> tf.Tensor:
  if option == 'none':
    return keep & ~in_group
  if option == 'all':
    return keep | in_group
  if option == 'random':
    return keep
  raise ValueError(f'Copy-paste option must be one of {OPTIONS}, got '
                   f'{option!r}.')


def paste_mask(paste_label: tf.Tensor, info: dataset_info_lib.DatasetInfo,
               padding_value: int, thing_option: str, stuff_option: str,
               void_option: str) -> tf.Tensor:
  """[H, W, 1] bool: the pixels of the second crop that get pasted."""
  divisor = info.panoptic_label_divisor
  ids, segment_of_pixel = tf.unique(tf.reshape(paste_label, [-1]))
  num_ids = tf.shape(ids)[0]
  # A random subset: shuffle a mask with a uniformly drawn number of ones.
  num_kept = tf.random.uniform([], 0, num_ids + 1, tf.int32)
  keep = tf.random.shuffle(tf.range(num_ids) < num_kept)

  keep = _apply_option(keep, _member_of(ids // divisor,
                                        info.thing_class_ids), thing_option)
  keep = _apply_option(keep, _member_of(ids // divisor,
                                        info.stuff_class_ids), stuff_option)
  keep = _apply_option(keep, ids == info.panoptic_ignore_label, void_option)
  keep &= ids != padding_value  # Never paste the second crop's padding.
  return tf.reshape(tf.gather(keep, segment_of_pixel), tf.shape(paste_label))


def panoptic_copy_paste(image: tf.Tensor, label: tf.Tensor,
                        paste_image: tf.Tensor, paste_label: tf.Tensor,
                        info: dataset_info_lib.DatasetInfo,
                        padding_value: int, thing_option: str = 'all',
                        stuff_option: str = 'random',
                        void_option: str = 'none'
                        ) -> Tuple[tf.Tensor, tf.Tensor]:
  """Pastes segments of (paste_image, paste_label) onto (image, label).

  All inputs share the crop size; labels are [H, W, 1] int32 panoptic ids.
  """
  divisor = info.panoptic_label_divisor
  pasted = paste_mask(paste_label, info, padding_value, thing_option,
                      stuff_option, void_option)
  instance = paste_label % divisor
  check = tf.debugging.assert_less(
      tf.maximum(tf.reduce_max(label % divisor), tf.reduce_max(instance)),
      divisor // 2,
      message='Panoptic copy-paste needs fewer than label_divisor / 2 '
      'instances per class in each image.')
  with tf.control_dependencies([check]):
    renumbered = tf.where(instance == 0, instance, divisor - 1 - instance)
  paste_label = (paste_label // divisor) * divisor + renumbered
  image = tf.where(pasted, tf.cast(paste_image, image.dtype), image)
  label = tf.where(pasted, paste_label, label)
  return image, label
