"""Residual bottleneck blocks: convolutional (ResNet) and axial (Axial-ResNet).

Both blocks are 1x1 reduce -> spatial operator -> 1x1 expand, added to a
(projected) shortcut. The spatial operator is a 3x3 convolution in the ResNet
bottleneck and height+width axial attention in the axial block. Any stride is
taken by the spatial operator and by the shortcut projection.

Conventions that DeepLab2 checkpoints and features depend on:
* A block receives the *non-activated* sum of the previous block and applies
  the activation itself; it also returns a non-activated sum. Encoder
  endpoints (`stage*`) are such sums.
* The last batch norm starts with gamma = 0, so a freshly initialised block is
  the identity on its shortcut.
* The shortcut is projected (1x1 conv + norm, strided) only when the channel
  count changes; it is created lazily from the input shape.
* Attribute names: `_conv1_bn_act`, `_conv2_bn_act` or `_attention`,
  `_conv3_bn`, `_shortcut`.
"""

import functools
from typing import Sequence

import tensorflow as tf
import tf_keras

from deeplab_kmax.layers import activations
from deeplab_kmax.layers import axial_attention
from deeplab_kmax.layers import convolutions
from deeplab_kmax.layers import drop_path
from deeplab_kmax.layers import normalization


class _Bottleneck(tf_keras.layers.Layer):
  """The part shared by both blocks; subclasses define `_spatial`."""

  def __init__(self,
               filters_list: Sequence[int],
               name: str,
               strides: int = 1,
               activation: str = 'relu',
               drop_path_keep_prob: float = 1.0,
               bn_layer: normalization.NormLayer = (
                   tf_keras.layers.BatchNormalization)):
    super().__init__(name=name)
    if len(filters_list) != 3:
      raise ValueError(f'{name}: filters_list must hold three channel counts '
                       f'(reduce, spatial, expand), got {filters_list}.')
    self._filters_list = tuple(int(f) for f in filters_list)
    self._strides = strides
    self._activation_name = activation
    self._activation = activations.get_activation(activation)
    self._bn_layer = bn_layer
    # Every convolution here is bias-free and batch-normalised.
    self._conv_bn = functools.partial(
        convolutions.Conv2DSame, use_bias=False, use_bn=True,
        bn_layer=bn_layer)
    reduce_width, _, expand_width = self._filters_list
    self._conv1_bn_act = self._conv_bn(
        reduce_width, 1, name='conv1_bn_act', activation=activation)
    self._conv3_bn = self._conv_bn(
        expand_width, 1, name='conv3_bn', gamma_init='zeros', activation=None)
    self._drop_path = drop_path.DropPath(drop_path_keep_prob,
                                         name='drop_path')
    self._shortcut = None

  @property
  def output_channels(self) -> int:
    return self._filters_list[2]

  def build(self, input_shape):
    channels = input_shape[-1]
    if channels is None:
      raise ValueError(f'{self.name}: the input channel count must be known; '
                       f'got shape {input_shape}.')
    if channels != self.output_channels:
      self._shortcut = self._conv_bn(
          self.output_channels, 1, name='shortcut', strides=self._strides,
          activation=None)
    super().build(input_shape)

  def _spatial(self, x: tf.Tensor, training) -> tf.Tensor:
    raise NotImplementedError

  def call(self, inputs: tf.Tensor, training=False) -> tf.Tensor:
    activated = self._activation(inputs)
    if self._shortcut is not None:
      shortcut = self._shortcut(activated, training=training)
    elif self._strides > 1:
      shortcut = activated[:, ::self._strides, ::self._strides]
    else:
      shortcut = activated
    residual = self._conv1_bn_act(activated, training=training)
    residual = self._spatial(residual, training)
    residual = self._conv3_bn(residual, training=training)
    return shortcut + self._drop_path(residual, training=training)


class BottleneckBlock(_Bottleneck):
  """The ResNet bottleneck: 1x1, 3x3 (strided / atrous), 1x1 convolutions."""

  def __init__(self,
               filters_list: Sequence[int],
               name: str,
               strides: int = 1,
               atrous_rate: int = 1,
               kernel_size: int = 3,
               **kwargs):
    super().__init__(filters_list, name, strides=strides, **kwargs)
    self._conv2_bn_act = self._conv_bn(
        self._filters_list[1], kernel_size, name='conv2_bn_act',
        strides=strides, atrous_rate=atrous_rate,
        activation=self._activation_name)

  def _spatial(self, x: tf.Tensor, training) -> tf.Tensor:
    return self._conv2_bn_act(x, training=training)


class AxialBlock(_Bottleneck):
  """The axial bottleneck: the 3x3 conv becomes height+width axial attention.

  The attention's output (filters_list[1] * 2 value channels, matching the
  1x1 reduce width) is activated before the 1x1 expand.
  """

  def __init__(self,
               filters_list: Sequence[int],
               name: str,
               strides: int = 1,
               num_heads: int = 8,
               **kwargs):
    super().__init__(filters_list, name, strides=strides, **kwargs)
    self._attention = axial_attention.AxialAttention2D(
        filters=self._filters_list[1], name='attention', strides=strides,
        num_heads=num_heads, bn_layer=self._bn_layer)

  def _spatial(self, x: tf.Tensor, training) -> tf.Tensor:
    return self._activation(self._attention(x, training=training))
