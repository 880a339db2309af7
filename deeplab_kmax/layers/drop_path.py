"""Stochastic depth (drop-path): randomly skip a residual branch per sample."""

import tensorflow as tf
import tf_keras


def keep_prob_for_stage(last_stage_keep_prob: float, schedule: str,
                        stage: int, num_stages: int) -> float:
  """Keep probability of `stage` under a 'constant' or 'linear' schedule.

  The linear schedule goes from 1.0 at the stem (stage 0) down to
  `last_stage_keep_prob` at the last stage.
  """
  if schedule == 'constant':
    return last_stage_keep_prob
  if schedule == 'linear':
    return 1.0 - (1.0 - last_stage_keep_prob) * stage / num_stages
  raise ValueError(f"drop_path_schedule must be 'constant' or 'linear', got "
                   f'{schedule!r}.')


class DropPath(tf_keras.layers.Layer):
  """Zeroes a whole residual branch for some samples, rescaling the rest.

  Identity at inference; in training each sample keeps its branch with
  probability `keep_prob` and a kept branch is divided by `keep_prob` so the
  expectation does not change.
  """

  def __init__(self, keep_prob: float = 1.0, name=None, **kwargs):
    super().__init__(name=name, **kwargs)
    if not 0.0 < keep_prob <= 1.0:
      raise ValueError(f'drop-path keep probability must be in (0, 1], got '
                       f'{keep_prob}.')
    self.keep_prob = keep_prob

  def call(self, inputs: tf.Tensor, training=False) -> tf.Tensor:
    if self.keep_prob == 1.0 or not training:
      return inputs
    return inputs * self.sample_scale(inputs)

  def sample_scale(self, inputs: tf.Tensor) -> tf.Tensor:
    """A random per-sample factor [B, 1, ..., 1]: 0 or 1 / keep_prob.

    A method of its own so that activation recomputation
    (`layers/recompute.py`) can replay the forward pass's draw.
    """
    # One Bernoulli draw per sample, broadcast over every other axis.
    shape = tf.concat(
        [tf.shape(inputs)[:1], tf.ones([tf.rank(inputs) - 1], tf.int32)], 0)
    noise = tf.random.uniform(shape, dtype=inputs.dtype)
    keep = tf.floor(self.keep_prob + noise)
    return keep / self.keep_prob

  def get_config(self):
    return {**super().get_config(), 'keep_prob': self.keep_prob}
