"""kMaX transformer decoder: learned cluster centres refined by k-means blocks.

The centres start from a learned [1, N, C] table tiled over the batch and
pass through k-means cross-attention blocks on pixel-decoder features from
coarse to fine (by default 2 blocks each at strides 32, 16 and 8). The final
centres are projected to class and mask embeddings for the prediction head.

Every block has its own auxiliary predictor whose outputs (one dict per
block, in order) are returned for deep supervision.

Checkpoint names (DeepLab2 `KMaXTransformerDecoder`): `cluster_centers`,
`_kmax_decoder/<i>/_block1_transformer/...`, `_class_embedding_projection`,
`_mask_embedding_projection`.

The same frame runs the clustering family (docs/clustering_family.md):
`cluster_decoder` picks the block (kMaX's k-means block, CMT-DeepLab's or
ClusterFormer's) and `pixel_cluster_interaction` how the centres read the
pixels. ClusterFormer blocks also refine the pixel feature; the refined
feature feeds the next block at the same stride.
"""

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import tensorflow as tf
import tf_keras

from deeplab_kmax import heads
from deeplab_kmax import keys
from deeplab_kmax.layers import cluster_assignment
from deeplab_kmax.layers import clusterformer
from deeplab_kmax.layers import cmt_clustering
from deeplab_kmax.layers import convolutions
from deeplab_kmax.layers import kmeans_cross_attention
from deeplab_kmax.layers import normalization

# Pixel-decoder outputs consumed, coarsest first (strides 32, 16, 8).
STAGE_FEATURE_KEYS = tuple(keys.decoder_stage(i) for i in (1, 2, 3))
STAGE_STRIDES = (32, 16, 8)
# Centre width C and FFN width of the published models; the config's
# transformer_decoder_width_multiplier scales both.
CENTER_CHANNELS = 256
FEED_FORWARD_CHANNELS = 2048
# The block layer of each `cluster_decoder` choice.
BLOCK_LAYERS = {
    cluster_assignment.KMAX: kmeans_cross_attention.KMaXTransformerLayer,
    cluster_assignment.CMT: cmt_clustering.CMTTransformerLayer,
    cluster_assignment.CLUSTERFORMER: clusterformer.ClusterFormerLayer,
}
DEFAULT_CLUSTERFORMER_ITERATIONS = 3


class KMaXTransformerDecoder(tf_keras.layers.Layer):
  """Cluster centres -> six k-means blocks -> class / mask embeddings."""

  def __init__(self,
               num_mask_slots: int = 128,
               num_classes: int = 134,
               num_blocks: Sequence[int] = (2, 2, 2),
               drop_path_keep_prob: float = 1.0,
               auxiliary_pixel_head_channels: int = 256,
               auxiliary_mask_embedding_channels: int = 128,
               auxiliary_head_conv_type: str = 'depthwise_separable_conv',
               num_heads: int = 8,
               feed_forward_channels: int = FEED_FORWARD_CHANNELS,
               center_channels: int = CENTER_CHANNELS,
               activation: str = 'gelu',
               void_prior_prob: float = 0.9,
               bn_layer: Optional[normalization.NormLayer] = None,
               cluster_decoder: str = cluster_assignment.KMAX,
               pixel_cluster_interaction: str = (
                   cluster_assignment.CLUSTER_ARGMAX),
               clusterformer_iterations: int = (
                   DEFAULT_CLUSTERFORMER_ITERATIONS),
               name: str = 'kmax_transformer_decoder'):
    """Builds the decoder.

    Args:
      num_mask_slots: number of cluster centres N (128 COCO/ADE20K, 256
        Cityscapes).
      num_classes: class-head outputs of the auxiliary predictors, void
        included (134 COCO, 20 Cityscapes).
      num_blocks: blocks at strides 32, 16 and 8.
      drop_path_keep_prob: drop-path keep probability of every block's
        residual branches (DeepLab2: 0.8 COCO/Cityscapes, 1.0 ADE20K).
      auxiliary_pixel_head_channels: 5x5 conv width of the auxiliary pixel
        space heads.
      auxiliary_mask_embedding_channels: auxiliary pixel/mask embedding size.
      auxiliary_head_conv_type: conv type of the auxiliary pixel heads.
      num_heads: heads of the centres' self-attention.
      feed_forward_channels: hidden width of the centres' FFN.
      center_channels: width C of the cluster centres.
      activation: activation throughout (gelu).
      void_prior_prob: void prior of the auxiliary class logits.
      bn_layer: builds every batch norm (default: synchronised, DeepLab2's
        momentum and epsilon).
      cluster_decoder: block family, one of
        `cluster_assignment.CLUSTER_DECODERS` ('kmax', 'cmt',
        'clusterformer').
      pixel_cluster_interaction: how the centres read the pixels, one of
        `cluster_assignment.PIXEL_CLUSTER_INTERACTIONS` (kmax and cmt).
      clusterformer_iterations: clustering iterations T of each
        ClusterFormer block.
      name: layer name.
    """
    super().__init__(name=name)
    cluster_assignment.check_choice(cluster_decoder,
                                    cluster_assignment.CLUSTER_DECODERS,
                                    'cluster_decoder')
    if len(num_blocks) != len(STAGE_STRIDES):
      raise ValueError(f'num_blocks needs one count per stride '
                       f'{STAGE_STRIDES}, got {list(num_blocks)}.')
    bn_layer = bn_layer or normalization.batch_norm_factory()
    self._num_blocks = tuple(num_blocks)

    def auxiliary_predictor():
      return heads.MaXDeepLabHead(
          num_classes=num_classes, semantic_num_classes=None,
          pixel_space_head_channels=auxiliary_pixel_head_channels,
          mask_embedding_channels=auxiliary_mask_embedding_channels,
          head_conv_type=auxiliary_head_conv_type, activation=activation,
          bn_layer=bn_layer, void_prior_prob=void_prior_prob,
          name='auxiliary_clustering_predictor')

    family_kwargs = dict(layer_class=BLOCK_LAYERS[cluster_decoder],
                         pixel_cluster_interaction=pixel_cluster_interaction)
    if cluster_decoder == cluster_assignment.CLUSTERFORMER:
      family_kwargs['clusterformer_iterations'] = clusterformer_iterations
    blocks = []
    for stride, count in zip(STAGE_STRIDES, num_blocks):
      for index in range(count):
        blocks.append(kmeans_cross_attention.KMaXDecoderBlock(
            name=f'kmax_block_os{stride}_{index}',
            auxiliary_predictor_fn=auxiliary_predictor,
            memory_channels=center_channels,
            bottleneck_channels=center_channels,
            key_channels=center_channels // 2,
            value_channels=center_channels,
            num_heads=num_heads,
            feed_forward_channels=feed_forward_channels,
            activation=activation,
            drop_path_keep_prob=float(drop_path_keep_prob),
            bn_layer=bn_layer, **family_kwargs))
    # Checkpoint path `_kmax_decoder/<i>`.
    self._kmax_decoder = blocks

    # Checkpoint key `cluster_centers` (the weight's name).
    self._cluster_centers = self.add_weight(  # [1, N, C]
        name='cluster_centers', shape=(1, num_mask_slots, center_channels),
        initializer=tf_keras.initializers.TruncatedNormal(stddev=1.0),
        trainable=True)

    def projection(attr_name):
      return convolutions.Conv1D(  # pointwise conv + BN + act
          center_channels, name=attr_name, use_bias=False, use_bn=True,
          activation=activation, bn_layer=bn_layer)

    self._class_embedding_projection = projection('class_embedding_projection')
    self._mask_embedding_projection = projection('mask_embedding_projection')

  @property
  def blocks(self) -> List[kmeans_cross_attention.KMaXDecoderBlock]:
    """The k-means blocks in execution order; `blocks[i](pixels, centres,
    training)` replays one block and returns (centres, auxiliary outputs)
    and, for pixel-refining blocks (`refines_pixels`), the refined pixels."""
    return list(self._kmax_decoder)

  @property
  def block_feature_keys(self) -> Tuple[str, ...]:
    """The pixel-decoder feature each block reads, in execution order."""
    return tuple(key for key, count in zip(STAGE_FEATURE_KEYS,
                                           self._num_blocks)
                 for _ in range(count))

  @property
  def cluster_centers(self) -> tf.Variable:
    return self._cluster_centers

  @property
  def checkpoint_items(self) -> Dict[str, tf.Module]:
    return {'transformer_decoder': self}

  def initial_cluster_centers(self, batch_size) -> tf.Tensor:
    """The learned centres tiled to [batch_size, N, C]."""
    return tf.tile(self._cluster_centers, [batch_size, 1, 1])

  def embed(self, cluster_centers: tf.Tensor,
            training=False) -> Tuple[tf.Tensor, tf.Tensor]:
    """Class and mask embeddings [B, N, C] of the final centres."""
    return (self._class_embedding_projection(cluster_centers,
                                             training=training),
            self._mask_embedding_projection(cluster_centers,
                                            training=training))

  def call(self, features: Mapping[str, tf.Tensor],
           training=False) -> Dict[str, tf.Tensor]:
    """Refines the centres on the pixel-decoder features.

    Args:
      features: the pixel decoder's endpoints: `decoder_stage1..3` (strides
        32, 16, 8) and `decoder_output` (stride 4 or 2); encoder endpoints
        such as `stage5` may be included and are passed through.
      training: training mode.

    Returns:
      A copy of `features` plus `transformer_class_feature`,
      `transformer_mask_feature` [B, N, C], `feature_panoptic` (=
      decoder_output), `feature_semantic` (= stage5, when given) and
      `auxiliary_outputs_pred`, a tuple with one prediction dict per block.
    """
    missing = [key for key in STAGE_FEATURE_KEYS + (keys.DECODER_OUTPUT,)
               if key not in features]
    if missing:
      raise KeyError(f'{self.name} needs pixel-decoder features {missing}; '
                     f'got keys {sorted(features)}.')
    outputs = dict(features)
    centers = self.initial_cluster_centers(
        tf.shape(features[STAGE_FEATURE_KEYS[0]])[0])
    auxiliary_outputs = []
    stage_pixels = {key: features[key] for key in STAGE_FEATURE_KEYS}
    for block, key in zip(self._kmax_decoder, self.block_feature_keys):
      if block.refines_pixels:
        centers, predictions, stage_pixels[key] = block(
            stage_pixels[key], centers, training=training)
      else:
        centers, predictions = block(stage_pixels[key], centers,
                                     training=training)
      auxiliary_outputs.append(predictions)

    class_feature, mask_feature = self.embed(centers, training=training)
    outputs[keys.TRANSFORMER_CLASS_FEATURE] = class_feature
    outputs[keys.TRANSFORMER_MASK_FEATURE] = mask_feature
    outputs[keys.FEATURE_PANOPTIC] = features[keys.DECODER_OUTPUT]
    if keys.encoder_stage(5) in features:
      outputs[keys.FEATURE_SEMANTIC] = features[keys.encoder_stage(5)]
    outputs[keys.AUXILIARY_OUTPUTS] = tuple(auxiliary_outputs)
    return outputs
