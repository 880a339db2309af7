"""Behaviour of the k-means cross-attention block on small, random layers.

Numerical agreement with DeepLab2 (full size) is in tests/test_kmax_decoder.py.
"""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from deeplab_kmax import heads
from deeplab_kmax import keys
from deeplab_kmax.layers import attention
from deeplab_kmax.layers import kmeans_cross_attention as kca
from deeplab_kmax.testing import reference

CENTERS, MEMORY, PIXEL_CHANNELS, HEIGHT, WIDTH = 6, 32, 24, 5, 7

SMALL = dict(memory_channels=MEMORY, bottleneck_channels=32, key_channels=16,
             value_channels=32, num_heads=4, feed_forward_channels=64)


def _small_predictor():
  return heads.MaXDeepLabHead(
      num_classes=5, semantic_num_classes=None, pixel_space_head_channels=16,
      mask_embedding_channels=8, name='auxiliary_clustering_predictor')


class _FixedLogits(tf_keras.layers.Layer):
  """Stand-in predictor whose mask logits are set by the test."""

  def __init__(self):
    super().__init__(name='fixed_logits')
    self.logits = None

  def call(self, unused_features, training=None):
    return {keys.PIXEL_SPACE_MASK_LOGITS: self.logits}


def _randomise(layer) -> None:
  """Non-degenerate weights (the default zero gammas hide residual paths)."""
  reference.fill_with_reference_rule({'layer': layer})


def _inputs(batch=2, seed=0, height=HEIGHT, width=WIDTH):
  rng = np.random.default_rng(seed)
  pixels = rng.standard_normal((batch, height, width, PIXEL_CHANNELS))
  centers = rng.standard_normal((batch, CENTERS, MEMORY))
  return (tf.constant(pixels, tf.float32), tf.constant(centers, tf.float32))


def bottleneck_inputs(batch, seed):
  """Random (pixels [B, HW, 32], centers [B, N, 32], values [B, HW, 32]) as
  the small block's bottleneck sees them."""
  rng = np.random.default_rng(seed)
  return (tf.constant(rng.standard_normal((batch, HEIGHT * WIDTH, 32)),
                      tf.float32),
          tf.constant(rng.standard_normal((batch, CENTERS, 32)), tf.float32),
          tf.constant(rng.standard_normal((batch, HEIGHT * WIDTH, 32)),
                      tf.float32))


def small_layer(layer_class=kca.KMaXTransformerLayer, seed=0, **options):
  """A small block of `layer_class` (this file's sizes), built on a batch
  of two and randomised; returns (layer, pixels, centers)."""
  layer = layer_class(_small_predictor, **SMALL, **options)
  pixels, centers = _inputs(batch=2, seed=seed)
  layer(pixels, centers)
  _randomise(layer)
  return layer, pixels, centers


@pytest.fixture(scope='module')
def block():
  return small_layer()[0]


def test_assignment_is_one_hot_argmax_over_clusters():
  rng = np.random.default_rng(1)
  logits = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
  assignment = kca.kmeans_assignment(tf.constant(logits)).numpy()
  expected = np.eye(5, dtype=np.float32)[logits.argmax(-1)]
  np.testing.assert_array_equal(assignment, expected)
  # Every pixel belongs to exactly one cluster; clusters hold many pixels.
  np.testing.assert_array_equal(assignment.sum(-1), np.ones((2, 3, 4)))
  assert assignment.sum(axis=(1, 2)).max() > 1


def test_assignment_has_no_gradient():
  logits = tf.constant(np.random.default_rng(2).standard_normal((1, 2, 2, 3)),
                       tf.float32)
  with tf.GradientTape() as tape:
    tape.watch(logits)
    loss = tf.reduce_sum(kca.kmeans_assignment(logits) * 3.0)
  assert tape.gradient(loss, logits) is None


def test_centres_depend_only_on_per_pixel_argmax():
  """Per-pixel shifts/scales of the logits keep the argmax over clusters.

  Such changes leave the block output unchanged, which fails for a softmax
  over pixels or an argmax over pixels; changing one pixel's winner does
  change it.
  """
  stub = _FixedLogits()
  layer = kca.KMaXTransformerLayer(lambda: stub, **SMALL)
  pixels, centers = _inputs(batch=1)
  rng = np.random.default_rng(3)
  logits = rng.standard_normal((1, HEIGHT, WIDTH, CENTERS)).astype(np.float32)
  stub.logits = tf.constant(logits)
  layer(pixels, centers)
  _randomise(layer)
  base, _ = layer(pixels, centers)

  offset = rng.uniform(-50, 50, (1, HEIGHT, WIDTH, 1))
  scale = rng.uniform(0.1, 10, (1, HEIGHT, WIDTH, 1))
  stub.logits = tf.constant(logits * scale + offset, tf.float32)
  same, _ = layer(pixels, centers)
  np.testing.assert_allclose(same, base, rtol=1e-6, atol=1e-6)

  moved = logits.copy()
  winner = moved[0, 2, 3].argmax()
  moved[0, 2, 3, (winner + 1) % CENTERS] = moved[0, 2, 3].max() + 1.0
  stub.logits = tf.constant(moved)
  changed, _ = layer(pixels, centers)
  assert np.abs(changed.numpy() - base.numpy()).max() > 1e-3


def test_update_gathers_values_by_cluster(block):
  rng = np.random.default_rng(4)
  labels = rng.integers(0, CENTERS, (2, 9))
  assignment = tf.constant(np.eye(CENTERS, dtype=np.float32)[labels])
  values = rng.standard_normal((2, 9, 32)).astype(np.float32)
  got = block.update_centers(assignment, tf.constant(values))
  sums = np.zeros((2, CENTERS, 32), np.float32)
  for b in range(2):
    np.add.at(sums[b], labels[b], values[b])
  expected = block._kmeans_memory_conv3_bn(
      block._kmeans_memory_batch_norm_retrieved_value(tf.constant(sums)))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _grads(layer, loss_fn):
  pixels, centers = _inputs(batch=2, seed=5)
  with tf.GradientTape() as tape:
    new_centers, aux = layer(pixels, centers, training=False)
    loss = loss_fn(new_centers, aux)
  variables = layer.trainable_variables
  grads = tape.gradient(loss, variables)
  return {v.name: g
          for v, g in zip(variables, grads)}


def _has_grad(grads, fragment):
  matched = [g for name, g in grads.items() if fragment in name]
  assert matched, f'no variable matches {fragment!r}'
  return all(g is not None and float(tf.reduce_max(tf.abs(g))) > 0
             for g in matched)


def _no_grad(grads, fragment):
  matched = [g for name, g in grads.items() if fragment in name]
  assert matched, f'no variable matches {fragment!r}'
  return all(g is None for g in matched)


def test_deep_supervision_gradients_reach_projections(block):
  """A loss on this block's auxiliary mask logits trains the predictor and
  the pixel/centre down-projections that feed it, but not the value path,
  which only enters the centre update after the (gradient-free) argmax."""
  grads = _grads(block, lambda c, aux: tf.reduce_sum(
      tf.square(aux['pixel_space_mask_logits'])))
  for fragment in ('pixel_conv1_bn_act/conv/kernel',
                   'memory_conv1_bn_act/conv/kernel',
                   'pixel_space_head', 'transformer_mask_head/conv/kernel',
                   'pixel_space_mask_batch_norm/gamma'):
    assert _has_grad(grads, fragment), fragment
  for fragment in ('pixel_v_conv_bn', 'kmeans_memory_conv3_bn',
                   'memory_qkv_conv_bn', 'memory_ffn_conv1_bn_act',
                   'transformer_class_head'):
    assert _no_grad(grads, fragment), fragment


def test_centre_gradients_flow_through_values_not_assignment(block):
  weights = tf.constant(np.random.default_rng(6).standard_normal(
      (2, CENTERS, MEMORY)), tf.float32)
  grads = _grads(block, lambda c, aux: tf.reduce_sum(c * weights))
  for fragment in ('pixel_v_conv_bn/conv/kernel', 'pixel_conv1_bn_act',
                   'kmeans_memory_batch_norm_retrieved_value/gamma',
                   'kmeans_memory_conv3_bn/conv/kernel',
                   'memory_qkv_conv_bn/conv/kernel',
                   'memory_ffn_conv2_bn/conv/kernel'):
    assert _has_grad(grads, fragment), fragment
  # The predictor only decides the hard assignment here.
  for fragment in ('pixel_space_head', 'transformer_mask_head',
                   'pixel_space_mask_batch_norm'):
    assert _no_grad(grads, fragment), fragment


def test_drop_path_only_in_training():
  layer = kca.KMaXTransformerLayer(_small_predictor, drop_path_keep_prob=0.5,
                                   **SMALL)
  pixels, centers = _inputs(batch=8, seed=7)
  layer(pixels, centers)
  _randomise(layer)
  eval1, _ = layer(pixels, centers, training=False)
  eval2, _ = layer(pixels, centers, training=False)
  # Deterministic up to float32 rounding (1e-6 of absmax); drop-path in
  # training moves the centres by O(absmax).
  rounding = 1e-6 * np.abs(eval1.numpy()).max()
  np.testing.assert_allclose(eval2, eval1, rtol=0, atol=rounding)
  train1, _ = layer(pixels, centers, training=True)
  train2, _ = layer(pixels, centers, training=True)
  assert np.abs(train1.numpy() - train2.numpy()).max() > 1e-4

  # Without drop-path, training mode is deterministic too.
  keep_all = kca.KMaXTransformerLayer(_small_predictor, **SMALL)
  keep_all(pixels, centers)
  _randomise(keep_all)
  first, _ = keep_all(pixels, centers, training=True)
  second, _ = keep_all(pixels, centers, training=True)
  np.testing.assert_allclose(second, first, rtol=0,
                             atol=1e-6 * np.abs(first.numpy()).max())


def test_dynamic_batch_and_spatial_size(block):
  fn = tf.function(
      lambda p, c: block(p, c, training=False),
      input_signature=[
          tf.TensorSpec([None, None, None, PIXEL_CHANNELS], tf.float32),
          tf.TensorSpec([None, CENTERS, MEMORY], tf.float32)])
  pixels, centers = _inputs(batch=3, seed=8, height=4, width=9)
  batched, aux = fn(pixels, centers)
  assert batched.shape == (3, CENTERS, MEMORY)
  assert aux['pixel_space_mask_logits'].shape == (3, 4, 9, CENTERS)
  # Inference is per-sample: batch 3 equals three batch-1 calls.
  for i in range(3):
    single, _ = fn(pixels[i:i + 1], centers[i:i + 1])
    np.testing.assert_allclose(single[0], batched[i], rtol=1e-5, atol=1e-5)
  other, _ = fn(*_inputs(batch=1, seed=9, height=3, width=3))
  assert other.shape == (1, CENTERS, MEMORY)


def test_block_wrapper_forwards_and_names_checkpoint_path():
  wrapper = kca.KMaXDecoderBlock('blk', auxiliary_predictor_fn=
                                 _small_predictor, **SMALL)
  pixels, centers = _inputs(batch=1)
  out, aux = wrapper(pixels, centers)
  assert out.shape == centers.shape
  assert set(aux) == {'pixel_space_mask_logits', 'transformer_class_logits',
                      'pixel_space_normalized_feature'}
  keys = reference.checkpoint_shapes({'b': wrapper})
  assert all(k.startswith('b/_block1_transformer/') for k in keys)
  assert ('b/_block1_transformer/_memory_attention/'
          '_batch_norm_retrieved_value/gamma/.ATTRIBUTES/VARIABLE_VALUE'
          in keys)


def test_bad_inputs_raise():
  layer = kca.KMaXTransformerLayer(_small_predictor, **SMALL)
  pixels, centers = _inputs(batch=1)
  with pytest.raises(ValueError, match='cluster_centers'):
    layer(pixels, centers[..., :8])
  with pytest.raises(ValueError, match='pixel_feature'):
    layer(pixels[0], centers)
  with pytest.raises(ValueError, match='divisible'):
    kca.KMaXTransformerLayer(_small_predictor, **{**SMALL, 'num_heads': 5})


def test_attention_heads_round_trip():
  x = tf.constant(np.arange(2 * 3 * 8, dtype=np.float32).reshape(2, 3, 8))
  split = attention.split_heads(x, 4)
  assert split.shape == (2, 4, 3, 2)
  np.testing.assert_array_equal(split[1, 2, 0], x[1, 0, 4:6])
  np.testing.assert_array_equal(attention.merge_heads(split), x)
  with pytest.raises(ValueError, match='num_heads'):
    attention.split_heads(x, 3)
