r"""A side-by-side sheet: image | ground truth | prediction, for a few images.

  python -m deeplab_kmax.comparison_sheet \
      --predictions=demo_output/predictions \
      --ground_truth=demo_output/data/coco/annotations/panoptic_val2017.json \
      --images=demo_output/data/coco/val2017 \
      --dataset_descriptor=demo_output/data/demo_shapes.json \
      --output=demo_output/predictions/comparison.png

Reads what `python -m deeplab_kmax.predict` wrote (`<stem>_panoptic.png` and
`<stem>_segments.json`) and the COCO-panoptic ground truth of the same
images, and draws both with the same colours and names, enlarged so the
labels are readable. A person sees at a glance which objects were found,
merged, split or misnamed.
"""

import glob
import json
import os
from typing import Dict, List, Mapping, Optional, Tuple

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from deeplab_kmax import cli_errors
from deeplab_kmax import predict
from deeplab_kmax import temp_files
from deeplab_kmax import visualization
from deeplab_kmax.data import coco_panoptic
from deeplab_kmax.data import dataset_info as dataset_info_lib

TITLES = ('image', 'ground truth', 'prediction')
_SEGMENTS_SUFFIX = predict.SEGMENTS_SUFFIX  # Written last, beside the PNG.


class SheetError(ValueError, cli_errors.ExpectedError):
  """An input of the sheet is missing or does not fit the others."""


def _read_png(path: str) -> np.ndarray:
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert('RGB'))
  except FileNotFoundError:
    raise SheetError(f'{path} does not exist.') from None


def panoptic_from_coco(segment_ids: np.ndarray, segments_info: List[Mapping],
                       info: dataset_info_lib.DatasetInfo,
                       where: str) -> np.ndarray:
  """[H, W] panoptic ids (class * divisor + instance) of a COCO annotation.

  Things are numbered 1, 2, ... per class in the order of `segments_info`;
  stuff, crowd segments and unannotated pixels keep instance 0 (the last
  are void).
  """
  divisor = info.panoptic_label_divisor
  panoptic = np.full(segment_ids.shape, info.ignore_label * divisor, np.int64)
  things = set(info.thing_class_ids)
  next_instance: Dict[int, int] = {}
  for segment in segments_info:
    category = segment['category_id']
    if category not in info.source_to_contiguous:
      raise SheetError(f'{where}: segment {segment["id"]} has category_id '
                       f'{category}, which the dataset descriptor '
                       f'{info.name!r} does not know.')
    semantic = info.source_to_contiguous[category]
    instance = 0
    if semantic in things and not segment.get('iscrowd', 0):
      instance = next_instance[semantic] = next_instance.get(semantic, 0) + 1
    panoptic[segment_ids == segment['id']] = semantic * divisor + instance
  return panoptic


def read_prediction(predictions_dir: str, stem: str,
                    info: dataset_info_lib.DatasetInfo
                    ) -> Tuple[np.ndarray, Dict[int, float]]:
  """(panoptic ids, {thing panoptic id: score}) of one `predict` output."""
  json_path = os.path.join(predictions_dir, stem + _SEGMENTS_SUFFIX)
  with open(json_path) as f:
    annotation = json.load(f)
  divisor = annotation['label_divisor']
  if divisor != info.panoptic_label_divisor:
    raise SheetError(f'{json_path} uses label divisor {divisor}; the '
                     f'descriptor {info.name!r} uses '
                     f'{info.panoptic_label_divisor}.')
  segment_ids = coco_panoptic.decode_segment_ids(_read_png(
      os.path.join(predictions_dir, annotation['file_name'])))
  # Unnumbered pixels (segment id 0) are void.
  panoptic = np.full(segment_ids.shape, info.ignore_label * divisor, np.int64)
  scores = {}
  for segment in annotation['segments_info']:
    panoptic[segment_ids == segment['id']] = segment['panoptic_id']
    if segment['isthing']:
      scores[segment['panoptic_id']] = segment['score']
  return panoptic, scores


def build_sheet(predictions_dir: str, ground_truth_json: str, images_dir: str,
                info: dataset_info_lib.DatasetInfo,
                min_long_side: int = 384,
                max_images: Optional[int] = None) -> np.ndarray:
  """The sheet, one row per prediction in `predictions_dir` (sorted)."""
  stems = sorted(os.path.basename(p)[:-len(_SEGMENTS_SUFFIX)] for p in
                 glob.glob(os.path.join(predictions_dir,
                                        '*' + _SEGMENTS_SUFFIX)))
  if not stems:
    raise SheetError(f'No *{_SEGMENTS_SUFFIX} in {predictions_dir}; run '
                     'python -m deeplab_kmax.predict first.')
  stems = stems[:max_images]
  try:
    with open(ground_truth_json) as f:
      ground_truth = json.load(f)
  except FileNotFoundError:
    raise SheetError(f'{ground_truth_json} does not exist.') from None
  by_stem = {os.path.splitext(a['file_name'])[0]: a
             for a in ground_truth.get('annotations', [])}
  png_dir = os.path.splitext(ground_truth_json)[0]
  rows = []
  for stem in stems:
    if stem not in by_stem:
      raise SheetError(f'{ground_truth_json} has no annotation for image '
                       f'{stem!r} (predicted in {predictions_dir}).')
    annotation = by_stem[stem]
    image_paths = glob.glob(os.path.join(images_dir, stem + '.*'))
    if not image_paths:
      raise SheetError(f'No image {stem}.* in {images_dir}.')
    image = _read_png(image_paths[0])
    truth = panoptic_from_coco(
        coco_panoptic.decode_segment_ids(_read_png(
            os.path.join(png_dir, annotation['file_name']))),
        annotation['segments_info'], info,
        where=f'{ground_truth_json} ({annotation["file_name"]})')
    predicted, scores = read_prediction(predictions_dir, stem, info)
    if not image.shape[:2] == truth.shape == predicted.shape:
      raise SheetError(f'{stem}: image {image.shape[:2]}, ground truth '
                       f'{truth.shape} and prediction {predicted.shape} '
                       'differ in size.')
    enlarged, _ = visualization.upscale_for_display(image, truth,
                                                    min_long_side)
    rows.append([
        enlarged,
        visualization.visualize_panoptic(image, truth, info,
                                         min_long_side=min_long_side),
        visualization.visualize_panoptic(image, predicted, info, scores,
                                         min_long_side=min_long_side),
    ])
  return visualization.titled_grid(rows, TITLES)


def write_sheet(path: str, sheet: np.ndarray) -> None:
  """Writes the PNG atomically (an earlier sheet survives a failure)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  temp_files.write_atomically(
      path, lambda temporary: Image.fromarray(sheet).save(temporary,
                                                          format='PNG'))


_PREDICTIONS = flags.DEFINE_string('predictions', None,
                                   'Folder written by deeplab_kmax.predict.')
_GROUND_TRUTH = flags.DEFINE_string(
    'ground_truth', None, 'COCO panoptic annotations JSON (its PNGs in the '
    'folder of the same name).')
_IMAGES = flags.DEFINE_string('images', None, 'Folder of the input images.')
_DESCRIPTOR = flags.DEFINE_string('dataset_descriptor', None,
                                  'Dataset descriptor (JSON or textproto).')
_OUTPUT = flags.DEFINE_string('output', None, 'Where to write the PNG sheet.')
_MIN_LONG_SIDE = flags.DEFINE_integer(
    'min_long_side', 384, 'Enlarge each picture until its long side is at '
    'least this.')
_MAX_IMAGES = flags.DEFINE_integer('max_images', 8, 'Rows at most.')


def main(argv):
  del argv
  info = dataset_info_lib.load(_DESCRIPTOR.value)
  sheet = build_sheet(_PREDICTIONS.value, _GROUND_TRUTH.value, _IMAGES.value,
                      info, _MIN_LONG_SIDE.value, _MAX_IMAGES.value)
  write_sheet(_OUTPUT.value, sheet)
  print(f'Wrote {_OUTPUT.value} ({sheet.shape[1]}x{sheet.shape[0]}).')


if __name__ == '__main__':
  flags.mark_flags_as_required(['predictions', 'ground_truth', 'images',
                                'dataset_descriptor', 'output'])
  cli_errors.run(main, expected=(SheetError, FileNotFoundError))
