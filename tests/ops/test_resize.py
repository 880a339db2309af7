"""The corner-aligned resize ops, against float64 references."""

import numpy as np
import pytest
import tensorflow as tf

from deeplab_kmax.ops import resize


def _source_positions(n_in: int, n_out: int) -> np.ndarray:
  """Where each output index samples the input, corners aligned."""
  if n_out == 1:
    return np.zeros(1)
  return np.arange(n_out) * (n_in - 1) / (n_out - 1)


def naive_bilinear(x: np.ndarray, size) -> np.ndarray:
  """Bilinear interpolation with aligned corners, in float64."""
  out = x.astype(np.float64)
  for axis, n_out in ((1, size[0]), (2, size[1])):
    pos = _source_positions(out.shape[axis], n_out)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, out.shape[axis] - 1)
    frac = (pos - lo).reshape([-1 if a == axis else 1 for a in range(4)])
    out = (np.take(out, lo, axis) * (1 - frac) + np.take(out, hi, axis) * frac)
  return out


@pytest.mark.parametrize('channels', [3, 32, 33])
def test_two_pass_resize_rounds_like_deeplab2(channels):
  x = np.random.default_rng(channels).standard_normal(
      (2, 5, 9, channels)).astype(np.float32)
  got = resize.bilinear_two_pass_if_narrow(x, [9, 17]).numpy()
  np.testing.assert_allclose(got, naive_bilinear(x, (9, 17)), atol=1e-5)
  joint = tf.compat.v1.image.resize_bilinear(x, [9, 17], align_corners=True)
  # Bit-equality is the point (the same op sequence as DeepLab2). It holds on
  # any CPU: the same kernel on the same input, computed per output pixel
  # with no reduction whose order could vary.
  np.testing.assert_array_equal(resize.bilinear(x, [9, 17]).numpy(),
                                joint.numpy())
  if channels > 32:  # one joint pass, as DeepLab2
    np.testing.assert_array_equal(got, joint.numpy())
  else:  # height pass then width pass, as DeepLab2
    height_first = tf.compat.v1.image.resize_bilinear(
        tf.compat.v1.image.resize_bilinear(x, [9, 9], align_corners=True),
        [9, 17], align_corners=True)
    np.testing.assert_array_equal(got, height_first.numpy())


def test_resize_to_same_size_is_a_no_op():
  x = tf.random.stateless_normal([1, 4, 6, 40], seed=[0, 1])
  for op in (resize.bilinear, resize.bilinear_two_pass_if_narrow,
             resize.nearest):
    assert op(x, [4, 6]) is x
    # With a run-time size the resize runs, and is exact.
    np.testing.assert_array_equal(op(x, tf.constant([4, 6])).numpy(),
                                  x.numpy())


@pytest.mark.parametrize('in_size,out_size', [((33, 33), (129, 129)),
                                              ((9, 7), (5, 13)),
                                              ((1, 4), (3, 1))])
def test_nearest_copies_the_closest_corner_aligned_source(in_size, out_size):
  ids = np.random.default_rng(2).integers(0, 100, (2,) + in_size + (1,),
                                          dtype=np.int32)
  got = resize.nearest(tf.constant(ids), out_size)
  assert got.dtype == tf.int32
  rows, cols = (np.floor(_source_positions(n_in, n_out) + 0.5).astype(int)
                for n_in, n_out in zip(in_size, out_size))
  np.testing.assert_array_equal(got.numpy(), ids[:, rows][:, :, cols])


def test_bilinear_keeps_float_dtypes_and_makes_integers_float32():
  pixels = np.random.default_rng(3).integers(0, 256, (1, 5, 7, 3), np.uint8)
  out = resize.bilinear(tf.constant(pixels), (9, 13))
  assert out.dtype == tf.float32
  np.testing.assert_allclose(out.numpy(), naive_bilinear(pixels, (9, 13)),
                             atol=1e-4)
  half = resize.bilinear(tf.constant(pixels, tf.float16), (9, 13))
  assert half.dtype == tf.float16


def test_bilinear_lookup_reads_the_upsampled_table():
  rng = np.random.default_rng(4)
  table = rng.random((2, 5, 7, 6)).astype(np.float32)
  channel = rng.integers(0, 6, (2, 17, 25)).astype(np.int32)
  upsampled = resize.bilinear(tf.constant(table), (17, 25)).numpy()
  expected = np.take_along_axis(upsampled, channel[..., None], -1)[..., 0]
  ours = resize.bilinear_lookup(tf.constant(table),
                                tf.constant(channel)).numpy()
  np.testing.assert_allclose(ours, expected, atol=1e-6)
