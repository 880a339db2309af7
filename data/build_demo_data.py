r"""Builds the synthetic demo dataset (no download) and its TFRecords.

  python data/build_demo_data.py --output_dir=demo_output/data

renders about a thousand 128x128 COCO-panoptic-format scenes (textured
sky, grass and water; discs, squares and triangles that occlude and touch
each other; crowd clusters and unlabelled debris), converts them with the
COCO converter and writes the dataset descriptor. Deterministic given
--seed. Output:

  demo_output/data/tfrecord/{train,val}-*.tfrecord,
  demo_output/data/demo_shapes.json (dataset descriptor),
  demo_output/data/coco/... (the COCO-format source files)

The descriptor is written last: with --reuse_existing a complete earlier
build (descriptor and full shard sets) is kept, an interrupted one redone.
"""

import time

from absl import flags

import _checkout  # pylint: disable=unused-import,g-bad-import-order

from deeplab_kmax import cli_errors
from deeplab_kmax.data import demo_dataset
from deeplab_kmax.data import panoptic_conversion

_OUTPUT_DIR = flags.DEFINE_string('output_dir', 'demo_output/data',
                                  'Where to write the dataset.')
_NUM_TRAIN = flags.DEFINE_integer('num_train', 1000, 'Training images.')
_NUM_VAL = flags.DEFINE_integer('num_val', 64, 'Validation images.')
_SEED = flags.DEFINE_integer('seed', 0, 'Random seed.')
_HEIGHT = flags.DEFINE_integer('height', 128, 'Image height.')
_WIDTH = flags.DEFINE_integer('width', 128, 'Image width.')
_NUM_SHARDS = flags.DEFINE_integer('num_shards', 4, 'Shards per split.')
_NUM_WORKERS = flags.DEFINE_integer('num_workers', 1,
                                    'Conversion worker processes.')
_REUSE_EXISTING = flags.DEFINE_boolean(
    'reuse_existing', False,
    'Keep a complete earlier build in --output_dir instead of rebuilding.')


def main(argv):
  del argv
  if _REUSE_EXISTING.value and demo_dataset.is_complete(_OUTPUT_DIR.value):
    print(f'Demo dataset already complete in {_OUTPUT_DIR.value}; kept.')
    return
  start = time.time()
  paths = demo_dataset.build(
      _OUTPUT_DIR.value, num_train=_NUM_TRAIN.value, num_val=_NUM_VAL.value,
      seed=_SEED.value, height=_HEIGHT.value, width=_WIDTH.value,
      num_shards=_NUM_SHARDS.value, num_workers=_NUM_WORKERS.value,
      show_progress=True)
  print(f'Demo dataset ready in {time.time() - start:.1f}s:')
  for key in ('descriptor', 'train_pattern', 'val_pattern'):
    print(f'  {key}: {paths[key]}')


if __name__ == '__main__':
  cli_errors.run(main, expected=(panoptic_conversion.ConversionError,))
