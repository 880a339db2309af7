"""Runs an experiment: train, eval, train_and_eval or continuous_eval.

    config --(${VAR} expansion, checks)--> strategy --> model, loss, data
      --> KMaXTrainer / KMaXEvaluator --> orbit.Controller
      with a CheckpointManager over DeepLab2's trainer checkpoint layout.

A run restarted with the same command resumes from the newest checkpoint in
model_dir (step counter, weights and optimizer state); only a fresh run reads
`model_options.initial_checkpoint`.
"""

import dataclasses
import os
import re
from typing import Any, Callable, List, Optional, Sequence

from absl import logging
import orbit
import tensorflow as tf
import tf_keras

from deeplab_kmax import config as config_lib
from deeplab_kmax import temp_files
from deeplab_kmax.trainer import checkpoints as checkpoints_lib
from deeplab_kmax.trainer import distribution
from deeplab_kmax.trainer import kmax_evaluator
from deeplab_kmax.trainer import kmax_trainer
from deeplab_kmax.trainer import optimizer as optimizer_lib
from deeplab_kmax.trainer import progress_log
from deeplab_kmax.trainer import summaries

MODES = ('train', 'eval', 'train_and_eval', 'continuous_eval')
KMAX_OUTPUT_STRIDE = config_lib.validation.KMAX_OUTPUT_STRIDE
# What killed runs leave in model_dir (removed when stale, see `temp_files`):
# TensorFlow writes a checkpoint's shards into `<prefix>_temp/` before
# merging them, and the `checkpoint` state file through `checkpoint.tmp<hex>`.
STALE_CHECKPOINT_WRITES = re.compile(
    r'ckpt-\d+_temp|checkpoint\.tmp[0-9a-f]{32}')
_NUM_TRAIN_VIS_IMAGES = 2


# --- Config preparation. -------------------------------------------------------


expand_environment_variables = config_lib.expand_environment_variables


def check_crop_size(crop_size: Sequence[int], field: str) -> None:
  """kMaX crops must be 32k+1 on both sides (the rule lives in validation)."""
  problem = config_lib.validation.kmax_crop_problem(crop_size, field)
  if problem:
    raise config_lib.ConfigError(problem + '.', field=field)


def check_file_pattern(dataset_options, field: str) -> None:
  patterns = list(dataset_options.file_pattern)
  if not patterns:
    raise config_lib.ConfigError(f'{field}.file_pattern is not set.',
                                 field=f'{field}.file_pattern')
  for pattern in patterns:
    if not tf.io.gfile.glob(pattern):
      raise FileNotFoundError(f'{field}.file_pattern {pattern!r} matches no '
                              'file.')


def prepare_config(config, mode: str, check_files: bool = True):
  """Expands placeholders and fails early on values that cannot work."""
  if mode not in MODES:
    raise ValueError(f'Unknown mode {mode!r}; expected one of {MODES}.')
  config = expand_environment_variables(config, mode)
  sections = [section for section, needed in (
      ('train_dataset_options', 'train' in mode),
      ('eval_dataset_options', 'eval' in mode)) if needed]
  config_lib.validate(config, datasets=sections)
  if check_files:
    for section in sections:
      check_file_pattern(getattr(config, section), section)
  if 'eval' in mode and config.eval_dataset_options.batch_size != 1:
    raise config_lib.ConfigError('eval_dataset_options.batch_size is '
                     f'{config.eval_dataset_options.batch_size}; evaluation '
                     'runs one image per batch (set it to 1).')
  return config


# --- Pluggable parts (real ones by default; tests pass stand-ins). --------------


def _default_model(config, dataset_info, crop_size=None):
  from deeplab_kmax import model as model_lib  # pylint: disable=g-import-not-at-top
  return model_lib.build_model(config, dataset_info, crop_size=crop_size)


def auxiliary_output_number(model) -> int:
  """Deep-supervision outputs the loss must expect (one per k-means block)."""
  number = getattr(model, 'auxiliary_output_number', None)
  if number is None:
    decoder = getattr(model, 'transformer_decoder', None)
    number = len(decoder.blocks) if decoder is not None else 0
  return int(number)


def _default_loss(config, dataset_info, model):
  from deeplab_kmax.losses import kmax_loss  # pylint: disable=g-import-not-at-top
  return kmax_loss.KMaXLoss.from_config(
      config.trainer_options.loss_options, config.model_options, dataset_info,
      auxiliary_output_number=auxiliary_output_number(model))


def _default_dataset(dataset_options, is_training, input_context=None):
  from deeplab_kmax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.create_dataset(dataset_options, is_training,
                                       input_context=input_context)


def _default_dataset_info(dataset_options):
  from deeplab_kmax.data import dataset_info  # pylint: disable=g-import-not-at-top
  return dataset_info.get_dataset_info(dataset_options)


@dataclasses.dataclass
class Builders:
  """How the experiment's parts are made; override for tests or new models.

  model(config, dataset_info, crop_size) -> tf_keras.Model with
    `checkpoint_items`; built for crop_size or built by `run_experiment`.
  loss(config, dataset_info, model) -> callable loss.
  dataset(dataset_options, is_training, input_context=None) -> tf.data.
  dataset_info(dataset_options) -> DatasetInfo.
  """
  model: Callable[..., Any] = _default_model
  loss: Callable[..., Any] = _default_loss
  dataset: Callable[..., Any] = _default_dataset
  dataset_info: Callable[..., Any] = _default_dataset_info


# --- Helpers. ---------------------------------------------------------------------


def build_model_variables(model: tf_keras.Model, crop_size: Sequence[int]):
  """Creates the model's variables for a [crop_h, crop_w, 3] input."""
  try:
    model(tf_keras.Input(list(crop_size) + [3]), training=False)
  except Exception:  # pylint: disable=broad-except
    # Not symbolically callable: one eager zero image instead.
    model(tf.zeros([1] + list(crop_size) + [3]), training=False)


def aligned_steps_per_loop(steps_per_loop: int,
                           boundaries: Sequence[int]) -> Callable[[int], int]:
  """Loop lengths that end exactly on multiples of every boundary interval,
  so checkpoints and image summaries land on round steps."""
  intervals = [b for b in boundaries if b and b > 0]

  def steps(current_step: int) -> int:
    n = steps_per_loop
    for interval in intervals:
      n = min(n, interval - current_step % interval)
    return max(n, 1)

  return steps


def evaluation_hooks(evaluator_options, dataset_info, model_dir: str,
                     is_chief: bool = True) -> List[Any]:
  """Instance AP for datasets with things; raw prediction files on request.

  Predictions go to `evaluator_options.override_save_dir` or
  `<model_dir>/vis`, under `raw_predictions/` (see
  `evaluation.prediction_writer`).
  """
  from deeplab_kmax.evaluation import instance_ap  # pylint: disable=g-import-not-at-top
  from deeplab_kmax.evaluation import prediction_writer  # pylint: disable=g-import-not-at-top
  hooks = []
  if dataset_info.thing_class_ids:
    hooks.append(instance_ap.InstanceAveragePrecision(
        dataset_info.thing_class_ids, dataset_info.panoptic_label_divisor,
        class_names=dataset_info.class_names,
        detailed=evaluator_options.detailed_ap_metrics))
  if evaluator_options.save_raw_predictions and is_chief:
    save_dir = (evaluator_options.override_save_dir or
                os.path.join(model_dir, 'vis'))
    hooks.append(prediction_writer.RawPredictionWriter(
        os.path.join(save_dir, 'raw_predictions'), dataset_info,
        raw_panoptic_format=evaluator_options.raw_panoptic_format,
        convert_to_eval_ids=evaluator_options.convert_raw_to_eval_ids))
  return hooks


def _train_image_summary_fn(model, builders: Builders, dataset_options,
                            dataset_info, strategy):
  """Writes predicted panoptic overlays of a few training crops."""
  if isinstance(strategy, tf.distribute.TPUStrategy):
    return None
  state = {}

  def write(step: int):
    if 'images' not in state:
      options = type(dataset_options).FromString(
          dataset_options.SerializeToString())
      options.batch_size = _NUM_TRAIN_VIS_IMAGES
      batch = next(iter(builders.dataset(options, True)))
      state['images'] = batch['image'][:_NUM_TRAIN_VIS_IMAGES]
    outputs = model(state['images'], training=False)
    if 'panoptic_pred' in outputs:
      # Orbit only enables recording inside its own summary interval.
      with tf.summary.record_if(True):
        summaries.write_panoptic_images(
            'train/panoptic_overlay', state['images'].numpy(),
            outputs['panoptic_pred'].numpy(), step, dataset_info,
            max_outputs=_NUM_TRAIN_VIS_IMAGES)

  return write


def _evaluate_continuously(controller, model_dir, global_step, eval_steps,
                           total_steps, timeout):
  """Evaluates each new checkpoint; stops after the final training step's
  checkpoint, or after `timeout` seconds without a new one (-1: never)."""
  result = None
  for path in tf.train.checkpoints_iterator(
      model_dir, timeout=None if timeout < 0 else timeout):
    controller.restore_checkpoint(path)
    result = controller.evaluate(steps=eval_steps)
    if int(global_step.numpy()) >= total_steps:
      logging.info('Evaluated the final checkpoint (step %d).', total_steps)
      break
  return result


# --- The experiment. -----------------------------------------------------------------


def run_experiment(mode: str,
                   config,
                   model_dir: str,
                   tpu: Optional[str] = None,
                   num_gpus: int = 0,
                   *,
                   strategy: Optional[tf.distribute.Strategy] = None,
                   builders: Optional[Builders] = None,
                   check_files: bool = True):
  """Runs `mode` for the experiment `config`, writing into `model_dir`.

  Returns the last evaluation results (eval modes) or None.
  """
  builders = builders or Builders()
  config = prepare_config(config, mode, check_files=check_files)
  strategy = strategy or distribution.create_strategy(tpu, num_gpus)
  is_chief = checkpoints_lib.is_chief(strategy)
  if is_chief:
    tf.io.gfile.makedirs(model_dir)
    temp_files.remove_stale(model_dir, STALE_CHECKPOINT_WRITES)

  training = 'train' in mode
  solver = config.trainer_options.solver_options
  train_options = config.train_dataset_options
  eval_options = config.eval_dataset_options
  info = builders.dataset_info(train_options if training else eval_options)
  if 'eval' in mode and training:
    eval_info = builders.dataset_info(eval_options)
    if eval_info.name != info.name:
      logging.warning('Training on %s but evaluating on %s.', info.name,
                      eval_info.name)
  else:
    eval_info = info

  trainer = evaluator = None
  optimizers = optimizer_lib.Optimizers(None, None)
  with strategy.scope():
    crop = list(train_options.crop_size if training else eval_options.crop_size)
    model = builders.model(config, info, crop)
    if not model.built:
      build_model_variables(model, crop)
    # int64; under replication only the first replica's value counts.
    global_step = orbit.utils.create_global_step()
    if training:
      optimizers = optimizer_lib.build_optimizers(solver)
      loss = builders.loss(config, info, model)
      backbone = model.checkpoint_items['encoder']
      trainer = kmax_trainer.KMaXTrainer(
          model, loss,
          lambda input_context: builders.dataset(train_options, True,
                                                 input_context),
          optimizers.main, global_step,
          backbone_optimizer=optimizers.backbone,
          backbone_variables=lambda: backbone.trainable_variables,
          clip_gradient_norm=(solver.clip_gradient_norm
                              if solver.use_gradient_clipping else None),
          total_steps=solver.training_number_of_steps,
          image_summary_fn=_train_image_summary_fn(
              model, builders, train_options, info, strategy),
          # Every worker runs the forward pass (it may read sync-on-read
          # variables collectively); only the chief has a real writer.
          image_summary_interval=config.trainer_options.save_summaries_steps,
          strategy=strategy,
          progress_log=progress_log.ProgressLog(
              os.path.join(model_dir, progress_log.JSONL_FILENAME)
              if is_chief else None))
    if 'eval' in mode:
      evaluator = kmax_evaluator.KMaXEvaluator(
          model, builders.dataset(eval_options, False), eval_info,
          global_step, model_dir=model_dir, strategy=strategy,
          num_vis_samples=(config.evaluator_options.num_vis_samples
                           if config.evaluator_options.save_predictions
                           else 0),
          write_files=is_chief,
          extra_metrics=evaluation_hooks(config.evaluator_options, eval_info,
                                         model_dir, is_chief),
          use_tf_function=config.evaluator_options.use_tf_function,
          official_panoptic_quality=(
              config.evaluator_options.official_panoptic_quality))

  checkpoint_class = (tf.train.Checkpoint if training else
                      checkpoints_lib.EvaluationCheckpoint)
  checkpoint = checkpoint_class(**checkpoints_lib.trainer_checkpoint_items(
      global_step, model.checkpoint_items, optimizers.main,
      optimizers.backbone))
  initial = config.model_options.initial_checkpoint

  def init_fn():
    if initial and training:
      logging.info('No checkpoint in %s; initialising from %s.', model_dir,
                   initial)
      model_options = config.model_options
      checkpoints_lib.restore_initial_checkpoint(
          initial, model.checkpoint_items,
          model_options.restore_semantic_last_layer_from_initial_checkpoint,
          model_options.restore_class_last_layer_from_initial_checkpoint)
    elif not training:
      logging.warning('No checkpoint in %s; evaluating %s.', model_dir,
                      f'the initial checkpoint {initial}' if initial else
                      'randomly initialised weights')
      if initial:
        checkpoints_lib.restore_initial_checkpoint(initial,
                                                   model.checkpoint_items, True)

  trainer_options = config.trainer_options
  manager = checkpoints_lib.create_checkpoint_manager(
      checkpoint, model_dir, global_step,
      max_to_keep=trainer_options.num_checkpoints_to_keep,
      save_every_n_steps=trainer_options.save_checkpoints_steps,
      strategy=strategy, init_fn=init_fn)
  # Orbit logs (and prints) while it restores; see progress_log.
  with progress_log.quiet_orbit():
    controller = orbit.Controller(
        strategy=strategy,
        trainer=trainer,
        evaluator=evaluator,
        global_step=global_step,
        steps_per_loop=(aligned_steps_per_loop(
            trainer_options.steps_per_loop,
            [trainer_options.save_checkpoints_steps,
             trainer_options.save_summaries_steps]) if training else None),
        checkpoint_manager=manager,
        summary_dir=os.path.join(model_dir, 'train') if is_chief else None,
        eval_summary_dir=os.path.join(model_dir, 'eval') if is_chief else None)

  total_steps = solver.training_number_of_steps
  evaluator_options = config.evaluator_options
  eval_steps = evaluator_options.eval_steps
  result = None
  # One readable line per loop at INFO (progress_log), not Orbit's dicts.
  with strategy.scope(), progress_log.quiet_orbit():
    if training and int(global_step.numpy()) == 0:
      controller.save_checkpoint()  # Step 0, so intervals count from here.
    if mode == 'train':
      controller.train(steps=total_steps)
    elif mode == 'train_and_eval':
      result = controller.train_and_evaluate(
          train_steps=total_steps, eval_steps=eval_steps,
          eval_interval=evaluator_options.eval_interval)
    elif mode == 'eval':
      result = controller.evaluate(steps=eval_steps)
    else:  # continuous_eval
      result = _evaluate_continuously(
          controller, model_dir, global_step, eval_steps, total_steps,
          evaluator_options.continuous_eval_timeout)
  checkpoints_lib.remove_worker_scratch(model_dir, strategy)
  return result
