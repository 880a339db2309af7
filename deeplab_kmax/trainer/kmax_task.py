"""What an experiment trains and evaluates, built from its config.

As in the TF Model Garden, a task owns the parts -- dataset descriptions,
the model, its loss and optimizers, the input pipelines, the evaluation
hooks and how a fresh model is initialised -- and knows nothing of devices
or loops; the runner (`train_lib`) owns the strategy, the Orbit trainer,
evaluator and controller, and the checkpoints.
"""

import dataclasses
import os
from typing import Any, Callable, List, Optional, Sequence

from absl import logging
import tensorflow as tf
import tf_keras

from deeplab_kmax import checkpoint_io
from deeplab_kmax import keys
from deeplab_kmax.config import config_pb2
from deeplab_kmax.config import validation
from deeplab_kmax.trainer import optimizer as optimizer_lib
from deeplab_kmax.trainer import summaries

_NUM_TRAIN_VIS_IMAGES = 2


def _default_model(config, dataset_info, crop_size=None):
  from deeplab_kmax import model as model_lib  # pylint: disable=g-import-not-at-top
  return model_lib.build_model(config, dataset_info, crop_size=crop_size)


def _default_loss(config, dataset_info, model):
  from deeplab_kmax.losses import kmax_loss  # pylint: disable=g-import-not-at-top
  return kmax_loss.KMaXLoss.from_config(
      config.trainer_options.loss_options, config.model_options, dataset_info,
      auxiliary_output_number=model.auxiliary_output_number)


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
    `checkpoint_items` and `backbone_variables`; built for crop_size or built
    by the task.
  loss(config, dataset_info, model) -> callable loss.
  dataset(dataset_options, is_training, input_context=None) -> tf.data.
  dataset_info(dataset_options) -> DatasetInfo.
  """
  model: Callable[..., Any] = _default_model
  loss: Callable[..., Any] = _default_loss
  dataset: Callable[..., Any] = _default_dataset
  dataset_info: Callable[..., Any] = _default_dataset_info


def build_model_variables(model: tf_keras.Model, crop_size: Sequence[int]):
  """Creates the model's variables for a [crop_h, crop_w, 3] input."""
  try:
    model(tf_keras.Input(list(crop_size) + [3]), training=False)
  except Exception:  # pylint: disable=broad-except
    # Not symbolically callable: one eager zero image instead.
    model(tf.zeros([1] + list(crop_size) + [3]), training=False)


class KMaXTask:
  """The parts of one `mode` run of a prepared config (`config.prepare`)."""

  def __init__(self, config: config_pb2.ExperimentOptions, mode: str,
               builders: Optional[Builders] = None):
    needs = validation.mode_needs(mode)
    self.config = config
    self.builders = builders or Builders()
    self.trains = needs.trains
    self.evaluates = needs.evaluates
    self.dataset_info = self.builders.dataset_info(
        config.train_dataset_options if self.trains else
        config.eval_dataset_options)
    self.eval_dataset_info = self.dataset_info
    if self.trains and self.evaluates:
      self.eval_dataset_info = self.builders.dataset_info(
          config.eval_dataset_options)
      if self.eval_dataset_info.name != self.dataset_info.name:
        logging.warning('Training on %s but evaluating on %s.',
                        self.dataset_info.name, self.eval_dataset_info.name)

  # --- Model, loss, optimizers (call inside the strategy's scope). ---------

  def build_model(self) -> tf_keras.Model:
    """The model, built for the crop it runs on."""
    options = (self.config.train_dataset_options if self.trains else
               self.config.eval_dataset_options)
    crop = list(options.crop_size)
    model = self.builders.model(self.config, self.dataset_info, crop)
    if not model.built:
      build_model_variables(model, crop)
    return model

  def build_loss(self, model: tf_keras.Model):
    return self.builders.loss(self.config, self.dataset_info, model)

  def build_optimizers(self) -> optimizer_lib.Optimizers:
    """Main and backbone optimizers (none when the run does not train)."""
    if not self.trains:
      return optimizer_lib.Optimizers(None, None)
    return optimizer_lib.build_optimizers(
        self.config.trainer_options.solver_options)

  # --- Inputs. --------------------------------------------------------------

  def train_dataset_fn(self) -> Callable[[tf.distribute.InputContext], Any]:
    """The training input per input pipeline (for distribute_datasets)."""
    options = self.config.train_dataset_options
    return lambda input_context: self.builders.dataset(options, True,
                                                       input_context)

  def build_eval_dataset(self):
    return self.builders.dataset(self.config.eval_dataset_options, False)

  # --- Evaluation and summaries. -------------------------------------------

  def evaluation_hooks(self, model_dir: str, is_chief: bool = True
                       ) -> List[Any]:
    """Instance AP for datasets with things; raw prediction files on request.

    Predictions go to `evaluator_options.override_save_dir` or
    `<model_dir>/vis`, under `raw_predictions/` (see
    `evaluation.prediction_writer`).
    """
    from deeplab_kmax.evaluation import instance_ap  # pylint: disable=g-import-not-at-top
    from deeplab_kmax.evaluation import prediction_writer  # pylint: disable=g-import-not-at-top
    options = self.config.evaluator_options
    info = self.eval_dataset_info
    hooks = []
    if info.thing_class_ids:
      hooks.append(instance_ap.InstanceAveragePrecision(
          info.thing_class_ids, info.panoptic_label_divisor,
          class_names=info.class_names,
          detailed=options.detailed_ap_metrics))
    if options.save_raw_predictions and is_chief:
      save_dir = options.override_save_dir or os.path.join(model_dir, 'vis')
      hooks.append(prediction_writer.RawPredictionWriter(
          os.path.join(save_dir, 'raw_predictions'), info,
          raw_panoptic_format=options.raw_panoptic_format,
          convert_to_eval_ids=options.convert_raw_to_eval_ids))
    return hooks

  def train_image_summary_fn(self, model: tf_keras.Model,
                             strategy: tf.distribute.Strategy
                             ) -> Optional[Callable[[int], None]]:
    """Writes predicted panoptic overlays of a few training crops."""
    if isinstance(strategy, tf.distribute.TPUStrategy):
      return None
    state = {}

    def write(step: int):
      if 'images' not in state:
        options = config_pb2.DatasetOptions()
        options.CopyFrom(self.config.train_dataset_options)
        options.batch_size = _NUM_TRAIN_VIS_IMAGES
        batch = next(iter(self.builders.dataset(options, True)))
        state['images'] = batch[keys.IMAGE][:_NUM_TRAIN_VIS_IMAGES]
      outputs = model(state['images'], training=False)
      if keys.PANOPTIC_PRED in outputs:
        # Orbit only enables recording inside its own summary interval.
        with tf.summary.record_if(True):
          summaries.write_panoptic_images(
              'train/panoptic_overlay', state['images'].numpy(),
              outputs[keys.PANOPTIC_PRED].numpy(), step, self.dataset_info,
              max_outputs=_NUM_TRAIN_VIS_IMAGES)

    return write

  # --- Initialisation of a run with no checkpoint of its own. --------------

  def initialize(self, model: tf_keras.Model) -> None:
    """Reads `model_options.initial_checkpoint`, if any, into `model`.

    Training fine-tunes from it (the config says whether the class-specific
    last layers are restored); evaluation reads all of it.
    """
    options = self.config.model_options
    initial = options.initial_checkpoint
    if self.trains:
      if initial:
        logging.info('Initialising from %s.', initial)
        checkpoint_io.restore_model(
            model.checkpoint_items, initial,
            checkpoint_io.RestoreMode.fine_tune(
                options.restore_semantic_last_layer_from_initial_checkpoint,
                options.restore_class_last_layer_from_initial_checkpoint))
      return
    logging.warning('Evaluating %s.', f'the initial checkpoint {initial}'
                    if initial else 'randomly initialised weights')
    if initial:
      checkpoint_io.restore_model(
          model.checkpoint_items, initial,
          checkpoint_io.RestoreMode.resume_or_evaluate())
