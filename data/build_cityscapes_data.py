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

import _checkout  # pylint: disable=unused-import,g-bad-import-order

from deeplab_kmax.data import converter_flags
from deeplab_kmax.data import panoptic_conversion

if __name__ == '__main__':
  converter_flags.run_release_converter(panoptic_conversion.CITYSCAPES_RELEASE)
