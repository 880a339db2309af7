"""Tests for the image | ground truth | prediction sheet and enlarged overlays."""

import json
import os

import numpy as np
from PIL import Image
import pytest

from deeplab_kmax import comparison_sheet
from deeplab_kmax import keys
from deeplab_kmax import predict
from deeplab_kmax import visualization
from deeplab_kmax.data import demo_dataset

SIZE = 48


@pytest.fixture(name='coco_split')
def _coco_split(tmp_path):
  root = tmp_path / 'coco'
  json_path = demo_dataset.write_coco_split(str(root), 'val', 2, seed=3,
                                            height=SIZE, width=SIZE)
  with open(json_path) as f:
    annotations = json.load(f)['annotations']
  return json_path, str(root / 'val2017'), annotations


def _truth(json_path, annotation, info):
  png = os.path.join(os.path.splitext(json_path)[0], annotation['file_name'])
  ids = comparison_sheet.coco_panoptic.decode_segment_ids(
      np.asarray(Image.open(png).convert('RGB')))
  return comparison_sheet.panoptic_from_coco(
      ids, annotation['segments_info'], info, where=png)


def test_upscale_keeps_ids_and_reaches_the_size():
  image = np.random.default_rng(0).uniform(0, 255, (30, 20, 3))
  panoptic = np.arange(600).reshape(30, 20)
  big_image, big_panoptic = visualization.upscale_for_display(
      image, panoptic, 512)
  assert big_panoptic.shape == (540, 360) and big_image.shape == (540, 360, 3)
  np.testing.assert_array_equal(big_panoptic[::18, ::18], panoptic)
  same_image, same = visualization.upscale_for_display(image, panoptic, 16)
  assert same.shape == (30, 20) and same_image.shape == (30, 20, 3)


def test_prediction_files_read_back_and_sheet_has_three_columns(
    tmp_path, coco_split):
  json_path, image_dir, annotations = coco_split
  info = demo_dataset.dataset_info()
  out = tmp_path / 'predictions'
  out.mkdir()
  truths = {}
  for annotation in annotations:
    stem = os.path.splitext(annotation['file_name'])[0]
    truth = _truth(json_path, annotation, info)
    truths[stem] = truth
    image = np.asarray(Image.open(os.path.join(image_dir, stem + '.jpg')))
    record = predict.write_prediction(
        str(out), stem, image,
        {keys.PANOPTIC_PRED: truth,
         keys.SEMANTIC_SCORES: np.full(truth.shape, 0.9, np.float32)},
        info, overlay_min_size=200)
    assert record['segments_info']
    overlay = np.asarray(Image.open(out / (stem + predict.OVERLAY_SUFFIX)))
    assert overlay.shape == (240, 240, 3)  # The whole factor 5 reaches 200.
  for stem, truth in truths.items():
    predicted, scores = comparison_sheet.read_prediction(str(out), stem, info)
    np.testing.assert_array_equal(predicted, truth)
    things = {int(p) for p in np.unique(truth)
              if p // info.panoptic_label_divisor in info.thing_class_ids}
    assert set(scores) == things
  sheet = comparison_sheet.build_sheet(str(out), json_path, image_dir, info,
                                       min_long_side=96)
  # Two rows of three 96-pixel pictures, gaps and a title band.
  assert sheet.shape[1] == 3 * 96 + 4 * 6
  assert 2 * 96 < sheet.shape[0] < 2 * 96 + 80
  path = tmp_path / 'sheet.png'
  comparison_sheet.write_sheet(str(path), sheet)
  assert np.asarray(Image.open(path)).shape == sheet.shape


def test_sheet_names_an_image_without_ground_truth(tmp_path, coco_split):
  json_path, image_dir, annotations = coco_split
  info = demo_dataset.dataset_info()
  out = tmp_path / 'predictions'
  out.mkdir()
  truth = _truth(json_path, annotations[0], info)
  predict.write_prediction(
      str(out), 'stranger', np.zeros((SIZE, SIZE, 3), np.uint8),
      {keys.PANOPTIC_PRED: truth,
       keys.SEMANTIC_SCORES: np.ones(truth.shape, np.float32)}, info)
  with pytest.raises(comparison_sheet.SheetError, match="'stranger'"):
    comparison_sheet.build_sheet(str(out), json_path, image_dir, info)
