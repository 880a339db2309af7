"""Relative positional encodings for 1-D (axial) self-attention.

Axial-DeepLab makes attention position-sensitive by giving queries, keys and
values a learned embedding per relative offset `key_pos - query_pos`. One
table holds `2 * max_span - 1` offsets (509 rows for the default span of 255),
independent of the feature size, so a checkpoint serves every crop. Offsets
beyond the span share the embedding at the table's edge.

For a sequence of length L the layer expands the table into an [L, L, depth]
tensor, `out[i, j] = table[clip(j - i + max_span - 1)]`. DeepLab2 does this
with a gather on a constant index matrix fixed at build time; here the same
values come from slicing, tiling and reshaping ("skewing") a window of the
table. That works for lengths only known at run time, involves no gather on a
variable (which tf2onnx's graph freezing trips over), and copies values
exactly, so results are bit-identical to the gather.
"""

from typing import Union

import tensorflow as tf
import tf_keras

# Largest relative offset with its own embedding; the table has 2 * 255 - 1
# = 509 rows in every DeepLab2 checkpoint.
MAX_SPAN = 255

Length = Union[int, tf.Tensor]


def _edge_padded(table: tf.Tensor, pad: tf.Tensor) -> tf.Tensor:
  """Repeats the first and last rows `pad` times at either end."""
  first = tf.tile(table[:1], [pad, 1])
  last = tf.tile(table[-1:], [pad, 1])
  return tf.concat([first, table, last], axis=0)


def relative_position_table(table: tf.Tensor, length: Length) -> tf.Tensor:
  """Expands a [2S - 1, D] offset table to [L, L, D] for a length-L axis.

  Row i, column j holds the embedding of offset j - i, clipped to
  [-(S - 1), S - 1]; S = (rows + 1) / 2 is the span.
  """
  table = tf.convert_to_tensor(table)
  rows = table.shape[0]
  if rows is None or rows % 2 != 1:
    raise ValueError(f'The relative-position table needs a static, odd number '
                     f'of rows (2 * span - 1); got shape {table.shape}.')
  span = (rows + 1) // 2
  length = tf.convert_to_tensor(length, tf.int32)
  # Offsets -(L-1)..(L-1) in order; pad with edge rows when L > span so that
  # the clipped offsets read the table's first and last rows.
  pad = tf.maximum(length - span, 0)
  padded = _edge_padded(table, pad)
  start = span - length + pad
  window = padded[start:start + 2 * length - 1]  # [2L - 1, D], offset k-(L-1)
  # Skew: with rows laid out with a period of 2L, reading every (2L - 1)-th
  # position shifts each successive query row one offset to the left.
  window = tf.pad(window, [[0, 1], [0, 0]])  # [2L, D]
  flat = tf.tile(window, [length, 1])  # [L * 2L, D]
  flat = flat[length - 1:length - 1 + length * (2 * length - 1)]
  depth = table.shape[1] if table.shape[1] is not None else -1
  skewed = tf.reshape(flat, [length, 2 * length - 1, depth])
  return skewed[:, :length]  # [L, L, D]


class RelativePositionalEncoding(tf_keras.layers.Layer):
  """A learned table of relative-offset embeddings for one attention term.

  Calling the layer with a length L returns the [L, L, depth] embeddings of
  every (query, key) pair along an axis of that length. The variable is named
  `embeddings`, as in DeepLab2 checkpoints.
  """

  def __init__(self,
               depth: int,
               name: str,
               max_span: int = MAX_SPAN,
               initialization_std: float = 1.0,
               **layer_kwargs):
    super().__init__(name=name, **layer_kwargs)
    if depth <= 0 or max_span <= 0:
      raise ValueError(f'{name}: depth and max_span must be positive, got '
                       f'{depth} and {max_span}.')
    self._depth = depth
    self._max_span = max_span
    self._initialization_std = initialization_std

  def build(self, input_shape=None):
    # The table size does not depend on the input (a length).
    self.embeddings = self.add_weight(
        name='embeddings',
        shape=(2 * self._max_span - 1, self._depth),
        initializer=tf_keras.initializers.TruncatedNormal(
            stddev=self._initialization_std),
        trainable=True)
    super().build(input_shape)

  def call(self, length: Length, transposed: bool = False) -> tf.Tensor:
    """[L, L, depth]; with `transposed`, out[i, j] holds offset i - j (the
    two position axes swapped), taken by reversing the table's rows, which
    negates every offset, instead of transposing the expanded tensor."""
    table = tf.reverse(self.embeddings, [0]) if transposed else self.embeddings
    return relative_position_table(table, length)

  def get_config(self):
    return {
        **super().get_config(),
        'depth': self._depth,
        'max_span': self._max_span,
        'initialization_std': self._initialization_std,
    }
