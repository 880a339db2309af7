"""Tests for position-sensitive axial attention."""

import numpy as np
import pytest
import tensorflow as tf

from deeplab_kmax.layers import axial_attention
from deeplab_kmax.layers import normalization

EPS = normalization.BATCH_NORM_EPSILON


def randomise(layer, seed=0):
  """Gives every variable (incl. batch-norm statistics) random values."""
  rng = np.random.default_rng(seed)
  for var in layer.variables:
    shape = var.shape.as_list()
    if 'variance' in var.name or 'gamma' in var.name:
      value = rng.uniform(0.5, 1.5, shape)
    else:
      value = rng.standard_normal(shape) * 0.3
    var.assign(value.astype(np.float32))


def bn(x, norm):
  mean, var = norm.moving_mean.numpy(), norm.moving_variance.numpy()
  return (x - mean) / np.sqrt(var + EPS) * norm.gamma.numpy() + \
      norm.beta.numpy()


def offsets(table, length):
  span = (table.shape[0] + 1) // 2
  idx = np.arange(length)[None, :] - np.arange(length)[:, None] + span - 1
  return table[np.clip(idx, 0, 2 * span - 2)]


def naive_axial_1d(layer, x):
  """Loop-free but independent float64 reference of the 1-D attention."""
  x = x.astype(np.float64)
  n, length, _ = x.shape
  heads = layer._num_heads
  dk, dv = layer._key_depth, layer._value_depth
  qkv = bn(x @ layer.qkv_kernel.numpy(), layer._batch_norm_qkv)
  q = qkv[..., :heads * dk].reshape(n, length, heads, dk)
  k = qkv[..., heads * dk:2 * heads * dk].reshape(n, length, heads, dk)
  v = qkv[..., 2 * heads * dk:].reshape(n, length, heads, dv)
  rq = offsets(layer._query_rpe.embeddings.numpy(), length)  # [L, M, dk]
  rk = offsets(layer._key_rpe.embeddings.numpy(), length)
  rv = offsets(layer._value_rpe.embeddings.numpy(), length)
  sim = np.stack([
      np.einsum('nlhd,nmhd->nhlm', q, k),
      np.einsum('nlhd,lmd->nhlm', q, rq),
      np.einsum('nmhd,lmd->nhlm', k, rk),
  ])
  sim = bn(sim, layer._batch_norm_similarity).sum(0)
  weights = np.exp(sim - sim.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.stack([
      np.einsum('nhlm,nmhd->nhld', weights, v),
      np.einsum('nhlm,lmd->nhld', weights, rv),
  ])
  out = bn(out, layer._batch_norm_retrieved_output).sum(0)
  return out.transpose(0, 2, 1, 3).reshape(n, length, heads * dv)


@pytest.mark.parametrize('length', [1, 6, 13])
def test_1d_matches_naive_reference(length):
  layer = axial_attention.AxialAttention1D(16, 32, name='height_axis',
                                           num_heads=4)
  x = np.random.default_rng(length).standard_normal(
      (3, length, 10)).astype(np.float32)
  layer(x)
  randomise(layer, seed=length)
  got = layer(x, training=False).numpy()
  assert got.shape == (3, length, 32)
  np.testing.assert_allclose(got, naive_axial_1d(layer, x), rtol=1e-4,
                             atol=1e-4)


def test_1d_variable_shapes_follow_deeplab2_contract():
  layer = axial_attention.AxialAttention1D(256, 512, name='width_axis')
  layer(tf.zeros([2, 7, 64]))
  shapes = {v.name.split('/', 1)[1]: tuple(v.shape) for v in layer.variables}
  assert shapes['qkv_kernel:0'] == (64, 1024)
  assert shapes['batch_norm_similarity/gamma:0'] == (3, 1, 8, 1, 1)
  assert shapes['batch_norm_retrieved_output/gamma:0'] == (2, 1, 8, 1, 64)
  assert shapes['query_rpe/embeddings:0'] == (509, 32)
  assert shapes['value_rpe/embeddings:0'] == (509, 64)


def test_1d_rejects_bad_head_split():
  with pytest.raises(ValueError, match='divisible by num_heads'):
    axial_attention.AxialAttention1D(12, 32, name='a', num_heads=8)


@pytest.fixture(scope='module')
def attention_pair():
  """Stride-1 and stride-2 2-D layers sharing the same random weights."""
  dense = axial_attention.AxialAttention2D(8, name='attention', num_heads=2)
  strided = axial_attention.AxialAttention2D(8, name='attention', strides=2,
                                             num_heads=2)
  x = tf.zeros([1, 5, 6, 12])
  dense(x)
  strided(x)
  randomise(dense, seed=3)
  for src, dst in zip(dense.variables, strided.variables):
    dst.assign(src)
  return dense, strided


def test_2d_is_height_then_width_attention(attention_pair):
  dense, _ = attention_pair
  x = np.random.default_rng(0).standard_normal((2, 5, 7, 12)).astype(
      np.float32)
  got = dense(x, training=False).numpy()
  assert got.shape == (2, 5, 7, 16)
  columns = x.transpose(0, 2, 1, 3).reshape(14, 5, 12)
  after_height = naive_axial_1d(dense._height_axis, columns)
  after_height = after_height.reshape(2, 7, 5, 16).transpose(0, 2, 1, 3)
  rows = after_height.reshape(10, 7, 16).astype(np.float32)
  expected = naive_axial_1d(dense._width_axis, rows).reshape(2, 5, 7, 16)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('height,width', [(9, 9), (5, 8), (1, 4)])
def test_2d_stride_two_subsamples_the_dense_output(attention_pair, height,
                                                   width):
  dense, strided = attention_pair
  x = tf.random.stateless_normal([2, height, width, 12], seed=[height, width])
  full = dense(x, training=False).numpy()
  got = strided(x, training=False).numpy()
  assert got.shape == (2, (height + 1) // 2, (width + 1) // 2, 16)
  np.testing.assert_allclose(got, full[:, ::2, ::2], rtol=1e-5, atol=1e-5)


def test_2d_dynamic_shapes_in_tf_function(attention_pair):
  dense, _ = attention_pair

  @tf.function(input_signature=[tf.TensorSpec([None, None, None, 12])])
  def run(x):
    return dense(x, training=False)

  assert run.get_concrete_function().structured_outputs.shape.as_list() == [
      None, None, None, 16]
  for shape in ([1, 4, 9, 12], [3, 7, 2, 12]):
    x = tf.random.stateless_normal(shape, seed=[1, 2])
    np.testing.assert_allclose(run(x).numpy(), dense(x).numpy(), rtol=1e-5,
                               atol=1e-5)


def test_2d_training_mode_gives_gradients_to_every_variable():
  layer = axial_attention.AxialAttention2D(8, name='attention', num_heads=2)
  x = tf.random.stateless_normal([2, 4, 5, 6], seed=[0, 1])
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(tf.square(layer(x, training=True)))
  grads = tape.gradient(loss, layer.trainable_variables)
  assert len(layer.trainable_variables) == 2 * (1 + 3 + 3 * 2)
  for var, grad in zip(layer.trainable_variables, grads):
    assert grad is not None, var.name
    assert np.isfinite(tf.convert_to_tensor(grad).numpy()).all(), var.name
  # Batch statistics were used and the moving averages moved.
  moving = layer._height_axis._batch_norm_qkv.moving_mean.numpy()
  assert np.abs(moving).max() > 0


def test_2d_rejects_non_image_input():
  layer = axial_attention.AxialAttention2D(8, num_heads=2)
  with pytest.raises(ValueError, match=r'\[B, H, W, C\]'):
    layer(tf.zeros([2, 5, 6]))
  with pytest.raises(ValueError, match='strides'):
    axial_attention.AxialAttention2D(8, strides=3)
