"""The kMaX transformer block: k-means cross-attention of centres to pixels.

Object queries are treated as cluster centres. Each block runs one k-means
iteration followed by a standard transformer update of the centres:

1. Assignment: an auxiliary MaX-DeepLab predictor scores every pixel against
   every centre; each pixel is hard-assigned to its best centre (argmax over
   the *cluster* axis, instead of a softmax over pixels as in ordinary
   cross-attention).
2. Update: the centres gather the sum of the values of their pixels
   (one-hot assignment^T @ pixel values), which is batch-normalised,
   projected and added residually.
3. Self-attention among the centres, then a feed-forward network, each
   residual with drop-path.

The hard assignment carries no gradient. Gradients reach this block through
the pixel values of the update step (pixel and value projections) and
through the self-attention and FFN; the auxiliary predictor learns only from
the deep-supervision losses on its own outputs.

Checkpoint compatibility (DeepLab2 `DualPathTransformerLayer` with only
k-means cross-attention and memory self-attention) fixes the private
attribute names, e.g. `_memory_conv1_bn_act`, `_pixel_v_conv_bn`,
`_kmeans_memory_conv3_bn`, `_auxiliary_clustering_predictor`; the decoder
stores each layer as `_block1_transformer` of a `KMaXDecoderBlock`.
"""

from typing import Callable, Dict, Tuple

import tensorflow as tf
import tf_keras

from deeplab_kmax.layers import activations
from deeplab_kmax.layers import attention
from deeplab_kmax.layers import convolutions
from deeplab_kmax.layers import drop_path
from deeplab_kmax.layers import normalization

# Output key of the auxiliary predictor that drives the assignment.
MASK_LOGITS_KEY = 'pixel_space_mask_logits'

AuxiliaryPredictorFn = Callable[[], tf_keras.layers.Layer]


def kmeans_assignment(mask_logits: tf.Tensor) -> tf.Tensor:
  """One-hot hard assignment of each pixel to its highest-scoring centre.

  Args:
    mask_logits: [B, H, W, N] pixel-to-centre affinities.

  Returns:
    [B, H, W, N] float one-hot over N (the cluster axis), without gradient.
  """
  num_clusters = mask_logits.shape[-1]
  if num_clusters is None:
    raise ValueError('The number of cluster centres (last axis of the mask '
                     'logits) must be known statically.')
  best = tf.argmax(mask_logits, axis=-1)  # [B, H, W]
  return tf.stop_gradient(tf.one_hot(best, num_clusters, dtype=tf.float32))


class KMaXTransformerLayer(tf_keras.layers.Layer):
  """One k-means cross-attention + self-attention + FFN update of centres."""

  def __init__(self,
               auxiliary_predictor_fn: AuxiliaryPredictorFn,
               name: str = 'block1_transformer',
               memory_channels: int = 256,
               bottleneck_channels: int = 256,
               key_channels: int = 128,
               value_channels: int = 256,
               num_heads: int = 8,
               feed_forward_channels: int = 2048,
               activation: str = 'gelu',
               attention_activation: str = 'softmax',
               drop_path_keep_prob: float = 1.0,
               bn_layer: normalization.NormLayer = (
                   tf_keras.layers.BatchNormalization)):
    """Builds the layer.

    Args:
      auxiliary_predictor_fn: builds the auxiliary predictor, a layer mapping
        {'feature_panoptic': [B, H, W, bottleneck],
         'transformer_class_feature'/'transformer_mask_feature': [B, N,
         bottleneck]} to a dict with `pixel_space_mask_logits` [B, H, W, N].
      name: layer name.
      memory_channels: channels of the cluster centres (256 in kMaX).
      bottleneck_channels: width of the pixel/centre down-projections.
      key_channels: total query/key depth of the centre self-attention.
      value_channels: total value depth (self-attention and k-means update).
      num_heads: self-attention heads.
      feed_forward_channels: hidden width of the centres' FFN (0: no FFN).
      activation: activation used throughout (kMaX uses gelu).
      attention_activation: attention normaliser of the self-attention.
      drop_path_keep_prob: keep probability of the three residual branches
        (k-means update, self-attention, FFN) in training.
      bn_layer: batch norm constructor.
    """
    super().__init__(name=name)
    if key_channels % num_heads or value_channels % num_heads:
      raise ValueError(f'key_channels ({key_channels}) and value_channels '
                       f'({value_channels}) must be divisible by num_heads '
                       f'({num_heads}).')
    self._memory_channels = memory_channels
    self._bottleneck = bottleneck_channels
    self._key_channels = key_channels
    self._value_channels = value_channels
    self._num_heads = num_heads
    self._feed_forward_channels = feed_forward_channels
    self._act = activations.get_activation(activation) or tf.identity

    def conv1d(channels, attr_name, act=None, gamma='ones', init='he_normal'):
      return convolutions.Conv1D(  # bias-free, BN'd pointwise projection
          channels, name=attr_name, use_bias=False, use_bn=True,
          bn_layer=bn_layer, gamma_init=gamma, activation=act,
          kernel_init=init)

    def qkv_init():
      # Transformer-style init for the q/k/v projections (one per kernel).
      return tf_keras.initializers.TruncatedNormal(
          stddev=bottleneck_channels ** -0.5)

    # Down-projections (bottleneck) of both spaces.
    self._memory_conv1_bn_act = conv1d(bottleneck_channels,
                                       'memory_conv1_bn_act', activation)
    self._pixel_conv1_bn_act = conv1d(bottleneck_channels,
                                      'pixel_conv1_bn_act', activation)
    self._memory_qkv_conv_bn = conv1d(2 * key_channels + value_channels,
                                      'memory_qkv_conv_bn', init=qkv_init())
    self._pixel_v_conv_bn = conv1d(value_channels, 'pixel_v_conv_bn',
                                   init=qkv_init())
    self._memory_attention = attention.BatchNormAttention(
        name='memory_attention', activation=activation,
        attention_activation=attention_activation, bn_layer=bn_layer)
    self._auxiliary_clustering_predictor = auxiliary_predictor_fn()

    # Residual branches end in a zero-gamma BN so each block starts as the
    # identity.
    self._kmeans_memory_batch_norm_retrieved_value = bn_layer(
        name='kmeans_memory_batch_norm_retrieved_value', axis=-1)
    self._kmeans_memory_conv3_bn = conv1d(
        memory_channels, 'kmeans_memory_conv3_bn', gamma='zeros')
    self._memory_conv3_bn = conv1d(memory_channels, 'memory_conv3_bn',
                                   gamma='zeros')
    if feed_forward_channels > 0:
      self._memory_ffn_conv1_bn_act = conv1d(
          feed_forward_channels, 'memory_ffn_conv1_bn_act', activation)
      self._memory_ffn_conv2_bn = conv1d(memory_channels,
                                         'memory_ffn_conv2_bn', gamma='zeros')

    self._kmeans_drop_path = drop_path.DropPath(drop_path_keep_prob,
                                                name='kmeans_drop_path')
    self._attention_drop_path = drop_path.DropPath(drop_path_keep_prob,
                                                   name='attention_drop_path')
    self._ffn_drop_path = drop_path.DropPath(drop_path_keep_prob,
                                             name='ffn_drop_path')

  @property
  def auxiliary_predictor(self) -> tf_keras.layers.Layer:
    return self._auxiliary_clustering_predictor

  def assign_pixels(self, pixel_feature: tf.Tensor, centers: tf.Tensor,
                    training=False) -> Tuple[Dict[str, tf.Tensor], tf.Tensor]:
    """k-means assignment step.

    Args:
      pixel_feature: [B, H, W, bottleneck] projected pixels.
      centers: [B, N, bottleneck] projected centres.
      training: training mode.

    Returns:
      The auxiliary predictions and the [B, H, W, N] one-hot assignment.
    """
    predictions = self._auxiliary_clustering_predictor(
        {
            'feature_panoptic': pixel_feature,
            'transformer_class_feature': centers,
            'transformer_mask_feature': centers,
        },
        training=training)
    return predictions, kmeans_assignment(predictions[MASK_LOGITS_KEY])

  def update_centers(self, assignment: tf.Tensor, pixel_value: tf.Tensor,
                     training=False) -> tf.Tensor:
    """k-means update step (before the residual addition).

    Args:
      assignment: [B, HW, N] one-hot assignment.
      pixel_value: [B, HW, value_channels].
      training: training mode.

    Returns:
      [B, N, memory_channels] centre update.
    """
    gathered = tf.einsum('bpn,bpc->bnc', assignment, pixel_value)  # [B,N,V]
    gathered = self._kmeans_memory_batch_norm_retrieved_value(
        gathered, training=training)
    return self._kmeans_memory_conv3_bn(gathered, training=training)

  def call(self, pixel_feature: tf.Tensor, cluster_centers: tf.Tensor,
           training=False) -> Tuple[tf.Tensor, Dict[str, tf.Tensor]]:
    """Runs one block.

    Args:
      pixel_feature: [B, H, W, C] (non-activated) pixel-decoder feature.
      cluster_centers: [B, N, memory_channels].
      training: training mode (drop-path, batch statistics).

    Returns:
      Updated [B, N, memory_channels] centres and the auxiliary predictions
      of this block (`pixel_space_mask_logits` [B, H, W, N],
      `transformer_class_logits`, `pixel_space_normalized_feature`).
    """
    if pixel_feature.shape.rank != 4 or pixel_feature.shape[-1] is None:
      raise ValueError(f'{self.name}: pixel_feature must be [B, H, W, C] '
                       f'with known C, got {pixel_feature.shape}.')
    if (cluster_centers.shape.rank != 3 or
        cluster_centers.shape[-1] != self._memory_channels or
        cluster_centers.shape[1] is None):
      raise ValueError(f'{self.name}: cluster_centers must be [B, N, '
                       f'{self._memory_channels}] with known N, got '
                       f'{cluster_centers.shape}.')
    num_centers = cluster_centers.shape[1]
    shape = tf.shape(pixel_feature)
    height, width = shape[1], shape[2]
    pixels = tf.reshape(pixel_feature,
                        [-1, height * width, pixel_feature.shape[-1]])

    # Bottleneck projections; the pixel input arrives non-activated.
    centers = self._memory_conv1_bn_act(cluster_centers, training=training)
    pixels = self._pixel_conv1_bn_act(self._act(pixels),
                                      training=training)  # [B, HW, D]
    query, key, value = tf.split(
        self._memory_qkv_conv_bn(centers, training=training),
        [self._key_channels, self._key_channels, self._value_channels],
        axis=-1)
    pixel_value = self._pixel_v_conv_bn(pixels, training=training)

    # k-means cross-attention: assign, then gather.
    pixel_map = tf.reshape(pixels,
                           [-1, height, width, self._bottleneck])
    predictions, assignment = self.assign_pixels(pixel_map, centers, training)
    assignment = tf.reshape(assignment, [-1, height * width, num_centers])
    update = self.update_centers(assignment, pixel_value, training)
    output = cluster_centers + self._kmeans_drop_path(update,
                                                      training=training)

    # Self-attention among the centres.
    heads = self._num_heads
    attended = self._memory_attention(
        (attention.split_heads(query, heads), attention.split_heads(key, heads),
         tf.reshape(value, [-1, num_centers, heads,
                            self._value_channels // heads])),
        training=training)  # [B, N, V]
    attended = self._memory_conv3_bn(attended, training=training)
    output = self._act(
        output + self._attention_drop_path(attended, training=training))

    if self._feed_forward_channels > 0:
      hidden = self._memory_ffn_conv1_bn_act(output, training=training)
      hidden = self._memory_ffn_conv2_bn(hidden, training=training)
      output = self._act(
          output + self._ffn_drop_path(hidden, training=training))
    return output, predictions


class KMaXDecoderBlock(tf_keras.layers.Layer):
  """Holder of one `KMaXTransformerLayer`, as DeepLab2's block group.

  It exists for the checkpoint path `_kmax_decoder/<i>/_block1_transformer`
  and forwards calls: `block(pixel_feature, centers, training)` returns
  `(new_centers, auxiliary_predictions)`.
  """

  def __init__(self, name: str, **layer_kwargs):
    super().__init__(name=name)
    self._block1_transformer = KMaXTransformerLayer(
        name='block1_transformer', **layer_kwargs)

  @property
  def transformer(self) -> KMaXTransformerLayer:
    return self._block1_transformer

  def call(self, pixel_feature: tf.Tensor, cluster_centers: tf.Tensor,
           training=False) -> Tuple[tf.Tensor, Dict[str, tf.Tensor]]:
    return self._block1_transformer(pixel_feature, cluster_centers,
                                    training=training)
