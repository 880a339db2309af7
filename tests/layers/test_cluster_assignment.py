"""The three pixel-cluster interactions: normalisation axis, gradients, switch.

kMaX's default (`cluster_argmax`) is checked bit for bit against the golden
numerics in tests/layers/test_kmeans_cross_attention.py and
tests/test_kmax_decoder.py; here it is only compared with itself.
"""

import numpy as np
import pytest
import tensorflow as tf

from deeplab_kmax import keys
from deeplab_kmax.layers import cluster_assignment as ca
from deeplab_kmax.layers import kmeans_cross_attention as kca
from tests.layers import test_kmeans_cross_attention as kca_test

SMALL = kca_test.SMALL
CENTERS, HEIGHT, WIDTH = kca_test.CENTERS, kca_test.HEIGHT, kca_test.WIDTH


def _logits(seed=0, shape=(2, HEIGHT, WIDTH, CENTERS)):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _softmax(x, axis):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def test_hard_assignment_is_kmax_assignment():
  logits = tf.constant(_logits(1))
  np.testing.assert_array_equal(ca.hard_assignment(logits),
                                kca.kmeans_assignment(logits))
  np.testing.assert_array_equal(
      ca.cluster_axis_assignment(logits, ca.CLUSTER_ARGMAX),
      np.eye(CENTERS, dtype=np.float32)[_logits(1).argmax(-1)])


def test_soft_assignment_normalises_over_clusters_not_pixels():
  logits = _logits(2)
  soft = ca.cluster_axis_assignment(tf.constant(logits),
                                    ca.CLUSTER_SOFTMAX).numpy()
  np.testing.assert_allclose(soft, _softmax(logits, -1), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-5)  # every pixel
  per_cluster = soft.sum(axis=(1, 2))  # [B, N]: mass over the pixels
  assert np.abs(per_cluster - 1.0).max() > 0.5


def test_spatial_attention_normalises_over_pixels_not_clusters():
  rng = np.random.default_rng(3)
  query = rng.standard_normal((2, CENTERS, 16)).astype(np.float32)
  key = rng.standard_normal((2, HEIGHT * WIDTH, 16)).astype(np.float32)
  value = rng.standard_normal((2, HEIGHT * WIDTH, 8)).astype(np.float32)
  retrieved, weights = ca.spatial_softmax_attention(
      tf.constant(query), tf.constant(key), tf.constant(value), num_heads=4)
  weights = weights.numpy()  # [B, h, N, HW]
  assert weights.shape == (2, 4, CENTERS, HEIGHT * WIDTH)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)  # every centre
  assert np.abs(weights.sum(2) - 1.0).max() > 0.5  # not per pixel
  # Independent computation per head: softmax_HW(q k^T / sqrt(d)) v.
  expected = np.zeros((2, CENTERS, 8), np.float32)
  for head in range(4):
    q = query[..., head * 4:(head + 1) * 4]
    k = key[..., head * 4:(head + 1) * 4]
    w = _softmax(np.einsum('bnd,bpd->bnp', q, k) / 2.0, -1)
    expected[..., head * 2:(head + 1) * 2] = np.einsum(
        'bnp,bpd->bnd', w, value[..., head * 2:(head + 1) * 2])
  np.testing.assert_allclose(retrieved, expected, rtol=1e-5, atol=1e-5)


def _stub_layer(interaction, logits):
  stub = kca_test._FixedLogits()  # pylint: disable=protected-access
  stub.logits = tf.constant(logits)
  layer = kca.KMaXTransformerLayer(lambda: stub, **SMALL,
                                   pixel_cluster_interaction=interaction)
  pixels, centers = kca_test._inputs(batch=1)  # pylint: disable=protected-access
  layer(pixels, centers)
  kca_test._randomise(layer)  # pylint: disable=protected-access
  return layer, stub, pixels, centers


def test_cluster_softmax_block_uses_softmax_over_clusters():
  """Per-pixel shifts of the logits leave a cluster-axis softmax unchanged;
  a softmax over the pixels would change (and the reverse for per-cluster
  shifts)."""
  logits = _logits(4, (1, HEIGHT, WIDTH, CENTERS))
  layer, stub, pixels, centers = _stub_layer(ca.CLUSTER_SOFTMAX, logits)
  base, _ = layer(pixels, centers)
  rng = np.random.default_rng(5)
  stub.logits = tf.constant(
      logits + rng.uniform(-5, 5, (1, HEIGHT, WIDTH, 1)), tf.float32)
  same, _ = layer(pixels, centers)
  np.testing.assert_allclose(same, base, rtol=1e-5, atol=1e-5)
  stub.logits = tf.constant(
      logits + rng.uniform(-5, 5, (1, 1, 1, CENTERS)), tf.float32)
  changed, _ = layer(pixels, centers)
  assert np.abs(changed.numpy() - base.numpy()).max() > 1e-3
  # Unlike the argmax, the soft weights move with any logit change.
  stub.logits = tf.constant(logits * 1.5)
  scaled, _ = layer(pixels, centers)
  assert np.abs(scaled.numpy() - base.numpy()).max() > 1e-4


def test_cluster_softmax_update_is_soft_gather():
  logits = _logits(6, (1, HEIGHT, WIDTH, CENTERS))
  layer, _, _, _ = _stub_layer(ca.CLUSTER_SOFTMAX, logits)
  pixels, centers, values = kca_test.bottleneck_inputs(batch=1, seed=7)
  update, clustered = layer.pixel_cluster_update(
      tf.constant(logits), pixels, centers, values)
  weights = _softmax(logits, -1).reshape(1, HEIGHT * WIDTH, CENTERS)
  expected = layer.update_centers(tf.constant(weights), values)
  np.testing.assert_allclose(update, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(clustered, centers)


def test_spatial_softmax_block_ignores_the_assignment_logits():
  """The centres read the pixels by attention; the affinity logits are only
  deep-supervised, so changing them leaves the new centres unchanged."""
  logits = _logits(8, (1, HEIGHT, WIDTH, CENTERS))
  layer, stub, pixels, centers = _stub_layer(ca.SPATIAL_SOFTMAX, logits)
  base, predictions = layer(pixels, centers)
  assert predictions[keys.PIXEL_SPACE_MASK_LOGITS].shape == (1, HEIGHT, WIDTH, CENTERS)
  stub.logits = tf.constant(_logits(9, (1, HEIGHT, WIDTH, CENTERS)))
  same, _ = layer(pixels, centers)
  # Exact on purpose: the same layer, weights and inputs in one process run
  # the same kernels; only the ignored logits changed.
  np.testing.assert_array_equal(same, base)
  names = {v.name.split('/')[1] for v in layer.trainable_variables}
  assert {'cross_query_conv_bn', 'pixel_key_conv_bn'} <= names


def test_spatial_softmax_update_matches_manual_attention():
  logits = _logits(10, (1, HEIGHT, WIDTH, CENTERS))
  layer, _, _, _ = _stub_layer(ca.SPATIAL_SOFTMAX, logits)
  pixels, centers, values = kca_test.bottleneck_inputs(batch=1, seed=11)
  update, _ = layer.pixel_cluster_update(tf.constant(logits), pixels, centers,
                                         values)
  retrieved, _ = ca.spatial_softmax_attention(
      layer._cross_query_conv_bn(centers),  # pylint: disable=protected-access
      layer._pixel_key_conv_bn(pixels),  # pylint: disable=protected-access
      values, SMALL['num_heads'])
  # pylint: disable=protected-access
  expected = layer._kmeans_memory_conv3_bn(
      layer._kmeans_memory_batch_norm_retrieved_value(retrieved))
  # pylint: enable=protected-access
  np.testing.assert_allclose(update, expected, rtol=1e-5, atol=1e-5)


def _centre_grads(interaction):
  layer = kca.KMaXTransformerLayer(kca_test._small_predictor, **SMALL,  # pylint: disable=protected-access
                                   pixel_cluster_interaction=interaction)
  pixels, centers = kca_test._inputs(batch=2, seed=12)  # pylint: disable=protected-access
  layer(pixels, centers)
  kca_test._randomise(layer)  # pylint: disable=protected-access
  weights = tf.constant(np.random.default_rng(13).standard_normal(
      (2, CENTERS, SMALL['memory_channels'])), tf.float32)
  with tf.GradientTape() as tape:
    new_centers, _ = layer(pixels, centers, training=True)
    loss = tf.reduce_sum(new_centers * weights)
  grads = tape.gradient(loss, layer.trainable_variables)
  return {v.name: g for v, g in zip(layer.trainable_variables, grads)}


@pytest.mark.parametrize('interaction,predictor_trained,attention_trained', [
    (ca.CLUSTER_ARGMAX, False, None),
    (ca.CLUSTER_SOFTMAX, True, None),
    (ca.SPATIAL_SOFTMAX, False, True),
])
def test_centre_gradients_by_interaction(interaction, predictor_trained,
                                         attention_trained):
  """The soft assignment trains the affinity predictor through the centre
  update; the argmax does not; spatial attention trains its q/k instead."""
  grads = _centre_grads(interaction)
  mask_head = [g for n, g in grads.items()
               if 'transformer_mask_head/conv/kernel' in n]
  assert len(mask_head) == 1
  has = mask_head[0] is not None and float(tf.reduce_max(
      tf.abs(mask_head[0]))) > 0
  assert has == predictor_trained
  query = [g for n, g in grads.items() if 'cross_query_conv_bn/conv' in n]
  if attention_trained is None:
    assert not query
  else:
    assert query and float(tf.reduce_max(tf.abs(query[0]))) > 0
  values = [g for n, g in grads.items() if 'pixel_v_conv_bn/conv/kernel' in n]
  assert float(tf.reduce_max(tf.abs(values[0]))) > 0


def test_default_is_cluster_argmax_and_identical():
  pixels, centers = kca_test._inputs(batch=2, seed=14)  # pylint: disable=protected-access
  default = kca.KMaXTransformerLayer(kca_test._small_predictor, **SMALL)  # pylint: disable=protected-access
  explicit = kca.KMaXTransformerLayer(
      kca_test._small_predictor, **SMALL,  # pylint: disable=protected-access
      pixel_cluster_interaction=ca.CLUSTER_ARGMAX)
  assert default.pixel_cluster_interaction == ca.CLUSTER_ARGMAX
  default(pixels, centers)
  explicit(pixels, centers)
  kca_test._randomise(default)  # pylint: disable=protected-access
  explicit.set_weights(default.get_weights())
  names = sorted(v.name for v in default.variables)
  assert names == sorted(v.name for v in explicit.variables)
  a, aux_a = default(pixels, centers)
  b, aux_b = explicit(pixels, centers)
  # Exact on purpose: two layers with the same weights and code path run
  # the same kernels on the same inputs in one process.
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(aux_a[keys.PIXEL_SPACE_MASK_LOGITS],
                                aux_b[keys.PIXEL_SPACE_MASK_LOGITS])


def test_unknown_interaction_is_rejected():
  with pytest.raises(ValueError, match=r"pixel_cluster_interaction is "
                     r"'softmax'.*'cluster_argmax', 'cluster_softmax', "
                     r"'spatial_softmax'"):
    kca.KMaXTransformerLayer(kca_test._small_predictor, **SMALL,  # pylint: disable=protected-access
                             pixel_cluster_interaction='softmax')
