"""Geometric preprocessing of an image and its panoptic label.

Training:  resize to range -> random scale -> autoaugment -> pad to at least
           the crop (random placement) -> random crop -> random left-right flip
Evaluation: resize to range (the longer side fits the crop) -> pad bottom/right
           to the crop. Deterministic.

Images are float32 in [0, 255] and are padded with the mean pixel 127.5;
labels are int32 panoptic ids padded with a caller-given value (void). Every
geometric op is applied to image and label together, with bilinear
interpolation for the image and nearest neighbour for the label (corners
aligned, as DeepLab2 does), so the two stay aligned.
"""

from typing import Collection, Dict, Mapping, Optional, Sequence, Tuple, Union

import tensorflow as tf

from deeplab_kmax.data import autoaugment
from deeplab_kmax.ops import resize

MEAN_PIXEL = 127.5
FLIP_PROBABILITY = 0.5

Size = Tuple[int, int]
ImageAndLabel = Tuple[tf.Tensor, Optional[tf.Tensor]]


def resize_spec(value: Union[None, int, Sequence[int]]) -> Optional[Size]:
  """Normalises a (repeated) resize field to (height, width) or None.

  Empty, None or any non-positive entry means "no constraint"; one value is
  used for both sides.
  """
  if value is None:
    return None
  if isinstance(value, int):
    value = (value,)
  value = tuple(int(v) for v in value)
  if not value:
    return None
  if len(value) == 1:
    value = (value[0], value[0])
  if len(value) != 2:
    raise ValueError(f'A resize value has one or two entries, got {value}.')
  if value[0] <= 0 or value[1] <= 0:
    return None
  return value


# A resized side never drops below one pixel: a very elongated image (say
# 10 x 2000 into a 129 crop) would otherwise get a zero-sized short side.
MIN_RESIZED_SIDE = 1


def _floor_scaled(size: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
  scaled = tf.cast(tf.floor(tf.cast(size, tf.float32) * scale), tf.int32)
  return tf.maximum(scaled, MIN_RESIZED_SIDE)


def range_resize_shape(height: tf.Tensor, width: tf.Tensor,
                       min_size: Optional[Size], max_size: Optional[Size],
                       factor: int = 0) -> tf.Tensor:
  """Output [height, width] for `resize_to_range`.

  Scales up or down, keeping the aspect ratio, until both sides reach
  `min_size`; then scales down (never up) until both fit in `max_size`
  (a side that would round down to 0 stays at `MIN_RESIZED_SIDE`). With
  `factor`, the sides become `k * factor + 1` (max_size is lowered to such a
  value first so the result still fits). Scale ratios are formed in float64
  and applied in float32, matching DeepLab2's sizes exactly.
  """
  height = tf.cast(height, tf.int32)
  width = tf.cast(width, tf.int32)
  if min_size is not None:
    ratio = tf.maximum(min_size[0] / tf.cast(height, tf.float64),
                       min_size[1] / tf.cast(width, tf.float64))
    ratio = tf.cast(ratio, tf.float32)
    height, width = _floor_scaled(height, ratio), _floor_scaled(width, ratio)
  if max_size is not None:
    if factor:
      max_size = (max_size[0] - (max_size[0] - 1) % factor,
                  max_size[1] - (max_size[1] - 1) % factor)
    ratio = tf.minimum(max_size[0] / tf.cast(height, tf.float64),
                       max_size[1] / tf.cast(width, tf.float64))
    ratio = tf.minimum(tf.cast(ratio, tf.float32), 1.0)
    height, width = _floor_scaled(height, ratio), _floor_scaled(width, ratio)
  shape = tf.stack([height, width])
  if factor:
    shape += (factor - (shape - 1) % factor) % factor
  return shape


def resize_image_and_label(image: tf.Tensor, label: Optional[tf.Tensor],
                           size: tf.Tensor) -> ImageAndLabel:
  """Bilinear image / nearest label resize with aligned corners."""
  image = resize.bilinear(image[tf.newaxis], size)[0]
  if label is not None:
    label = resize.nearest(label[tf.newaxis], size)[0]
  return image, label


def resize_to_range(image, label, min_size, max_size, factor=0):
  shape = tf.shape(image)
  size = range_resize_shape(shape[0], shape[1], min_size, max_size, factor)
  return resize_image_and_label(image, label, size)


def random_scale(min_scale: float, max_scale: float,
                 step: float) -> Union[float, tf.Tensor]:
  """A scale drawn uniformly from [min, max], or from the grid min + k*step."""
  if min_scale < 0 or min_scale > max_scale:
    raise ValueError(f'Need 0 <= min_scale_factor <= max_scale_factor, got '
                     f'{min_scale} and {max_scale}.')
  if min_scale == max_scale:
    return float(min_scale)
  if step == 0:
    return tf.random.uniform([], min_scale, max_scale)
  num_steps = int((max_scale - min_scale) / step + 1)
  grid = tf.linspace(float(min_scale), float(max_scale), num_steps)
  return tf.gather(grid, tf.random.uniform([], 0, num_steps, tf.int32))


def scale_image_and_label(image, label, scale):
  """Resizes both by `scale` (sizes truncated toward zero)."""
  if isinstance(scale, float) and scale == 1.0:
    return image, label
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  size = tf.cast(hw * scale, tf.int32)
  return resize_image_and_label(image, label, size)


def pad_image_and_label(image: tf.Tensor, label: Optional[tf.Tensor],
                        offset_height, offset_width, target_height,
                        target_width, label_pad_value: int):
  """Places the pair at (offset_h, offset_w) on a target-sized canvas.

  The image is padded in mean-subtracted space, so the fill is the mean pixel.
  """
  shape = tf.shape(image)
  bottom = target_height - offset_height - shape[0]
  right = target_width - offset_width - shape[1]
  checks = [
      tf.debugging.assert_non_negative(
          bottom, message='Image is taller than the target size after '
          'resizing; raise crop_size or lower max_resize_value.'),
      tf.debugging.assert_non_negative(
          right, message='Image is wider than the target size after '
          'resizing; raise crop_size or lower max_resize_value.'),
  ]
  with tf.control_dependencies(checks):
    paddings = [[offset_height, bottom], [offset_width, right], [0, 0]]
  image = tf.pad(image - MEAN_PIXEL, paddings) + MEAN_PIXEL
  if label is not None:
    label = tf.pad(label, paddings, constant_values=label_pad_value)
  return image, label


def random_crop(tensors: Sequence[tf.Tensor], crop_height: int,
                crop_width: int):
  """The same random crop_height x crop_width window of every tensor."""
  shape = tf.shape(tensors[0])
  check = tf.debugging.assert_greater_equal(
      shape[:2], tf.constant([crop_height, crop_width]),
      message='Cannot crop: the image is smaller than the crop size.')
  with tf.control_dependencies([check]):
    top = tf.random.uniform([], 0, shape[0] - crop_height + 1, tf.int32)
    left = tf.random.uniform([], 0, shape[1] - crop_width + 1, tf.int32)
  cropped = []
  for tensor in tensors:
    window = tensor[top:top + crop_height, left:left + crop_width]
    window.set_shape([crop_height, crop_width, tensor.shape[-1]])
    cropped.append(window)
  return cropped


def random_flip_left_right(tensors: Sequence[tf.Tensor],
                           probability: float = FLIP_PROBABILITY):
  """Flips every tensor along width, all or none."""
  flip = tf.random.uniform([]) <= probability
  return [tf.cond(flip, lambda t=t: tf.reverse(t, [1]), lambda t=t: t)
          for t in tensors]


def preprocess(image: tf.Tensor, label: Optional[tf.Tensor], *,
               crop_size: Size, is_training: bool,
               label_pad_value: int,
               min_resize_value: Optional[Size] = None,
               max_resize_value: Optional[Size] = None,
               resize_factor: Optional[int] = None,
               min_scale_factor: float = 1.0, max_scale_factor: float = 1.0,
               scale_factor_step_size: float = 0.0,
               autoaugment_policy_name: Optional[str] = None):
  """Returns (resized image before padding, processed image, label).

  Args:
    image: [H, W, 3] image (any numeric dtype).
    label: [H, W, 1] panoptic label, or None (evaluation without labels).
    crop_size: Output (height, width).
    is_training: Random augmentation and crop when True; deterministic
      resize-and-pad otherwise.
    label_pad_value: Label value of padded pixels.
    min_resize_value, max_resize_value, resize_factor: Range resize, see
      `range_resize_shape`. In evaluation, max defaults to the crop size.
    min_scale_factor, max_scale_factor, scale_factor_step_size: Random scale.
    autoaugment_policy_name: Optional colour policy (training only).
  """
  if is_training and label is None:
    raise ValueError('Training needs a label.')
  crop_height, crop_width = crop_size
  image.shape.assert_is_compatible_with([None, None, 3])
  image = tf.cast(image, tf.float32)
  if label is not None:
    label.shape.assert_is_compatible_with([None, None, 1])
    label = tf.cast(label, tf.int32)
  min_resize_value = resize_spec(min_resize_value)
  max_resize_value = resize_spec(max_resize_value)
  if max_resize_value is None and not is_training:
    max_resize_value = (crop_height, crop_width)
  if max_resize_value is not None and (max_resize_value[0] > crop_height or
                                       max_resize_value[1] > crop_width):
    raise ValueError(f'max_resize_value {max_resize_value} exceeds the crop '
                     f'size {crop_size}.')

  resized_image = image
  if min_resize_value or max_resize_value:
    image, label = resize_to_range(image, label, min_resize_value,
                                   max_resize_value, resize_factor)
    resized_image = image

  if not is_training:
    image, label = pad_image_and_label(image, label, 0, 0, crop_height,
                                       crop_width, label_pad_value)
    image.set_shape(list(crop_size) + [3])
    if label is not None:
      label.set_shape(list(crop_size) + [1])
    return resized_image, image, label

  scale = random_scale(min_scale_factor, max_scale_factor,
                       scale_factor_step_size)
  image, label = scale_image_and_label(image, label, scale)
  if autoaugment_policy_name:
    # Colour ops work on uint8 (truncating, as DeepLab2 does).
    image = tf.cast(autoaugment.distort_image(
        tf.cast(image, tf.uint8), autoaugment_policy_name), tf.float32)

  # Pad to at least the crop, placing the image at a random offset.
  shape = tf.shape(image)
  margin_height = crop_height - shape[0]
  margin_width = crop_width - shape[1]
  offset_height = tf.random.uniform([], 0, tf.maximum(margin_height, 1),
                                    tf.int32)
  offset_width = tf.random.uniform([], 0, tf.maximum(margin_width, 1),
                                   tf.int32)
  image, label = pad_image_and_label(
      image, label, offset_height, offset_width,
      shape[0] + tf.maximum(margin_height, 0),
      shape[1] + tf.maximum(margin_width, 0), label_pad_value)
  image, label = random_crop([image, label], crop_height, crop_width)
  image, label = random_flip_left_right([image, label])
  return resized_image, image, label


def undo_eval_preprocessing(maps: Mapping[str, tf.Tensor],
                            resized_size: tf.Tensor,
                            output_size: tf.Tensor,
                            bilinear_keys: Collection[str] = ()
                            ) -> Dict[str, tf.Tensor]:
  """Brings predictions on an evaluation crop back to the raw image.

  The inverse of the evaluation branch of `preprocess`, as DeepLab2's
  evaluator applies it: the bottom/right padding is cropped off, then the
  image part is resized to the raw size, corners aligned.

  Args:
    maps: [B, crop_h, crop_w] maps keyed by name.
    resized_size: [2] size of the image part (top-left) of the crop.
    output_size: [2] raw image size.
    bilinear_keys: maps resized bilinearly (smooth probabilities); all others
      take nearest neighbour, so ids stay ids.

  Returns:
    [B, H, W] maps, each of its input's dtype.
  """
  restored = {}
  for key, value in maps.items():
    part = value[:, :resized_size[0], :resized_size[1], tf.newaxis]
    if key in bilinear_keys:
      part = resize.bilinear(part, output_size)
    else:
      part = resize.nearest(part, output_size)
    restored[key] = tf.cast(part[..., 0], value.dtype)
  return restored
