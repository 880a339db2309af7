"""Raw prediction files: formats, id conversion, atomic replacement."""

import json
import os

import numpy as np
from PIL import Image
import pytest

from deeplab_kmax.data import dataset_info as dataset_info_lib
from deeplab_kmax.evaluation import prediction_writer

_DIV = 256
# Gappy source ids, as in COCO: training id -> category id.
_INFO = dataset_info_lib.from_json_dict({
    'name': 'gappy', 'ignore_label': 0, 'panoptic_label_divisor': _DIV,
    'num_classes': 4,
    'classes': [{'id': 1, 'name': 'ball', 'isthing': True, 'source_id': 11},
                {'id': 2, 'name': 'cup', 'isthing': True, 'source_id': 17},
                {'id': 3, 'name': 'sky', 'isthing': False, 'source_id': 40}]})


def _prediction():
  panoptic = np.full((6, 8), 3 * _DIV)
  panoptic[0, :] = 0  # Void.
  panoptic[1:3, 1:3] = 1 * _DIV + 1
  panoptic[3:6, 4:8] = 1 * _DIV + 2
  panoptic[1:3, 5:7] = 2 * _DIV + 300 % _DIV
  semantic = panoptic // _DIV
  semantic[0, :] = 3
  scores = np.where(panoptic > 0, 0.75, 0.0).astype(np.float32)
  return {'panoptic_pred': panoptic, 'semantic_pred': semantic,
          'semantic_scores': scores,
          'image_name': np.array(b'000000000139', dtype=object)}


def _writer(tmp_path, fmt, convert=True):
  return prediction_writer.RawPredictionWriter(
      str(tmp_path / 'raw_predictions'), _INFO, raw_panoptic_format=fmt,
      convert_to_eval_ids=convert)


def test_coco_panoptic_round_trip(tmp_path):
  writer = _writer(tmp_path, 'coco_panoptic')
  writer.reset()
  example = _prediction()
  writer.update(example)
  assert writer.result() == {'num_images': 1.0}
  out = tmp_path / 'raw_predictions'
  with open(out / 'predictions.json') as f:
    content = json.load(f)
  (annotation,) = content['annotations']
  assert annotation['image_id'] == 139  # COCO's integer id.
  assert annotation['file_name'] == '000000000139.png'
  assert {c['id'] for c in content['categories']} == {11, 17, 40}
  rgb = np.asarray(Image.open(out / 'panoptic' / '000000000139.png')).astype(
      np.int64)
  segment_ids = (rgb[..., 0] + 256 * rgb[..., 1] +
                 65536 * rgb[..., 2])
  # Decode back to training ids: every segment is one panoptic id.
  to_training = {11: 1, 17: 2, 40: 3}
  decoded = np.zeros_like(segment_ids)
  for segment in annotation['segments_info']:
    mask = segment_ids == segment['id']
    assert segment['area'] == mask.sum()
    assert segment['score'] == pytest.approx(0.75)
    original = np.unique(example['panoptic_pred'][mask])
    assert len(original) == 1
    assert original[0] // _DIV == to_training[segment['category_id']]
    decoded[mask] = original[0]
  np.testing.assert_array_equal(decoded, example['panoptic_pred'])
  semantic = np.asarray(Image.open(out / 'raw_semantic' /
                                   '000000000139.png'))
  np.testing.assert_array_equal(
      semantic, np.vectorize({1: 11, 2: 17, 3: 40}.get)(
          example['semantic_pred']))


@pytest.mark.parametrize('fmt', ['two_channel_png', 'three_channel_png',
                                 'two_channel_numpy_array'])
@pytest.mark.parametrize('convert', [True, False])
def test_deeplab2_raw_formats(tmp_path, fmt, convert):
  writer = _writer(tmp_path, fmt, convert)
  writer.reset()
  example = _prediction()
  writer.update(example)
  writer.result()
  base = tmp_path / 'raw_predictions' / 'raw_panoptic' / '000000000139'
  panoptic = example['panoptic_pred']
  classes, instances = panoptic // _DIV, panoptic % _DIV
  if convert:
    classes = np.vectorize({0: 0, 1: 11, 2: 17, 3: 40}.get)(classes)
  if fmt == 'two_channel_numpy_array':
    array = np.load(str(base) + '.npy')
    np.testing.assert_array_equal(array[..., 0], classes)
    np.testing.assert_array_equal(array[..., 1], instances)
    return
  rgb = np.asarray(Image.open(str(base) + '.png')).astype(np.int64)
  np.testing.assert_array_equal(rgb[..., 0], classes)
  if fmt == 'two_channel_png':
    np.testing.assert_array_equal(rgb[..., 1], instances)
  else:
    np.testing.assert_array_equal(rgb[..., 1] * 256 + rgb[..., 2], instances)


def test_a_new_evaluation_replaces_the_old_only_when_complete(tmp_path):
  writer = _writer(tmp_path, 'two_channel_png')
  writer.reset()
  writer.update(_prediction())
  writer.result()
  out = tmp_path / 'raw_predictions' / 'raw_panoptic'
  assert os.listdir(out) == ['000000000139.png']

  writer.reset()
  second = dict(_prediction(), image_name=np.array(b'other', dtype=object))
  writer.update(second)
  # Mid-evaluation: the previous complete set is still what is published.
  assert os.listdir(out) == ['000000000139.png']
  writer.result()
  assert os.listdir(out) == ['other.png']
  assert sorted(os.listdir(tmp_path)) == ['raw_predictions']  # No leftovers.


def test_bad_format_and_ids_that_do_not_fit(tmp_path):
  with pytest.raises(ValueError, match='raw_panoptic_format'):
    _writer(tmp_path, 'jpeg')
  writer = _writer(tmp_path, 'two_channel_png')
  writer.reset()
  example = _prediction()
  example['panoptic_pred'] = example['panoptic_pred'] * 0 + 1 * 1000 + 300
  big_divisor = dataset_info_lib.from_json_dict(
      dict(_INFO.to_json_dict(), panoptic_label_divisor=1000))
  writer = prediction_writer.RawPredictionWriter(
      str(tmp_path / 'out'), big_divisor, 'two_channel_png')
  writer.reset()
  with pytest.raises(ValueError, match='000000000139: instance id 300'):
    writer.update(example)
