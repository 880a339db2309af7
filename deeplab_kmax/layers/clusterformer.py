"""ClusterFormer's decoder block (Liang et al., NeurIPS 2023) on kMaX's frame.

Two steps replace kMaX's single k-means read of the pixels:

1. Recurrent cross-attention clustering, T iterations (T a config field):

     A_t     = softmax_N(P C_t^T / sqrt(D))                  # [B, HW, N]
     G_t     = (A_t^T V) / (A_t^T 1)                         # [B, N, V]
     C_{t+1} = C_t + W_c(G_t)                                # [B, N, D]

   P are the bottleneck pixels, V their values, C_0 the bottleneck centres;
   every pixel distributes its mass over the clusters and each centre
   becomes the assignment-weighted mean of its pixels, projected back to
   the centre space by W_c (one BN'd pointwise projection shared by the
   iterations, hence "recurrent"). The centre update of the block is
   P_out(BN(G_T)), in kMaX's variables; T = 0 skips clustering (no update).
2. Feature dispatching: every pixel is refined from the final centres,
   each centre gated by the similarity

     g_pn = sigmoid(alpha * cos(P_p, C_T,n) + beta)          # [B, HW, N]
     X'   = X + W_d((1/N) sum_n g_pn C_T,n)                  # [B, HW, C]

   with learned scalars alpha, beta (initialised to 1, 0). X' goes to the
   next block at the same stride (the decoder passes it on).

The self-attention among the centres, the FFN and the deep-supervised
auxiliary predictor are kMaX's, so a kMaX checkpoint restores them; the new
variables are `_cluster_projection`, `_dispatch_scale`, `_dispatch_bias` and
`_dispatch_conv_bn`. Choices where the paper is open: the 1/sqrt(D) scaled
dot product as affinity, the residual W_c update, the weighted mean, the
1/N normalisation of the dispatch and its BN'd projection W_d (created
when the pixel width C is first seen).
"""

from typing import Dict, List, Tuple

import tensorflow as tf

from deeplab_kmax.layers import cluster_assignment
from deeplab_kmax.layers import kmeans_cross_attention


def recurrent_clustering(pixels: tf.Tensor, centers: tf.Tensor,
                         pixel_value: tf.Tensor, iterations: int,
                         projection) -> Tuple[List[tf.Tensor], tf.Tensor]:
  """Runs the T clustering iterations.

  Args:
    pixels: [B, HW, D] bottleneck pixels.
    centers: [B, N, D] initial centres C_0.
    pixel_value: [B, HW, V] pixel values.
    iterations: T >= 0.
    projection: maps the [B, N, V] gathered values to a [B, N, D] change.

  Returns:
    The T + 1 centre states [C_0, ..., C_T] and the last gathered values
    G_T [B, N, V] (None when T = 0).
  """
  scale = float(pixels.shape[-1]) ** -0.5
  states, gathered = [centers], None
  for _ in range(iterations):
    logits = tf.einsum('bpd,bnd->bpn', pixels, states[-1]) * scale
    assignment = cluster_assignment.soft_assignment(logits)  # [B, HW, N]
    mass = tf.reduce_sum(assignment, axis=1)[..., tf.newaxis]  # [B, N, 1]
    gathered = tf.einsum('bpn,bpv->bnv', assignment,
                         pixel_value) / (mass + 1e-6)  # [B, N, V]
    states.append(states[-1] + projection(gathered))  # [B, N, D]
  return states, gathered


def dispatch_gates(pixels: tf.Tensor, centers: tf.Tensor, scale: tf.Tensor,
                   bias: tf.Tensor) -> tf.Tensor:
  """sigmoid(scale * cos(pixel, centre) + bias), [B, HW, N]."""
  cosine = tf.einsum('bpd,bnd->bpn', tf.math.l2_normalize(pixels, axis=-1),
                     tf.math.l2_normalize(centers, axis=-1))
  return tf.sigmoid(scale * cosine + bias)


class ClusterFormerLayer(kmeans_cross_attention.KMaXTransformerLayer):
  """Recurrent clustering of the centres, then dispatching to the pixels."""

  refines_pixels = True

  def __init__(self, *args, clusterformer_iterations: int = 3, **kwargs):
    super().__init__(*args, **kwargs)
    if clusterformer_iterations < 0:
      raise ValueError('clusterformer_iterations must be >= 0, got '
                       f'{clusterformer_iterations}.')
    self._iterations = int(clusterformer_iterations)
    self._cluster_projection = self.conv1d(self._widths.bottleneck,
                                           'cluster_projection')
    self._dispatch_scale = self.add_weight(
        name='dispatch_scale', shape=(), initializer='ones', trainable=True)
    self._dispatch_bias = self.add_weight(
        name='dispatch_bias', shape=(), initializer='zeros', trainable=True)
    self._dispatch_conv_bn = None

  @property
  def iterations(self) -> int:
    return self._iterations

  def build(self, input_shape):
    # The dispatch projection maps back to the pixel width C of the input.
    self._dispatch_conv_bn = self.conv1d(int(input_shape[-1]),
                                         'dispatch_conv_bn')
    super().build(input_shape)

  def cluster(self, pixels: tf.Tensor, centers: tf.Tensor,
              pixel_value: tf.Tensor,
              training=False) -> Tuple[List[tf.Tensor], tf.Tensor]:
    """The centre states [C_0 .. C_T] and G_T (see `recurrent_clustering`)."""
    return recurrent_clustering(
        pixels, centers, pixel_value, self._iterations,
        lambda g: self._cluster_projection(g, training=training))

  def pixel_cluster_update(self, mask_logits: tf.Tensor, pixels: tf.Tensor,
                           centers: tf.Tensor, pixel_value: tf.Tensor,
                           training=False) -> Tuple[tf.Tensor, tf.Tensor]:
    del mask_logits  # Deep-supervised only; clustering has its own affinity.
    states, gathered = self.cluster(pixels, centers, pixel_value, training)
    if gathered is None:  # T = 0: no clustering, no update.
      no_update = tf.zeros([tf.shape(centers)[0], centers.shape[1],
                            self._widths.memory])  # [B, N, M]
      return no_update, states[-1]
    gathered = self._kmeans_memory_batch_norm_retrieved_value(
        gathered, training=training)
    return self._kmeans_memory_conv3_bn(gathered, training=training), states[-1]

  def dispatch(self, pixel_feature: tf.Tensor, pixels: tf.Tensor,
               centers: tf.Tensor, training=False) -> tf.Tensor:
    """Refines the [B, H, W, C] pixel feature from the [B, N, D] centres."""
    gates = dispatch_gates(pixels, centers, self._dispatch_scale,
                           self._dispatch_bias)  # [B, HW, N]
    dispatched = tf.einsum('bpn,bnd->bpd', gates,
                           centers) / float(centers.shape[1])  # [B, HW, D]
    change = self._dispatch_conv_bn(dispatched, training=training)  # [B,HW,C]
    return pixel_feature + tf.reshape(change, tf.shape(pixel_feature))

  def call(self, pixel_feature: tf.Tensor, cluster_centers: tf.Tensor,
           training=False
           ) -> Tuple[tf.Tensor, Dict[str, tf.Tensor], tf.Tensor]:
    """Returns the new centres, the auxiliary predictions and the refined
    [B, H, W, C] pixel feature."""
    output, predictions, pixels, clustered = self.run_block(
        pixel_feature, cluster_centers, training)
    refined = self.dispatch(pixel_feature, pixels, clustered, training)
    return output, predictions, refined
