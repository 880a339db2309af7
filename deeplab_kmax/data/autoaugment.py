"""AutoAugment colour policies (Cubuk et al., CVPR 2019 / RandAugment 2020).

kMaX-DeepLab trains with DeepLab2's `simple_classification_policy`: five
sub-policies of two colour operations each, over a reduced operation space.
One sub-policy is drawn per image and each of its operations fires with its
own probability. Only colours change, so labels are untouched.

Images are uint8 [H, W, 3]. The operations follow PIL's definitions (the
TensorFlow AutoAugment ports), including one quirk kept for parity with
DeepLab2-trained recipes: `Contrast` blends towards the histogram's bin mean
(pixel count / 256, clipped), not the mean intensity.
"""

from typing import Callable, Dict, List, Sequence, Tuple

import tensorflow as tf

# Operation space, indexed by the policy encoding below.
_OPERATIONS = ('AutoContrast', 'Equalize', 'Invert', 'Posterize', 'Solarize',
               'Color', 'Contrast', 'Brightness', 'Sharpness')
_PROBABILITIES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
_MAX_LEVEL = 10.0

# Each sub-policy: (operation index, probability index, magnitude) x 2.
_SIMPLE_CLASSIFICATION = (
    ((8, 2, 7), (7, 1, 10)),
    ((1, 0, 9), (6, 1, 10)),
    ((8, 1, 9), (5, 1, 9)),
    ((4, 1, 7), (1, 3, 9)),
    ((8, 1, 1), (1, 1, 7)),
)

Step = Tuple[str, float, float]  # (operation, probability, magnitude)


def _decode_policy(encoded, magnitude_scale: float = 1.0) -> List[List[Step]]:
  return [[(_OPERATIONS[op], _PROBABILITIES[prob], level * magnitude_scale)
           for op, prob, level in sub_policy] for sub_policy in encoded]


POLICIES: Dict[str, List[List[Step]]] = {
    'simple_classification_policy': _decode_policy(_SIMPLE_CLASSIFICATION),
    'simple_classification_policy_magnitude_scale_0.2': _decode_policy(
        _SIMPLE_CLASSIFICATION, magnitude_scale=0.2),
}


def blend(image1: tf.Tensor, image2: tf.Tensor, factor: float) -> tf.Tensor:
  """image1 + factor * (image2 - image1); extrapolation is clipped to uint8."""
  if factor == 0.0:
    return tf.cast(image1, tf.uint8)
  if factor == 1.0:
    return tf.cast(image2, tf.uint8)
  low = tf.cast(image1, tf.float32)
  mixed = low + factor * (tf.cast(image2, tf.float32) - low)
  if not 0.0 < factor < 1.0:
    mixed = tf.clip_by_value(mixed, 0.0, 255.0)
  return tf.cast(mixed, tf.uint8)


def _gray(image: tf.Tensor) -> tf.Tensor:
  return tf.image.rgb_to_grayscale(image)


def autocontrast(image: tf.Tensor) -> tf.Tensor:
  """Stretches each channel to span [0, 255]."""
  def stretch(channel):
    low = tf.cast(tf.reduce_min(channel), tf.float32)
    high = tf.cast(tf.reduce_max(channel), tf.float32)
    def rescale():
      gain = 255.0 / (high - low)
      values = tf.cast(channel, tf.float32) * gain - low * gain
      return tf.cast(tf.clip_by_value(values, 0.0, 255.0), tf.uint8)
    return tf.cond(high > low, rescale, lambda: channel)
  return tf.stack([stretch(image[..., c]) for c in range(3)], axis=-1)


def equalize(image: tf.Tensor) -> tf.Tensor:
  """PIL histogram equalisation, per channel."""
  def equalize_channel(channel):
    values = tf.cast(channel, tf.int32)
    histogram = tf.histogram_fixed_width(values, [0, 255], nbins=256)
    nonzero = tf.boolean_mask(histogram, histogram > 0)
    # PIL's step ignores the count of the brightest occupied bin.
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
    def remap():
      table = (tf.cumsum(histogram) + step // 2) // step
      table = tf.clip_by_value(tf.concat([[0], table[:-1]], 0), 0, 255)
      return tf.gather(table, values)
    return tf.cast(tf.cond(step > 0, remap, lambda: values), tf.uint8)
  return tf.stack([equalize_channel(image[..., c]) for c in range(3)], axis=-1)


def invert(image: tf.Tensor) -> tf.Tensor:
  return 255 - image


def posterize(image: tf.Tensor, bits: int) -> tf.Tensor:
  """Keeps the `bits` most significant bits of each value."""
  keep = (0xFF << (8 - bits)) & 0xFF
  return tf.bitwise.bitwise_and(image, tf.constant(keep, tf.uint8))


def solarize(image: tf.Tensor, threshold: int) -> tf.Tensor:
  return tf.where(tf.cast(image, tf.int32) >= threshold, 255 - image, image)


def color(image: tf.Tensor, factor: float) -> tf.Tensor:
  return blend(tf.image.grayscale_to_rgb(_gray(image)), image, factor)


def contrast(image: tf.Tensor, factor: float) -> tf.Tensor:
  histogram = tf.histogram_fixed_width(tf.cast(_gray(image), tf.int32),
                                       [0, 255], nbins=256)
  level = tf.clip_by_value(
      tf.reduce_sum(tf.cast(histogram, tf.float32)) / 256.0, 0.0, 255.0)
  flat = tf.cast(tf.fill(tf.shape(image), level), tf.uint8)
  return blend(flat, image, factor)


def brightness(image: tf.Tensor, factor: float) -> tf.Tensor:
  return blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor: float) -> tf.Tensor:
  """Blends with PIL's SMOOTH-filtered image; the border stays unfiltered."""
  kernel = tf.constant([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13.0
  kernel = tf.tile(kernel[:, :, tf.newaxis, tf.newaxis], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(tf.cast(image, tf.float32)[tf.newaxis],
                                  kernel, [1, 1, 1, 1], padding='VALID')[0]
  smooth = tf.cast(tf.clip_by_value(smooth, 0.0, 255.0), tf.uint8)
  inner = tf.pad(tf.ones_like(smooth, tf.bool), [[1, 1], [1, 1], [0, 0]])
  smooth = tf.where(inner, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), image)
  return blend(smooth, image, factor)


def _enhance_factor(level: float) -> float:
  return level / _MAX_LEVEL * 1.8 + 0.1


def operation(name: str, level: float) -> Callable[[tf.Tensor], tf.Tensor]:
  """The uint8 -> uint8 function of one policy step at magnitude `level`."""
  if name == 'AutoContrast':
    return autocontrast
  if name == 'Equalize':
    return equalize
  if name == 'Invert':
    return invert
  if name == 'Posterize':
    return lambda x: posterize(x, int(level / _MAX_LEVEL * 4))
  if name == 'Solarize':
    return lambda x: solarize(x, int(level / _MAX_LEVEL * 256))
  enhancers = {'Color': color, 'Contrast': contrast,
               'Brightness': brightness, 'Sharpness': sharpness}
  if name in enhancers:
    factor = _enhance_factor(level)
    return lambda x: enhancers[name](x, factor)
  raise ValueError(f'Unknown AutoAugment operation {name!r}.')


def apply_policy(image: tf.Tensor, policy: Sequence[Sequence[Step]]
                 ) -> tf.Tensor:
  """Draws one sub-policy, then applies each of its steps with its chance."""
  def run_sub_policy(steps):
    def run():
      out = image
      for name, probability, level in steps:
        fn = operation(name, level)
        fire = tf.random.uniform([]) < probability
        out = tf.cond(fire, lambda x=out, f=fn: f(x), lambda x=out: x)
      return out
    return run
  choice = tf.random.uniform([], 0, len(policy), tf.int32)
  out = tf.switch_case(choice, [run_sub_policy(s) for s in policy])
  out.set_shape(image.shape)
  return out


def distort_image(image: tf.Tensor, policy_name: str) -> tf.Tensor:
  """Applies the named policy to a uint8 [H, W, 3] image."""
  if policy_name not in POLICIES:
    raise ValueError(f'Unknown autoaugment_policy_name {policy_name!r}; '
                     f'available: {sorted(POLICIES)}.')
  if image.dtype != tf.uint8:
    raise ValueError(f'AutoAugment expects a uint8 image, got {image.dtype}.')
  return apply_policy(image, POLICIES[policy_name])
