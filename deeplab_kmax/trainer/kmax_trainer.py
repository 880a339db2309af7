"""The Orbit inner training loop of kMaX-DeepLab.

One step: forward in training mode, per-example losses averaged over the
*global* batch, gradients summed across replicas, optional global-norm
clipping, then two optimizers -- one for the pretrained encoder (backbone
learning-rate multiplier) and one for everything else.

Gradients are all-reduced explicitly before clipping, so clipping sees the
gradient of the global batch and one replica or many give the same update.

Performance options (trainer_options extensions): the model may compute in
bfloat16 / float16 (predictions are cast to float32 before the loss; float16
scales the loss dynamically and skips steps whose gradients overflow), and
the forward + loss + gradient part of the step may be compiled with XLA.
"""

import time
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence

import orbit
import tensorflow as tf
import tf_keras

from deeplab_kmax import keys
from deeplab_kmax import precision as precision_lib
from deeplab_kmax import precision_options
from deeplab_kmax.trainer import optimizer as optimizer_lib
from deeplab_kmax.trainer import progress_log as progress_log_lib


class NonFiniteLossError(RuntimeError):
  """The loss or its gradient became NaN/Inf; training must stop."""


def _loss_names(loss_fn, loss_names: Optional[Sequence[str]]) -> list:
  if loss_names is None:
    for attribute in ('get_loss_names', 'loss_names'):
      value = getattr(loss_fn, attribute, None)
      if value is not None:
        loss_names = value() if callable(value) else value
        break
  names = list(loss_names or [keys.TOTAL_LOSS])
  if keys.TOTAL_LOSS not in names:
    names.insert(0, keys.TOTAL_LOSS)
  return names


def partition_by_backbone(items: Sequence[Any],
                          backbone_variables: Iterable[tf.Variable],
                          variable_of: Callable[[Any], tf.Variable] = (
                              lambda item: item[1])):
  """Splits (gradient, variable) pairs -- or any items -- into those of
  the main optimizer and those of the backbone optimizer (the encoder's
  trainable variables), by variable identity."""
  backbone = {v.ref() for v in backbone_variables}
  main = [item for item in items if variable_of(item).ref() not in backbone]
  rest = [item for item in items if variable_of(item).ref() in backbone]
  return main, rest


format_duration = progress_log_lib.format_duration


class KMaXTrainer(orbit.StandardTrainer):
  """Trains a kMaX-DeepLab model (or any model with the same contract).

  Contract: `model(images, training=True)` returns a dict of predictions;
  `loss_fn(inputs, predictions)` returns a dict of per-example losses [B]
  containing `total_loss`. Build it inside `strategy.scope()`.
  """

  def __init__(
      self,
      model: tf_keras.Model,
      loss_fn: Callable[[Mapping[str, Any], Mapping[str, Any]],
                        Mapping[str, tf.Tensor]],
      train_dataset,
      optimizer: tf_keras.optimizers.legacy.Optimizer,
      global_step: tf.Variable,
      *,
      backbone_optimizer: Optional[
          tf_keras.optimizers.legacy.Optimizer] = None,
      backbone_variables: Optional[Callable[[], Iterable[tf.Variable]]] = None,
      clip_gradient_norm: Optional[float] = None,
      loss_names: Optional[Sequence[str]] = None,
      total_steps: Optional[int] = None,
      image_summary_fn: Optional[Callable[[int], None]] = None,
      image_summary_interval: Optional[int] = None,
      strategy: Optional[tf.distribute.Strategy] = None,
      options: Optional[orbit.StandardTrainerOptions] = None,
      progress_log: Optional[progress_log_lib.ProgressLog] = None,
      mixed_precision: str = precision_options.FLOAT32,
      jit_compile: bool = False):
    """Creates the trainer.

    Args:
      model: the model, built or not.
      loss_fn: per-example losses, see the class docstring.
      train_dataset: a tf.data.Dataset (global batch, split across replicas),
        a function `(input_context) -> Dataset` giving per-replica batches, or
        an already distributed dataset.
      optimizer: updates all trainable variables not given to the backbone.
      global_step: int64 step counter, incremented once per step.
      backbone_optimizer: optional optimizer for `backbone_variables`.
      backbone_variables: returns the encoder's trainable variables; called
        once the model is built. Required with `backbone_optimizer`.
      clip_gradient_norm: clip the global gradient norm to this if set.
      loss_names: names of the loss terms to log; defaults to what the loss
        object reports (`get_loss_names()` / `loss_names`).
      total_steps: training length, for the ETA in the logs.
      image_summary_fn: called with the step to write image summaries.
      image_summary_interval: call `image_summary_fn` when a loop ends on a
        multiple of this.
      strategy: defaults to the current strategy.
      options: Orbit loop options.
      progress_log: where each loop's line and JSON record go; by default
        the line is logged and no JSON file is written.
      mixed_precision: the precision the model was built with (one of
        `precision_options.TRAINING_PRECISIONS`); "mixed_float16" adds
        dynamic loss scaling.
      jit_compile: compile forward, loss and gradients with XLA.
    """
    self._strategy = strategy or tf.distribute.get_strategy()
    if isinstance(train_dataset, tf.data.Dataset):
      train_dataset = self._strategy.experimental_distribute_dataset(
          train_dataset)
    elif callable(train_dataset):
      train_dataset = self._strategy.distribute_datasets_from_function(
          train_dataset)
    super().__init__(train_dataset, options)
    if backbone_optimizer is not None and backbone_variables is None:
      raise ValueError('backbone_optimizer needs backbone_variables.')
    if clip_gradient_norm is not None and clip_gradient_norm <= 0:
      raise ValueError('clip_gradient_norm must be positive, got '
                       f'{clip_gradient_norm}.')
    self._model = model
    self._loss_fn = loss_fn
    self._optimizer = optimizer
    self._backbone_optimizer = backbone_optimizer
    self._backbone_variables = backbone_variables
    self._clip_gradient_norm = clip_gradient_norm
    self._global_step = global_step
    self._total_steps = total_steps
    self._image_summary_fn = image_summary_fn
    self._image_summary_interval = image_summary_interval
    self._progress_log = progress_log or progress_log_lib.ProgressLog()
    precision_lib.check_precision(mixed_precision,
                                  precision_options.TRAINING_PRECISIONS,
                                  'mixed_precision')
    self._gradients_fn = (tf.function(self._loss_and_gradients,
                                      jit_compile=True)
                          if jit_compile else self._loss_and_gradients)

    with self._strategy.scope():
      # One scaler per optimizer; both see the same finite/non-finite
      # pattern (see `_apply`), so their scales stay equal.
      self._loss_scalers = None
      if precision_lib.uses_loss_scaling(mixed_precision):
        self._loss_scalers = {
            id(o): precision_lib.loss_scaler(o)
            for o in (optimizer, backbone_optimizer) if o is not None}
      self._loss_metrics = {
          name: tf_keras.metrics.Mean(f'train_{name}', dtype=tf.float32)
          for name in _loss_names(loss_fn, loss_names)
      }
      self._gradient_norm = tf_keras.metrics.Mean('gradient_norm')
      self._nonfinite_steps = tf_keras.metrics.Sum('nonfinite_steps')
    self._loop_start_step = 0
    self._loop_start_time = time.time()

  # --- Properties used by train_lib and the checkpoint. ---------------------

  @property
  def model(self) -> tf_keras.Model:
    return self._model

  @property
  def optimizer(self):
    return self._optimizer

  @property
  def backbone_optimizer(self):
    return self._backbone_optimizer

  @property
  def global_step(self) -> tf.Variable:
    return self._global_step

  @property
  def strategy(self) -> tf.distribute.Strategy:
    return self._strategy

  # --- Orbit hooks. -----------------------------------------------------------

  def train_loop_begin(self):
    for metric in self._all_metrics():
      metric.reset_state()
    self._loop_start_step = int(self._global_step.numpy())
    self._loop_start_time = time.time()

  def train_step(self, iterator):
    self._strategy.run(self._replica_step, args=(next(iterator),))
    self._global_step.assign_add(1)

  def train_loop_end(self) -> Dict[str, tf.Tensor]:
    step = int(self._global_step.numpy())
    losses = {name: metric.result() for name, metric in
              self._loss_metrics.items()}
    if float(self._nonfinite_steps.result()) > 0:
      values = ', '.join(f'{name}={float(value):.4g}'
                         for name, value in losses.items())
      raise NonFiniteLossError(
          f'The training loss or its gradient became NaN/Inf between steps '
          f'{self._loop_start_step} and {step} (in '
          f'{int(self._nonfinite_steps.result())} replica-steps; loop means: '
          f'{values}; mean gradient norm '
          f'{float(self._gradient_norm.result()):.4g}). Training stopped '
          'without saving these weights; the last checkpoint in model_dir is '
          'the last good state. Consider a lower learning rate, gradient '
          'clipping (solver_options.use_gradient_clipping) or checking the '
          'input data.')

    logs = {f'losses/train_{name}': value for name, value in losses.items()}
    logs[keys.LEARNING_RATE] = optimizer_lib.current_learning_rate(
        self._optimizer)
    if self._backbone_optimizer is not None:
      logs['backbone_learning_rate'] = optimizer_lib.current_learning_rate(
          self._backbone_optimizer)
    logs['gradient_norm'] = self._gradient_norm.result()
    self._log_progress(step, losses, logs)

    if (self._image_summary_fn is not None and self._image_summary_interval and
        step % self._image_summary_interval == 0):
      self._image_summary_fn(step)
    return logs

  # --- The step. ---------------------------------------------------------------

  def _all_metrics(self):
    return list(self._loss_metrics.values()) + [self._gradient_norm,
                                                self._nonfinite_steps]

  def _loss_and_gradients(self, inputs: Mapping[str, Any]):
    """This replica's loss means, objective and (unscaled) gradients, one per
    trainable variable (None where a variable gets none)."""
    num_replicas = self._strategy.num_replicas_in_sync
    with tf.GradientTape() as tape:
      # Whatever the model computes in, the loss reads float32.
      predictions = precision_lib.to_float32(
          self._model(inputs[keys.IMAGE], training=True))
      per_example = self._loss_fn(inputs, predictions)
      if keys.TOTAL_LOSS not in per_example:
        raise KeyError(f'The loss returned {sorted(per_example)}; expected a '
                       f'{keys.TOTAL_LOSS!r} entry.')
      # Mean over this replica's examples; dividing by the replica count
      # makes the cross-replica gradient sum the global-batch mean.
      local_means = {name: tf.reduce_mean(tf.cast(value, tf.float32))
                     for name, value in per_example.items()}
      objective = local_means[keys.TOTAL_LOSS]
      if self._model.losses:
        objective += tf.add_n(precision_lib.to_float32(self._model.losses))
      scaled_objective = objective / num_replicas
      scaler = self._main_loss_scaler()
      if scaler is not None:
        scaled_objective = scaler.get_scaled_loss(scaled_objective)

    gradients = tape.gradient(scaled_objective,
                              self._model.trainable_variables)
    if scaler is not None:
      gradients = scaler.get_unscaled_gradients(gradients)
    return local_means, objective, gradients

  def _main_loss_scaler(self):
    return (None if self._loss_scalers is None else
            self._loss_scalers[id(self._optimizer)])

  def _replica_step(self, inputs: Mapping[str, Any]):
    local_means, objective, gradients = self._gradients_fn(inputs)
    variables = self._model.trainable_variables
    pairs = [(g, v) for g, v in zip(gradients, variables) if g is not None]
    if not pairs:
      raise ValueError('The loss has no gradient with respect to any '
                       'trainable variable.')
    gradients = [tf.convert_to_tensor(g) for g, _ in pairs]
    variables = [v for _, v in pairs]
    replica_context = tf.distribute.get_replica_context()
    gradients = replica_context.all_reduce(tf.distribute.ReduceOp.SUM,
                                           gradients)
    gradient_norm = tf.linalg.global_norm(gradients)
    if self._clip_gradient_norm:
      gradients, _ = tf.clip_by_global_norm(
          gradients, self._clip_gradient_norm, use_norm=gradient_norm)
    gradients_finite = tf.math.is_finite(gradient_norm)
    self._apply(list(zip(gradients, variables)), gradients_finite)

    if self._loss_scalers is None:
      finite = tf.logical_and(tf.math.is_finite(objective), gradients_finite)
      self._gradient_norm.update_state(gradient_norm)
    else:
      # Overflowing gradients are expected with loss scaling: that step is
      # skipped and the scale lowered; only a non-finite loss is an error.
      finite = tf.math.is_finite(objective)
      self._gradient_norm.update_state(
          tf.where(gradients_finite, gradient_norm, 0.0),
          sample_weight=tf.cast(gradients_finite, tf.float32))
    self._nonfinite_steps.update_state(
        1.0 - tf.cast(finite, tf.float32))
    for name, metric in self._loss_metrics.items():
      if name in local_means:
        metric.update_state(local_means[name])

  def _apply(self, gradients_and_variables, gradients_finite: tf.Tensor):
    """Sends encoder variables to the backbone optimizer, the rest to main.

    With loss scaling each group goes through its optimizer's scaler, which
    skips the update and lowers the scale when its gradients are not finite;
    a non-finite gradient anywhere is made visible to every group, so all
    skip together and their scales stay equal.
    """
    groups = [(self._optimizer, gradients_and_variables)]
    if self._backbone_optimizer is not None:
      main_pairs, backbone_pairs = partition_by_backbone(
          gradients_and_variables, self._backbone_variables())
      groups = [(self._optimizer, main_pairs),
                (self._backbone_optimizer, backbone_pairs)]
    if self._loss_scalers is not None:
      poison = tf.where(gradients_finite, 0.0, float('nan'))
      groups = [(self._loss_scalers[id(optimizer)],
                 [(g + tf.cast(poison, g.dtype), v) for g, v in pairs])
                for optimizer, pairs in groups]
    for optimizer, pairs in groups:
      if pairs:
        optimizer.apply_gradients(pairs,
                                  experimental_aggregate_gradients=False)

  def _log_progress(self, step: int, losses: Mapping[str, tf.Tensor],
                    logs: Mapping[str, Any]):
    """One line for a person, the whole loop in the JSON lines file."""
    elapsed = max(time.time() - self._loop_start_time, 1e-9)
    extra = {key: float(logs[key]) for key in
             ('backbone_learning_rate', 'gradient_norm') if key in logs}
    self._progress_log.log(progress_log_lib.LoopRecord(
        step=step,
        losses={name: float(value) for name, value in losses.items()},
        learning_rate=float(logs[keys.LEARNING_RATE]),
        steps_per_second=(step - self._loop_start_step) / elapsed,
        total_steps=self._total_steps,
        extra=extra))
