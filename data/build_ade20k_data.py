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

import functools
import os
import sys

if __package__ in (None, ''):  # Run as a script from a checkout.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deeplab_kmax.data import converter_flags  # pylint: disable=g-import-not-at-top
from deeplab_kmax.data import dataset_info as dataset_info_lib
from deeplab_kmax.data import panoptic_conversion

_FLAGS = converter_flags.define_converter_flags(
    'ade20k_root', 'ADE20K dataset root folder.', num_shards=1000)


def main(argv):
  del argv
  _FLAGS.convert_splits(
      {split: os.path.join('images', folder) for split, folder
       in panoptic_conversion.ADE20K_SPLIT_FOLDERS.items()},
      panoptic_conversion.ade20k_tasks,
      functools.partial(panoptic_conversion.ade20k_label_spec,
                        dataset_info_lib.ADE20K_PANOPTIC))


if __name__ == '__main__':
  _FLAGS.run(main)
