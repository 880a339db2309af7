"""How cluster centres read the pixels: the three rows of kMaX's ablation.

Every decoder block scores pixels against centres (the affinity logits, which
are also the block's deep-supervised mask prediction) and then gathers pixel
values into a centre update. The choices differ only in the axis that turns
scores into weights:

* `cluster_argmax` (kMaX): each pixel goes to its best centre; one-hot over
  the cluster axis, no gradient.
* `cluster_softmax` (CMT-DeepLab's clustering reading): each pixel spreads a
  unit of mass over the centres; softmax over the cluster axis, differentiable.
* `spatial_softmax` (MaX-DeepLab / DETR cross-attention): each centre spreads
  a unit of mass over the pixels; softmax over the pixel axis, computed per
  head from separate query / key projections.

The decoder families built on these blocks are named in `CLUSTER_DECODERS`;
the allowed values are defined once, in `cluster_options`.
"""

from typing import Tuple

import tensorflow as tf

from deeplab_kmax.layers import attention
from deeplab_kmax.layers import cluster_options

# The choices' names (re-exported; defined without TensorFlow).
CLUSTER_ARGMAX = cluster_options.CLUSTER_ARGMAX
CLUSTER_SOFTMAX = cluster_options.CLUSTER_SOFTMAX
SPATIAL_SOFTMAX = cluster_options.SPATIAL_SOFTMAX
PIXEL_CLUSTER_INTERACTIONS = cluster_options.PIXEL_CLUSTER_INTERACTIONS
CLUSTER_AXIS_INTERACTIONS = cluster_options.CLUSTER_AXIS_INTERACTIONS
KMAX = cluster_options.KMAX
CMT = cluster_options.CMT
CLUSTERFORMER = cluster_options.CLUSTERFORMER
CLUSTER_DECODERS = cluster_options.CLUSTER_DECODERS
check_choice = cluster_options.check_choice


def hard_assignment(mask_logits: tf.Tensor) -> tf.Tensor:
  """One-hot argmax over the cluster axis, without gradient.

  Args:
    mask_logits: [..., N] pixel-to-centre affinities.

  Returns:
    [..., N] float one-hot over N.
  """
  num_clusters = mask_logits.shape[-1]
  if num_clusters is None:
    raise ValueError('The number of cluster centres (last axis of the mask '
                     'logits) must be known statically.')
  best = tf.argmax(mask_logits, axis=-1)  # [...]
  return tf.stop_gradient(tf.one_hot(best, num_clusters, dtype=tf.float32))


def soft_assignment(mask_logits: tf.Tensor) -> tf.Tensor:
  """Softmax over the cluster axis: every pixel's weights sum to one.

  Args:
    mask_logits: [..., N] pixel-to-centre affinities.

  Returns:
    [..., N] assignment weights; gradients flow into the logits.
  """
  return tf.nn.softmax(mask_logits, axis=-1)


def cluster_axis_assignment(mask_logits: tf.Tensor,
                            interaction: str) -> tf.Tensor:
  """The [..., N] assignment of a cluster-axis interaction."""
  if interaction == CLUSTER_ARGMAX:
    return hard_assignment(mask_logits)
  if interaction == CLUSTER_SOFTMAX:
    return soft_assignment(mask_logits)
  raise ValueError(f'{interaction!r} does not normalise over the cluster '
                   f'axis; expected one of {CLUSTER_AXIS_INTERACTIONS}.')


def spatial_softmax_attention(
    query: tf.Tensor, key: tf.Tensor, value: tf.Tensor,
    num_heads: int) -> Tuple[tf.Tensor, tf.Tensor]:
  """Multi-head cross-attention of centres over pixels (softmax over pixels).

  Args:
    query: [B, N, K] centre queries.
    key: [B, HW, K] pixel keys.
    value: [B, HW, V] pixel values.
    num_heads: heads h; K and V must be multiples of h.

  Returns:
    The retrieved values [B, N, V] and the attention weights [B, h, N, HW]
    (each centre's weights over the pixels sum to one).
  """
  query = attention.split_heads(query, num_heads)  # [B, h, N, K/h]
  key = attention.split_heads(key, num_heads)  # [B, h, HW, K/h]
  value = attention.split_heads(value, num_heads)  # [B, h, HW, V/h]
  scale = float(query.shape[-1]) ** -0.5
  logits = tf.einsum('bhnd,bhpd->bhnp', query, key) * scale  # [B, h, N, HW]
  weights = tf.nn.softmax(logits, axis=-1)  # over the pixels
  retrieved = tf.einsum('bhnp,bhpd->bhnd', weights, value)  # [B, h, N, V/h]
  return attention.merge_heads(retrieved), weights  # [B, N, V]
