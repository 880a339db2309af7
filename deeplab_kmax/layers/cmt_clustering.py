"""CMT-DeepLab's clustering mask transformer block (Yu et al., CVPR 2022).

A kMaX block with two changes from the CMT paper:

1. Clustering update added to cross-attention. The centres receive both
   the ordinary cross-attention update (multi-head, softmax over the
   pixels) and the clustering update (the affinity logits turned into a
   per-pixel assignment over the cluster axis, then assignment^T @ values):

     C' = C + P_ca(BN(softmax_HW(Q_c K_p^T) V_p)) + P_cl(BN(A^T V_p)),
     A  = assignment_N(pixel-centre affinity logits)        # [B, HW, N]

   The clustering term is the kMaX update, read with the block's
   `pixel_cluster_interaction` (CMT's soft assignment: `cluster_softmax`;
   the default `cluster_argmax` gives the hard one).
2. Location-sensitive clustering by coordinate convolution: the pixel
   bottleneck sees the normalised pixel coordinates (y, x) in [-1, 1].

Choices where the paper leaves details open:
* CoordConv is folded into the existing pixel bottleneck: a 1x1 convolution
  of [feature, y, x] equals the feature's convolution plus a convolution of
  (y, x). The coordinate kernel (`_pixel_coordinate_conv`, 2 -> D, no bias)
  starts at zero, so a kMaX checkpoint starts from kMaX's function, and its
  output is added before the bottleneck's batch norm and activation, so the
  coordinates reach every consumer of the clustering pixels (affinities,
  values, keys).
* The cross-attention branch has its own query/key projections, batch norm
  and zero-initialised output projection (`_cross_attention_*`), so the
  block starts as kMaX's.
* CMT's dynamic reference masks and their mask-approximation loss, and its
  pixel-feature update, are not built: this block changes only how the
  centres read the pixels, so it keeps kMaX's heads and losses.
"""

from typing import Tuple

import tensorflow as tf
import tf_keras

from deeplab_kmax.layers import cluster_assignment
from deeplab_kmax.layers import kmeans_cross_attention


def pixel_coordinates(height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
  """[HW, 2] (y, x) of every pixel in row-major order, each in [-1, 1]."""
  ys = tf.linspace(-1.0, 1.0, height)  # [H]
  xs = tf.linspace(-1.0, 1.0, width)  # [W]
  grid_y, grid_x = tf.meshgrid(ys, xs, indexing='ij')  # [H, W] each
  return tf.reshape(tf.stack([grid_y, grid_x], axis=-1), [-1, 2])


class CMTTransformerLayer(kmeans_cross_attention.KMaXTransformerLayer):
  """kMaX block + cross-attention update + location-sensitive pixels."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    cluster_assignment.check_choice(
        self.pixel_cluster_interaction,
        cluster_assignment.CLUSTER_AXIS_INTERACTIONS,
        'pixel_cluster_interaction of the CMT decoder (its cross-attention '
        'already normalises over the pixels)')
    self._pixel_coordinate_conv = tf_keras.layers.Dense(
        self._widths.bottleneck, use_bias=False, kernel_initializer='zeros',
        name='pixel_coordinate_conv')
    self._cross_query_conv_bn, self._pixel_key_conv_bn = (
        self.cross_attention_projections())
    self._cross_attention_batch_norm_retrieved_value = self._bn_layer(
        name='cross_attention_batch_norm_retrieved_value', axis=-1)
    self._cross_attention_conv3_bn = self.conv1d(
        self._widths.memory, 'cross_attention_conv3_bn', gamma='zeros')

  def project_pixels(self, pixels: tf.Tensor, height: tf.Tensor,
                     width: tf.Tensor, training=False) -> tf.Tensor:
    """CoordConv bottleneck: act(BN(W x + U [y, x])), [B, HW, D]."""
    bottleneck = self._pixel_conv1_bn_act
    projected = bottleneck._conv(self._act(pixels))  # [B, HW, D]  pylint: disable=protected-access
    coordinates = self._pixel_coordinate_conv(
        pixel_coordinates(height, width))  # [HW, D]
    return bottleneck._apply_tail(  # pylint: disable=protected-access
        projected + coordinates[tf.newaxis], training)

  def pixel_cluster_update(self, mask_logits: tf.Tensor, pixels: tf.Tensor,
                           centers: tf.Tensor, pixel_value: tf.Tensor,
                           training=False) -> Tuple[tf.Tensor, tf.Tensor]:
    clustering, _ = super().pixel_cluster_update(
        mask_logits, pixels, centers, pixel_value, training)  # [B, N, M]
    cross_attention = self.spatial_attention_update(
        centers, pixels, pixel_value,
        self._cross_attention_batch_norm_retrieved_value,
        self._cross_attention_conv3_bn, training)  # [B, N, M]
    return clustering + cross_attention, centers
