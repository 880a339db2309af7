"""Corner-aligned resizing, the one convention of this code base.

DeepLab2 resizes everything (input images, labels, features, mask logits,
predictions) with TF's legacy kernels, corners aligned and no half-pixel
centres: crops are `stride * k + 1` pixels, so the first and last sample of
each map sit exactly on the first and last pixel at every stride. Every
resize in this package goes through this module.

  bilinear                        one joint pass (images, logits, features)
  bilinear_two_pass_if_narrow     DeepLab2's rounding of feature resizes
  nearest                         labels and id maps
  bilinear_lookup                 one channel per pixel of a bilinear resize
"""

from typing import Sequence, Union

import tensorflow as tf

Size = Union[Sequence[int], tf.Tensor]

# DeepLab2 resizes features of at most this many channels one axis at a time
# (a TPU memory-layout choice); the float rounding differs slightly from a
# joint pass, and parity with its checkpoints' outputs depends on it.
_TWO_PASS_MAX_CHANNELS = 32


def _has_static_size(images: tf.Tensor, size: Size) -> bool:
  """Whether `size` is a Python size equal to the images' static [H, W]."""
  return (isinstance(size, (list, tuple)) and
          all(isinstance(side, int) for side in size) and
          tuple(images.shape[1:3]) == tuple(size))


def _bilinear_float32(images: tf.Tensor, size: Size) -> tf.Tensor:
  return tf.raw_ops.ResizeBilinear(
      images=images, size=tf.convert_to_tensor(size, tf.int32),
      align_corners=True, half_pixel_centers=False)


def _like_input(resized: tf.Tensor, images: tf.Tensor) -> tf.Tensor:
  """A floating input keeps its dtype; any other gives float32."""
  return tf.cast(resized, images.dtype) if images.dtype.is_floating else (
      resized)


def bilinear(images: tf.Tensor, size: Size) -> tf.Tensor:
  """[B, H, W, C] -> [B, h, w, C] bilinear, corners aligned, in one pass.

  Computed in float32 (see `_like_input` for the output dtype).
  """
  images = tf.convert_to_tensor(images)
  if _has_static_size(images, size):
    return images
  return _like_input(_bilinear_float32(images, size), images)


def bilinear_two_pass_if_narrow(images: tf.Tensor, size: Size) -> tf.Tensor:
  """`bilinear` with DeepLab2's float rounding for narrow feature maps.

  Inputs of at most 32 channels are interpolated along the height, then the
  width (resizing an axis to its own length is exact with aligned corners);
  wider ones in one joint pass. The pixel decoder's skip connections and the
  deep-supervision outputs resize this way, which parity with DeepLab2's
  activations needs; everything else uses `bilinear`.
  """
  images = tf.convert_to_tensor(images)
  if _has_static_size(images, size) or (
      images.shape[-1] > _TWO_PASS_MAX_CHANNELS):
    return bilinear(images, size)
  size = tf.convert_to_tensor(size, tf.int32)
  width = tf.shape(images)[2]
  height_done = _bilinear_float32(images, tf.stack([size[0], width]))
  return _like_input(_bilinear_float32(height_done, size), images)


def nearest(images: tf.Tensor, size: Size) -> tf.Tensor:
  """[B, H, W, C] -> [B, h, w, C] nearest neighbour, corners aligned.

  The dtype is kept, so ids stay ids. Source positions round half up.
  """
  images = tf.convert_to_tensor(images)
  if _has_static_size(images, size):
    return images
  return tf.raw_ops.ResizeNearestNeighbor(
      images=images, size=tf.convert_to_tensor(size, tf.int32),
      align_corners=True, half_pixel_centers=False)


def bilinear_lookup(table: tf.Tensor, channel: tf.Tensor) -> tf.Tensor:
  """`bilinear(table, [H, W])[b, y, x, channel[b, y, x]]`, never built.

  Each output pixel blends the four source cells of one channel, so the
  memory cost is that of a few [B, H, W] maps instead of [B, H, W, K].

  Args:
    table: [B, h, w, K] float32.
    channel: [B, H, W] int32 in [0, K): the channel read at each pixel.

  Returns:
    [B, H, W] float32.
  """
  shape = tf.shape(table)
  batch, height, width, depth = shape[0], shape[1], shape[2], shape[3]
  out_shape = tf.shape(channel)

  def axis(in_size, out_size):
    scale = (tf.cast(in_size - 1, tf.float32) /
             tf.cast(tf.maximum(out_size - 1, 1), tf.float32))
    position = tf.cast(tf.range(out_size), tf.float32) * scale
    low = tf.cast(tf.floor(position), tf.int32)
    high = tf.minimum(low + 1, in_size - 1)
    return low, high, position - tf.cast(low, tf.float32)

  top, bottom, y_weight = axis(height, out_shape[1])
  left, right, x_weight = axis(width, out_shape[2])
  flat = tf.reshape(table, [batch, -1])  # [B, h * w * K]

  def read(rows, cols):  # [H], [W] -> [B, H, W]
    cell = rows[:, tf.newaxis] * width + cols[tf.newaxis, :]  # [H, W]
    return tf.gather(flat, cell[tf.newaxis] * depth + channel, batch_dims=1)

  x_weight = x_weight[tf.newaxis, tf.newaxis, :]
  y_weight = y_weight[tf.newaxis, :, tf.newaxis]
  upper = read(top, left) + (read(top, right) - read(top, left)) * x_weight
  lower = read(bottom, left) + (
      read(bottom, right) - read(bottom, left)) * x_weight
  return upper + (lower - upper) * y_weight
