"""Stems: the first layers that bring an image to stride 2.

Both return a non-activated feature (the encoder's `stage1`); the first
residual stage activates it. Checkpoint paths: `_stem/_conv`,
`_stem/_batch_norm` for the ResNet stem, and `_stem/_conv1_bn_act`,
`_stem/_conv2_bn_act`, `_stem/_conv3_bn` for the Inception stem.
"""

import functools

import tensorflow as tf
import tf_keras

from deeplab_kmax.layers import convolutions
from deeplab_kmax.layers import normalization


def resnet_stem(bn_layer: normalization.NormLayer = (
                    tf_keras.layers.BatchNormalization),
                width_multiplier: float = 1.0) -> tf_keras.layers.Layer:
  """The original ResNet stem: one strided 7x7 convolution with batch norm.

  Unlike the classical ResNet there is no max pooling here: the first block
  of the next stage takes the stride instead.
  """
  return convolutions.Conv2DSame(
      int(round(64 * width_multiplier)), 7, name='stem', strides=2,
      use_bias=False, use_bn=True, bn_layer=bn_layer, activation=None)


class InceptionStem(tf_keras.layers.Layer):
  """Three 3x3 convolutions (the first strided), as in Inception-v4.

  Used by the "ResNet-beta" / Axial-ResNet (MaX-S) backbones; ends with 128
  channels and no activation.
  """

  def __init__(self,
               bn_layer: normalization.NormLayer = (
                   tf_keras.layers.BatchNormalization),
               width_multiplier: float = 1.0,
               activation: str = 'relu',
               name: str = 'stem'):
    super().__init__(name=name)
    narrow = int(64 * width_multiplier)
    wide = int(128 * width_multiplier)
    conv3x3_bn = functools.partial(
        convolutions.Conv2DSame, kernel_size=3, use_bias=False, use_bn=True,
        bn_layer=bn_layer)
    self._conv1_bn_act = conv3x3_bn(narrow, name='conv1_bn_act', strides=2,
                                    activation=activation)
    self._conv2_bn_act = conv3x3_bn(narrow, name='conv2_bn_act',
                                    activation=activation)
    self._conv3_bn = conv3x3_bn(wide, name='conv3_bn', activation=None)

  def call(self, inputs: tf.Tensor, training=False) -> tf.Tensor:
    features = inputs
    for conv in (self._conv1_bn_act, self._conv2_bn_act, self._conv3_bn):
      features = conv(features, training=training)
    return features
