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

import _checkout  # pylint: disable=unused-import,g-bad-import-order

from deeplab_kmax.data import converter_flags
from deeplab_kmax.data import panoptic_conversion

if __name__ == '__main__':
  converter_flags.run_release_converter(panoptic_conversion.ADE20K_RELEASE)
