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

The same block runs the other rows of kMaX's pixel-cluster interaction
ablation (`pixel_cluster_interaction`, see `cluster_assignment`): a softmax
over the cluster axis instead of the argmax, or ordinary multi-head
cross-attention with a softmax over the pixels (which adds the query / key
projections `_cross_query_conv_bn`, `_pixel_key_conv_bn`). All three read
the centre update through the same batch norm and output projection, so a
kMaX checkpoint restores every shared variable. Subclasses for the CMT and
ClusterFormer decoders override `project_pixels` and `pixel_cluster_update`.
"""

import dataclasses
from typing import Callable, Dict, Optional, Tuple

import tensorflow as tf
import tf_keras

from deeplab_kmax import keys
from deeplab_kmax.layers import activations
from deeplab_kmax.layers import attention
from deeplab_kmax.layers import cluster_assignment
from deeplab_kmax.layers import convolutions
from deeplab_kmax.layers import drop_path
from deeplab_kmax.layers import normalization

AuxiliaryPredictorFn = Callable[[], tf_keras.layers.Layer]


@dataclasses.dataclass(frozen=True)
class CenterWidths:
  """Channel widths of one transformer block; checked once, here."""
  memory: int  # C of the cluster centres.
  bottleneck: int  # Pixel / centre down-projections.
  key: int  # Total query/key depth of the centre self-attention.
  value: int  # Total value depth (self-attention and k-means update).
  num_heads: int
  feed_forward: int  # Hidden width of the centres' FFN (0: no FFN).

  def __post_init__(self):
    if self.key % self.num_heads or self.value % self.num_heads:
      raise ValueError(f'key_channels ({self.key}) and value_channels '
                       f'({self.value}) must be divisible by num_heads '
                       f'({self.num_heads}).')


def kmeans_assignment(mask_logits: tf.Tensor) -> tf.Tensor:
  """One-hot hard assignment of each pixel to its highest-scoring centre.

  Args:
    mask_logits: [B, H, W, N] pixel-to-centre affinities.

  Returns:
    [B, H, W, N] float one-hot over N (the cluster axis), without gradient.
  """
  return cluster_assignment.hard_assignment(mask_logits)


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
                   tf_keras.layers.BatchNormalization),
               pixel_cluster_interaction: str = (
                   cluster_assignment.CLUSTER_ARGMAX)):
    """Builds the layer.

    Args:
      auxiliary_predictor_fn: builds the auxiliary predictor, a layer mapping
        {`feature_panoptic`: [B, H, W, bottleneck],
         `transformer_class_feature`/`transformer_mask_feature`: [B, N,
         bottleneck]} to a dict with `pixel_space_mask_logits` [B, H, W, N].
      name: layer name.
      memory_channels: channels C of the cluster centres.
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
      pixel_cluster_interaction: how the centres read the pixels, one of
        `cluster_assignment.PIXEL_CLUSTER_INTERACTIONS` (kMaX's argmax over
        the clusters by default).
    """
    super().__init__(name=name)
    self._interaction = cluster_assignment.check_choice(
        pixel_cluster_interaction,
        cluster_assignment.PIXEL_CLUSTER_INTERACTIONS,
        'pixel_cluster_interaction')
    self._widths = CenterWidths(memory_channels, bottleneck_channels,
                                key_channels, value_channels, num_heads,
                                feed_forward_channels)
    self._bn_layer = bn_layer
    self._act = activations.get_activation(activation) or tf.identity
    conv1d, qkv_init = self.conv1d, self.qkv_init

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
    if self._interaction == cluster_assignment.SPATIAL_SOFTMAX:
      self._cross_query_conv_bn, self._pixel_key_conv_bn = (
          self.cross_attention_projections())

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

  def conv1d(self, channels: int, attr_name: str, act: Optional[str] = None,
             gamma: str = 'ones', init='he_normal') -> convolutions.Conv1D:
    """A bias-free, batch-normalised pointwise projection of [B, L, C]."""
    return convolutions.Conv1D(
        channels, name=attr_name, use_bias=False, use_bn=True,
        bn_layer=self._bn_layer, gamma_init=gamma, activation=act,
        kernel_init=init)

  def qkv_init(self) -> tf_keras.initializers.Initializer:
    """Transformer-style init of a query/key/value kernel (one per kernel)."""
    return tf_keras.initializers.TruncatedNormal(
        stddev=self._widths.bottleneck ** -0.5)

  def cross_attention_projections(
      self) -> Tuple[convolutions.Conv1D, convolutions.Conv1D]:
    """Centre-query and pixel-key projections of a spatial cross-attention."""
    return (self.conv1d(self._widths.key, 'cross_query_conv_bn',
                        init=self.qkv_init()),
            self.conv1d(self._widths.key, 'pixel_key_conv_bn',
                        init=self.qkv_init()))

  @property
  def auxiliary_predictor(self) -> tf_keras.layers.Layer:
    return self._auxiliary_clustering_predictor

  @property
  def pixel_cluster_interaction(self) -> str:
    return self._interaction

  def assign_pixels(self, pixel_feature: tf.Tensor, centers: tf.Tensor,
                    training=False) -> Tuple[Dict[str, tf.Tensor], tf.Tensor]:
    """k-means assignment step.

    Args:
      pixel_feature: [B, H, W, bottleneck] projected pixels.
      centers: [B, N, bottleneck] projected centres.
      training: training mode.

    Returns:
      The auxiliary predictions and the [B, H, W, N] assignment (one-hot
      for `cluster_argmax`, softmax over N for `cluster_softmax`).
    """
    predictions = self._auxiliary_clustering_predictor(
        {
            keys.FEATURE_PANOPTIC: pixel_feature,
            keys.TRANSFORMER_CLASS_FEATURE: centers,
            keys.TRANSFORMER_MASK_FEATURE: centers,
        },
        training=training)
    return predictions, cluster_assignment.cluster_axis_assignment(
        predictions[keys.PIXEL_SPACE_MASK_LOGITS], self._interaction)

  def update_centers(self, assignment: tf.Tensor, pixel_value: tf.Tensor,
                     training=False) -> tf.Tensor:
    """k-means update step (before the residual addition).

    Args:
      assignment: [B, HW, N] assignment (weights over the cluster axis).
      pixel_value: [B, HW, value_channels].
      training: training mode.

    Returns:
      [B, N, memory_channels] centre update.
    """
    assignment = tf.cast(assignment, pixel_value.dtype)  # Mixed precision.
    gathered = tf.einsum('bpn,bpc->bnc', assignment, pixel_value)  # [B,N,V]
    gathered = self._kmeans_memory_batch_norm_retrieved_value(
        gathered, training=training)
    return self._kmeans_memory_conv3_bn(gathered, training=training)

  def project_pixels(self, pixels: tf.Tensor, height: tf.Tensor,
                     width: tf.Tensor, training=False) -> tf.Tensor:
    """Bottleneck projection [B, HW, C] -> [B, HW, D] of the (non-activated)
    pixel input; `height`/`width` let subclasses add pixel coordinates."""
    del height, width  # Used by location-sensitive subclasses.
    return self._pixel_conv1_bn_act(self._act(pixels), training=training)

  def spatial_attention_update(self, centers: tf.Tensor, pixels: tf.Tensor,
                               pixel_value: tf.Tensor,
                               norm: tf_keras.layers.Layer,
                               output_conv: tf_keras.layers.Layer,
                               training=False) -> tf.Tensor:
    """Centres read the pixels by spatial-softmax attention; the result goes
    through `norm` and `output_conv` (their checkpoint names differ per
    block): [B, N, memory_channels]."""
    retrieved, _ = cluster_assignment.spatial_softmax_attention(
        self._cross_query_conv_bn(centers, training=training),
        self._pixel_key_conv_bn(pixels, training=training),
        pixel_value, self._widths.num_heads)  # [B, N, V]
    return output_conv(norm(retrieved, training=training), training=training)

  def pixel_cluster_update(self, mask_logits: tf.Tensor, pixels: tf.Tensor,
                           centers: tf.Tensor, pixel_value: tf.Tensor,
                           training=False) -> Tuple[tf.Tensor, tf.Tensor]:
    """The centres read the pixels (the interaction step).

    Args:
      mask_logits: [B, H, W, N] affinities of the auxiliary predictor.
      pixels: [B, HW, D] bottleneck pixels.
      centers: [B, N, D] bottleneck centres.
      pixel_value: [B, HW, V] pixel values.
      training: training mode.

    Returns:
      The [B, N, memory_channels] centre update (before drop-path and the
      residual addition) and the [B, N, D] bottleneck centres after the
      interaction (unchanged here; iterative subclasses refine them).
    """
    if self._interaction == cluster_assignment.SPATIAL_SOFTMAX:
      return self.spatial_attention_update(
          centers, pixels, pixel_value,
          self._kmeans_memory_batch_norm_retrieved_value,
          self._kmeans_memory_conv3_bn, training), centers
    assignment = cluster_assignment.cluster_axis_assignment(
        mask_logits, self._interaction)  # [B, H, W, N]
    assignment = tf.reshape(assignment,
                            [-1, tf.shape(pixels)[1], centers.shape[1]])
    return self.update_centers(assignment, pixel_value, training), centers

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
    output, predictions, _, _ = self.run_block(pixel_feature, cluster_centers,
                                               training)
    return output, predictions

  def run_block(
      self, pixel_feature: tf.Tensor, cluster_centers: tf.Tensor,
      training=False
  ) -> Tuple[tf.Tensor, Dict[str, tf.Tensor], tf.Tensor, tf.Tensor]:
    """`call`, plus the [B, HW, D] bottleneck pixels and the [B, N, D]
    bottleneck centres after the interaction (for pixel-refining blocks)."""
    if pixel_feature.shape.rank != 4 or pixel_feature.shape[-1] is None:
      raise ValueError(f'{self.name}: pixel_feature must be [B, H, W, C] '
                       f'with known C, got {pixel_feature.shape}.')
    if (cluster_centers.shape.rank != 3 or
        cluster_centers.shape[-1] != self._widths.memory or
        cluster_centers.shape[1] is None):
      raise ValueError(f'{self.name}: cluster_centers must be [B, N, '
                       f'{self._widths.memory}] with known N, got '
                       f'{cluster_centers.shape}.')
    num_centers = cluster_centers.shape[1]
    shape = tf.shape(pixel_feature)
    height, width = shape[1], shape[2]
    pixels = tf.reshape(pixel_feature,
                        [-1, height * width, pixel_feature.shape[-1]])

    # Bottleneck projections; the pixel input arrives non-activated.
    centers = self._memory_conv1_bn_act(cluster_centers, training=training)
    pixels = self.project_pixels(pixels, height, width,
                                 training=training)  # [B, HW, D]
    query, key, value = tf.split(
        self._memory_qkv_conv_bn(centers, training=training),
        [self._widths.key, self._widths.key, self._widths.value],
        axis=-1)
    pixel_value = self._pixel_v_conv_bn(pixels, training=training)

    # Pixel-cluster interaction (k-means by default): assign, then gather.
    pixel_map = tf.reshape(pixels,
                           [-1, height, width, self._widths.bottleneck])
    predictions = self._auxiliary_clustering_predictor(
        {
            keys.FEATURE_PANOPTIC: pixel_map,
            keys.TRANSFORMER_CLASS_FEATURE: centers,
            keys.TRANSFORMER_MASK_FEATURE: centers,
        },
        training=training)
    update, clustered = self.pixel_cluster_update(
        predictions[keys.PIXEL_SPACE_MASK_LOGITS], pixels, centers,
        pixel_value, training)
    output = cluster_centers + self._kmeans_drop_path(update,
                                                      training=training)

    # Self-attention among the centres.
    heads = self._widths.num_heads
    attended = self._memory_attention(
        (attention.split_heads(query, heads), attention.split_heads(key, heads),
         tf.reshape(value, [-1, num_centers, heads,
                            self._widths.value // heads])),
        training=training)  # [B, N, V]
    attended = self._memory_conv3_bn(attended, training=training)
    output = self._act(
        output + self._attention_drop_path(attended, training=training))

    if self._widths.feed_forward > 0:
      hidden = self._memory_ffn_conv1_bn_act(output, training=training)
      hidden = self._memory_ffn_conv2_bn(hidden, training=training)
      output = self._act(
          output + self._ffn_drop_path(hidden, training=training))
    return output, predictions, pixels, clustered


class KMaXDecoderBlock(tf_keras.layers.Layer):
  """Holder of one `KMaXTransformerLayer`, as DeepLab2's block group.

  It exists for the checkpoint path `_kmax_decoder/<i>/_block1_transformer`
  and forwards calls: `block(pixel_feature, centers, training)` returns
  `(new_centers, auxiliary_predictions)`, plus the refined pixel feature
  when the layer refines pixels (`refines_pixels`, e.g. ClusterFormer).
  """

  def __init__(self, name: str,
               layer_class: type = KMaXTransformerLayer,
               **layer_kwargs):
    super().__init__(name=name)
    self._block1_transformer = layer_class(
        name='block1_transformer', **layer_kwargs)

  @property
  def refines_pixels(self) -> bool:
    """Whether calls also return a refined [B, H, W, C] pixel feature."""
    return getattr(self._block1_transformer, 'refines_pixels', False)

  @property
  def transformer(self) -> KMaXTransformerLayer:
    return self._block1_transformer

  def call(self, pixel_feature: tf.Tensor, cluster_centers: tf.Tensor,
           training=False) -> Tuple[tf.Tensor, ...]:
    return self._block1_transformer(pixel_feature, cluster_centers,
                                    training=training)
