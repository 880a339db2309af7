"""Tests for align-corners resizing and the ResizedFuse skip connection."""

import numpy as np
import pytest
import tensorflow as tf

from deeplab_kmax.layers import resized_fuse


def naive_resize(x: np.ndarray, size) -> np.ndarray:
  """Bilinear interpolation with aligned corners, in float64."""
  def coords(n_in, n_out):
    if n_out == 1:
      return np.zeros(1)
    return np.arange(n_out) * (n_in - 1) / (n_out - 1)
  out = x.astype(np.float64)
  for axis, n_out in ((1, size[0]), (2, size[1])):
    pos = coords(out.shape[axis], n_out)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, out.shape[axis] - 1)
    frac = (pos - lo).reshape([-1 if a == axis else 1 for a in range(4)])
    out = (np.take(out, lo, axis) * (1 - frac) + np.take(out, hi, axis) * frac)
  return out


@pytest.mark.parametrize('channels', [3, 32, 33])
def test_resize_matches_align_corners_bilinear(channels):
  x = np.random.default_rng(channels).standard_normal(
      (2, 5, 9, channels)).astype(np.float32)
  got = resized_fuse.resize_align_corners(x, [9, 17]).numpy()
  np.testing.assert_allclose(got, naive_resize(x, (9, 17)), atol=1e-5)
  joint = tf.compat.v1.image.resize_bilinear(x, [9, 17], align_corners=True)
  # Bit-equality is the point (the same op sequence as DeepLab2). It holds on
  # any CPU: the same kernel on the same input, computed per output pixel
  # with no reduction whose order could vary.
  if channels > 32:  # one joint pass, as DeepLab2
    np.testing.assert_array_equal(got, joint.numpy())
  else:  # height pass then width pass, as DeepLab2
    height_first = tf.compat.v1.image.resize_bilinear(
        tf.compat.v1.image.resize_bilinear(x, [9, 9], align_corners=True),
        [9, 17], align_corners=True)
    np.testing.assert_array_equal(got, height_first.numpy())


def test_resize_to_same_size_is_a_no_op():
  x = tf.random.stateless_normal([1, 4, 6, 40], seed=[0, 1])
  assert resized_fuse.resize_align_corners(x, [4, 6]) is x
  # With a run-time size the resize runs, and is exact.
  np.testing.assert_array_equal(
      resized_fuse.resize_align_corners(x, tf.constant([4, 6])).numpy(),
      x.numpy())


def test_fuse_projects_mismatched_inputs_and_sums_without_activation():
  fuse = resized_fuse.ResizedFuse(8, name='skip', activation='gelu')
  low = tf.random.stateless_normal([2, 3, 4, 16], seed=[1, 1])
  same = tf.random.stateless_normal([2, 5, 7, 8], seed=[2, 2])
  high = tf.random.stateless_normal([2, 5, 7, 12], seed=[3, 3])
  out = fuse([low, same, high], training=False)
  assert out.shape == (2, 5, 7, 8)
  assert not hasattr(fuse, '_resized_conv_bn2')  # width already matches
  gelu = tf.nn.gelu
  expected = (
      resized_fuse.resize_align_corners(
          fuse._resized_conv_bn1(gelu(low, approximate=False)), [5, 7])
      + same + fuse._resized_conv_bn3(gelu(high, approximate=False)))
  np.testing.assert_allclose(out.numpy(), expected.numpy(), atol=1e-6)
  assert out.numpy().min() < -0.5  # the sum is not activated


def test_fuse_explicit_and_dynamic_target_size():
  fuse = resized_fuse.ResizedFuse(4, name='skip')
  a = tf.zeros([1, 3, 3, 4])
  b = tf.ones([1, 5, 5, 4])
  assert fuse([a, b], target_size=[9, 9]).shape == (1, 9, 9, 4)

  @tf.function(input_signature=[tf.TensorSpec([None, None, None, 4])] * 2)
  def run(x, y):
    return fuse([x, y])

  np.testing.assert_array_equal(run(a, b).numpy(), np.ones([1, 5, 5, 4]))


def test_fuse_rejects_wrong_number_of_inputs():
  fuse = resized_fuse.ResizedFuse(4, name='skip')
  fuse([tf.zeros([1, 2, 2, 4]), tf.zeros([1, 3, 3, 4])])
  with pytest.raises(ValueError, match='built for 2 inputs'):
    fuse([tf.zeros([1, 2, 2, 4])])
