"""ConvNeXt pixel encoder (Liu et al., "A ConvNet for the 2020s", CVPR 2022).

kMaX-DeepLab uses the four ImageNet ConvNeXt sizes as pixel encoders. The
network is a patchify stem (4x4 conv, stride 4, then LayerNorm) followed by
four stages of ConvNeXt blocks; between stages a LayerNorm + 2x2 stride-2 conv
halves the resolution. Each block is

  x + drop_path(layer_scale * W2(gelu(W1(LN(dwconv7x7(x))))))

with the MLP expanding the width four times.

Odd crops. The stem pads one zero row/column before and two after the image,
and each downsampling pads one after, so an input of size H gives
(H - 1) // 4 + 1 positions after the stem and ceil(h / 2) after each 2x2
downsampling: a 129 crop becomes 33, 17, 9, 5, the same grid as the ResNet
encoders. DeepLab2 does the same for kMaX ("zero padding for downstream").
The downsampling pads *before* its LayerNorm, so the padded cells reach the
conv as LN(0) = beta rather than zero; checkpoints trained this way expect it.

Endpoints returned by `ConvNeXtEncoder.call` (C = the size's widths):

  name     stride  channels  what
  stage1   4       C[0]      stem output (patchify conv + LayerNorm)
  stage2   4       C[0]      after stage 0 blocks
  stage3   8       C[1]      after stage 1 blocks
  stage4   16      C[2]      after stage 2 blocks
  stage5   32      C[3]      after stage 3 blocks
  resK     as stageK         gelu(stageK), kept for parity with DeepLab2

The kMaX pixel decoder reads stage2..stage5 and applies its own LayerNorm to
each; nothing here normalises the stage outputs a second time.

Checkpoint layout. DeepLab2's converted ImageNet weights and kMaX checkpoints
address ConvNeXt variables through Keras containers, so the structure below is
fixed by them:
  downsample_layers/<i>/layer_with_weights-<n>/...   (i = 0 is the stem)
  stages/<i>/layer_with_weights-<j>/{depthwise_conv,norm,pointwise_conv1,
                                     pointwise_conv2}/..., .../layer_scale
`layer_with_weights-<n>` is how a tf_keras Sequential names its n-th child
that owns variables (weightless layers such as zero padding are not counted
there, but do appear as `layer-<k>` in the object graph), which is why the
padding layers stay inside the Sequential containers at DeepLab2's positions.
The depthwise kernel is stored as a grouped Conv2D kernel, [7, 7, 1, C].
"""

import dataclasses
from typing import Dict, List, Tuple

import numpy as np
import tensorflow as tf
import tf_keras

from deeplab_kmax import keys
from deeplab_kmax.layers import activations
from deeplab_kmax.layers import drop_path as drop_path_lib
from deeplab_kmax.layers import normalization

NUM_STAGES = 4
MLP_EXPANSION = 4
DEPTHWISE_KERNEL_SIZE = 7
LAYER_SCALE_INIT = 1e-6
# Stem: (before, after) zero padding for the 4x4 stride-4 patchify conv, and
# for each 2x2 stride-2 downsampling conv.
STEM_PADDING = (1, 2)
DOWNSAMPLE_PADDING = (0, 1)


@dataclasses.dataclass(frozen=True)
class ConvNeXtSize:
  """Blocks per stage and channel width per stage."""
  depths: Tuple[int, int, int, int]
  widths: Tuple[int, int, int, int]


CONVNEXT_SIZES: Dict[str, ConvNeXtSize] = {
    'tiny': ConvNeXtSize(depths=(3, 3, 9, 3), widths=(96, 192, 384, 768)),
    'small': ConvNeXtSize(depths=(3, 3, 27, 3), widths=(96, 192, 384, 768)),
    'base': ConvNeXtSize(depths=(3, 3, 27, 3), widths=(128, 256, 512, 1024)),
    'large': ConvNeXtSize(depths=(3, 3, 27, 3), widths=(192, 384, 768, 1536)),
}


def _weight_init() -> tf_keras.initializers.Initializer:
  return tf_keras.initializers.TruncatedNormal(stddev=0.02)


def block_keep_probs(last_keep_prob: float, num_blocks: int) -> List[float]:
  """Drop-path keep probabilities, decaying linearly block by block.

  ConvNeXt spreads stochastic depth over all blocks of the network (not per
  stage): the first block always survives, the last keeps `last_keep_prob`.
  kMaX-DeepLab's ConvNeXt uses this rule whatever the config's
  `drop_path_schedule` says.
  """
  if not 0.0 < last_keep_prob <= 1.0:
    raise ValueError(f'drop_path_keep_prob must be in (0, 1], got '
                     f'{last_keep_prob}.')
  # float32 steps, as the reference computes them with tf.linspace.
  probs = np.linspace(1.0, last_keep_prob, num_blocks, dtype=np.float32)
  return [float(p) for p in probs]


class ChannelwiseConv2D(tf_keras.layers.Layer):
  """Per-channel ('depthwise') KxK convolution with bias, 'same' padding.

  Variables follow a Keras grouped Conv2D with groups == channels (kernel
  [K, K, 1, C]), which is how ConvNeXt checkpoints store them; the product is
  computed with a depthwise convolution, the same arithmetic without the XLA
  detour Keras takes for grouped convolutions on CPU.
  """

  def __init__(self, kernel_size: int, name=None, **kwargs):
    super().__init__(name=name, **kwargs)
    self._kernel_size = kernel_size

  def build(self, input_shape):
    channels = tf.TensorShape(input_shape)[-1]
    if channels is None:
      raise ValueError(f'{self.name}: the channel dimension must be known, got '
                       f'input shape {input_shape}.')
    k = self._kernel_size
    self.kernel = self.add_weight(
        name='kernel', shape=(k, k, 1, channels), initializer=_weight_init())
    self.bias = self.add_weight(
        name='bias', shape=(channels,), initializer='zeros')
    super().build(input_shape)

  def call(self, x: tf.Tensor) -> tf.Tensor:
    k = self._kernel_size
    per_channel = tf.reshape(self.kernel, [k, k, -1, 1])  # [K, K, C, 1]
    y = tf.nn.depthwise_conv2d(x, per_channel, strides=[1, 1, 1, 1],
                               padding='SAME')
    return tf.nn.bias_add(y, self.bias)

  def get_config(self):
    return {**super().get_config(), 'kernel_size': self._kernel_size}


class ConvNeXtBlock(tf_keras.layers.Layer):
  """Inverted-bottleneck residual block with a large depthwise kernel.

  Spatial mixing (7x7 per channel) and channel mixing (a 4x MLP) are separated,
  with a single LayerNorm and a single GELU, as in a transformer block. The
  branch is scaled by a learned per-channel `layer_scale` that starts near zero
  so that deep networks begin close to the identity.
  """

  def __init__(self,
               width: int,
               drop_path_keep_prob: float = 1.0,
               layer_scale_init: float = LAYER_SCALE_INIT,
               name=None,
               **kwargs):
    super().__init__(name=name, **kwargs)
    if layer_scale_init <= 0:
      raise ValueError('layer_scale_init must be positive: DeepLab2 ConvNeXt '
                       f'checkpoints always hold a layer scale, got '
                       f'{layer_scale_init}.')
    self._width = width
    self._keep_prob = drop_path_keep_prob
    self._layer_scale_init = layer_scale_init
    # Attribute names are checkpoint keys.
    self.depthwise_conv = ChannelwiseConv2D(DEPTHWISE_KERNEL_SIZE,
                                            name='depthwise_conv')
    self.norm = normalization.layer_norm('norm')
    self.pointwise_conv1 = tf_keras.layers.Dense(
        MLP_EXPANSION * width, kernel_initializer=_weight_init(),
        name='pointwise_conv1')
    self.pointwise_conv2 = tf_keras.layers.Dense(
        width, kernel_initializer=_weight_init(), name='pointwise_conv2')
    self._gelu = activations.get_activation('gelu')
    self.drop_path = drop_path_lib.DropPath(drop_path_keep_prob,
                                            name='drop_path')

  def build(self, input_shape):
    channels = tf.TensorShape(input_shape)[-1]
    if channels is not None and channels != self._width:
      raise ValueError(f'{self.name}: expected {self._width} input channels, '
                       f'got input shape {input_shape}.')
    self.layer_scale = self.add_weight(
        name='layer_scale', shape=(1, 1, 1, self._width),
        initializer=tf_keras.initializers.Constant(self._layer_scale_init))
    # DeepLab2's object graph also reaches this variable through a `gamma`
    # edge; keeping the alias makes both object graphs identical.
    self.gamma = self.layer_scale
    super().build(input_shape)

  def call(self, x: tf.Tensor, training=None) -> tf.Tensor:
    branch = self.depthwise_conv(x)          # [B, H, W, C]
    branch = self.norm(branch)
    branch = self.pointwise_conv1(branch)    # [B, H, W, 4C]
    branch = self._gelu(branch)
    branch = self.pointwise_conv2(branch)    # [B, H, W, C]
    branch = self.layer_scale * branch
    return x + self.drop_path(branch, training=training)

  def get_config(self):
    return {
        **super().get_config(),
        'width': self._width,
        'drop_path_keep_prob': self._keep_prob,
        'layer_scale_init': self._layer_scale_init,
    }


def _stem(width: int) -> tf_keras.Sequential:
  """Pads (1 before, 2 after), embeds 4x4 patches to `width` channels, LN."""
  return tf_keras.Sequential([
      tf_keras.layers.ZeroPadding2D((STEM_PADDING, STEM_PADDING)),
      tf_keras.layers.Conv2D(width, 4, strides=4,
                             kernel_initializer=_weight_init()),
      normalization.layer_norm('stem_norm'),
  ], name='stem')


def _downsampling(index: int, width: int) -> tf_keras.Sequential:
  """Pads one cell after, LN, then a 2x2 stride-2 conv (halve and widen)."""
  return tf_keras.Sequential([
      tf_keras.layers.ZeroPadding2D((DOWNSAMPLE_PADDING, DOWNSAMPLE_PADDING)),
      normalization.layer_norm(f'downsample{index}_norm'),
      tf_keras.layers.Conv2D(width, 2, strides=2,
                             kernel_initializer=_weight_init()),
  ], name=f'downsample{index}')


class ConvNeXtEncoder(tf_keras.Model):
  """ConvNeXt backbone returning multi-scale endpoints for kMaX-DeepLab.

  Input: images already normalised to [-1, 1] (the kMaX model divides by 127.5
  and subtracts 1 before every encoder; ConvNeXt adds no ImageNet mean/std
  step). Any batch/height/width works, including odd sizes and unknown shapes
  inside tf.function. See the module docstring for the endpoints.
  """

  def __init__(self,
               size: ConvNeXtSize,
               drop_path_keep_prob: float = 1.0,
               layer_scale_init: float = LAYER_SCALE_INIT,
               name='convnext'):
    super().__init__(name=name)
    self._size = size
    self._last_keep_prob = drop_path_keep_prob
    self._layer_scale_init = layer_scale_init
    keep_probs = block_keep_probs(drop_path_keep_prob, sum(size.depths))

    # Attribute names and container types are checkpoint keys.
    self.downsample_layers = [_stem(size.widths[0])] + [
        _downsampling(i, size.widths[i]) for i in range(1, NUM_STAGES)]
    self.stages = []
    first_block = 0
    for i, (depth, width) in enumerate(zip(size.depths, size.widths)):
      blocks = [
          ConvNeXtBlock(width,
                        drop_path_keep_prob=keep_probs[first_block + j],
                        layer_scale_init=layer_scale_init,
                        name=f'block{i}_{j}')
          for j in range(depth)
      ]
      self.stages.append(tf_keras.Sequential(blocks, name=f'stage{i}'))
      first_block += depth
    self._gelu = activations.get_activation('gelu')

  @property
  def size(self) -> ConvNeXtSize:
    return self._size

  def get_config(self):
    return {
        'name': self.name,
        'depths': list(self._size.depths),
        'widths': list(self._size.widths),
        'drop_path_keep_prob': self._last_keep_prob,
        'layer_scale_init': self._layer_scale_init,
    }

  @classmethod
  def from_config(cls, config):
    config = dict(config)
    size = ConvNeXtSize(depths=tuple(config.pop('depths')),
                        widths=tuple(config.pop('widths')))
    return cls(size, **config)

  @property
  def endpoint_channels(self) -> Dict[str, int]:
    """Channels of each `stageK`/`resK` endpoint."""
    widths = self._size.widths
    stage_widths = (widths[0],) + tuple(widths)  # Stages 1..5.
    channels = {keys.encoder_stage(k + 1): w
                for k, w in enumerate(stage_widths)}
    channels.update({keys.encoder_activation(k + 1): w
                     for k, w in enumerate(stage_widths)})
    return channels

  def call(self, images: tf.Tensor, training=None) -> Dict[str, tf.Tensor]:
    if images.shape.rank != 4:
      raise ValueError(f'{self.name}: expected [batch, height, width, '
                       f'channels] images, got shape {images.shape}.')
    endpoints = {}
    x = images
    for i in range(NUM_STAGES):
      x = self.downsample_layers[i](x, training=training)
      if i == 0:
        endpoints[keys.encoder_stage(1)] = x    # [B, H/4, W/4, C0]
      x = self.stages[i](x, training=training)  # [B, H/2^(i+2), ., Ci]
      endpoints[keys.encoder_stage(i + 2)] = x
    for k in range(1, NUM_STAGES + 2):
      endpoints[keys.encoder_activation(k)] = self._gelu(
          endpoints[keys.encoder_stage(k)])
    return endpoints


def build_convnext(size: str,
                   *,
                   drop_path_keep_prob: float = 1.0,
                   layer_scale_init: float = LAYER_SCALE_INIT,
                   input_channels: int = 3,
                   name=None) -> ConvNeXtEncoder:
  """A built ConvNeXt encoder of `size` ('tiny', 'small', 'base', 'large').

  `drop_path_keep_prob` is the keep probability of the last block; earlier
  blocks keep more (see `block_keep_probs`). Variables exist on return, so a
  checkpoint can be restored before the first call. Calling the encoder on
  [B, H, W, 3] images in [-1, 1] returns stage1..stage5 (strides 4, 4, 8, 16,
  32) and res1..res5 = gelu(stage1..stage5).
  """
  key = str(size).lower()
  if key not in CONVNEXT_SIZES:
    raise ValueError(f'ConvNeXt size must be one of {sorted(CONVNEXT_SIZES)}, '
                     f'got {size!r}.')
  encoder = ConvNeXtEncoder(
      CONVNEXT_SIZES[key], drop_path_keep_prob, layer_scale_init,
      name=name or f'convnext_{key}')
  encoder.build((None, None, None, input_channels))
  return encoder
