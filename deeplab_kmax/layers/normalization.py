"""Normalisation layer factories shared by every model part.

DeepLab2 builds all batch norms through a single `norm_layer` callable that is
either plain or synchronised batch norm (momentum 0.99, epsilon 1e-3). Both
store the same four variables (gamma, beta, moving_mean, moving_variance), so
checkpoints are interchangeable whichever one is used.

Keras never runs a synchronised batch norm through the fused kernel, not
even in inference, where it is the per-channel affine map x * s + b: a
separate Mul and Add over every feature map after every convolution.
`BatchNormalization` below runs inference on [B, H, W, C] maps through
FusedBatchNormV3 instead, which grappler's remapper fuses into the
convolution before it (and the ReLU after it); training is Keras' own
(synchronised) computation. Results move at float-rounding level.
"""

import functools
from typing import Callable

import tensorflow as tf
import tf_keras

NormLayer = Callable[..., tf_keras.layers.Layer]

BATCH_NORM_MOMENTUM = 0.99
BATCH_NORM_EPSILON = 1e-3
LAYER_NORM_EPSILON = 1e-6


class BatchNormalization(tf_keras.layers.BatchNormalization):
  """Keras batch norm whose inference on 4-D maps uses the fused kernel."""

  def _fused_inference(self, inputs, training) -> bool:
    if training is None:
      training = tf_keras.backend.learning_phase()
    return (isinstance(training, (bool, int)) and not training and
            inputs.shape.rank == 4 and self.axis == [3] and
            not self.renorm and self.virtual_batch_size is None and
            self.adjustment is None and
            self.compute_dtype in ('float16', 'bfloat16', 'float32'))

  def call(self, inputs, training=None, mask=None):
    if mask is not None or not self._fused_inference(inputs, training):
      return super().call(inputs, training=training, mask=mask)
    inputs = tf.cast(inputs, self.compute_dtype)
    shape, dtype = self.moving_mean.shape, self.moving_mean.dtype
    gamma = self.gamma if self.scale else tf.ones(shape, dtype)
    beta = self.beta if self.center else tf.zeros(shape, dtype)
    outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
        inputs, gamma, beta, mean=self.moving_mean,
        variance=self.moving_variance, epsilon=self.epsilon,
        is_training=False, data_format='NHWC')
    return outputs


def batch_norm_factory(use_sync_batchnorm: bool = True,
                       momentum: float = BATCH_NORM_MOMENTUM,
                       epsilon: float = BATCH_NORM_EPSILON) -> NormLayer:
  """Returns a constructor for (synchronised) batch normalisation.

  Synchronised batch norm aggregates batch statistics across replicas under a
  tf.distribute strategy; in inference mode it equals ordinary batch norm.
  """
  return functools.partial(
      BatchNormalization,
      momentum=momentum,
      epsilon=epsilon,
      synchronized=use_sync_batchnorm)


def layer_norm(name: str, axis: int = -1) -> tf_keras.layers.Layer:
  """Layer normalisation with the epsilon kMaX uses on backbone features."""
  return tf_keras.layers.LayerNormalization(
      axis=axis, epsilon=LAYER_NORM_EPSILON, name=name)
