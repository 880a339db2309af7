"""Per-example reduction shared by the DeepLab2-compatible loss terms."""

import tensorflow as tf


def average_nonzero_loss(loss: tf.Tensor,
                         top_k_percent: float = 1.0) -> tf.Tensor:
  """Averages each example's loss over its non-zero entries.

  DeepLab2 normalises its pixel (and slot) losses by how many weighted losses
  are non-zero rather than by the element count, so zero-weight pixels (void,
  padding) do not dilute the mean. Exactly-zero losses of weighted pixels are
  excluded too; that is DeepLab2's behaviour and is kept. With
  `top_k_percent` < 1 only the largest round(top_k_percent * count) losses of
  each example are kept first (hard-pixel mining).

  Args:
    loss: [B, ...] float tensor of already weighted losses.
    top_k_percent: Fraction in [0, 1] of the largest losses to keep.

  Returns:
    [B] float tensor; 0 for an example without any non-zero loss.
  """
  if not 0.0 <= top_k_percent <= 1.0:
    raise ValueError(f'top_k_percent must lie in [0, 1], got {top_k_percent}.')
  loss = tf.reshape(loss, [tf.shape(loss)[0], -1])  # [B, L]
  if top_k_percent != 1.0:
    length = loss.shape[1]
    if length is not None:
      keep = int(round(top_k_percent * length))
    else:
      keep = tf.cast(tf.math.round(
          top_k_percent * tf.cast(tf.shape(loss)[1], tf.float32)), tf.int32)
    loss = tf.math.top_k(loss, keep, sorted=False).values
  count = tf.reduce_sum(tf.cast(loss != 0.0, loss.dtype), axis=1)
  return tf.math.divide_no_nan(tf.reduce_sum(loss, axis=1), count)
