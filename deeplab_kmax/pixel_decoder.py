"""kMaX-DeepLab's pixel decoder.

The decoder walks up the encoder's feature pyramid from stride 32: a stage of
residual blocks refines the current map, then a skip connection upsamples it
to the next encoder resolution and adds that (layer-normalised) encoder
feature. The two coarsest stages use axial-attention blocks (in effect a
transformer encoder over pixels), the finer ones ResNet bottlenecks; `STAGES`
lists them.

Outputs `decoder_stage1..3` (strides 32, 16, 8) feed the kMaX transformer
decoder's k-means cross-attention blocks; `decoder_output` (stride 4, or 2
for Cityscapes) is the per-pixel embedding source.

Channel counts of the encoder features and spatial sizes are taken from the
inputs on the first call, so any encoder with `stage1..stage5` endpoints can
be plugged in.

Checkpoint paths: `_backbone_norms/<i>`, `_stages/<i>/_block<j>/...` and
`_skip_connections/<i>/_resized_conv_bn{1,2}/...`, with i counted from the
stride-32 end.
"""

import dataclasses
import functools
from typing import Dict, Mapping, Optional, Sequence

import tensorflow as tf
import tf_keras

from deeplab_kmax import keys
from deeplab_kmax.layers import block_group
from deeplab_kmax.layers import normalization
from deeplab_kmax.layers import resized_fuse

AXIAL = 'axial'
BOTTLENECK = 'bottleneck'


@dataclasses.dataclass(frozen=True)
class DecoderStage:
  """One stage: `num_blocks` blocks at the resolution of encoder `stage{k}`."""
  name: str  # layer name, `stage_<i>`
  stride: int  # output stride of the stage's input and output
  encoder_stage: int  # k of the encoder endpoint `stage{k}` at that stride
  width: int  # bottleneck width at width_multiplier 1; blocks output 4x
  num_blocks: int
  block_type: str  # AXIAL or BOTTLENECK


# Coarsest first. Stride-4 outputs use the first four stages, stride-2
# outputs (Cityscapes) all five.
STAGES = (
    DecoderStage('stage_0', 32, 5, 512, 1, AXIAL),
    DecoderStage('stage_1', 16, 4, 256, 5, AXIAL),
    DecoderStage('stage_2', 8, 3, 128, 1, BOTTLENECK),
    DecoderStage('stage_3', 4, 2, 64, 1, BOTTLENECK),
    DecoderStage('stage_4', 2, 1, 32, 1, BOTTLENECK),
)
HIGH_RESOLUTION_OUTPUT_STRIDES = (4, 2)
_ACTIVATION = 'gelu'
# DeepLab2 builds these stages as ResNet stages at original stride 32 of an
# output-stride-16 network, which dilates every bottleneck's 3x3 convolution
# by 2 at whatever resolution the stage runs; trained weights expect it.
BOTTLENECK_ATROUS_RATE = 2
_BLOCK_BUILDERS = {
    AXIAL: block_group.axial_block,
    BOTTLENECK: functools.partial(block_group.bottleneck_block,
                                  atrous_rate=BOTTLENECK_ATROUS_RATE),
}


def decoder_output_names(num_stages: int) -> Sequence[str]:
  """Output keys, coarsest first: decoder_stage1.., then decoder_output."""
  return [keys.decoder_stage(i + 1) for i in range(num_stages - 1)] + [
      keys.DECODER_OUTPUT]


class KMaXPixelDecoder(tf_keras.layers.Layer):
  """Axial + bottleneck decoder over encoder endpoints `stage1..stage5`.

  call(endpoints) returns a copy of `endpoints` with `decoder_stage1..3` and
  `decoder_output` added (so later heads can still reach encoder features).
  """

  def __init__(self,
               high_resolution_output_stride: int = 4,
               bn_layer: Optional[normalization.NormLayer] = None,
               name: str = 'kmax_pixel_decoder',
               width_multiplier: float = 1.0):
    """Builds the stages down to `high_resolution_output_stride` (4 or 2).

    `bn_layer` builds every batch norm (default: synchronised, DeepLab2's
    momentum and epsilon); `width_multiplier` scales the stage widths.
    """
    super().__init__(name=name)
    if width_multiplier <= 0:
      raise ValueError(f'{name}: width_multiplier must be positive, got '
                       f'{width_multiplier}.')
    if high_resolution_output_stride not in HIGH_RESOLUTION_OUTPUT_STRIDES:
      raise ValueError(
          f'{name}: high_resolution_output_stride must be one of '
          f'{sorted(HIGH_RESOLUTION_OUTPUT_STRIDES)}, got '
          f'{high_resolution_output_stride}.')
    bn_layer = bn_layer or normalization.batch_norm_factory()
    stages = [stage for stage in STAGES
              if stage.stride >= high_resolution_output_stride]
    widths = [max(1, int(round(stage.width * width_multiplier)))
              for stage in stages]
    self._num_stages = len(stages)
    self._endpoint_names = tuple(keys.encoder_stage(stage.encoder_stage)
                                 for stage in stages)

    self._backbone_norms = [
        normalization.layer_norm(f'backbone_norm_{i}')
        for i in range(self._num_stages)]
    self._stages = []
    for stage, width in zip(stages, widths):
      build_block = _BLOCK_BUILDERS[stage.block_type]
      self._stages.append(block_group.BlockSequence(
          [build_block(width, f'block{j + 1}', activation=_ACTIVATION,
                       bn_layer=bn_layer)
           for j in range(stage.num_blocks)],
          name=stage.name))
    # Skip connection i brings stage i's output to stage i + 1's width.
    self._skip_connections = [
        resized_fuse.ResizedFuse(
            num_channels=widths[i + 1],
            name=f'skip_connection_{i}',
            activation=_ACTIVATION,
            bn_layer=bn_layer)
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
