"""Position-sensitive axial attention (Axial-DeepLab, ECCV 2020).

2-D self-attention over H x W pixels costs O((HW)^2). Axial attention factors
it into a 1-D attention along the height axis followed by one along the width
axis, each global over its axis. Every 1-D attention is position-sensitive:
besides the content term q.k, queries and keys are matched against learned
relative-offset embeddings (q.r_q and k.r_k), and the output retrieves
relative-offset value embeddings (r_v) besides the value content.

Each term gets its own batch norm before the terms are added, which is why the
similarity norm has parameters of shape [3, 1, heads, 1, 1] (three similarity
terms) and the output norm [2, 1, heads, 1, value_depth] (content and
positional retrieval). Attribute names (`_height_axis`, `_query_rpe`,
`_batch_norm_similarity`, ...) and the variable name `qkv_kernel` follow
DeepLab2 checkpoints.
"""

from typing import Optional, Union

import tensorflow as tf
import tf_keras

from deeplab_kmax.layers import normalization
from deeplab_kmax.layers import positional_encodings

Dim = Union[int, tf.Tensor]


def _dim(x: tf.Tensor, axis: int) -> Dim:
  """The static size of an axis when known, else its run-time size."""
  static = x.shape[axis]
  return static if static is not None else tf.shape(x)[axis]


def _heads_first(x: tf.Tensor) -> tf.Tensor:
  """[N, L, h, d] -> [N, h, L, d]."""
  return tf.transpose(x, [0, 2, 1, 3])


def _positions_first(x: tf.Tensor) -> tf.Tensor:
  """[N, L, h, d] -> [L, N * h, d]: one matmul batch per position."""
  x = tf.transpose(x, [1, 0, 2, 3])
  return tf.reshape(x, [_dim(x, 0), -1, x.shape[-1]])


def _positions_last(x: tf.Tensor, num_heads: int, perm) -> tf.Tensor:
  """[L, N * h, M] -> [L, N, h, M], then transposed by `perm`."""
  return tf.transpose(
      tf.reshape(x, [_dim(x, 0), -1, num_heads, _dim(x, 2)]), perm)


class AxialAttention1D(tf_keras.layers.Layer):
  """Multi-head, position-sensitive global self-attention along one axis.

  Input [N, L, C] (N folds the batch and the other spatial axis), output
  [N, L, total_value_depth]. Works for any L known only at run time; offsets
  beyond `max_span` share edge embeddings (see positional_encodings).
  """

  def __init__(self,
               total_key_depth: int,
               total_value_depth: int,
               name: str,
               num_heads: int = 8,
               bn_layer: normalization.NormLayer = (
                   tf_keras.layers.BatchNormalization),
               max_span: int = positional_encodings.MAX_SPAN,
               initialization_std_for_query_key_rpe: float = 1.0,
               initialization_std_for_value_rpe: float = 1.0,
               **layer_kwargs):
    super().__init__(name=name, **layer_kwargs)
    for what, depth in (('total_key_depth', total_key_depth),
                        ('total_value_depth', total_value_depth)):
      if depth % num_heads:
        raise ValueError(f'{name}: {what} ({depth}) must be divisible by '
                         f'num_heads ({num_heads}).')
    self._key_channels = total_key_depth
    self._value_channels = total_value_depth
    self._num_heads = num_heads
    self._key_depth = total_key_depth // num_heads
    self._value_depth = total_value_depth // num_heads

    self._batch_norm_qkv = bn_layer(name='batch_norm_qkv', axis=-1)
    # Over the stacked terms [term, N, head, L, M | D]: one statistic per
    # (term, head) for similarities, per (term, head, channel) for outputs.
    self._batch_norm_similarity = bn_layer(
        name='batch_norm_similarity', axis=[0, 2])
    self._batch_norm_retrieved_output = bn_layer(
        name='batch_norm_retrieved_output', axis=[0, 2, 4])

    def offset_table(depth, table_name, std):
      return positional_encodings.RelativePositionalEncoding(
          depth, table_name, max_span=max_span, initialization_std=std)

    qk_std = initialization_std_for_query_key_rpe
    self._query_rpe = offset_table(self._key_depth, 'query_rpe', qk_std)
    self._key_rpe = offset_table(self._key_depth, 'key_rpe', qk_std)
    self._value_rpe = offset_table(self._value_depth, 'value_rpe',
                                   initialization_std_for_value_rpe)

  def build(self, input_shape):
    channels = input_shape[-1]
    if len(input_shape) != 3 or channels is None:
      raise ValueError(f'{self.name}: expected a [N, L, C] input with a known '
                       f'C, got shape {input_shape}.')
    # Transformer-style init; the batch norm after it makes the scale benign.
    self.qkv_kernel = self.add_weight(
        name='qkv_kernel',
        shape=(channels, 2 * self._key_channels + self._value_channels),
        initializer=tf_keras.initializers.TruncatedNormal(
            stddev=channels ** -0.5))
    super().build(input_shape)

  def _split_heads(self, x: tf.Tensor, depth: int) -> tf.Tensor:
    """[N, L, heads * depth] -> [N, L, heads, depth]."""
    return tf.reshape(
        x, [-1, _dim(x, 1), self._num_heads, depth])

  def call(self, inputs: tf.Tensor, training=False) -> tf.Tensor:
    length = _dim(inputs, 1)
    qkv = tf.einsum('nlc,cd->nld', inputs, self.qkv_kernel)
    qkv = self._batch_norm_qkv(qkv, training=training)
    query, key, value = tf.split(
        qkv, [self._key_channels, self._key_channels, self._value_channels],
        axis=-1)
    query = self._split_heads(query, self._key_depth)  # [N, L, h, dk]
    key = self._split_heads(key, self._key_depth)  # [N, M, h, dk]
    value = self._split_heads(value, self._value_depth)  # [N, M, h, dv]

    # Similarity of query position l and key position m; three terms. Each
    # is a batched matmul with the batch axes leading, which oneDNN runs
    # faster than the einsums' own transposes (the same products and sums:
    # bit-identical outputs in our checks).
    content = tf.matmul(_heads_first(query), _heads_first(key),
                        transpose_b=True)  # [N, h, L, M]
    # Position terms batch over the position the embeddings depend on:
    # [L, N*h, M] -> [N, h, L, M] for queries, [M, N*h, L] -> ... for keys.
    query_position = _positions_last(
        tf.matmul(_positions_first(query), self._query_rpe(length),
                  transpose_b=True), self._num_heads, [1, 2, 0, 3])
    key_position = _positions_last(
        tf.matmul(_positions_first(key),
                  self._key_rpe(length, transposed=True),  # [M, L, dk]
                  transpose_b=True), self._num_heads, [1, 2, 3, 0])
    similarity = tf.stack([content, query_position, key_position])
    similarity = self._batch_norm_similarity(similarity, training=training)
    attention = tf.nn.softmax(tf.reduce_sum(similarity, axis=0))  # [N,h,L,M]

    # Retrieve value content and relative-position value embeddings.
    retrieved_content = tf.matmul(attention,
                                  _heads_first(value))  # [N, h, L, dv]
    retrieved_position = tf.einsum('bhlm,lmd->bhld', attention,
                                   self._value_rpe(length))
    retrieved = tf.stack([retrieved_content, retrieved_position])
    retrieved = self._batch_norm_retrieved_output(retrieved, training=training)
    retrieved = tf.reduce_sum(retrieved, axis=0)  # [N, h, L, dv]

    merged = tf.transpose(retrieved, [0, 2, 1, 3])  # [N, L, h, dv]
    return tf.reshape(merged, [-1, length, self._value_channels])


class AxialAttention2D(tf_keras.layers.Layer):
  """Height-axis then width-axis attention over a [B, H, W, C] feature map.

  With strides 2 the rows are subsampled between the two passes and the
  columns after the second, so the output is [B, ceil(H/2), ceil(W/2), ...].
  Output channels: filters * value_expansion. `axis_kwargs` go to both
  AxialAttention1D layers (e.g. max_span, initialisation stds).
  """

  def __init__(self,
               filters: int,
               name: str = 'attention',
               *,
               strides: int = 1,
               bn_layer: normalization.NormLayer = (
                   tf_keras.layers.BatchNormalization),
               key_expansion: float = 1.0,
               value_expansion: float = 2.0,
               num_heads: int = 8,
               **axis_kwargs):
    super().__init__(name=name)
    if strides not in (1, 2):
      raise ValueError(f'{name}: strides must be 1 or 2, got {strides}.')
    self._strides = strides
    self._value_channels = int(round(filters * value_expansion))
    axis_options = dict(
        total_key_depth=int(round(filters * key_expansion)),
        total_value_depth=self._value_channels,
        num_heads=num_heads,
        bn_layer=bn_layer,
        **axis_kwargs)
    self._height_axis = AxialAttention1D(name='height_axis', **axis_options)
    self._width_axis = AxialAttention1D(name='width_axis', **axis_options)

  def call(self, inputs: tf.Tensor, training=False) -> tf.Tensor:
    if inputs.shape.rank != 4:
      raise ValueError(f'{self.name}: expected a [B, H, W, C] input, got '
                       f'shape {inputs.shape}.')
    height, width = _dim(inputs, 1), _dim(inputs, 2)
    channels = inputs.shape[-1]
    value_channels = self._value_channels

    # Columns become sequences: [B, W, H, C] -> [B * W, H, C].
    columns = tf.reshape(tf.transpose(inputs, [0, 2, 1, 3]),
                         [-1, height, channels])
    columns = self._height_axis(columns, training=training)
    attended = tf.transpose(
        tf.reshape(columns, [-1, width, height, value_channels]),
        [0, 2, 1, 3])  # [B, H, W, V]
    if self._strides > 1:
      attended = attended[:, ::self._strides]

    # Rows become sequences: [B * H', W, V].
    out_height = _dim(attended, 1)
    rows = tf.reshape(attended, [-1, width, value_channels])
    rows = self._width_axis(rows, training=training)
    attended = tf.reshape(rows, [-1, out_height, width, value_channels])
    if self._strides > 1:
      attended = attended[:, :, ::self._strides]
    return attended
