"""DeepLab2's export_model.py, with Keras layer traces left out of the file.

  TF_USE_LEGACY_KERAS=1 PYTHONPATH=../shared/bench \
  python tests/parity/deeplab2_export_model.py --experiment_option_path=... \
      --checkpoint_path=... --output_path=...

Runs `deeplab2.export_model.main` unchanged (same flags, module, signature
and serving graph) inside tf_keras' `keras_option_scope(save_traces=False)`.
DeepLab2's module tracks its Keras model, so by default the SavedModel also
gets a traced function for every Keras layer, which takes most of the export
time and which serving never calls: the `serving_default` graph is traced
from the module's `__call__` either way.
"""

from absl import app
from tf_keras.src.saving.legacy.saved_model import utils as keras_saving_utils

from deeplab2 import export_model


def main(argv) -> None:
  with keras_saving_utils.keras_option_scope(save_traces=False,
                                             in_tf_saved_model_scope=False):
    export_model.main(argv)


if __name__ == '__main__':
  app.run(main)
