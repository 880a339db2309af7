"""A stage of residual blocks that share one output resolution.

The stage is described in terms of the *original* ResNet: the stride it would
have in ResNet (`resnet_stride`, 1 or 2, taken by its first block) and the
total stride of its input there (`resnet_input_stride`). The actual network
may stop striding at `output_stride`; deeper stages then keep the resolution
and dilate their 3x3 convolutions by (original stride / output_stride), so
that receptive fields are unchanged ("atrous" ResNet).

The same description selects the block type and drop-path rate, following
DeepLab2 so that checkpoints and features line up:
* blocks whose original input stride is >= `use_axial_beyond_stride` (> 0)
  are axial blocks (bottleneck width doubled for the reduce conv), the others
  ResNet bottlenecks;
* drop-path applies only to blocks at original stride >= 16, with the keep
  probability of "stage" log2(stride) - 1 out of 4 under the schedule.
Blocks are attributes `_block1`, `_block2`, ...
"""

import math

import tensorflow as tf
import tf_keras

from deeplab_kmax.layers import drop_path
from deeplab_kmax.layers import normalization
from deeplab_kmax.layers import residual_blocks

# Drop-path is only used from this original ResNet stride on.
DROP_PATH_BEYOND_STRIDE = 16
# Attention blocks widen the 1x1 reduction by this factor.
ATTENTION_BOTTLENECK_EXPANSION = 2


def _is_power_of_two(value: int) -> bool:
  return value > 0 and value & (value - 1) == 0


class BlockGroup(tf_keras.layers.Layer):
  """`num_blocks` residual blocks; input and output are non-activated."""

  def __init__(self,
               filters: int,
               num_blocks: int,
               name: str,
               resnet_stride: int,
               resnet_input_stride: int,
               output_stride: int = 16,
               use_axial_beyond_stride: int = 0,
               drop_path_keep_prob: float = 1.0,
               drop_path_schedule: str = 'constant',
               activation: str = 'relu',
               bn_layer: normalization.NormLayer = (
                   tf_keras.layers.BatchNormalization),
               weight_decay: float = 0.0):
    super().__init__(name=name)
    for what, value in (('resnet_input_stride', resnet_input_stride),
                        ('output_stride', output_stride)):
      if not _is_power_of_two(value):
        raise ValueError(f'{name}: {what} must be a power of two, got '
                         f'{value}.')
    if num_blocks < 1:
      raise ValueError(f'{name}: num_blocks must be >= 1, got {num_blocks}.')

    self._num_blocks = num_blocks
    current_stride = resnet_input_stride  # original stride seen by a block
    for index in range(num_blocks):
      first = index == 0
      strides = (resnet_stride
                 if first and resnet_input_stride < output_stride else 1)
      atrous_rate = max(current_stride // output_stride, 1)

      keep_prob = 1.0
      if current_stride >= DROP_PATH_BEYOND_STRIDE:
        stage = int(round(math.log2(current_stride))) - 1
        keep_prob = drop_path.keep_prob_for_stage(
            drop_path_keep_prob, drop_path_schedule, stage=stage,
            num_stages=4)

      common = dict(strides=strides, activation=activation,
                    drop_path_keep_prob=keep_prob, bn_layer=bn_layer,
                    weight_decay=weight_decay)
      if use_axial_beyond_stride > 0 and (
          current_stride >= use_axial_beyond_stride):
        block = residual_blocks.AxialBlock(
            [filters * ATTENTION_BOTTLENECK_EXPANSION, filters, filters * 4],
            name=f'block{index + 1}', **common)
      else:
        block = residual_blocks.BottleneckBlock(
            [filters, filters, filters * 4], name=f'block{index + 1}',
            atrous_rate=atrous_rate, **common)
      setattr(self, f'_block{index + 1}', block)

      if first:
        current_stride *= resnet_stride

  def blocks(self):
    return [getattr(self, f'_block{i + 1}') for i in range(self._num_blocks)]

  def call(self, inputs: tf.Tensor, training=False) -> tf.Tensor:
    x = inputs
    for block in self.blocks():
      x = block(x, training=training)
    return x
