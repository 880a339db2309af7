"""Runs an experiment: train, eval, train_and_eval or continuous_eval.

    config --(config.prepare: ${VAR} expansion, checks)--> strategy
      --> KMaXTask (model, loss, optimizers, data, evaluation hooks)
      --> KMaXTrainer / KMaXEvaluator --> orbit.Controller
      with a CheckpointManager over DeepLab2's trainer checkpoint layout.

A run restarted with the same command resumes from the newest checkpoint in
model_dir (step counter, weights and optimizer state); only a fresh run reads
`model_options.initial_checkpoint` (`KMaXTask.initialize`).
"""

import os
import re
from typing import Callable, Optional, Sequence

from absl import logging
import orbit
import tensorflow as tf

from deeplab_kmax import config as config_lib
from deeplab_kmax import precision
from deeplab_kmax import precision_options
from deeplab_kmax import temp_files
from deeplab_kmax.trainer import checkpoints as checkpoints_lib
from deeplab_kmax.trainer import distribution
from deeplab_kmax.trainer import kmax_evaluator
from deeplab_kmax.trainer import kmax_task
from deeplab_kmax.trainer import kmax_trainer
from deeplab_kmax.trainer import progress_log

MODES = config_lib.TRAINING_MODES
# What killed runs leave in model_dir (removed when stale, see `temp_files`):
# TensorFlow writes a checkpoint's shards into `<prefix>_temp/` before
# merging them, and the `checkpoint` state file through `checkpoint.tmp<hex>`.
STALE_CHECKPOINT_WRITES = re.compile(
    r'ckpt-\d+_temp|checkpoint\.tmp[0-9a-f]{32}')

# The task's parts, re-exported for callers that build them by hand.
Builders = kmax_task.Builders
build_model_variables = kmax_task.build_model_variables


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

  For a config built in memory: it is prepared first (`config.prepare`);
  the command line, which loads and prepares its config, calls
  `run_prepared`. Returns the last evaluation results (eval modes) or None.
  """
  config = config_lib.prepare_config(config, mode, check_files=check_files)
  return run_prepared(mode, config, model_dir,
                      strategy or distribution.create_strategy(tpu, num_gpus),
                      builders)


def run_prepared(mode: str, config, model_dir: str,
                 strategy: tf.distribute.Strategy,
                 builders: Optional[Builders] = None):
  """`run_experiment` for a config that `config.prepare` has checked."""
  if mode not in MODES:
    raise ValueError(f'Unknown mode {mode!r}; expected one of {MODES}.')
  is_chief = checkpoints_lib.is_chief(strategy)
  if is_chief:
    tf.io.gfile.makedirs(model_dir)
    temp_files.remove_stale(model_dir, STALE_CHECKPOINT_WRITES)
  task = kmax_task.KMaXTask(config, mode, builders)
  with strategy.scope():
    # Training may build the model in mixed precision (variables float32).
    with precision.keras_policy(
        config.trainer_options.mixed_precision if task.trains
        else precision_options.FLOAT32):
      model = task.build_model()
    # int64; under replication only the first replica's value counts.
    global_step = orbit.utils.create_global_step()
    optimizers = task.build_optimizers()
    trainer = (_build_trainer(task, model, optimizers, global_step, strategy,
                              model_dir, is_chief) if task.trains else None)
    evaluator = (_build_evaluator(task, model, global_step, strategy,
                                  model_dir, is_chief)
                 if task.evaluates else None)
  checkpoint_class = (tf.train.Checkpoint if task.trains else
                      checkpoints_lib.EvaluationCheckpoint)
  checkpoint = checkpoint_class(**checkpoints_lib.trainer_checkpoint_items(
      global_step, model.checkpoint_items, optimizers.main,
      optimizers.backbone))

  def init_fn():
    logging.info('No checkpoint in %s.', model_dir)
    task.initialize(model)

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
             trainer_options.save_summaries_steps]) if task.trains else None),
        checkpoint_manager=manager,
        summary_dir=os.path.join(model_dir, 'train') if is_chief else None,
        eval_summary_dir=os.path.join(model_dir, 'eval') if is_chief else None)
  # One readable line per loop at INFO (progress_log), not Orbit's dicts.
  with strategy.scope(), progress_log.quiet_orbit():
    if task.trains and int(global_step.numpy()) == 0:
      controller.save_checkpoint()  # Step 0, so intervals count from here.
    result = _dispatch(mode, controller, config, model_dir, global_step)
  checkpoints_lib.remove_worker_scratch(model_dir, strategy)
  return result


def _build_trainer(task: kmax_task.KMaXTask, model, optimizers, global_step,
                   strategy, model_dir: str,
                   is_chief: bool) -> kmax_trainer.KMaXTrainer:
  trainer_options = task.config.trainer_options
  solver = trainer_options.solver_options
  return kmax_trainer.KMaXTrainer(
      model, task.build_loss(model), task.train_dataset_fn(), optimizers.main,
      global_step,
      backbone_optimizer=optimizers.backbone,
      backbone_variables=lambda: model.backbone_variables,
      clip_gradient_norm=(solver.clip_gradient_norm
                          if solver.use_gradient_clipping else None),
      total_steps=solver.training_number_of_steps,
      image_summary_fn=task.train_image_summary_fn(model, strategy),
      # Every worker runs the forward pass (it may read sync-on-read
      # variables collectively); only the chief has a real writer.
      image_summary_interval=trainer_options.save_summaries_steps,
      strategy=strategy,
      progress_log=progress_log.ProgressLog(
          os.path.join(model_dir, progress_log.JSONL_FILENAME)
          if is_chief else None),
      mixed_precision=trainer_options.mixed_precision,
      jit_compile=trainer_options.jit_compile)


def _build_evaluator(task: kmax_task.KMaXTask, model, global_step, strategy,
                     model_dir: str,
                     is_chief: bool) -> kmax_evaluator.KMaXEvaluator:
  options = task.config.evaluator_options
  return kmax_evaluator.KMaXEvaluator(
      model, task.build_eval_dataset(), task.eval_dataset_info, global_step,
      model_dir=model_dir, strategy=strategy,
      num_vis_samples=(options.num_vis_samples if options.save_predictions
                       else 0),
      write_files=is_chief,
      extra_metrics=task.evaluation_hooks(model_dir, is_chief),
      use_tf_function=options.use_tf_function,
      official_panoptic_quality=options.official_panoptic_quality)


def _dispatch(mode: str, controller: orbit.Controller, config,
              model_dir: str, global_step: tf.Variable):
  """Runs the mode's loop; returns the last evaluation results or None."""
  total_steps = config.trainer_options.solver_options.training_number_of_steps
  options = config.evaluator_options
  if mode == 'train':
    controller.train(steps=total_steps)
    return None
  if mode == 'train_and_eval':
    return controller.train_and_evaluate(
        train_steps=total_steps, eval_steps=options.eval_steps,
        eval_interval=options.eval_interval)
  if mode == 'eval':
    return controller.evaluate(steps=options.eval_steps)
  return _evaluate_continuously(controller, model_dir, global_step,
                                options.eval_steps, total_steps,
                                options.continuous_eval_timeout)


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
