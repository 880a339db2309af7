"""Multi-head dot-product attention with batch-normalised logits and values.

MaX-DeepLab style transformers normalise the attention logits (one set of
statistics per head) and the retrieved values (per head and value channel)
with batch norm instead of scaling by 1/sqrt(d). This removes the need for a
careful initialisation of the query/key projections.

Checkpoint names: `_batch_norm_similarity` (params [heads]) and
`_batch_norm_retrieved_value` (params [1, heads, 1, value_depth]).
"""

from typing import Optional, Tuple

import tensorflow as tf
import tf_keras

from deeplab_kmax.layers import activations
from deeplab_kmax.layers import normalization


def split_heads(x: tf.Tensor, num_heads: int) -> tf.Tensor:
  """[B, L, H * D] -> [B, H, L, D]."""
  depth = x.shape[-1]
  if depth is None or depth % num_heads:
    raise ValueError(f'Channels ({depth}) must be a known multiple of '
                     f'num_heads ({num_heads}).')
  length = tf.shape(x)[1]
  x = tf.reshape(x, [-1, length, num_heads, depth // num_heads])
  return tf.transpose(x, [0, 2, 1, 3])


def merge_heads(x: tf.Tensor) -> tf.Tensor:
  """[B, H, L, D] -> [B, L, H * D]."""
  num_heads, depth = x.shape[1], x.shape[3]
  length = tf.shape(x)[2]
  x = tf.transpose(x, [0, 2, 1, 3])
  return tf.reshape(x, [-1, length, num_heads * depth])


class BatchNormAttention(tf_keras.layers.Layer):
  """softmax(BN(q k^T)) v, then BN + activation on the retrieved values."""

  def __init__(self,
               name: str = 'attention',
               activation: Optional[str] = 'gelu',
               attention_activation: str = 'softmax',
               bn_layer: normalization.NormLayer = (
                   tf_keras.layers.BatchNormalization)):
    super().__init__(name=name)
    # Logits are [B, heads, L, M]: normalise each head separately.
    self._batch_norm_similarity = bn_layer(
        axis=1, name='batch_norm_similarity')
    # Values are [B, heads, L, D]; heads x D is the effective channel axis.
    value_axes = [1, 3]
    self._batch_norm_retrieved_value = bn_layer(
        name='batch_norm_retrieved_value', axis=value_axes)
    self._value_act = activations.get_activation(activation)
    self._normalise_weights = activations.get_activation(attention_activation)

  def call(self, inputs: Tuple[tf.Tensor, tf.Tensor, tf.Tensor],
           training=False) -> tf.Tensor:
    """Attends queries over keys.

    Args:
      inputs: (query [B, H, L, Dk], key [B, H, M, Dk], value [B, M, H, Dv]).
      training: whether batch norms use batch statistics.

    Returns:
      [B, L, H * Dv] retrieved values.
    """
    query, key, value = inputs
    logits = tf.einsum('bhld,bhmd->bhlm', query, key)  # [B, H, L, M]
    logits = self._batch_norm_similarity(logits, training=training)
    weights = self._normalise_weights(logits)
    retrieved = tf.einsum('bhlm,bmhd->bhld', weights, value)  # [B, H, L, Dv]
    retrieved = self._batch_norm_retrieved_value(retrieved, training=training)
    if self._value_act is not None:
      retrieved = self._value_act(retrieved)
    return merge_heads(retrieved)
