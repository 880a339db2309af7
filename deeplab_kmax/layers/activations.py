"""Activation lookup by the names DeepLab2 configs use."""

from typing import Callable, Optional

import tensorflow as tf
import tf_keras

Activation = Callable[[tf.Tensor], tf.Tensor]


def _exact_gelu(x: tf.Tensor) -> tf.Tensor:
  # Written with erf rather than tf.nn.gelu's erfc: same function to a few
  # ulps, and ONNX has Erf but no Erfc, so exported graphs convert.
  return 0.5 * x * (1.0 + tf.math.erf(x * 0.7071067811865476))


def _tanh_gelu(x: tf.Tensor) -> tf.Tensor:
  return tf.nn.gelu(x, approximate=True)


def _hard_swish(x: tf.Tensor) -> tf.Tensor:
  return x * tf.nn.relu6(x + 3.0) * (1.0 / 6.0)


def _hard_sigmoid(x: tf.Tensor) -> tf.Tensor:
  # DeepLab2 rounds 1/6 to 0.16667; kept for numerical parity.
  return tf.nn.relu6(x + 3.0) * 0.16667


_NAMED = {
    'gelu': _exact_gelu,
    'approximated_gelu': _tanh_gelu,
    'silu': tf.nn.silu,
    'swish': tf.nn.silu,
    'hard_swish': _hard_swish,
    'hard_sigmoid': _hard_sigmoid,
    'relu6': tf.nn.relu6,
    'identity': tf.identity,
    'none': tf.identity,
}


def get_activation(name: Optional[str]) -> Optional[Activation]:
  """Maps a config activation name to a function; None stays None."""
  if name is None:
    return None
  key = str(name).lower()
  if key in _NAMED:
    return _NAMED[key]
  return tf_keras.activations.get(key)
