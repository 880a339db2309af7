"""Normalisation layer factories shared by every model part.

DeepLab2 builds all batch norms through a single `norm_layer` callable that is
either plain or synchronised batch norm (momentum 0.99, epsilon 1e-3). Both
store the same four variables (gamma, beta, moving_mean, moving_variance), so
checkpoints are interchangeable whichever one is used.
"""

import functools
from typing import Callable

import tf_keras

NormLayer = Callable[..., tf_keras.layers.Layer]

BATCH_NORM_MOMENTUM = 0.99
BATCH_NORM_EPSILON = 1e-3
LAYER_NORM_EPSILON = 1e-6


def batch_norm_factory(use_sync_batchnorm: bool = True,
                       momentum: float = BATCH_NORM_MOMENTUM,
                       epsilon: float = BATCH_NORM_EPSILON) -> NormLayer:
  """Returns a constructor for (synchronised) batch normalisation.

  Synchronised batch norm aggregates batch statistics across replicas under a
  tf.distribute strategy; in inference mode it equals ordinary batch norm.
  """
  return functools.partial(
      tf_keras.layers.BatchNormalization,
      momentum=momentum,
      epsilon=epsilon,
      synchronized=use_sync_batchnorm)


def layer_norm(name: str, axis: int = -1) -> tf_keras.layers.Layer:
  """Layer normalisation with the epsilon kMaX uses on backbone features."""
  return tf_keras.layers.LayerNormalization(
      axis=axis, epsilon=LAYER_NORM_EPSILON, name=name)
