"""CMT-DeepLab block: clustering + cross-attention update, CoordConv pixels."""

import numpy as np
import pytest
import tensorflow as tf

from deeplab_kmax import keys
from deeplab_kmax.layers import cluster_assignment as ca
from deeplab_kmax.layers import cmt_clustering
from tests.layers import test_kmeans_cross_attention as kca_test

SMALL = kca_test.SMALL
CENTERS, HEIGHT, WIDTH = kca_test.CENTERS, kca_test.HEIGHT, kca_test.WIDTH
# pylint: disable=protected-access


def _layer(interaction=ca.CLUSTER_SOFTMAX, seed=0):
  return kca_test.small_layer(cmt_clustering.CMTTransformerLayer, seed=seed,
                              pixel_cluster_interaction=interaction)


def test_pixel_coordinates_are_row_major_in_unit_range():
  coords = cmt_clustering.pixel_coordinates(tf.constant(3),
                                            tf.constant(5)).numpy()
  assert coords.shape == (15, 2)
  np.testing.assert_allclose(coords[0], [-1, -1])
  np.testing.assert_allclose(coords[4], [-1, 1])  # end of the first row
  np.testing.assert_allclose(coords[-1], [1, 1])
  np.testing.assert_allclose(coords[7], [0, 0])


def test_update_adds_clustering_and_cross_attention():
  layer, _, _ = _layer()
  rng = np.random.default_rng(1)
  logits = tf.constant(rng.standard_normal((2, HEIGHT, WIDTH, CENTERS)),
                       tf.float32)
  pixels = tf.constant(rng.standard_normal((2, HEIGHT * WIDTH, 32)),
                       tf.float32)
  centers = tf.constant(rng.standard_normal((2, CENTERS, 32)), tf.float32)
  values = tf.constant(rng.standard_normal((2, HEIGHT * WIDTH, 32)),
                       tf.float32)
  update, _ = layer.pixel_cluster_update(logits, pixels, centers, values)
  clustering = layer.update_centers(
      tf.reshape(tf.nn.softmax(logits, -1), [2, -1, CENTERS]), values)
  retrieved, _ = ca.spatial_softmax_attention(
      layer._cross_query_conv_bn(centers), layer._pixel_key_conv_bn(pixels),
      values, SMALL['num_heads'])
  cross = layer._cross_attention_conv3_bn(
      layer._cross_attention_batch_norm_retrieved_value(retrieved))
  np.testing.assert_allclose(update, clustering + cross, rtol=1e-5,
                             atol=1e-5)
  # Both terms are live: neither is (numerically) zero.
  assert float(tf.reduce_max(tf.abs(clustering))) > 1e-2
  assert float(tf.reduce_max(tf.abs(cross))) > 1e-2


def test_pixels_are_location_sensitive():
  """A spatially constant input gives different pixels at different places
  once the coordinate kernel is non-zero; kMaX's projection does not."""
  layer, _, _ = _layer()
  constant = tf.ones([1, HEIGHT * WIDTH, kca_test.PIXEL_CHANNELS])
  projected = layer.project_pixels(constant, HEIGHT, WIDTH).numpy()
  assert np.ptp(projected, axis=1).max() > 1e-3
  plain = layer._pixel_conv1_bn_act(layer._act(constant)).numpy()
  assert np.ptp(plain, axis=1).max() < 1e-5
  # Zero coordinate kernel: exactly kMaX's bottleneck.
  layer._pixel_coordinate_conv.kernel.assign(
      tf.zeros_like(layer._pixel_coordinate_conv.kernel))
  np.testing.assert_allclose(layer.project_pixels(constant, HEIGHT, WIDTH),
                             plain, rtol=1e-6, atol=1e-6)


def test_fresh_coordinate_kernel_is_zero_and_receives_gradient():
  layer = cmt_clustering.CMTTransformerLayer(
      kca_test._small_predictor, **SMALL,
      pixel_cluster_interaction=ca.CLUSTER_SOFTMAX)
  pixels, centers = kca_test._inputs(batch=2, seed=2)
  layer(pixels, centers)
  kernel = layer._pixel_coordinate_conv.kernel
  np.testing.assert_array_equal(kernel, np.zeros((2, 32)))
  kca_test._randomise(layer)
  kernel.assign(tf.zeros_like(kernel))
  with tf.GradientTape() as tape:
    new_centers, aux = layer(pixels, centers, training=True)
    loss = tf.reduce_sum(new_centers ** 2) + tf.reduce_sum(
        aux[keys.PIXEL_SPACE_MASK_LOGITS] ** 2)
  grad = tape.gradient(loss, kernel)
  assert grad is not None and float(tf.reduce_max(tf.abs(grad))) > 0


def test_cmt_rejects_spatial_softmax():
  with pytest.raises(ValueError, match='pixel_cluster_interaction of the CMT'
                     r".*'cluster_argmax', 'cluster_softmax'"):
    cmt_clustering.CMTTransformerLayer(
        kca_test._small_predictor, **SMALL,
        pixel_cluster_interaction=ca.SPATIAL_SOFTMAX)
