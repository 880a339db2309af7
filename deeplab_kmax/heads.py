"""The MaX-DeepLab prediction head used by kMaX-DeepLab.

A mask transformer predicts a panoptic segmentation as N (mask, class) pairs:

* the pixel space head turns the high-resolution pixel feature into an
  L2-normalised embedding per pixel;
* each cluster centre is projected to a mask kernel (`transformer_mask_head`)
  and class logits (`transformer_class_head`, with a void class last);
* mask logits are the dot products between pixel embeddings and mask kernels,
  followed by a batch norm whose single gamma/beta are shared by all slots.

An optional auxiliary semantic branch (ASPP + low-level fusion decoder, then a
semantic head) adds a per-pixel semantic loss during training.

The same head, without the semantic branch, is the "auxiliary clustering
predictor" inside every kMaX transformer block: its mask logits decide the
k-means assignment and are deep-supervised.

Checkpoint compatibility fixes the private attribute names below, and the
top-level items of `MaXDeepLabHead.checkpoint_items`.

With `fold_batch_norm` on (`layers/bn_folding.py`), inference folds the
pixel feature batch norm into the pixel space head's last conv, and the
mask-logit batch norm's scale into the mask kernels.
"""

import math
from typing import Dict, Mapping, Optional, Sequence, Tuple

import tensorflow as tf
import tf_keras

from deeplab_kmax import keys
from deeplab_kmax.layers import aspp as aspp_lib
from deeplab_kmax.layers import bn_folding
from deeplab_kmax.layers import convolutions
from deeplab_kmax.layers import normalization
from deeplab_kmax.ops import resize

DEFAULT_LOW_LEVEL = ((keys.encoder_activation(3), 64),
                     (keys.encoder_activation(2), 32))


def void_logit_bias(num_classes: int, void_prior_prob: float = 0.9) -> float:
  """Constant added to the void logit so that void starts at `prior` prob.

  With all other logits equal, softmax gives void the probability
  b / (b + C - 1) for b = exp(bias); solving for `void_prior_prob` gives
  bias = log((C - 1) * p / (1 - p)), e.g. log(133 * 9) for COCO.
  """
  return math.log((num_classes - 1) * void_prior_prob / (1 - void_prior_prob))


def add_void_bias(class_logits: tf.Tensor,
                  void_prior_prob: float = 0.9) -> tf.Tensor:
  """Adds `void_logit_bias` to the last (void) channel of [B, N, C] logits."""
  if class_logits.shape.rank != 3 or class_logits.shape[-1] is None:
    raise ValueError('transformer class logits must be [batch, slots, '
                     f'classes] with known classes, got {class_logits.shape}.')
  num_classes = class_logits.shape[-1]
  bias = [0.0] * num_classes
  bias[-1] = void_logit_bias(num_classes, void_prior_prob)
  return class_logits + tf.constant(bias, dtype=class_logits.dtype)


def _features_of(features: Mapping[str, tf.Tensor], key: str,
                 owner: str) -> tf.Tensor:
  if key not in features:
    raise KeyError(f'{owner} needs the feature {key!r}; got keys '
                   f'{sorted(features)}.')
  return features[key]


class PredictionHead(tf_keras.layers.Layer):
  """5x5 (separable) conv + BN + act, then a 1x1 conv with bias.

  Attribute names `conv_block` and `final_conv` are checkpoint names; the
  semantic head's two parts are separate checkpoint items
  (`semantic_head_without_last_layer`, `semantic_last_layer`).
  """

  def __init__(self,
               intermediate_channels: int,
               output_channels: int,
               name: str,
               conv_type: str = 'depthwise_separable_conv',
               bn_layer: normalization.NormLayer = (
                   tf_keras.layers.BatchNormalization),
               activation: str = 'gelu'):
    super().__init__(name=name)
    self.conv_block = convolutions.StackedConv2DSame(  # 5x5, BN, act
        num_layers=1, conv_type=conv_type,
        output_channels=intermediate_channels, kernel_size=5,
        name='conv_block', use_bias=False, use_bn=True, bn_layer=bn_layer,
        activation=activation)
    self.final_conv = tf_keras.layers.Conv2D(
        output_channels, 1, name='final_conv',
        kernel_initializer=tf_keras.initializers.TruncatedNormal(stddev=0.01))

  def call(self, x: tf.Tensor, training=False) -> tf.Tensor:
    return self.final_conv(self.conv_block(x, training=training))


class SemanticDecoder(tf_keras.layers.Layer):
  """ASPP on the stride-32 feature, then upsample-and-fuse low-level features.

  Low-level features are fused from the coarsest to the finest (e.g. res3 at
  stride 8, then res2 at stride 4): each is projected by a 1x1 conv, the
  running feature is resized (align corners) to its size, concatenated and
  mixed by a 5x5 (separable) conv.
  """

  def __init__(self,
               high_level_feature_key: str = keys.FEATURE_SEMANTIC,
               low_level: Sequence[Tuple[str, int]] = DEFAULT_LOW_LEVEL,
               aspp_channels: int = 256,
               decoder_channels: int = 256,
               atrous_rates: Sequence[int] = (6, 12, 18),
               name: str = 'semantic_decoder',
               conv_type: str = 'depthwise_separable_conv',
               bn_layer: normalization.NormLayer = (
                   tf_keras.layers.BatchNormalization),
               activation: str = 'gelu'):
    super().__init__(name=name)
    self._high_level_feature_key = high_level_feature_key
    self._low_level_keys = [key for key, _ in low_level]
    self._aspp = aspp_lib.ASPP(aspp_channels, atrous_rates, name='aspp',
                               activation=activation, bn_layer=bn_layer)
    for index, (_, project_channels) in enumerate(low_level):
      # Checkpoint names: _low_level_conv{i}, _fusion_conv{i} (1-based).
      suffix = index + 1
      project = convolutions.Conv2DSame(
          project_channels, 1, name=f'low_level_conv{suffix}',
          use_bias=False, use_bn=True, activation=activation,
          bn_layer=bn_layer)
      fuse = convolutions.StackedConv2DSame(
          num_layers=1, conv_type=conv_type, output_channels=decoder_channels,
          kernel_size=5, name=f'fusion_conv{suffix}', use_bias=False,
          use_bn=True, activation=activation, bn_layer=bn_layer)
      setattr(self, f'_low_level_conv{suffix}', project)
      setattr(self, f'_fusion_conv{suffix}', fuse)

  def set_pool_size(self, size: Optional[Tuple[int, int]]) -> None:
    """Tiled instead of global ASPP image pooling (None: global)."""
    self._aspp.set_pool_size(size)

  def _low_level_feature(self, features: Mapping[str, tf.Tensor],
                         key: str) -> tf.Tensor:
    if key in features:
      return features[key]
    # Encoders may expose only the pre-activation `stageK`; DeepLab2's
    # `resK` is relu(stageK).
    if key.startswith('res') and f'stage{key[3:]}' in features:
      return tf.nn.relu(features[f'stage{key[3:]}'])
    return _features_of(features, key, self.name)

  def call(self, features: Mapping[str, tf.Tensor], training=False):
    x = _features_of(features, self._high_level_feature_key, self.name)
    x = self._aspp(x, training=training)
    for index, key in enumerate(self._low_level_keys):
      low = getattr(self, f'_low_level_conv{index + 1}')(
          self._low_level_feature(features, key), training=training)
      x = resize.bilinear(x, tf.shape(low)[1:3])
      x = tf.concat([x, low], axis=3)
      x = getattr(self, f'_fusion_conv{index + 1}')(x, training=training)
    return x


class MaXDeepLabHead(bn_folding.FoldsBatchNorm, tf_keras.layers.Layer):
  """Mask-transformer outputs (+ optional semantic logits) from features.

  Inputs (a dict): `feature_panoptic` [B, H, W, C] pixel feature,
  `transformer_class_feature` and `transformer_mask_feature` [B, N, D];
  with the semantic branch also `feature_semantic` and the low-level keys
  (`res3`, `res2`; `stage3`/`stage2` are accepted and relu'd).
  Outputs: `pixel_space_normalized_feature` [B, H, W, E],
  `pixel_space_mask_logits` [B, H, W, N], `transformer_class_logits`
  [B, N, num_classes] (void last, void bias included) and, with the semantic
  head, `semantic_logits`. `auxiliary_outputs_pred` is passed through.
  """

  def __init__(self,
               num_classes: int = 134,
               semantic_num_classes: Optional[int] = 134,
               use_semantic_decoder: bool = True,
               pixel_space_head_channels: int = 256,
               mask_embedding_channels: int = 128,
               semantic_head_channels: int = 256,
               aspp_channels: int = 256,
               decoder_channels: int = 256,
               atrous_rates: Sequence[int] = (6, 12, 18),
               low_level: Sequence[Tuple[str, int]] = DEFAULT_LOW_LEVEL,
               high_level_feature_key: str = keys.FEATURE_SEMANTIC,
               head_conv_type: str = 'depthwise_separable_conv',
               decoder_conv_type: str = 'depthwise_separable_conv',
               activation: str = 'gelu',
               bn_layer: Optional[normalization.NormLayer] = None,
               void_prior_prob: float = 0.9,
               name: str = 'max_deeplab_head'):
    """Builds the head.

    Args:
      num_classes: outputs of the class head, void included (134 on COCO,
        20 on Cityscapes): `LabelSpace.class_head_outputs`.
      semantic_num_classes: outputs of the auxiliary semantic head, or None
        to build no semantic branch (the per-block auxiliary predictors).
      use_semantic_decoder: whether the semantic head sits on an ASPP +
        low-level fusion decoder (COCO/ADE20K) or directly on
        `feature_semantic` (Cityscapes).
      pixel_space_head_channels: width of the pixel space head's 5x5 conv.
      mask_embedding_channels: pixel/mask embedding size (128).
      semantic_head_channels: width of the semantic head's 5x5 conv.
      aspp_channels: ASPP width.
      decoder_channels: width of the fusion convs.
      atrous_rates: ASPP dilation rates.
      low_level: (feature key, projection channels), coarsest first.
      high_level_feature_key: the semantic decoder's ASPP input.
      head_conv_type: 'depthwise_separable_conv' or 'standard_conv'.
      decoder_conv_type: conv type of the fusion convs.
      activation: activation of every conv block (kMaX uses gelu).
      bn_layer: builds every batch norm (default: synchronised, DeepLab2's
        momentum and epsilon).
      void_prior_prob: initial void probability defining the void bias.
      name: layer name.
    """
    super().__init__(name=name)
    bn_layer = bn_layer or normalization.batch_norm_factory()
    self._num_classes = num_classes
    self._void_prior_prob = void_prior_prob
    self._use_semantic_head = semantic_num_classes is not None
    self._use_semantic_decoder = self._use_semantic_head and (
        use_semantic_decoder)

    if self._use_semantic_decoder:
      self._auxiliary_semantic_decoder = SemanticDecoder(
          high_level_feature_key=high_level_feature_key, low_level=low_level,
          aspp_channels=aspp_channels, decoder_channels=decoder_channels,
          atrous_rates=atrous_rates, name='auxiliary_semantic_decoder',
          conv_type=decoder_conv_type, bn_layer=bn_layer,
          activation=activation)
    if self._use_semantic_head:
      self._auxiliary_semantic_head = PredictionHead(
          semantic_head_channels, semantic_num_classes,
          name='auxiliary_semantic_head', conv_type=head_conv_type,
          activation=activation, bn_layer=bn_layer)

    self._pixel_space_head = PredictionHead(
        pixel_space_head_channels, mask_embedding_channels,
        name='pixel_space_head', conv_type=head_conv_type,
        activation=activation, bn_layer=bn_layer)
    # BN on the kernels (and on features and logits below) replaces a careful
    # initialisation of this second-order (dot-product) mask prediction.
    self._transformer_mask_head = convolutions.Conv1D(  # -> mask kernels
        mask_embedding_channels, name='transformer_mask_head',
        use_bias=False, use_bn=True, bn_layer=bn_layer, activation=None)
    self._transformer_class_head = convolutions.Conv1D(  # -> class logits
        num_classes, name='transformer_class_head', use_bias=True,
        use_bn=False, activation=None,
        kernel_init=tf_keras.initializers.TruncatedNormal(stddev=0.01))
    self._pixel_space_feature_batch_norm = bn_layer(
        name='pixel_space_feature_batch_norm', axis=-1,
        gamma_initializer=tf_keras.initializers.Constant(1.0))
    # A small initial gamma gives soft (low-temperature) initial masks.
    # float32 under mixed precision too: these logits drive the k-means
    # argmax, the matching and the losses.
    self._pixel_space_mask_batch_norm = bn_layer(
        name='pixel_space_mask_batch_norm', axis=-1,
        gamma_initializer=tf_keras.initializers.Constant(0.1),
        dtype='float32')

  @property
  def checkpoint_items(self) -> Dict[str, tf.Module]:
    """Top-level checkpoint items of DeepLab2's MaX-DeepLab predictor."""
    items = {
        'pixel_space_head': self._pixel_space_head,
        'transformer_mask_head': self._transformer_mask_head,
        'transformer_class_head': self._transformer_class_head,
        'pixel_space_feature_batch_norm': self._pixel_space_feature_batch_norm,
        'pixel_space_mask_batch_norm': self._pixel_space_mask_batch_norm,
    }
    if self._use_semantic_decoder:
      items['semantic_decoder'] = self._auxiliary_semantic_decoder
    if self._use_semantic_head:
      items['semantic_head_without_last_layer'] = (
          self._auxiliary_semantic_head.conv_block)
      items['semantic_last_layer'] = self._auxiliary_semantic_head.final_conv
    return items

  @property
  def semantic_decoder(self) -> Optional[SemanticDecoder]:
    return self._auxiliary_semantic_decoder if (
        self._use_semantic_decoder) else None

  def semantic_logits(self, features: Mapping[str, tf.Tensor],
                      training=False) -> tf.Tensor:
    """Auxiliary semantic logits (at the semantic decoder's stride)."""
    if not self._use_semantic_head:
      raise ValueError(f'{self.name} was built without a semantic head.')
    if self._use_semantic_decoder:
      x = self._auxiliary_semantic_decoder(features, training=training)
    else:
      x = _features_of(features, keys.FEATURE_SEMANTIC, self.name)
    return self._auxiliary_semantic_head(x, training=training)

  def pixel_space_normalized_feature(self, pixel_feature: tf.Tensor,
                                     training=False) -> tf.Tensor:
    """Unit-norm pixel embeddings [B, H, W, E]."""
    if self.folds_batch_norm(training):
      head = self._pixel_space_head
      x = head.conv_block(pixel_feature, training=training)
      x = bn_folding.convolve_folded(
          head.final_conv, self._pixel_space_feature_batch_norm, x,
          activation_follows=False)
      return tf.math.l2_normalize(x, axis=-1)
    x = self._pixel_space_head(pixel_feature, training=training)
    x = self._pixel_space_feature_batch_norm(x, training=training)
    return tf.math.l2_normalize(x, axis=-1)

  def transformer_class_logits(self, class_feature: tf.Tensor,
                               training=False) -> tf.Tensor:
    logits = self._transformer_class_head(class_feature, training=training)
    return add_void_bias(logits, self._void_prior_prob)

  def pixel_space_mask_logits(self, normalized_feature: tf.Tensor,
                              mask_feature: tf.Tensor,
                              training=False) -> tf.Tensor:
    """Pixel-to-slot affinities [B, H, W, N]."""
    kernels = tf.cast(self._transformer_mask_head(mask_feature,
                                                  training=training),
                      tf.float32)  # [B, N, E], float32 when mixed
    feature = tf.cast(normalized_feature, tf.float32)  # [B, H, W, E]
    if self.folds_batch_norm(training):
      # One scalar s, b: einsum(f, k) * s + b = einsum(f, k * s) + b.
      scale, offset = bn_folding.affine(self._pixel_space_mask_batch_norm)
      return tf.einsum('bhwe,bne->bhwn', feature, kernels * scale) + offset
    logits = tf.einsum('bhwe,bne->bhwn', feature, kernels)  # [B, H, W, N]
    # One BN over a trailing singleton axis: gamma/beta shared by all slots.
    logits = self._pixel_space_mask_batch_norm(logits[..., None],
                                               training=training)
    return tf.squeeze(logits, axis=-1)

  def call(self, features: Mapping[str, tf.Tensor],
           training=False) -> Dict[str, tf.Tensor]:
    outputs = {}
    if self._use_semantic_head:
      outputs[keys.SEMANTIC_LOGITS] = self.semantic_logits(features, training)
    normalized = self.pixel_space_normalized_feature(
        _features_of(features, keys.FEATURE_PANOPTIC, self.name), training)
    outputs[keys.PIXEL_SPACE_NORMALIZED_FEATURE] = normalized
    outputs[keys.TRANSFORMER_CLASS_LOGITS] = self.transformer_class_logits(
        _features_of(features, keys.TRANSFORMER_CLASS_FEATURE, self.name),
        training)
    outputs[keys.PIXEL_SPACE_MASK_LOGITS] = self.pixel_space_mask_logits(
        normalized,
        _features_of(features, keys.TRANSFORMER_MASK_FEATURE, self.name),
        training)
    if keys.AUXILIARY_OUTPUTS in features:
      outputs[keys.AUXILIARY_OUTPUTS] = features[keys.AUXILIARY_OUTPUTS]
    return outputs
