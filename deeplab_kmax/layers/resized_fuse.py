"""Fuse features of different resolutions into one map (MaX-DeepLab).

Every input is brought to `num_channels` (activation, then 1x1 conv + batch
norm, unless it already has that width) and to the target resolution
(`resize.bilinear_two_pass_if_narrow`, DeepLab2's rounding), then the
inputs are summed. The sum is left non-activated because the residual block
that consumes it activates its input. The projection runs before resizing,
so upsampled maps are projected at their cheaper low resolution.

Checkpoint paths: the projection of input i is `_resized_conv_bn{i+1}`.
DeepLab2 uses a stride-2 convolution instead (`_strided_conv_bn{i+1}`) when an
input satisfies (size + 1) // 2 == target size. In kMaX's pixel decoder,
whose inputs are never larger than the target, that only holds for a 1x1
target map (inputs of at most 16-32 pixels), so this layer does not
implement it.
"""

from typing import Optional, Sequence

import tensorflow as tf
import tf_keras

from deeplab_kmax.layers import activations
from deeplab_kmax.layers import convolutions
from deeplab_kmax.layers import normalization
from deeplab_kmax.ops import resize

Size = resize.Size


def _static_size(x: tf.Tensor):
  return tuple(x.shape[1:3])


class ResizedFuse(tf_keras.layers.Layer):
  """Projects, resizes and sums [B, h_i, w_i, c_i] features (no final act).

  The output size is `target_size` if given to call(), else the size of the
  last input. Projections are created from the input shapes on first call.
  """

  def __init__(self,
               num_channels: int,
               name: str,
               activation: str = 'relu',
               bn_layer: normalization.NormLayer = (
                   tf_keras.layers.BatchNormalization)):
    super().__init__(name=name)
    self._num_channels = num_channels
    self._activation = activations.get_activation(activation)
    self._bn_layer = bn_layer
    self._projection_names = ()

  def build(self, input_shapes):
    projections = []
    for index, shape in enumerate(input_shapes):
      channels = shape[-1]
      if channels is None:
        raise ValueError(f'{self.name}: input {index} needs a known channel '
                         f'count, got shape {shape}.')
      if channels == self._num_channels:
        projections.append(None)
        continue
      attr = f'_resized_conv_bn{index + 1}'
      setattr(self, attr, convolutions.Conv2DSame(
          self._num_channels, 1, name=attr[1:], use_bias=False, use_bn=True,
          bn_layer=self._bn_layer, activation=None))
      projections.append(attr)
    self._projection_names = tuple(projections)
    super().build(input_shapes)

  def call(self, inputs: Sequence[tf.Tensor], training=False,
           target_size: Optional[Size] = None) -> tf.Tensor:
    inputs = list(inputs)
    if len(inputs) != len(self._projection_names):
      raise ValueError(f'{self.name}: built for {len(self._projection_names)} '
                       f'inputs, called with {len(inputs)}.')
    if target_size is None:
      last = inputs[-1]
      static = _static_size(last)
      target_size = (list(static) if None not in static
                     else tf.shape(last)[1:3])
    fused = []
    for feature, attr in zip(inputs, self._projection_names):
      if attr is not None:
        feature = getattr(self, attr)(self._activation(feature),
                                      training=training)
      fused.append(resize.bilinear_two_pass_if_narrow(feature, target_size))
    return tf.add_n(fused)
