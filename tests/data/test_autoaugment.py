"""AutoAugment colour operations against PIL, and the kMaX policy."""

import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps
import pytest
import tensorflow as tf

from deeplab_kmax.data import autoaugment


@pytest.fixture(scope='module')
def photo():
  rng = np.random.default_rng(0)
  base = np.linspace(20, 200, 24 * 32).reshape(24, 32, 1)
  return np.clip(base + rng.normal(0, 25, (24, 32, 3)), 0, 255).astype(
      np.uint8)


def _tf(fn, image, *args):
  return fn(tf.constant(image), *args).numpy()


def test_simple_classification_policy():
  assert autoaugment.POLICIES['simple_classification_policy'] == [
      [('Sharpness', 0.4, 7), ('Brightness', 0.2, 10)],
      [('Equalize', 0.0, 9), ('Contrast', 0.2, 10)],
      [('Sharpness', 0.2, 9), ('Color', 0.2, 9)],
      [('Solarize', 0.2, 7), ('Equalize', 0.6, 9)],
      [('Sharpness', 0.2, 1), ('Equalize', 0.2, 7)],
  ]
  scaled = autoaugment.POLICIES[
      'simple_classification_policy_magnitude_scale_0.2']
  assert scaled[0][0] == ('Sharpness', 0.4, 7 * 0.2)


@pytest.mark.parametrize('name, ours, pil', [
    ('equalize', autoaugment.equalize, ImageOps.equalize),
    ('invert', autoaugment.invert, ImageOps.invert),
    ('solarize', lambda x: autoaugment.solarize(x, 100),
     lambda im: ImageOps.solarize(im, 100)),
    ('posterize', lambda x: autoaugment.posterize(x, 3),
     lambda im: ImageOps.posterize(im, 3)),
])
def test_exact_operations_match_pil(photo, name, ours, pil):
  del name
  np.testing.assert_array_equal(_tf(ours, photo),
                                np.asarray(pil(Image.fromarray(photo))))


def test_autocontrast_matches_pil(photo):
  expected = np.asarray(ImageOps.autocontrast(Image.fromarray(photo)))
  got = _tf(autoaugment.autocontrast, photo)
  assert np.abs(got.astype(int) - expected).max() <= 1
  assert got[..., 0].min() == 0 and got[..., 0].max() == 255
  flat = np.full((4, 4, 3), 77, np.uint8)
  np.testing.assert_array_equal(_tf(autoaugment.autocontrast, flat), flat)


@pytest.mark.parametrize('ours, enhancer', [
    (autoaugment.color, ImageEnhance.Color),
    (autoaugment.brightness, ImageEnhance.Brightness),
])
@pytest.mark.parametrize('factor', [0.3, 1.5])
def test_enhancers_match_pil(photo, ours, enhancer, factor):
  expected = np.asarray(enhancer(Image.fromarray(photo)).enhance(factor))
  got = _tf(ours, photo, factor)
  assert np.abs(got.astype(int) - expected).max() <= 2


def test_sharpness_blends_with_smoothed_interior(photo):
  factor = 1.6
  image = photo.astype(np.float64)
  smooth = image.copy()
  kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13.0
  for y in range(1, image.shape[0] - 1):
    for x in range(1, image.shape[1] - 1):
      window = image[y - 1:y + 2, x - 1:x + 2]
      smooth[y, x] = np.floor(np.einsum('ijc,ij->c', window, kernel))
  expected = np.clip(smooth + factor * (image - smooth), 0, 255)
  got = _tf(autoaugment.sharpness, photo, factor)
  assert np.abs(got - np.floor(expected)).max() <= 1
  # Border pixels are not filtered, so blending leaves them unchanged.
  np.testing.assert_array_equal(got[0], photo[0])


def test_contrast_blends_towards_histogram_bin_mean(photo):
  # DeepLab2's quirk: the grey level is pixel count / 256 (here 3), clipped.
  level = min(photo.shape[0] * photo.shape[1] / 256.0, 255.0)
  got = _tf(autoaugment.contrast, photo, 0.5)
  expected = np.floor(level + 0.5 * (photo - np.floor(level)))
  assert np.abs(got - expected).max() <= 1


def test_blend_extrapolation_is_clipped():
  low = np.zeros((1, 1, 3), np.uint8)
  high = np.full((1, 1, 3), 200, np.uint8)
  assert _tf(lambda a, b: autoaugment.blend(a, b, 2.0), low, high).max() == 255
  assert _tf(lambda a, b: autoaugment.blend(a, b, 0.5), low, high).max() == 100
  assert _tf(lambda a, b: autoaugment.blend(a, b, 0.0), low, high).max() == 0


def test_distort_image_randomly_applies_colour_ops(photo):
  outcomes = set()
  for seed in range(30):
    tf.random.set_seed(seed)
    out = autoaugment.distort_image(tf.constant(photo),
                                    'simple_classification_policy')
    assert out.dtype == tf.uint8 and out.shape == photo.shape
    outcomes.add(bool((out.numpy() == photo).all()))
  assert outcomes == {True, False}  # Sometimes nothing fires.
  with pytest.raises(ValueError, match='Unknown autoaugment'):
    autoaugment.distort_image(tf.constant(photo), 'nope')
  with pytest.raises(ValueError, match='uint8'):
    autoaugment.distort_image(tf.zeros([2, 2, 3]),
                              'simple_classification_policy')
