"""The project's batch norm: Keras' (synchronised) batch norm in training,
the fused kernel in inference on [B, H, W, C] maps."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from deeplab_kmax.layers import normalization


def _pair(channels: int, rank: int):
  """Ours and Keras' synchronised batch norm with the same far-from-identity
  statistics, built for a rank-`rank` input."""
  ours = normalization.batch_norm_factory()(name='ours')
  keras = tf_keras.layers.BatchNormalization(
      momentum=normalization.BATCH_NORM_MOMENTUM,
      epsilon=normalization.BATCH_NORM_EPSILON, synchronized=True)
  shape = [2] + [5] * (rank - 2) + [channels]
  ours.build(shape)
  keras.build(shape)
  rng = np.random.default_rng(0)
  weights = [rng.uniform(0.5, 2.0, channels), rng.normal(size=channels),
             rng.normal(size=channels), rng.uniform(0.05, 3.0, channels)]
  ours.set_weights(weights)
  keras.set_weights(weights)
  return ours, keras, tf.random.stateless_normal(shape, seed=[1, 2]) * 3.0


def _op_types(fn, x):
  return {op.type for op in
          tf.function(fn).get_concrete_function(x).graph.get_operations()}


@pytest.mark.parametrize('training', [False, None])
def test_inference_on_maps_runs_the_fused_kernel(training):
  ours, keras, x = _pair(16, rank=4)
  np.testing.assert_allclose(ours(x, training=training),
                             keras(x, training=training), rtol=0, atol=1e-5)
  ops = _op_types(lambda t: ours(t, training=training), x)
  assert 'FusedBatchNormV3' in ops
  assert not ops & {'Mul', 'AddV2', 'Sub', 'Rsqrt'}, ops


def test_training_is_keras_synchronised_batch_norm():
  ours, keras, x = _pair(8, rank=4)
  np.testing.assert_array_equal(ours(x, training=True),
                                keras(x, training=True))
  np.testing.assert_array_equal(ours.moving_mean.numpy(),
                                keras.moving_mean.numpy())
  np.testing.assert_array_equal(ours.moving_variance.numpy(),
                                keras.moving_variance.numpy())
  assert 'FusedBatchNormV3' not in _op_types(
      lambda t: ours(t, training=True), x)


def test_sequences_use_keras_computation():
  # [B, L, C] (the transformer's 1-D convolutions): no fused kernel exists.
  ours, keras, x = _pair(8, rank=3)
  np.testing.assert_array_equal(ours(x, training=False),
                                keras(x, training=False))
  assert 'FusedBatchNormV3' not in _op_types(
      lambda t: ours(t, training=False), x)


def test_bfloat16_inference_keeps_float32_statistics():
  tf_keras.mixed_precision.set_global_policy('mixed_bfloat16')
  try:
    ours, keras, x = _pair(8, rank=4)
    out = ours(tf.cast(x, tf.bfloat16), training=False)
    assert out.dtype == tf.bfloat16
    assert ours.moving_variance.dtype == tf.float32
    expected = keras(tf.cast(x, tf.bfloat16), training=False)
    np.testing.assert_allclose(tf.cast(out, tf.float32),
                               tf.cast(expected, tf.float32), rtol=0.02,
                               atol=0.05)
  finally:
    tf_keras.mixed_precision.set_global_policy('float32')
