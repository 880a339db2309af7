"""DeepLab2's export_model.py, with Keras layer traces left out of the file.

  TF_USE_LEGACY_KERAS=1 PYTHONPATH=../shared/bench \
  python tests/parity/deeplab2_export_model.py --experiment_option_path=... \
      --checkpoint_path=... --output_path=... \
      [--probe_inputs=INPUTS.npz --probe_out=OUT [--probe_saved_model=DIR \
       --probe_saved_model_out=OUT2]]

Runs `deeplab2.export_model.main` unchanged (same flags, module, signature
and serving graph) inside tf_keras' `keras_option_scope(save_traces=False)`.
DeepLab2's module tracks its Keras model, so by default the SavedModel also
gets a traced function for every Keras layer, which takes most of the export
time and which serving never calls: the `serving_default` graph is traced
from the module's `__call__` either way.

With --probe_inputs, the same process then loads SavedModels and records
their outputs (deeplab2_export_probe.probe): first --probe_saved_model (any
other export, all its signatures), then the one just written
(serving_default only; its refused inputs must come last, see there). One
process for all saves a TensorFlow + DeepLab2 start-up per SavedModel; a
SavedModel load needs no Python code of the exporter either way.
"""

import os
import sys

from absl import app
from absl import flags
from tf_keras.src.saving.legacy.saved_model import utils as keras_saving_utils

from deeplab2 import export_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deeplab2_export_probe  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.DEFINE_string('probe_inputs', None,
                    'After the export, run these inputs (.npz) through it.')
flags.DEFINE_string('probe_out', None,
                    'OUT prefix (.npz, .json) of the exported model\'s probe.')
flags.DEFINE_string('probe_saved_model', None,
                    'Another SavedModel to probe first, with all signatures.')
flags.DEFINE_string('probe_saved_model_out', None,
                    'OUT prefix of the --probe_saved_model probe.')
FLAGS = flags.FLAGS


def main(argv) -> None:
  with keras_saving_utils.keras_option_scope(save_traces=False,
                                             in_tf_saved_model_scope=False):
    export_model.main(argv)
  if not FLAGS.probe_inputs:
    return
  if FLAGS.probe_saved_model:
    deeplab2_export_probe.probe(FLAGS.probe_saved_model, FLAGS.probe_inputs,
                                FLAGS.probe_saved_model_out)
  deeplab2_export_probe.probe(FLAGS.output_path, FLAGS.probe_inputs,
                              FLAGS.probe_out, default_only=True)


if __name__ == '__main__':
  app.run(main)
