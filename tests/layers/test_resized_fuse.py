"""Tests for the ResizedFuse skip connection (its resize: tests/ops)."""

import numpy as np
import pytest
import tensorflow as tf

from deeplab_kmax.layers import resized_fuse
from deeplab_kmax.ops import resize


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
      resize.bilinear_two_pass_if_narrow(
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
