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
from absl import flags

if __package__ in (None, ''):  # Run as a script from a checkout.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deeplab_kmax.data import dataset_info as dataset_info_lib
from deeplab_kmax.data import panoptic_conversion

_ROOT = flags.DEFINE_string('ade20k_root', None, 'ADE20K dataset root folder.')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None,
                                  'Where to write the TFRecord shards.')
_NUM_SHARDS = flags.DEFINE_integer('num_shards', 1000, 'Shards per split.')
_SPLITS = flags.DEFINE_list('splits', None,
                            'Splits to convert; default: those present.')
_NUM_WORKERS = flags.DEFINE_integer(
    'num_workers', min(8, os.cpu_count() or 1),
    'Processes decoding images and building labels.')
_TREAT_CROWD_AS_IGNORE = flags.DEFINE_boolean(
    'treat_crowd_as_ignore', True,
    'Label crowd thing segments as void (DeepLab2 default).')


def main(argv):
  del argv
  root = _ROOT.value
  folders = panoptic_conversion.ADE20K_SPLIT_FOLDERS
  splits = _SPLITS.value or [
      s for s in folders
      if os.path.isdir(os.path.join(root, 'images', folders[s]))]
  if not splits:
    raise app.UsageError(f'No images/training or images/validation under '
                         f'{root}.')
  spec = panoptic_conversion.ade20k_label_spec(
      dataset_info_lib.ADE20K_PANOPTIC,
      treat_crowd_as_ignore=_TREAT_CROWD_AS_IGNORE.value)
  for split in splits:
    tasks = panoptic_conversion.ade20k_tasks(root, split)
    shards = panoptic_conversion.write_split(
        tasks, spec, _OUTPUT_DIR.value, split, _NUM_SHARDS.value,
        _NUM_WORKERS.value)
    print(f'{split}: {len(tasks)} images, {len(shards)} shards in '
          f'{_OUTPUT_DIR.value}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['output_dir', 'ade20k_root'])
  app.run(main)
