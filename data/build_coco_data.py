r"""Converts COCO panoptic (or any COCO-format panoptic data) to TFRecords.

Expected layout (the official COCO one):

  ${coco_root}/train2017/*.jpg, ${coco_root}/val2017/*.jpg, test2017/*.jpg
  ${coco_root}/annotations/panoptic_{train,val}2017.json
  ${coco_root}/annotations/panoptic_{train,val}2017/*.png

Usage:

  python data/build_coco_data.py --coco_root=/data/coco \
      --output_dir=/data/coco/tfrecord --num_shards=1000

Writes `{split}-SSSSS-of-NNNNN.tfrecord` in DeepLab2's format (crowd thing
segments and unlabelled pixels become void 0; COCO category ids are packed to
1..133). For your own COCO-format dataset pass
`--dataset_descriptor=my_dataset.json`, or derive a descriptor from the JSON
categories with `--write_descriptor=my_dataset.json --dataset_name=my_dataset`
and point the experiment config's `dataset_descriptor` at it.
"""


from absl import app
from absl import flags
from absl import logging

import _checkout  # pylint: disable=unused-import,g-bad-import-order

from deeplab_kmax.data import converter_flags
from deeplab_kmax.data import dataset_info as dataset_info_lib
from deeplab_kmax.data import panoptic_conversion

_FLAGS = converter_flags.define_converter_flags(
    'coco_root', 'COCO dataset root folder.', num_shards=1000)
_DESCRIPTOR = flags.DEFINE_string(
    'dataset_descriptor', None,
    'Descriptor (JSON or textproto) of a custom dataset; default: COCO.')
_WRITE_DESCRIPTOR = flags.DEFINE_string(
    'write_descriptor', None,
    'Derive a JSON descriptor from the JSON categories of the first labelled '
    'split, save it here and convert with it.')
_DATASET_NAME = flags.DEFINE_string(
    'dataset_name', 'custom_panoptic', 'Name for --write_descriptor.')


def _descriptor(coco_root, splits) -> dataset_info_lib.DatasetInfo:
  if _WRITE_DESCRIPTOR.value:
    labelled = [s for s in splits if s != 'test']
    if not labelled:
      raise app.UsageError('--write_descriptor needs a labelled split.')
    json_path = panoptic_conversion.coco_split_paths(coco_root, labelled[0])[1]
    content = panoptic_conversion.read_panoptic_json(json_path)
    if not content.get('categories'):
      raise panoptic_conversion.ConversionError(
          f'{json_path} has no "categories" to derive a descriptor from.')
    info = dataset_info_lib.from_coco_categories(_DATASET_NAME.value,
                                                 content['categories'])
    info.save(_WRITE_DESCRIPTOR.value)
    logging.info('Wrote dataset descriptor %s', _WRITE_DESCRIPTOR.value)
    return info
  if _DESCRIPTOR.value:
    try:
      return dataset_info_lib.load(_DESCRIPTOR.value)
    except ValueError as e:  # The message names the descriptor and field.
      raise panoptic_conversion.ConversionError(str(e)) from e
  return dataset_info_lib.COCO_PANOPTIC


def main(argv):
  del argv
  coco_root = _FLAGS.root.value
  splits = _FLAGS.splits_to_convert(panoptic_conversion.COCO_SPLIT_FOLDERS)
  written = panoptic_conversion.convert_coco_panoptic(
      coco_root, _FLAGS.output_dir.value, splits, _FLAGS.num_shards.value,
      _descriptor(coco_root, splits), num_workers=_FLAGS.num_workers.value,
      treat_crowd_as_ignore=_FLAGS.treat_crowd_as_ignore.value)
  for split, shards in written.items():
    print(f'{split}: {len(shards)} shards in {_FLAGS.output_dir.value}')


if __name__ == '__main__':
  _FLAGS.run(main)
