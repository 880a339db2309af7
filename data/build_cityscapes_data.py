r"""Converts Cityscapes panoptic to DeepLab2-format TFRecords.

Expects the official layout plus the train-id panoptic files made by
cityscapesScripts (`createPanopticImgs --use-train-id`):

  ${cityscapes_root}/leftImg8bit/{train,val,test}/<city>/*_leftImg8bit.png
  ${cityscapes_root}/gtFine/cityscapes_panoptic_{train,val}_trainId.json
  ${cityscapes_root}/gtFine/cityscapes_panoptic_{train,val}_trainId/*.png

  python data/build_cityscapes_data.py --cityscapes_root=/data/cityscapes \
      --output_dir=/data/cityscapes/tfrecord

Labels are `train_id * 1000 + instance`; unlabelled and (by default) crowd
pixels are void 255.
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
    'cityscapes_root', 'Cityscapes dataset root folder.', num_shards=10)


def main(argv):
  del argv
  _FLAGS.convert_splits(
      {split: os.path.join('leftImg8bit', split)
       for split in ('train', 'val', 'test')},
      panoptic_conversion.cityscapes_tasks,
      functools.partial(panoptic_conversion.LabelSpec.from_dataset_info,
                        dataset_info_lib.CITYSCAPES_PANOPTIC))


if __name__ == '__main__':
  _FLAGS.run(main)
