"""Prints the parameter counts of the model an experiment config describes.

  python trainer/count_parameters.py --config_file=configs/coco/kmax_meta_r50.textproto

The figures are those of DeepLab2's `summary.tsv`: checkpoint keys, trainable
variables and parameters, and all parameters (batch-norm statistics included).
"""

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deeplab_kmax import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from deeplab_kmax import model as model_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from deeplab_kmax import model_summary  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG_FILES = flags.DEFINE_multi_string(
    'config_file', None, 'Experiment config(s) (textproto).', required=True)
_PER_ITEM = flags.DEFINE_bool('per_item', False,
                              'Also print counts per checkpoint item.')


def main(argv):
  del argv
  print('config\tcheckpoint_keys\ttrainable_variables\ttrainable_params\t'
        'total_params\tnon_trainable_params')
  for path in _CONFIG_FILES.value:
    model = model_lib.build_model(config_lib.load_config(path),
                                  crop_size=(129, 129))
    c = model_summary.parameter_counts(model)
    print(f'{path}\t{c.checkpoint_keys}\t{c.trainable_variables}\t'
          f'{c.trainable_parameters}\t{c.total_parameters}\t'
          f'{c.non_trainable_parameters}')
    if _PER_ITEM.value:
      print(model_summary.parameter_table(model))


if __name__ == '__main__':
  app.run(main)
