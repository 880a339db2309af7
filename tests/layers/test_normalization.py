"""The project's batch norm: the fused kernels on [B, H, W, C] maps in
inference and in single-replica training, Keras' synchronised batch norm
across replicas."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from deeplab_kmax.layers import normalization
from tests import graph_ops


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


@pytest.mark.parametrize('training', [False, None])
def test_inference_on_maps_runs_the_fused_kernel(training):
  ours, keras, x = _pair(16, rank=4)
  np.testing.assert_allclose(ours(x, training=training),
                             keras(x, training=training), rtol=0, atol=1e-5)
  ops = graph_ops.traced_op_types(lambda t: ours(t, training=training), x)
  assert 'FusedBatchNormV3' in ops
  assert not ops & {'Mul', 'AddV2', 'Sub', 'Rsqrt'}, ops


def _train_twice(layer, x):
  """Two training calls; the outputs and gradients of the second."""
  layer(x, training=True)
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = layer(x, training=True)
    loss = tf.reduce_sum(y * tf.sin(y))
  return y, tape.gradient(loss, [x, layer.gamma, layer.beta])


def test_single_replica_training_is_fused_and_equals_keras():
  ours, keras, x = _pair(8, rank=4)
  y_ours, grads_ours = _train_twice(ours, x)
  y_keras, grads_keras = _train_twice(keras, x)
  np.testing.assert_allclose(y_ours, y_keras, rtol=0, atol=1e-5)
  for got, want in zip(grads_ours, grads_keras):
    scale = np.abs(want.numpy()).max()
    np.testing.assert_allclose(got / scale, want / scale, rtol=0, atol=1e-5)
  # The moving variance takes the biased batch variance, as Keras'
  # synchronised batch norm and DeepLab2 do (not Keras' fused n / (n - 1)).
  np.testing.assert_allclose(ours.moving_mean.numpy(),
                             keras.moving_mean.numpy(), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(ours.moving_variance.numpy(),
                             keras.moving_variance.numpy(), rtol=1e-6)
  ops = graph_ops.traced_op_types(lambda t: ours(t, training=True), x)
  assert 'FusedBatchNormV3' in ops
  assert 'Rsqrt' not in ops, ops


def test_one_value_per_channel_keeps_keras_computation():
  # ASPP's pooling branch: [B, 1, 1, C]; with B = 1 the unbiased variance
  # of the fused op would divide by zero.
  ours, keras, _ = _pair(8, rank=4)
  x = tf.random.stateless_normal([1, 1, 1, 8], seed=[5, 6])
  np.testing.assert_array_equal(ours(x, training=True),
                                keras(x, training=True))
  np.testing.assert_array_equal(ours.moving_variance.numpy(),
                                keras.moving_variance.numpy())
  assert 'FusedBatchNormV3' not in graph_ops.traced_op_types(
      lambda t: ours(t, training=True), x)


_REPLICAS_SCRIPT = textwrap.dedent('''
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices('CPU')[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from deeplab_kmax.layers import normalization
    strategy = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])
    with strategy.scope():
      layer = normalization.batch_norm_factory()(name='bn')
      layer.build([2, 5, 5, 4])
    x = tf.random.stateless_normal([2, 5, 5, 4], seed=[1, 2]) * 3.0 + 1.0

    def replica_fn(images):
      return layer(images, training=True)

    fn = tf.function(lambda: strategy.run(replica_fn, args=(x,)))
    fn()
    ops = {op.type for op in fn.get_concrete_function().graph.get_operations()}
    # Both replicas see the same batch, so the synchronised moments are
    # that batch's: the moving mean moves 1 - momentum of the way to it.
    mean = layer.moving_mean.numpy()
    expected = 0.01 * tf.reduce_mean(x, axis=[0, 1, 2]).numpy()
    print('FUSED', 'FusedBatchNormV3' in ops,
          'MEAN_OK', bool(np.allclose(mean, expected, atol=1e-6)))
''')


def test_several_replicas_keep_keras_synchronised_computation():
  result = subprocess.run([sys.executable, '-c', _REPLICAS_SCRIPT],
                          capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'FUSED False MEAN_OK True' in result.stdout, result.stdout


def test_sequences_use_keras_computation():
  # [B, L, C] (the transformer's 1-D convolutions): no fused kernel exists.
  ours, keras, x = _pair(8, rank=3)
  np.testing.assert_array_equal(ours(x, training=False),
                                keras(x, training=False))
  assert 'FusedBatchNormV3' not in graph_ops.traced_op_types(
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
