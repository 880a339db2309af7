"""Mixed precision: which Keras policy builds the model, and float32 islands.

A model built inside `keras_policy('bfloat16')` keeps float32 variables (so
checkpoints do not change) and computes in bfloat16. What must stay exact
enough -- losses, softmaxes, the k-means affinity logits and their argmax,
Hungarian matching and post-processing -- reads float32 through `to_float32`
or its own casts. float16 training also scales the loss (`loss_scaler`).
"""

import contextlib
from typing import Any, Iterator

import tensorflow as tf
import tf_keras

from deeplab_kmax import precision_options

KERAS_POLICIES = precision_options.KERAS_POLICIES


def check_precision(precision: str, allowed=tuple(KERAS_POLICIES),
                    field: str = 'precision') -> str:
  """Returns `precision` or raises a ValueError naming `field`."""
  if precision not in allowed:
    raise ValueError(f'{field} is {precision!r}; expected one of '
                     f'{", ".join(repr(a) for a in allowed)}.')
  return precision


@contextlib.contextmanager
def keras_policy(precision: str) -> Iterator[None]:
  """Layers constructed inside compute in `precision` (variables float32);
  the previous global policy is restored on exit."""
  check_precision(precision)
  previous = tf_keras.mixed_precision.global_policy()
  tf_keras.mixed_precision.set_global_policy(KERAS_POLICIES[precision])
  try:
    yield
  finally:
    tf_keras.mixed_precision.set_global_policy(previous)


def compute_dtype(precision: str) -> tf.DType:
  """The activations' dtype under `precision`."""
  return tf.as_dtype(tf_keras.mixed_precision.Policy(
      KERAS_POLICIES[check_precision(precision)]).compute_dtype)


def to_float32(structure: Any) -> Any:
  """Casts every floating tensor of a nested structure to float32."""

  def cast(value):
    if isinstance(value, (tf.Tensor, tf.Variable)) and value.dtype.is_floating:
      return tf.cast(value, tf.float32)
    return value

  return tf.nest.map_structure(cast, structure)


def uses_loss_scaling(precision: str) -> bool:
  return precision in precision_options.LOSS_SCALED_PRECISIONS


def loss_scaler(optimizer) -> tf_keras.mixed_precision.LossScaleOptimizer:
  """A dynamic loss scale (tf_keras LossScaleOptimizer) around `optimizer`.

  Training checkpoints keep the inner optimizer, so their layout is that of
  a float32 run; the scale itself restarts at its initial value on resume.
  """
  return tf_keras.mixed_precision.LossScaleOptimizer(optimizer)
