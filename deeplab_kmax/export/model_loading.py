"""Building a model for inference from a config and a checkpoint.

Inference must not silently run half-initialised weights, so unlike an
initial-checkpoint restore for fine-tuning, every model variable has to be in
the checkpoint. Accepted checkpoints: DeepLab2's (model items at the top
level, as `tf.train.Checkpoint(**model.checkpoint_items)` writes them) and
this package's trainer checkpoints (the same items plus optimizer state,
which is ignored); a directory means its latest checkpoint.
"""

from typing import Optional, Sequence

from absl import logging

from deeplab_kmax import checkpoint_io
from deeplab_kmax import model as model_lib
from deeplab_kmax.config import config_pb2
from deeplab_kmax.data import dataset_info as dataset_info_lib
from deeplab_kmax.export import serving

# Variables do not depend on the input size, so the model is built on a small
# input; the serving graph is traced at the eval crop later.
BUILD_CROP = (129, 129)


class IncompleteCheckpointError(ValueError):
  """The checkpoint lacks variables the model needs."""


def build_inference_model(config: config_pb2.ExperimentOptions,
                          checkpoint_path: Optional[str],
                          allow_partial: bool = False,
                          build_crop: Sequence[int] = BUILD_CROP):
  """Builds the model of `config` and restores all of its weights.

  Args:
    config: the experiment config; the eval dataset describes the labels.
    checkpoint_path: checkpoint prefix or directory; None keeps the random
      initialisation (only useful for tests and benchmarks).
    allow_partial: accept a checkpoint that lacks some model variables.
    build_crop: input size used to create the variables.

  Returns:
    A built KMaXDeepLab.

  Raises:
    FileNotFoundError: no checkpoint at `checkpoint_path`.
    IncompleteCheckpointError: model variables are missing from it.
  """
  info = dataset_info_lib.get_dataset_info(config.eval_dataset_options)
  model = model_lib.build_model(config, dataset_info=info,
                                crop_size=build_crop)
  if checkpoint_path is None:
    logging.warning('No checkpoint given: the model keeps random weights.')
    return model
  restore_all_weights(model, checkpoint_path, allow_partial)
  return model


def restore_all_weights(model, checkpoint_path: str,
                        allow_partial: bool = False
                        ) -> checkpoint_io.RestoreReport:
  """Restores every model variable from a checkpoint, or raises.

  Raises:
    FileNotFoundError: no checkpoint at `checkpoint_path`.
    IncompleteCheckpointError: model variables are missing from it (unless
      `allow_partial`).
  """
  report = checkpoint_io.restore(model.checkpoint_items, checkpoint_path)
  logging.info('Checkpoint %s: %s', checkpoint_path, report.summary())
  if report.missing and not allow_partial:
    listed = '\n  '.join(report.missing[:10])
    raise IncompleteCheckpointError(
        f'{checkpoint_path} lacks {len(report.missing)} of the model\'s '
        f'variables ({report.missing_by_item()}), e.g.\n  {listed}\n'
        'Is it a checkpoint of this config (same backbone and dataset)? '
        'Pass --allow_partial_checkpoint to export anyway.')
  return report


def build_serving_module_from_checkpoint(
    config: config_pb2.ExperimentOptions, checkpoint_path: Optional[str],
    allow_partial: bool = False) -> serving.PanopticServingModule:
  """Model + checkpoint + eval preprocessing, ready to export or call."""
  model = build_inference_model(config, checkpoint_path, allow_partial)
  return serving.build_serving_module(
      model, config,
      extra_metadata={'checkpoint': str(checkpoint_path or '')})
