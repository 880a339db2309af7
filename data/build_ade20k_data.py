r"""Converts ADE20K panoptic (COCO-format conversion) to TFRecords.

Expects:

  ${ade20k_root}/images/{training,validation}/*.jpg
  ${ade20k_root}/ade20k_panoptic_{train,val}.json
  ${ade20k_root}/ade20k_panoptic_{train,val}/*.png

  python data/build_ade20k_data.py --ade20k_root=/data/ADEChallengeData2016 \
      --output_dir=/data/ade20k/tfrecord

Labels are `(json category + 1) * 1000 + instance`; JSON category 255,
unlabelled pixels and (by default) crowd pixels are void 0.
"""

import os
import sys

from absl import app

if __package__ in (None, ''):  # Run as a script from a checkout.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deeplab_kmax import cli_errors  # pylint: disable=g-import-not-at-top
from deeplab_kmax.data import converter_flags
from deeplab_kmax.data import dataset_info as dataset_info_lib
from deeplab_kmax.data import panoptic_conversion

_FLAGS = converter_flags.define_converter_flags(
    'ade20k_root', 'ADE20K dataset root folder.', num_shards=1000)


def main(argv):
  del argv
  root = _FLAGS.root.value
  folders = panoptic_conversion.ADE20K_SPLIT_FOLDERS
  splits = _FLAGS.splits.value or [
      s for s in folders
      if os.path.isdir(os.path.join(root, 'images', folders[s]))]
  if not splits:
    raise app.UsageError(f'No images/training or images/validation under '
                         f'{root}.')
  spec = panoptic_conversion.ade20k_label_spec(
      dataset_info_lib.ADE20K_PANOPTIC,
      treat_crowd_as_ignore=_FLAGS.treat_crowd_as_ignore.value)
  tasks = {split: panoptic_conversion.ade20k_tasks(root, split)
           for split in splits}
  _FLAGS.convert(tasks, spec)


if __name__ == '__main__':
  converter_flags.mark_required(_FLAGS)
  cli_errors.run(main, expected=(panoptic_conversion.ConversionError,))
