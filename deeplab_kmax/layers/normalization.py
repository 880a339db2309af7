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
convolution before it (and the ReLU after it).

Training under a single replica (no tf.distribute strategy, or one with one
replica in sync) has no statistics to synchronise, so a synchronised batch
norm there equals a plain one: it runs FusedBatchNormV3 (and its gradient)
instead of moments, Mul and Add ops and their gradients, which took ~12% of
a COCO R50 training step. The moving variance still takes the biased batch
variance, as the synchronised computation does (Keras' own fused path would
store the unbiased one). Several replicas keep Keras' synchronised
computation. Results (outputs, gradients,
moving statistics) move at float-rounding level.
"""

import functools
from typing import Callable

import tensorflow as tf
import tf_keras

NormLayer = Callable[..., tf_keras.layers.Layer]

BATCH_NORM_MOMENTUM = 0.99
BATCH_NORM_EPSILON = 1e-3
LAYER_NORM_EPSILON = 1e-6


def _single_replica() -> bool:
  return tf.distribute.get_strategy().num_replicas_in_sync == 1


class BatchNormalization(tf_keras.layers.BatchNormalization):
  """Keras batch norm that uses the fused kernels on 4-D maps wherever that
  computes the same thing: inference, and training of a single replica."""

  def _fusable(self, inputs) -> bool:
    return (inputs.shape.rank == 4 and self.axis == [3] and
            not self.renorm and self.virtual_batch_size is None and
            self.adjustment is None and
            self.compute_dtype in ('float16', 'bfloat16', 'float32'))

  def _fused_training(self, inputs, training) -> bool:
    # The biased variance is recovered from the op's unbiased one, which
    # needs more than one value per channel (ASPP pooling gives [B, 1, 1, C]).
    # A plain (unsynchronised) batch norm keeps Keras' own computation.
    height, width = inputs.shape[1:3]
    return (training is True and self.synchronized and _single_replica() and
            self._fusable(inputs) and height is not None and
            width is not None and height * width > 1)

  def _fused_inference(self, inputs, training) -> bool:
    if training is None:
      training = tf_keras.backend.learning_phase()
    return (isinstance(training, (bool, int)) and not training and
            self._fusable(inputs))

  def _fused_training_call(self, inputs):
    """Fused normalisation with the batch's moments; the moving averages get
    the biased batch variance, as Keras' synchronised batch norm (and
    DeepLab2) update them. Keras' own fused path would store the unbiased
    one, n / (n - 1) larger."""
    inputs = tf.cast(inputs, self.compute_dtype)
    outputs, mean, unbiased_variance = tf.compat.v1.nn.fused_batch_norm(
        inputs, *self._gamma_beta(), epsilon=self.epsilon, is_training=True,
        data_format='NHWC')
    shape = tf.shape(inputs)
    count = tf.cast(shape[0] * shape[1] * shape[2], unbiased_variance.dtype)
    variance = unbiased_variance * ((count - 1.0) / count)
    decay = 1.0 - self.momentum

    def update(moving, value):
      return lambda: moving.assign_sub(
          (moving - tf.cast(value, moving.dtype)) * decay)

    self.add_update(update(self.moving_mean, mean))
    self.add_update(update(self.moving_variance, variance))
    return outputs

  def _gamma_beta(self):
    shape, dtype = self.moving_mean.shape, self.moving_mean.dtype
    gamma = self.gamma if self.scale else tf.ones(shape, dtype)
    beta = self.beta if self.center else tf.zeros(shape, dtype)
    return gamma, beta

  def call(self, inputs, training=None, mask=None):
    if mask is None and self._fused_training(inputs, training):
      return self._fused_training_call(inputs)
    if mask is not None or not self._fused_inference(inputs, training):
      return super().call(inputs, training=training, mask=mask)
    inputs = tf.cast(inputs, self.compute_dtype)
    outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
        inputs, *self._gamma_beta(), mean=self.moving_mean,
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
