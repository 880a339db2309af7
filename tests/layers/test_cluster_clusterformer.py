"""ClusterFormer block: T recurrent clustering iterations, feature dispatching."""

import numpy as np
import pytest
import tensorflow as tf

from deeplab_kmax import keys
from deeplab_kmax.layers import clusterformer
from tests.layers import test_kmeans_cross_attention as kca_test

SMALL = kca_test.SMALL
CENTERS, HEIGHT, WIDTH = kca_test.CENTERS, kca_test.HEIGHT, kca_test.WIDTH
PIXEL_CHANNELS = kca_test.PIXEL_CHANNELS
# pylint: disable=protected-access


def _layer(iterations, seed=0):
  return kca_test.small_layer(clusterformer.ClusterFormerLayer, seed=seed,
                              clusterformer_iterations=iterations)


def _bottleneck_inputs(seed=1):
  return kca_test.bottleneck_inputs(batch=2, seed=seed)


@pytest.mark.parametrize('iterations', [1, 3])
def test_centres_change_once_per_iteration(iterations):
  layer, _, _ = _layer(iterations)
  pixels, centers, values = _bottleneck_inputs()
  states, gathered = layer.cluster(pixels, centers, values)
  assert len(states) == iterations + 1
  np.testing.assert_array_equal(states[0], centers)
  for before, after in zip(states, states[1:]):
    assert float(tf.reduce_max(tf.abs(after - before))) > 1e-3
  assert gathered.shape == (2, CENTERS, 32)


def test_zero_iterations_skip_clustering():
  layer, pixels, centers = _layer(0)
  bottleneck = _bottleneck_inputs()
  states, gathered = layer.cluster(*bottleneck)
  assert len(states) == 1 and gathered is None
  update, clustered = layer.pixel_cluster_update(
      None, bottleneck[0], bottleneck[1], bottleneck[2])
  np.testing.assert_array_equal(update, np.zeros((2, CENTERS, 32)))
  np.testing.assert_array_equal(clustered, bottleneck[1])
  # The clustering projection never ran, so it has no variables.
  assert not any('cluster_projection' in v.name for v in layer.variables)
  new_centers, _, refined = layer(pixels, centers)
  assert new_centers.shape == centers.shape
  assert refined.shape == pixels.shape


def test_one_iteration_is_a_softmax_over_clusters_weighted_mean():
  pixels, centers, values = _bottleneck_inputs(2)
  seen = []

  def projection(gathered):
    seen.append(gathered)
    return tf.zeros_like(centers)

  clusterformer.recurrent_clustering(pixels, centers, values, 1, projection)
  p, c, v = pixels.numpy(), centers.numpy(), values.numpy()
  logits = np.einsum('bpd,bnd->bpn', p, c) / np.sqrt(32)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)  # over the clusters
  expected = (np.einsum('bpn,bpv->bnv', weights, v) /
              (weights.sum(1)[..., None] + 1e-6))
  np.testing.assert_allclose(seen[0], expected, rtol=1e-4, atol=1e-5)


def test_dispatch_gates_are_sigmoid_of_scaled_cosine():
  pixels, centers, _ = _bottleneck_inputs(3)
  gates = clusterformer.dispatch_gates(pixels, centers, tf.constant(2.0),
                                       tf.constant(-0.5)).numpy()
  p = pixels.numpy() / np.linalg.norm(pixels.numpy(), axis=-1, keepdims=True)
  c = centers.numpy() / np.linalg.norm(centers.numpy(), axis=-1,
                                       keepdims=True)
  expected = 1 / (1 + np.exp(-(2.0 * np.einsum('bpd,bnd->bpn', p, c) - 0.5)))
  np.testing.assert_allclose(gates, expected, rtol=1e-5, atol=1e-6)


def test_dispatching_refines_pixels_and_receives_gradients():
  layer, pixels, centers = _layer(2, seed=4)
  with tf.GradientTape() as tape:
    new_centers, aux, refined = layer(pixels, centers, training=True)
    loss = tf.reduce_sum(refined ** 2)
  assert refined.shape == (2, HEIGHT, WIDTH, PIXEL_CHANNELS)
  assert new_centers.shape == centers.shape
  assert aux[keys.PIXEL_SPACE_MASK_LOGITS].shape == (2, HEIGHT, WIDTH, CENTERS)
  assert float(tf.reduce_max(tf.abs(refined - pixels))) > 1e-3
  variables = {v.name: v for v in layer.trainable_variables}
  grads = dict(zip(variables, tape.gradient(loss,
                                            list(variables.values()))))
  for fragment in ('dispatch_scale', 'dispatch_bias',
                   'dispatch_conv_bn/conv/kernel', 'cluster_projection/conv',
                   'pixel_conv1_bn_act/conv/kernel'):
    matched = [g for name, g in grads.items() if fragment in name]
    assert matched, fragment
    assert all(g is not None and float(tf.reduce_max(tf.abs(g))) > 0
               for g in matched), fragment


def test_negative_iterations_are_rejected():
  with pytest.raises(ValueError, match='clusterformer_iterations'):
    clusterformer.ClusterFormerLayer(kca_test._small_predictor, **SMALL,
                                     clusterformer_iterations=-1)
