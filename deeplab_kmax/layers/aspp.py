"""Atrous Spatial Pyramid Pooling (DeepLabv3).

Five parallel branches over the same high-level feature: a 1x1 conv, three
dilated 3x3 convs, and image-level pooling followed by a 1x1 conv. Their
concatenation is projected back to `output_channels`.

Checkpoint names (DeepLab2): `_conv_bn_act`, `_aspp_conv{1,2,3}/_conv_bn_act`,
`_aspp_pool/_conv_bn_act`, `_proj_conv_bn_act`.
"""

from typing import Optional, Sequence, Tuple

import tensorflow as tf
import tf_keras

from deeplab_kmax.layers import convolutions
from deeplab_kmax.layers import normalization
from deeplab_kmax.ops import resize


def _conv_bn_act(channels: int, kernel_size: int, name: str,
                 bn_layer: normalization.NormLayer, activation: str,
                 atrous_rate: int = 1) -> convolutions.Conv2DSame:
  """Bias-free conv followed by BN and the activation."""
  return convolutions.Conv2DSame(
      channels, kernel_size, name=name, atrous_rate=atrous_rate,
      use_bias=False, use_bn=True, activation=activation, bn_layer=bn_layer)


class _AtrousBranch(tf_keras.layers.Layer):
  """One dilated 3x3 conv + BN + activation."""

  def __init__(self, output_channels: int, atrous_rate: int, name: str,
               bn_layer: normalization.NormLayer, activation: str):
    super().__init__(name=name)
    self._conv_bn_act = _conv_bn_act(output_channels, 3, 'conv_bn_act',
                                     bn_layer, activation,
                                     atrous_rate=atrous_rate)

  def call(self, x: tf.Tensor, training=False) -> tf.Tensor:
    return self._conv_bn_act(x, training=training)


class _ImagePoolingBranch(tf_keras.layers.Layer):
  """Global (or tiled) average pooling, 1x1 conv, then broadcast back."""

  def __init__(self, output_channels: int, name: str,
               bn_layer: normalization.NormLayer, activation: str):
    super().__init__(name=name)
    self.pool_size: Optional[Tuple[int, int]] = None
    self._conv_bn_act = _conv_bn_act(output_channels, 1, 'conv_bn_act',
                                     bn_layer, activation)

  def call(self, x: tf.Tensor, training=False) -> tf.Tensor:
    size = tf.shape(x)[1:3]
    if self.pool_size is None:
      static_hw = x.shape[1:3]
      if None in static_hw:
        pooled = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
      else:
        pooled = tf.nn.avg_pool2d(x, list(static_hw), 1, 'VALID')
    else:
      pooled = tf.nn.avg_pool2d(x, list(self.pool_size), 1, 'VALID')
    pooled = self._conv_bn_act(pooled, training=training)
    # One joint pass (not DeepLab2's two-pass feature rounding): the goldens
    # of the pooling branch depend on it.
    return resize.bilinear(pooled, size)


class ASPP(tf_keras.layers.Layer):
  """DeepLabv3 ASPP with dropout 0.1 after the projection (training only)."""

  def __init__(self,
               output_channels: int = 256,
               atrous_rates: Sequence[int] = (6, 12, 18),
               name: str = 'aspp',
               bn_layer: normalization.NormLayer = (
                   tf_keras.layers.BatchNormalization),
               activation: str = 'relu',
               dropout_rate: float = 0.1):
    super().__init__(name=name)
    if len(atrous_rates) != 3:
      raise ValueError(f'ASPP needs exactly 3 atrous rates, got '
                       f'{list(atrous_rates)}.')
    self._conv_bn_act = _conv_bn_act(output_channels, 1, 'conv_bn_act',
                                     bn_layer, activation)
    self._aspp_conv1 = _AtrousBranch(output_channels, atrous_rates[0],
                                     'aspp_conv1', bn_layer, activation)
    self._aspp_conv2 = _AtrousBranch(output_channels, atrous_rates[1],
                                     'aspp_conv2', bn_layer, activation)
    self._aspp_conv3 = _AtrousBranch(output_channels, atrous_rates[2],
                                     'aspp_conv3', bn_layer, activation)
    self._aspp_pool = _ImagePoolingBranch(output_channels, 'aspp_pool',
                                          bn_layer, activation)
    self._proj_conv_bn_act = _conv_bn_act(
        output_channels, 1, 'proj_conv_bn_act', bn_layer, activation)
    self._proj_drop = tf_keras.layers.Dropout(dropout_rate)

  def set_pool_size(self, pool_size: Optional[Tuple[int, int]]) -> None:
    """Tiled pooling of this size instead of global pooling (None resets)."""
    if pool_size is not None and None in tuple(pool_size):
      raise ValueError('pool_size must give both dimensions or be None, got '
                       f'{pool_size}.')
    self._aspp_pool.pool_size = None if pool_size is None else tuple(pool_size)

  def call(self, x: tf.Tensor, training=False) -> tf.Tensor:
    branches = [
        self._conv_bn_act(x, training=training),
        self._aspp_conv1(x, training=training),
        self._aspp_conv2(x, training=training),
        self._aspp_conv3(x, training=training),
        self._aspp_pool(x, training=training),
    ]
    fused = self._proj_conv_bn_act(tf.concat(branches, axis=3),
                                   training=training)
    return self._proj_drop(fused, training=training)
