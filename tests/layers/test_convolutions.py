"""Convolution wrappers: dilated convolutions as one Conv2D op."""

import numpy as np
import pytest
import tensorflow as tf

from deeplab_kmax.layers import convolutions
from tests import graph_ops


@pytest.mark.parametrize('strides,rate,size', [(1, 6, 21), (1, 18, 21),
                                               (1, 2, 17), (2, 1, 17)])
def test_dilated_conv_is_one_op_and_equals_space_to_batch(strides, rate,
                                                          size):
  rng = np.random.default_rng(0)
  x = tf.constant(rng.standard_normal([2, size, size, 16]), tf.float32)
  layer = convolutions.Conv2DSame(8, 3, name='conv', strides=strides,
                                  atrous_rate=rate, use_bias=True)
  layer(x)  # build
  conv = layer._conv  # pylint: disable=protected-access
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(x)
    ours = layer(x)
    # What Keras would compute: tf.nn.convolution (space-to-batch for rates
    # above 1).
    expected = tf.nn.convolution(
        layer._pad(x), conv.kernel, strides=strides,  # pylint: disable=protected-access
        padding=conv.padding.upper(), dilations=rate) + conv.bias
    loss_ours = tf.reduce_sum(ours * ours)
    loss_expected = tf.reduce_sum(expected * expected)
  np.testing.assert_allclose(ours.numpy(), expected.numpy(), atol=1e-5,
                             rtol=1e-5)
  for got, want in zip(tape.gradient(loss_ours, [x, conv.kernel]),
                       tape.gradient(loss_expected, [x, conv.kernel])):
    scale = np.abs(want.numpy()).max()
    np.testing.assert_allclose(got.numpy() / scale, want.numpy() / scale,
                               atol=1e-5)

  op_types = graph_ops.traced_op_types(layer, x)
  assert 'SpaceToBatchND' not in op_types, op_types
  assert 'Conv2D' in op_types, op_types


def test_undilated_conv_unchanged():
  x = tf.random.stateless_normal([1, 9, 9, 4], seed=[1, 2])
  layer = convolutions.Conv2DSame(4, 3, name='conv', use_bias=False)
  layer(x)
  want = tf.nn.conv2d(x, layer._conv.kernel, 1, 'SAME')  # pylint: disable=protected-access
  np.testing.assert_array_equal(layer(x).numpy(), want.numpy())


def test_float16_keeps_a_differentiable_dilated_convolution():
  # No CPU kernel computes the gradient of a dilated float16 Conv2D.
  x = tf.cast(tf.random.stateless_normal([1, 21, 21, 8], seed=[3, 4]),
              tf.float16)
  conv = convolutions._Conv2D(  # pylint: disable=protected-access
      4, 3, padding='same', dilation_rate=6, use_bias=False, dtype='float16')
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = conv(x)
  gradients = tape.gradient(y, [x, conv.kernel])
  assert all(np.isfinite(g.numpy().astype(np.float32)).all()
             for g in gradients)
