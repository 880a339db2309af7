"""Tests for the relative positional encoding table expansion."""

import numpy as np
import pytest
import tensorflow as tf

from deeplab_kmax.layers import positional_encodings
from tests import graph_ops


def naive_table(table: np.ndarray, length: int) -> np.ndarray:
  """out[i, j] = table[clip(j - i + span - 1)], by explicit indexing."""
  span = (table.shape[0] + 1) // 2
  out = np.empty((length, length, table.shape[1]), table.dtype)
  for i in range(length):
    for j in range(length):
      out[i, j] = table[min(max(j - i + span - 1, 0), 2 * span - 2)]
  return out


@pytest.mark.parametrize('span,length', [
    (255, 1), (255, 2), (255, 5), (255, 9), (255, 33), (255, 129),
    (3, 1), (3, 3), (3, 4), (3, 11),  # lengths beyond the span: clipping
])
def test_table_matches_naive_gather_exactly(span, length):
  rng = np.random.default_rng(span * 1000 + length)
  table = rng.standard_normal((2 * span - 1, 6)).astype(np.float32)
  got = positional_encodings.relative_position_table(table, length).numpy()
  np.testing.assert_array_equal(got, naive_table(table, length))


def test_clipping_beyond_default_span():
  rng = np.random.default_rng(1)
  table = rng.standard_normal((509, 2)).astype(np.float32)
  got = positional_encodings.relative_position_table(table, 300).numpy()
  np.testing.assert_array_equal(got, naive_table(table, 300))
  # Far offsets share the edge embeddings.
  np.testing.assert_array_equal(got[0, 299], table[-1])
  np.testing.assert_array_equal(got[299, 0], table[0])


@pytest.mark.parametrize('span,length', [(255, 7), (3, 3), (3, 8)])
def test_transposed_swaps_the_position_axes_exactly(span, length):
  layer = positional_encodings.RelativePositionalEncoding(
      5, 'key_rpe', max_span=span)
  out = layer(length).numpy()
  transposed = layer(length, transposed=True).numpy()
  np.testing.assert_array_equal(transposed, np.transpose(out, [1, 0, 2]))
  np.testing.assert_array_equal(
      out, naive_table(layer.embeddings.numpy(), length))


def test_dynamic_length_inside_tf_function():
  layer = positional_encodings.RelativePositionalEncoding(4, 'query_rpe')

  @tf.function(input_signature=[tf.TensorSpec([], tf.int32)])
  def expand(length):
    return layer(length)

  table = None
  for length in (3, 17):
    out = expand(tf.constant(length))
    table = layer.embeddings.numpy()
    np.testing.assert_array_equal(out.numpy(), naive_table(table, length))
  concrete = expand.get_concrete_function()
  assert concrete.structured_outputs.shape.as_list() == [None, None, 4]
  # No gather on the variable (it breaks graph freezing for tf2onnx).
  assert not graph_ops.op_types(concrete.graph) & {
      'ResourceGather', 'GatherV2', 'GatherNd'}


def test_variable_and_checkpoint_name(tmp_path):
  layer = positional_encodings.RelativePositionalEncoding(8, 'key_rpe')
  assert layer(5).shape == (5, 5, 8)
  path = tf.train.Checkpoint(rpe=layer).write(str(tmp_path / 'ckpt'))
  shapes = dict(tf.train.list_variables(path))
  assert shapes['rpe/embeddings/.ATTRIBUTES/VARIABLE_VALUE'] == [509, 8]


def test_gradient_reaches_used_rows_only():
  layer = positional_encodings.RelativePositionalEncoding(3, 'value_rpe')
  layer(1)
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(layer(4))
  grad = tf.convert_to_tensor(tape.gradient(loss, layer.embeddings)).numpy()
  counts = grad[:, 0]
  # Offset d in [-3, 3] occurs (4 - |d|) times; other rows get nothing.
  expected = np.zeros(509, np.float32)
  for offset in range(-3, 4):
    expected[254 + offset] = 4 - abs(offset)
  np.testing.assert_array_equal(counts, expected)


def test_rejects_even_table():
  with pytest.raises(ValueError, match='odd'):
    positional_encodings.relative_position_table(np.zeros((4, 2)), 3)
