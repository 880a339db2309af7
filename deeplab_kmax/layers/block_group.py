"""Stages of residual blocks that share one output resolution.

`BlockSequence` applies residual blocks one after the other; they are its
attributes `_block1`, `_block2`, ... (DeepLab2's checkpoint names).
`bottleneck_block` and `axial_block` size a block from its bottleneck width.

`BlockGroup` is the sequence of one (atrous) ResNet stage. The stage is
described in terms of the *original* ResNet: the stride it would
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
"""

import math
from typing import List, Sequence

import tensorflow as tf
import tf_keras

from deeplab_kmax.layers import drop_path
from deeplab_kmax.layers import normalization
from deeplab_kmax.layers import residual_blocks

# Drop-path is only used from this original ResNet stride on.
DROP_PATH_BEYOND_STRIDE = 16
# Attention blocks widen the 1x1 reduction by this factor.
ATTENTION_BOTTLENECK_EXPANSION = 2
# A block's output is this many times its bottleneck width.
OUTPUT_EXPANSION = 4


def _is_power_of_two(value: int) -> bool:
  return value > 0 and value & (value - 1) == 0


def bottleneck_block(filters: int, name: str,
                     **kwargs) -> residual_blocks.BottleneckBlock:
  """A ResNet bottleneck of width `filters`; `kwargs` go to the block."""
  return residual_blocks.BottleneckBlock(
      [filters, filters, filters * OUTPUT_EXPANSION], name=name, **kwargs)


def axial_block(filters: int, name: str,
                **kwargs) -> residual_blocks.AxialBlock:
  """An axial block of attention width `filters`; `kwargs` go to the block."""
  return residual_blocks.AxialBlock(
      [filters * ATTENTION_BOTTLENECK_EXPANSION, filters,
       filters * OUTPUT_EXPANSION], name=name, **kwargs)


class BlockSequence(tf_keras.layers.Layer):
  """Residual blocks in order; input and output are non-activated sums."""

  def __init__(self, blocks: Sequence[tf_keras.layers.Layer], name: str):
    super().__init__(name=name)
    if not blocks:
      raise ValueError(f'{name}: needs at least one block.')
    self._num_blocks = len(blocks)
    for index, block in enumerate(blocks):
      setattr(self, f'_block{index + 1}', block)

  def blocks(self) -> List[tf_keras.layers.Layer]:
    return [getattr(self, f'_block{i + 1}') for i in range(self._num_blocks)]

  def call(self, inputs: tf.Tensor, training=False) -> tf.Tensor:
    x = inputs
    for block in self.blocks():
      x = block(x, training=training)
    return x


class BlockGroup(BlockSequence):
  """`num_blocks` blocks of one ResNet stage (see the module docstring)."""

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
                   tf_keras.layers.BatchNormalization)):
    for what, value in (('resnet_input_stride', resnet_input_stride),
                        ('output_stride', output_stride)):
      if not _is_power_of_two(value):
        raise ValueError(f'{name}: {what} must be a power of two, got '
                         f'{value}.')
    if num_blocks < 1:
      raise ValueError(f'{name}: num_blocks must be >= 1, got {num_blocks}.')

    blocks = []
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
                    drop_path_keep_prob=keep_prob, bn_layer=bn_layer)
      block_name = f'block{index + 1}'
      if use_axial_beyond_stride > 0 and (
          current_stride >= use_axial_beyond_stride):
        blocks.append(axial_block(filters, block_name, **common))
      else:
        blocks.append(bottleneck_block(filters, block_name,
                                       atrous_rate=atrous_rate, **common))

      if first:
        current_stride *= resnet_stride
    super().__init__(blocks, name=name)
