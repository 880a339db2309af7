"""ResNet-50 and Axial-ResNet-50 (MaX-S) pixel encoders for kMaX-DeepLab.

Both are a stride-2 stem followed by four residual stages (3, 4, 6, 3 blocks)
at strides 4, 8, 16 and 32:
* `resnet50` (DeepLab2's `kmax_resnet50`): the 7x7 ResNet stem, convolutional
  bottlenecks, ReLU;
* `axial_resnet50` (`kmax_axial_resnet50`, the MaX-DeepLab-S backbone): the
  Inception stem, axial-attention blocks wherever the original stride is
  >= 16 (stage 4 from its second block on, and stage 5), GELU.

The encoder returns, per stage k, the non-activated block sum `stage{k}` (the
features kMaX's pixel decoder consumes) and its activation `res{k}`.
Checkpoint paths: `_stem/...`, `_stage2/_block1/...` ... `_stage5/...`.
"""

from typing import Dict, List, Optional

import tensorflow as tf
import tf_keras

from deeplab_kmax import keys
from deeplab_kmax.layers import activations
from deeplab_kmax.layers import block_group
from deeplab_kmax.layers import normalization
from deeplab_kmax.layers import stems

_STAGE_BLOCKS = (3, 4, 6, 3)


class AxialResNet(tf_keras.layers.Layer):
  """A stem plus four residual stages; returns a dict of endpoints."""

  def __init__(self,
               name: str,
               stem: str = 'resnet',
               num_blocks=_STAGE_BLOCKS,
               use_axial_beyond_stride: int = 0,
               activation: str = 'relu',
               output_stride: int = 32,
               drop_path_keep_prob: float = 1.0,
               drop_path_schedule: str = 'linear',
               bn_layer: Optional[normalization.NormLayer] = None,
               width_multiplier: float = 1.0,
               stem_width_multiplier: float = 1.0,
               layer_multiplier: float = 1.0):
    super().__init__(name=name)
    if min(width_multiplier, stem_width_multiplier, layer_multiplier) <= 0:
      raise ValueError(f'{name}: width and layer multipliers must be positive, '
                       f'got {width_multiplier}, {stem_width_multiplier}, '
                       f'{layer_multiplier}.')
    if output_stride not in (8, 16, 32):
      raise ValueError(f'{name}: output_stride must be 8, 16 or 32, got '
                       f'{output_stride}.')
    if len(num_blocks) != 4:
      raise ValueError(f'{name}: num_blocks needs one count per stage 2..5, '
                       f'got {num_blocks}.')
    bn_layer = bn_layer or normalization.batch_norm_factory()
    self._activation = activations.get_activation(activation)
    self._encoder_output_stride = output_stride

    if stem == 'resnet':
      self._stem = stems.resnet_stem(bn_layer, stem_width_multiplier)
    elif stem == 'inception':
      self._stem = stems.InceptionStem(bn_layer, stem_width_multiplier,
                                       activation=activation)
    else:
      raise ValueError(f"{name}: stem must be 'resnet' or 'inception', got "
                       f'{stem!r}.')

    shared = {'output_stride': output_stride,
              'use_axial_beyond_stride': use_axial_beyond_stride,
              'drop_path_schedule': drop_path_schedule,
              'activation': activation, 'bn_layer': bn_layer}
    # Stage k (2..5) starts at original stride 2^(k-1) and halves it once;
    # its bottleneck width is 32 * that input stride (64 ... 512), scaled by
    # the width multiplier (1.0 for the published models).
    for stage, blocks in zip(range(2, 6), num_blocks):
      input_stride = 2 ** (stage - 1)
      setattr(self, f'_stage{stage}', block_group.BlockGroup(
          filters=max(1, int(round(32 * input_stride * width_multiplier))),
          num_blocks=max(1, int(round(blocks * layer_multiplier))),
          name=f'stage{stage}', resnet_stride=2,
          resnet_input_stride=input_stride,
          drop_path_keep_prob=drop_path_keep_prob, **shared))

  @property
  def output_stride(self) -> int:
    return self._encoder_output_stride

  @property
  def stage_layers(self) -> List[tf_keras.layers.Layer]:
    """The stem and the four residual stages, in call order."""
    return [self._stem] + [getattr(self, f'_stage{k}') for k in range(2, 6)]

  def call(self, inputs: tf.Tensor, training=False) -> Dict[str, tf.Tensor]:
    if inputs.shape.rank != 4 or inputs.shape[-1] != 3:
      raise ValueError(f'{self.name}: expected normalised RGB images '
                       f'[B, H, W, 3], got shape {inputs.shape}.')
    x = self._stem(inputs, training=training)
    endpoints = {keys.encoder_stage(1): x,
                 keys.encoder_activation(1): self._activation(x)}
    for stage in range(2, 6):
      x = getattr(self, f'_stage{stage}')(x, training=training)
      endpoints[keys.encoder_stage(stage)] = x
      endpoints[keys.encoder_activation(stage)] = self._activation(x)
    endpoints[keys.BACKBONE_OUTPUT] = endpoints[keys.encoder_activation(5)]
    return endpoints


def build_axial_resnet(name: str,
                       *,
                       drop_path_keep_prob: float = 1.0,
                       drop_path_schedule: str = 'linear',
                       output_stride: int = 32,
                       bn_layer: Optional[normalization.NormLayer] = None,
                       width_multiplier: float = 1.0,
                       stem_width_multiplier: float = 1.0,
                       layer_multiplier: float = 1.0) -> AxialResNet:
  """Builds `resnet50` or `axial_resnet50` (a `kmax_` prefix is accepted).

  DeepLab2's kMaX always uses the linear drop-path schedule for these
  encoders (its config's schedule field is ignored), hence the default.
  `bn_layer` builds every batch norm (default: synchronised, DeepLab2's
  momentum and epsilon).
  The multipliers (DeepLab2's backbone width / stem width / layer
  multipliers) shrink the network for small experiments; the published
  checkpoints need 1.0. The layer builds on its first call.
  """
  key = name.lower()
  if key.startswith('kmax_'):
    key = key[len('kmax_'):]
  common = {'output_stride': output_stride,
            'drop_path_keep_prob': drop_path_keep_prob,
            'drop_path_schedule': drop_path_schedule,
            'bn_layer': bn_layer,
            'width_multiplier': width_multiplier,
            'stem_width_multiplier': stem_width_multiplier,
            'layer_multiplier': layer_multiplier}
  if key == 'resnet50':
    return AxialResNet(key, stem='resnet', use_axial_beyond_stride=0,
                       activation='relu', **common)
  if key == 'axial_resnet50':
    return AxialResNet(key, stem='inception', use_axial_beyond_stride=16,
                       activation='gelu', **common)
  raise ValueError(f"Unknown (axial) ResNet encoder {name!r}; expected "
                   f"'resnet50' or 'axial_resnet50' (optionally 'kmax_'-"
                   f'prefixed).')
