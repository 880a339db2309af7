"""Building a model for inference from a config and a checkpoint.

Inference must not silently run half-initialised weights, so the checkpoint
is read in `checkpoint_io`'s strict-inference mode: every model variable has
to be in it. Accepted checkpoints: DeepLab2's (model items at the top
level, as `tf.train.Checkpoint(**model.checkpoint_items)` writes them) and
this package's trainer checkpoints (the same items plus optimizer state,
which is ignored); a directory means its latest checkpoint.
"""

from typing import Optional, Sequence

from absl import logging

from deeplab_kmax import checkpoint_io
from deeplab_kmax import model as model_lib
from deeplab_kmax import precision as precision_lib
from deeplab_kmax import precision_options
from deeplab_kmax.config import config_pb2
from deeplab_kmax.data import dataset_info as dataset_info_lib
from deeplab_kmax.layers import bn_folding
from deeplab_kmax.export import serving

# Variables do not depend on the input size, so the model is built on a small
# input; the serving graph is traced at the eval crop later.
BUILD_CROP = (129, 129)
# What the CLIs report without a traceback.
IncompleteCheckpointError = checkpoint_io.IncompleteCheckpointError


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
  checkpoint_io.restore_model(
      model.checkpoint_items, checkpoint_path,
      checkpoint_io.RestoreMode.strict_inference(allow_partial))
  return model


def build_serving_module_from_checkpoint(
    config: config_pb2.ExperimentOptions, checkpoint_path: Optional[str],
    allow_partial: bool = False,
    precision: str = precision_options.FLOAT32,
    jit_compile: bool = False,
    fold_batch_norm: bool = False) -> serving.PanopticServingModule:
  """Model + checkpoint + eval preprocessing, ready to export or call.

  `precision` (one of `precision_options.SERVING_PRECISIONS`) is the
  network's compute dtype; the outputs are float32 / int32 in every case.
  `jit_compile` compiles the network and the merge with XLA.
  `fold_batch_norm` computes each batch norm inside the convolution before
  it (`layers/bn_folding.py`): faster, equal up to float rounding.
  """
  precision_lib.check_precision(precision,
                                precision_options.SERVING_PRECISIONS,
                                'precision')
  with precision_lib.keras_policy(precision):
    model = build_inference_model(config, checkpoint_path, allow_partial)
  if fold_batch_norm:
    bn_folding.enable(model)
  return serving.build_serving_module(
      model, config,
      extra_metadata={'checkpoint': str(checkpoint_path or ''),
                      'precision': precision, 'jit_compile': jit_compile,
                      'fold_batch_norm': fold_batch_norm},
      jit_compile=jit_compile)
