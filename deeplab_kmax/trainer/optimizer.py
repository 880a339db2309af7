"""Learning-rate schedules and optimizers of the kMaX-DeepLab solver.

kMaX-DeepLab trains with AdamW: Adam on the gradient plus a weight decay that
acts on the weights directly (decoupled from the adaptive moments), applied
only to convolution / linear kernels. The pretrained backbone gets its own
optimizer whose schedule is scaled by `backbone_learning_rate_multiplier`.

Both optimizers subclass the tf_keras *legacy* Adam so that they own exactly
the variables DeepLab2's trainer checkpoints hold (`iter`, `beta_1`,
`beta_2`, `decay`, and per-variable slots `m` / `v`); a DeepLab2 trainer
checkpoint can therefore be resumed here, and the other way round.
"""

import re
from typing import NamedTuple, Optional

from absl import logging
import tensorflow as tf
import tf_keras

SUPPORTED_OPTIMIZERS = ('adamw', 'adam', 'sgd')
SUPPORTED_LEARNING_POLICIES = ('poly', 'cosine')

# Weight decay touches only kernels and weights: norms, biases, embeddings,
# cluster centers and layer scales are left alone (as in DeepLab2's AdamW).
DECAYED_VARIABLE_PATTERN = r'(kernel|weight)$'

_SGD_MOMENTUM = 0.9


class LinearWarmup(tf_keras.optimizers.schedules.LearningRateSchedule):
  """Ramps the rate linearly from 0 to `peak_learning_rate`, then defers.

  Before `warmup_steps` the rate is `peak * step / warmup_steps`; from then on
  it is `after_warmup(step)`, evaluated at the global step (not at
  `step - warmup_steps`), which is how DeepLab2 composes the two.
  """

  def __init__(self, peak_learning_rate: float, warmup_steps: int,
               after_warmup: tf_keras.optimizers.schedules.LearningRateSchedule,
               name: Optional[str] = None):
    super().__init__()
    if warmup_steps <= 0:
      raise ValueError(f'warmup_steps must be positive, got {warmup_steps}.')
    self.peak_learning_rate = peak_learning_rate
    self.warmup_steps = warmup_steps
    self.after_warmup = after_warmup
    self.name = name

  def __call__(self, step):
    with tf.name_scope(self.name or 'linear_warmup'):
      step = tf.cast(step, tf.float32)
      warmup_steps = tf.cast(self.warmup_steps, tf.float32)
      ramp = self.peak_learning_rate * (step / warmup_steps)
      return tf.where(step < warmup_steps, ramp, self.after_warmup(step))

  def get_config(self):
    return {
        'peak_learning_rate': self.peak_learning_rate,
        'warmup_steps': self.warmup_steps,
        'after_warmup': tf_keras.optimizers.schedules.serialize(
            self.after_warmup),
        'name': self.name,
    }

  @classmethod
  def from_config(cls, config):
    config = dict(config)
    config['after_warmup'] = tf_keras.optimizers.schedules.deserialize(
        config['after_warmup'])
    return cls(**config)


def build_learning_rate_schedule(
    solver_options, multiplier: float = 1.0
) -> tf_keras.optimizers.schedules.LearningRateSchedule:
  """The solver's schedule, with its peak rate scaled by `multiplier`.

  The multiplier scales the base rate only; `poly_end_learning_rate` stays as
  configured (DeepLab2 behaves the same way for the backbone optimizer).
  """
  peak = solver_options.base_learning_rate * multiplier
  total_steps = solver_options.training_number_of_steps
  if total_steps <= 0:
    raise ValueError('solver_options.training_number_of_steps must be '
                     f'positive, got {total_steps}.')
  policy = solver_options.learning_policy
  if policy == 'poly':
    schedule = tf_keras.optimizers.schedules.PolynomialDecay(
        initial_learning_rate=peak,
        decay_steps=total_steps,
        end_learning_rate=solver_options.poly_end_learning_rate,
        power=solver_options.poly_learning_power,
        cycle=False)
  elif policy == 'cosine':
    schedule = tf_keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=peak, decay_steps=total_steps, alpha=0.0)
  else:
    raise ValueError(
        f'Unknown solver_options.learning_policy {policy!r}; supported: '
        f'{", ".join(SUPPORTED_LEARNING_POLICIES)}.')
  if solver_options.warmup_steps > 0:
    schedule = LinearWarmup(peak, solver_options.warmup_steps, schedule)
  return schedule


def canonical_variable_name(variable) -> str:
  """`a/b/kernel/replica_1:0` -> `a/b/kernel`.

  Inside a distributed update the optimizer sees per-device components whose
  names carry a replica suffix; decisions keyed on names must ignore it so all
  replicas agree.
  """
  name = variable.name.split(':')[0]
  return re.sub(r'/replica_\d+$', '', name)


class AdamWeightDecay(tf_keras.optimizers.legacy.Adam):
  """Adam with decoupled weight decay on matching variables.

  For each decayed variable the update is, before the Adam step,
    w <- w - lr(t) * weight_decay * w
  where lr(t) is the scheduled learning rate (not Adam's bias-corrected step
  size). The Adam step itself is the legacy tf_keras one (epsilon 1e-7 added
  to sqrt(v) without bias correction).
  """

  def __init__(self,
               learning_rate=1e-3,
               weight_decay: float = 0.0,
               decayed_variable_pattern: str = DECAYED_VARIABLE_PATTERN,
               beta_1: float = 0.9,
               beta_2: float = 0.999,
               epsilon: float = 1e-7,
               name: str = 'AdamWeightDecay',
               **kwargs):
    super().__init__(learning_rate=learning_rate, beta_1=beta_1,
                     beta_2=beta_2, epsilon=epsilon, amsgrad=False, name=name,
                     **kwargs)
    self.weight_decay = weight_decay
    self.decayed_variable_pattern = decayed_variable_pattern
    self._decay_regex = re.compile(decayed_variable_pattern)

  def decays(self, variable) -> bool:
    """Whether weight decay applies to `variable`."""
    if self.weight_decay == 0.0:
      return False
    name = canonical_variable_name(variable)
    decision = self._decay_regex.search(name) is not None
    logging.vlog(1, 'AdamW: weight decay %s for %s.',
                 'on' if decision else 'off', name)
    return decision

  def _scheduled_lr(self, variable, apply_state):
    key = (variable.device, variable.dtype.base_dtype)
    coefficients = (apply_state or {}).get(key)
    if coefficients is None:
      coefficients = self._fallback_apply_state(*key)
    return coefficients['lr_t']

  def _decoupled_decay(self, variable, apply_state):
    if not self.decays(variable):
      return []
    lr = self._scheduled_lr(variable, apply_state)
    rate = tf.cast(self.weight_decay, variable.dtype.base_dtype)
    return [variable.assign_sub(lr * rate * variable,
                                use_locking=self._use_locking)]

  # Keras calls these two per variable; decay first, then the Adam step.

  def _resource_apply_dense(self, gradient, variable, apply_state=None):
    with tf.control_dependencies(self._decoupled_decay(variable, apply_state)):
      return super()._resource_apply_dense(gradient, variable,
                                           apply_state=apply_state)

  def _resource_apply_sparse(self, gradient, variable, indices,
                             apply_state=None):
    with tf.control_dependencies(self._decoupled_decay(variable, apply_state)):
      return super()._resource_apply_sparse(gradient, variable, indices,
                                            apply_state=apply_state)

  def get_config(self):
    config = super().get_config()
    config.update(weight_decay=self.weight_decay,
                  decayed_variable_pattern=self.decayed_variable_pattern)
    return config


def build_optimizer(solver_options, learning_rate_multiplier: float = 1.0):
  """One optimizer for the solver options (legacy tf_keras variable layout)."""
  schedule = build_learning_rate_schedule(solver_options,
                                          learning_rate_multiplier)
  name = solver_options.optimizer
  if name == 'adamw':
    return AdamWeightDecay(
        learning_rate=schedule,
        weight_decay=solver_options.adamw_weight_decay)
  if name == 'adam':
    return AdamWeightDecay(learning_rate=schedule, weight_decay=0.0,
                           name='Adam')
  if name == 'sgd':
    return tf_keras.optimizers.legacy.SGD(learning_rate=schedule,
                                          momentum=_SGD_MOMENTUM)
  raise ValueError(f'Unknown solver_options.optimizer {name!r}; supported: '
                   f'{", ".join(SUPPORTED_OPTIMIZERS)}.')


class Optimizers(NamedTuple):
  """The main optimizer and, when configured, the backbone one."""
  main: tf_keras.optimizers.legacy.Optimizer
  backbone: Optional[tf_keras.optimizers.legacy.Optimizer]


def build_optimizers(solver_options) -> Optimizers:
  """Builds both optimizers.

  As in DeepLab2, a backbone optimizer exists only when the config sets
  `backbone_learning_rate_multiplier` explicitly (even to 1.0): its presence
  decides whether trainer checkpoints hold a `backbone_optimizer` entry.
  """
  main = build_optimizer(solver_options)
  if not solver_options.HasField('backbone_learning_rate_multiplier'):
    return Optimizers(main, None)
  multiplier = solver_options.backbone_learning_rate_multiplier
  return Optimizers(main, build_optimizer(solver_options, multiplier))


def current_learning_rate(optimizer) -> tf.Tensor:
  """The rate the optimizer will use for its next update."""
  return optimizer._decayed_lr(tf.float32)  # pylint: disable=protected-access
