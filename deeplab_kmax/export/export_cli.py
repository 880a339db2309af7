r"""Command line: export a kMaX-DeepLab checkpoint (SavedModel, ONNX, TFLite).

  kmax-export --config_file=coco/kmax_meta_r50 \
      --checkpoint_path=/path/to/ckpt-150000 --output_path=/tmp/kmax/1

(the same as `python trainer/export_model.py ...`). The checkpoint may be an
official DeepLab2 kMaX-DeepLab checkpoint or one written by this package's
trainer (a directory means its latest checkpoint). The SavedModel takes
uint8 images of any size and returns panoptic, semantic and instance maps at
that size (see docs/serving.md); the evaluation resize and padding of
`eval_dataset_options` happen inside the graph.

The export is written next to --output_path and renamed into place when
complete; an existing --output_path is kept unless --overwrite is given.
--onnx_path additionally writes the network as ONNX (needs the optional
`deeplab_kmax[onnx]` packages); --tflite_path writes a TFLite model of the
network and the mask-wise merge at a fixed crop size (docs/tflite.md).
--precision=bfloat16|float16 runs the network in that dtype (outputs
unchanged in dtype) and --jit_compile compiles it with XLA.

Flags are defined by `run()` only, so importing this module has no side
effects on other tools' flags.
"""

import time

from absl import app
from absl import flags
from absl import logging
import tensorflow as tf

from deeplab_kmax import checkpoint_io
from deeplab_kmax import cli_errors
from deeplab_kmax import config as config_lib
from deeplab_kmax import precision_options
from deeplab_kmax.export import model_loading
from deeplab_kmax.export import saved_model

FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_string(
      'config_file', None, 'Experiment config (textproto path, or the name '
      'of a shipped config such as coco/kmax_meta_r50) of the checkpoint.')
  flags.DEFINE_string(
      'checkpoint_path', None,
      'Checkpoint prefix (e.g. .../ckpt-150000) or a directory of '
      'checkpoints.')
  flags.DEFINE_string(
      'output_path', None, 'SavedModel directory to create (for TF Serving: '
      '<model_base_path>/<version>).')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing --output_path.')
  flags.DEFINE_multi_string(
      'config_override', [],
      'Config overrides, FIELD.PATH=VALUE (e.g. '
      'eval_dataset_options.crop_size=[641,641] to serve at a lower '
      'resolution) or a textproto snippet. Repeatable.')
  flags.DEFINE_bool(
      'allow_partial_checkpoint', False,
      'Export even if the checkpoint lacks some model variables.')
  flags.DEFINE_string(
      'onnx_path', None, 'Also write the network as ONNX to this file.')
  flags.DEFINE_string(
      'tflite_path', None, 'Also write a TFLite model (network and mask-wise '
      'merge at a fixed crop size) to this file.')
  flags.DEFINE_string(
      'tflite_size', None, 'HxW crop of the TFLite model (each side 32k+1); '
      'default: eval_dataset_options.crop_size.')
  flags.DEFINE_enum(
      'tflite_quantization', 'none', ['none', 'float16', 'dynamic_range'],
      'Weight quantization of the TFLite model.')
  flags.DEFINE_enum(
      'precision', precision_options.FLOAT32,
      list(precision_options.SERVING_PRECISIONS),
      'Compute dtype of the exported network (float32 variables; outputs '
      'float32 / int32 as always).')
  flags.DEFINE_bool(
      'jit_compile', False,
      'Compile the network and the mask-wise merge with XLA.')
  flags.DEFINE_bool(
      'fold_batch_norm', False,
      'Compute each batch norm inside the convolution before it (faster on '
      'CPU; outputs equal up to float rounding).')
  flags.mark_flags_as_required(
      ['config_file', 'checkpoint_path', 'output_path'])
  cli_errors.define_verbose_flag()


def _expected_errors():
  """Failures the user can fix: reported as a message, no traceback."""
  return (config_lib.ConfigError, checkpoint_io.IncompleteCheckpointError)


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  start = time.time()
  tflite_size = None
  if FLAGS.tflite_size:
    from deeplab_kmax.export import tflite_export  # pylint: disable=g-import-not-at-top
    try:
      tflite_size = tflite_export.parse_size(FLAGS.tflite_size)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
  config = config_lib.load_experiment(FLAGS.config_file,
                                     FLAGS.config_override or (),
                                     mode=config_lib.INFERENCE)
  output_path = FLAGS.output_path
  if tf.io.gfile.exists(output_path) and not FLAGS.overwrite:
    # Checked before the (slow) model build.
    raise FileExistsError(f'{output_path} already exists; pass --overwrite '
                          'to replace it.')
  module = model_loading.build_serving_module_from_checkpoint(
      config, FLAGS.checkpoint_path, FLAGS.allow_partial_checkpoint,
      precision=FLAGS.precision, jit_compile=FLAGS.jit_compile,
      fold_batch_norm=FLAGS.fold_batch_norm)
  saved_model.write_saved_model(module, output_path,
                                overwrite=FLAGS.overwrite)
  logging.info('SavedModel written to %s (%.0fs).', output_path,
               time.time() - start)
  if FLAGS.onnx_path:
    from deeplab_kmax.export import onnx_export  # pylint: disable=g-import-not-at-top
    onnx_export.convert_network(
        module.model, config.eval_dataset_options.crop_size,
        FLAGS.onnx_path, metadata=module.metadata)
    logging.info('ONNX model written to %s.', FLAGS.onnx_path)
  if FLAGS.tflite_path:
    from deeplab_kmax.export import tflite_export  # pylint: disable=g-import-not-at-top
    conversion = tflite_export.export(module, FLAGS.tflite_path, tflite_size,
                                      FLAGS.tflite_quantization)
    logging.info('TFLite model (%s, %d ops, select TF ops: %s) written to '
                 '%s.', conversion.quantization, len(conversion.ops),
                 ', '.join(conversion.select_tf_ops) or 'none',
                 FLAGS.tflite_path)
  print(f'Exported {output_path}')
  return 0


def run() -> None:
  """The `kmax-export` console script and `trainer/export_model.py`."""
  _define_flags()
  cli_errors.run(main, expected=_expected_errors())


if __name__ == '__main__':
  run()
