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

import os
import sys

from absl import app
from absl import flags

if __package__ in (None, ''):  # Run as a script from a checkout.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deeplab_kmax.data import dataset_info as dataset_info_lib
from deeplab_kmax.data import panoptic_conversion

_ROOT = flags.DEFINE_string('cityscapes_root', None,
                            'Cityscapes dataset root folder.')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None,
                                  'Where to write the TFRecord shards.')
_NUM_SHARDS = flags.DEFINE_integer('num_shards', 10, 'Shards per split.')
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
  splits = _SPLITS.value or [
      s for s in ('train', 'val', 'test')
      if os.path.isdir(os.path.join(root, 'leftImg8bit', s))]
  if not splits:
    raise app.UsageError(f'No leftImg8bit/<split> folder under {root}.')
  spec = panoptic_conversion.LabelSpec.from_dataset_info(
      dataset_info_lib.CITYSCAPES_PANOPTIC,
      treat_crowd_as_ignore=_TREAT_CROWD_AS_IGNORE.value)
  for split in splits:
    tasks = panoptic_conversion.cityscapes_tasks(root, split)
    shards = panoptic_conversion.write_split(
        tasks, spec, _OUTPUT_DIR.value, split, _NUM_SHARDS.value,
        _NUM_WORKERS.value)
    print(f'{split}: {len(tasks)} images, {len(shards)} shards in '
          f'{_OUTPUT_DIR.value}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['output_dir', 'cityscapes_root'])
  app.run(main)
