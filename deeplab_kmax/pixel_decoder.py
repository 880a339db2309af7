"""kMaX-DeepLab's pixel decoder.

The decoder walks up the encoder's feature pyramid from stride 32: a stage of
residual blocks refines the current map, then a skip connection upsamples it
to the next encoder resolution and adds that (layer-normalised) encoder
feature. The two coarsest stages use axial-attention blocks (in effect a
transformer encoder over pixels), the finer ones ResNet bottlenecks:

  stride   32      16      8          4           (2, Cityscapes)
  stage    axial   axial   bottleneck bottleneck  bottleneck
  blocks   1       5       1          1           1
  width    512     256     128        64          32    (outputs are 4x)

Outputs `decoder_stage1..3` (strides 32, 16, 8) feed the kMaX transformer
decoder's k-means cross-attention blocks; `decoder_output` (stride 4, or 2
for Cityscapes) is the per-pixel embedding source.

Like DeepLab2 the block groups are built as if their input were at original
stride 32 with a nominal output stride of 16, so the bottleneck stages use
3x3 convolutions dilated by 2. Everything else (channel counts of the encoder
features, spatial sizes) is taken from the inputs on the first call, so any
encoder with `stage1..stage5` endpoints can be plugged in.

Checkpoint paths: `_backbone_norms/<i>`, `_stages/<i>/_block<j>/...` and
`_skip_connections/<i>/_resized_conv_bn{1,2}/...`, with i counted from the
stride-32 end.
"""

from typing import Dict, Mapping, Optional, Sequence

import tensorflow as tf
import tf_keras

from deeplab_kmax.layers import block_group
from deeplab_kmax.layers import normalization
from deeplab_kmax.layers import resized_fuse

# high_resolution_output_stride -> per-stage (width, blocks, type), from
# stride 32 downwards.
_STAGE_CONFIGS = {
    4: ((512, 1, 'axial'), (256, 5, 'axial'), (128, 1, 'bottleneck'),
        (64, 1, 'bottleneck')),
    2: ((512, 1, 'axial'), (256, 5, 'axial'), (128, 1, 'bottleneck'),
        (64, 1, 'bottleneck'), (32, 1, 'bottleneck')),
}
_ACTIVATION = 'gelu'
# The decoder's block groups pretend to sit at original stride 32 of a
# stride-16 network (see module docstring).
_NOMINAL_INPUT_STRIDE = 32
_NOMINAL_OUTPUT_STRIDE = 16
_AXIAL_BEYOND_STRIDE = 16


def decoder_output_names(num_stages: int) -> Sequence[str]:
  """Output keys, coarsest first: decoder_stage1.., then decoder_output."""
  return [f'decoder_stage{i + 1}' for i in range(num_stages - 1)] + [
      'decoder_output']


class KMaXPixelDecoder(tf_keras.layers.Layer):
  """Axial + bottleneck decoder over encoder endpoints `stage1..stage5`.

  call(endpoints) returns a copy of `endpoints` with `decoder_stage1..3` and
  `decoder_output` added (so later heads can still reach encoder features).
  """

  def __init__(self,
               high_resolution_output_stride: int = 4,
               use_sync_batchnorm: bool = True,
               bn_layer: Optional[normalization.NormLayer] = None,
               name: str = 'kmax_pixel_decoder',
               stage_configs=None,
               weight_decay: float = 0.0,
               width_multiplier: float = 1.0):
    super().__init__(name=name)
    if width_multiplier <= 0:
      raise ValueError(f'{name}: width_multiplier must be positive, got '
                       f'{width_multiplier}.')
    if stage_configs is None:
      if high_resolution_output_stride not in _STAGE_CONFIGS:
        raise ValueError(
            f'{name}: high_resolution_output_stride must be one of '
            f'{sorted(_STAGE_CONFIGS)}, got {high_resolution_output_stride}.')
      stage_configs = tuple(
          (max(1, int(round(width * width_multiplier))), blocks, kind)
          for width, blocks, kind in _STAGE_CONFIGS[
              high_resolution_output_stride])
    if len(stage_configs) not in (4, 5):
      raise ValueError(f'{name}: expected 4 or 5 stages (down to stride 4 or '
                       f'2), got {len(stage_configs)}.')
    if bn_layer is None:
      bn_layer = normalization.batch_norm_factory(use_sync_batchnorm)
    self._num_stages = len(stage_configs)
    # Stage i reads the encoder endpoint at stride 32 / 2^i.
    self._endpoint_names = tuple(
        f'stage{5 - i}' for i in range(self._num_stages))

    self._backbone_norms = [
        normalization.layer_norm(f'backbone_norm_{i}')
        for i in range(self._num_stages)]
    self._stages = []
    for i, (width, blocks, block_type) in enumerate(stage_configs):
      if block_type not in ('axial', 'bottleneck'):
        raise ValueError(f"{name}: block type must be 'axial' or "
                         f"'bottleneck', got {block_type!r}.")
      self._stages.append(block_group.BlockGroup(
          filters=width,
          num_blocks=blocks,
          name=f'stage_{i}',
          resnet_stride=1,
          resnet_input_stride=_NOMINAL_INPUT_STRIDE,
          output_stride=_NOMINAL_OUTPUT_STRIDE,
          use_axial_beyond_stride=(
              _AXIAL_BEYOND_STRIDE if block_type == 'axial' else 0),
          drop_path_keep_prob=1.0,
          activation=_ACTIVATION,
          bn_layer=bn_layer,
          weight_decay=weight_decay))
    self._skip_connections = [
        resized_fuse.ResizedFuse(
            num_channels=stage_configs[i + 1][0],
            name=f'skip_connection_{i}',
            activation=_ACTIVATION,
            bn_layer=bn_layer,
            weight_decay=weight_decay)
        for i in range(self._num_stages - 1)]

  @property
  def endpoint_names(self) -> Sequence[str]:
    """Encoder endpoints consumed, coarsest first."""
    return self._endpoint_names

  def call(self, endpoints: Mapping[str, tf.Tensor],
           training=False) -> Dict[str, tf.Tensor]:
    missing = [k for k in self._endpoint_names if k not in endpoints]
    if missing:
      raise ValueError(f'{self.name}: encoder endpoints {missing} are missing; '
                       f'expected {list(self._endpoint_names)}, got '
                       f'{sorted(endpoints)}.')
    outputs = dict(endpoints)
    names = decoder_output_names(self._num_stages)

    def encoder_feature(i):
      return self._backbone_norms[i](endpoints[self._endpoint_names[i]],
                                     training=training)

    features = encoder_feature(0)
    for i, skip in enumerate(self._skip_connections):
      features = self._stages[i](features, training=training)
      outputs[names[i]] = features
      features = skip([features, encoder_feature(i + 1)], training=training)
    outputs[names[-1]] = self._stages[-1](features, training=training)
    return outputs
