r"""Exports a kMaX-DeepLab checkpoint as a SavedModel for TF Serving.

  python trainer/export_model.py \
      --config_file=configs/coco/kmax_meta_r50.textproto \
      --checkpoint_path=/path/to/ckpt-150000 \
      --output_path=/tmp/kmax_r50_coco/1

The checkpoint may be an official DeepLab2 kMaX-DeepLab checkpoint or one
written by this package's trainer (a directory means its latest checkpoint).
The SavedModel takes uint8 images of any size and returns panoptic, semantic
and instance maps at that size (see docs/serving.md); the evaluation resize
and padding of `eval_dataset_options` happen inside the graph.

The export is written next to --output_path and renamed into place when
complete; an existing --output_path is kept unless --overwrite is given.
--onnx_path additionally writes the network as ONNX (needs the optional
`deeplab_kmax[onnx]` packages).
"""

import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import tensorflow as tf

# Makes `deeplab_kmax` importable when run as `python trainer/export_model.py`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deeplab_kmax import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from deeplab_kmax.export import model_loading  # pylint: disable=g-import-not-at-top,wrong-import-position
from deeplab_kmax.export import saved_model  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG_FILE = flags.DEFINE_string(
    'config_file', None, 'Experiment config (textproto) of the checkpoint.')
_CHECKPOINT_PATH = flags.DEFINE_string(
    'checkpoint_path', None,
    'Checkpoint prefix (e.g. .../ckpt-150000) or a directory of checkpoints.')
_OUTPUT_PATH = flags.DEFINE_string(
    'output_path', None, 'SavedModel directory to create (for TF Serving: '
    '<model_base_path>/<version>).')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Replace an existing --output_path.')
_CONFIG_OVERRIDE = flags.DEFINE_multi_string(
    'config_override', [],
    'FIELD.PATH=VALUE overrides of the config, e.g. '
    'eval_dataset_options.crop_size=[641,641] to serve at a lower '
    'resolution. Repeatable.')
_ALLOW_PARTIAL = flags.DEFINE_bool(
    'allow_partial_checkpoint', False,
    'Export even if the checkpoint lacks some model variables.')
_ONNX_PATH = flags.DEFINE_string(
    'onnx_path', None, 'Also write the network as ONNX to this file.')

flags.mark_flags_as_required(['config_file', 'checkpoint_path', 'output_path'])


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  start = time.time()
  config = config_lib.load_for_inference(_CONFIG_FILE.value,
                                         _CONFIG_OVERRIDE.value or ())
  output_path = _OUTPUT_PATH.value
  if tf.io.gfile.exists(output_path) and not _OVERWRITE.value:
    # Checked before the (slow) model build.
    logging.error('%s already exists; pass --overwrite to replace it.',
                  output_path)
    return 1
  module = model_loading.build_serving_module_from_checkpoint(
      config, _CHECKPOINT_PATH.value, _ALLOW_PARTIAL.value)
  saved_model.write_saved_model(module, output_path,
                                overwrite=_OVERWRITE.value)
  logging.info('SavedModel written to %s (%.0fs).', output_path,
               time.time() - start)
  if _ONNX_PATH.value:
    from deeplab_kmax.export import onnx_export  # pylint: disable=g-import-not-at-top
    onnx_export.convert_network(
        module.model, config.eval_dataset_options.crop_size,
        _ONNX_PATH.value, metadata=module.metadata)
    logging.info('ONNX model written to %s.', _ONNX_PATH.value)
  print(f'Exported {output_path}')
  return 0


if __name__ == '__main__':
  app.run(main)
