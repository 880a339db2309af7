"""COCO-format panoptic -> DeepLab2 TFRecords, against DeepLab2's own output."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from deeplab_kmax.data import dataset_info
from deeplab_kmax.data import panoptic_conversion
from deeplab_kmax.data import tfrecord_codec

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
ConversionError = panoptic_conversion.ConversionError


def _records(path):
  return [r.numpy() for r in tf.data.TFRecordDataset(str(path))]


def _convert(root, out, num_shards=1, **kwargs):
  return panoptic_conversion.convert_coco_panoptic(
      str(root), str(out), ['val'], num_shards, dataset_info.COCO_PANOPTIC,
      show_progress=False, **kwargs)


def _feature_bytes(example):
  """Each feature serialised on its own (deterministic per feature)."""
  return {k: v.SerializeToString()
          for k, v in example.features.feature.items()}


def test_records_equal_deeplab2_converter_output(reference_dir, tmp_path):
  written = _convert(reference_dir / 'tfrecord' / 'coco_synth', tmp_path)
  assert written == {'val': [str(tmp_path / 'val-00000-of-00001.tfrecord')]}
  ours = _records(written['val'][0])
  theirs = _records(reference_dir / 'tfrecord' / 'val-00000-of-00001.tfrecord')
  assert len(ours) == len(theirs) == 3
  for mine, official in zip(ours, theirs):
    a = tf.train.Example.FromString(mine)
    b = tf.train.Example.FromString(official)
    # Proto map order is unspecified, so compare per feature, byte for byte.
    assert _feature_bytes(a) == _feature_bytes(b)
    assert a == b
    assert mine == b.SerializeToString(deterministic=True)
    values = tfrecord_codec.example_to_numpy(mine)
    assert values[tfrecord_codec.KEY_ENCODED_LABEL] == (
        tfrecord_codec.example_to_numpy(official)[
            tfrecord_codec.KEY_ENCODED_LABEL])


def test_label_semantics(reference_dir, tmp_path):
  """Crowd and unlabelled pixels are void; instances count per class."""
  root = reference_dir / 'tfrecord' / 'coco_synth'
  written = _convert(root, tmp_path)
  label = tfrecord_codec.example_to_numpy(
      _records(written['val'][0])[0])['panoptic_label']
  content = json.loads((root / 'annotations' / 'panoptic_val2017.json'
                        ).read_text())
  png = np.asarray(Image.open(root / 'annotations' / 'panoptic_val2017' /
                              '000000000001.png')).astype(np.int64)
  ids = png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2]
  mapping = dataset_info.COCO_PANOPTIC.source_to_contiguous
  person_count = 0
  listed = np.zeros(ids.shape, bool)
  for segment in content['annotations'][0]['segments_info']:
    mask = ids == segment['id']
    listed |= mask
    semantic = mapping[segment['category_id']]
    if segment['iscrowd']:
      assert (label[mask] == 0).all()
    elif semantic <= 80:
      person_count += segment['category_id'] == 1
      instance = person_count if segment['category_id'] == 1 else 1
      assert (label[mask] == semantic * 256 + instance).all()
    else:
      assert (label[mask] == semantic * 256).all()
  assert (label[~listed] == 0).all() and (~listed).any()
  assert person_count == 2


def test_crowd_can_keep_its_class(reference_dir, tmp_path):
  root = reference_dir / 'tfrecord' / 'coco_synth'
  written = _convert(root, tmp_path, treat_crowd_as_ignore=False)
  label = tfrecord_codec.example_to_numpy(
      _records(written['val'][0])[0])['panoptic_label']
  # Segment 201 (0xc9) is an iscrowd person: class 1, instance 0.
  png = np.asarray(Image.open(root / 'annotations' / 'panoptic_val2017' /
                              '000000000001.png')).astype(np.int64)
  crowd = (png[..., 0] == 201) & (png[..., 1] == 0) & (png[..., 2] == 0)
  assert crowd.any() and (label[crowd] == 256).all()


def test_sharding_and_parallel_workers_give_the_same_records(reference_dir,
                                                             tmp_path):
  root = reference_dir / 'tfrecord' / 'coco_synth'
  single = _records(_convert(root, tmp_path / 'one')['val'][0])
  shards = _convert(root, tmp_path / 'two', num_shards=2, num_workers=2)['val']
  assert [os.path.basename(p) for p in shards] == [
      'val-00000-of-00002.tfrecord', 'val-00001-of-00002.tfrecord']
  split = [_records(p) for p in shards]
  assert [len(s) for s in split] == [2, 1]
  assert split[0] + split[1] == single


def _break(root, what):
  """Corrupts the writable copy; returns the file named in the error."""
  annotations = root / 'annotations'
  json_path = annotations / 'panoptic_val2017.json'
  content = json.loads(json_path.read_text())
  if what == 'unknown_category':
    content['annotations'][1]['segments_info'][0]['category_id'] = 12
    json_path.write_text(json.dumps(content))
    return '000000000002'
  if what == 'png_size':
    png = annotations / 'panoptic_val2017' / '000000000003.png'
    Image.open(png).resize((41, 40)).save(png)
    return '000000000003.png'
  if what == 'missing_png':
    os.remove(annotations / 'panoptic_val2017' / '000000000002.png')
    return '000000000002.png'
  if what == 'corrupt_json':
    json_path.write_text(json_path.read_text()[:-20])
    return 'panoptic_val2017.json'
  if what == 'missing_json':
    os.remove(json_path)
    return 'panoptic_val2017.json'
  if what == 'missing_image':
    os.remove(root / 'val2017' / '000000000002.jpg')
    return '000000000002.jpg'
  if what == 'unannotated_image':
    del content['annotations'][2]
    json_path.write_text(json.dumps(content))
    return '000000000003.jpg'
  if what == 'wrong_area':
    content['annotations'][2]['segments_info'][0]['area'] += 1
    json_path.write_text(json.dumps(content))
    return '000000000003'
  if what == 'crowd_stuff':
    content['annotations'][0]['segments_info'][0]['iscrowd'] = 1
    json_path.write_text(json.dumps(content))
    return '000000000001'
  raise ValueError(what)


@pytest.mark.parametrize('what', [
    'unknown_category', 'png_size', 'missing_png', 'corrupt_json',
    'missing_json', 'missing_image', 'unannotated_image', 'wrong_area',
    'crowd_stuff'])
def test_bad_input_stops_with_a_named_error_and_no_shards(coco_synth_copy,
                                                          tmp_path, what):
  named = _break(coco_synth_copy, what)
  out = tmp_path / 'out'
  out.mkdir()
  with pytest.raises(ConversionError, match=named):
    # Two shards: image 3 lives in the second, so the first one was already
    # written when the error hits; it must not survive.
    _convert(coco_synth_copy, out, num_shards=2)
  assert os.listdir(out) == []


def test_unknown_category_error_names_image_id_and_file(coco_synth_copy,
                                                         tmp_path):
  _break(coco_synth_copy, 'unknown_category')
  with pytest.raises(ConversionError) as error:
    _convert(coco_synth_copy, tmp_path / 'out')
  message = str(error.value)
  assert 'image id 2' in message and '000000000002.jpg' in message
  assert 'category_id 12' in message


def test_custom_descriptor_remaps_categories(coco_synth_copy, tmp_path):
  """A descriptor derived from the JSON categories gives COCO's labels."""
  content = json.loads((coco_synth_copy / 'annotations' /
                        'panoptic_val2017.json').read_text())
  info = dataset_info.from_coco_categories('mine', content['categories'])
  assert info.source_to_contiguous == (
      dataset_info.COCO_PANOPTIC.source_to_contiguous)
  a = _records(_convert(coco_synth_copy, tmp_path / 'a')['val'][0])
  b = _records(panoptic_conversion.convert_coco_panoptic(
      str(coco_synth_copy), str(tmp_path / 'b'), ['val'], 1, info,
      show_progress=False)['val'][0])
  assert a == b


def test_build_coco_data_script(reference_dir, tmp_path):
  """The command line converter, with a derived descriptor."""
  descriptor = tmp_path / 'mine.json'
  result = subprocess.run(
      [sys.executable, os.path.join(_REPO, 'data', 'build_coco_data.py'),
       f'--coco_root={reference_dir / "tfrecord" / "coco_synth"}',
       f'--output_dir={tmp_path / "out"}', '--num_shards=1',
       '--num_workers=1', f'--write_descriptor={descriptor}',
       '--dataset_name=mine'],
      capture_output=True, text=True, timeout=240, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert dataset_info.load(descriptor).num_classes == 134
  ours = _records(tmp_path / 'out' / 'val-00000-of-00001.tfrecord')
  theirs = _records(reference_dir / 'tfrecord' / 'val-00000-of-00001.tfrecord')
  assert [tf.train.Example.FromString(r) for r in ours] == [
      tf.train.Example.FromString(r) for r in theirs]


def _write_png_ids(path, ids):
  ids = np.asarray(ids, np.int64)
  Image.fromarray(np.stack([ids % 256, ids // 256 % 256, ids // 65536],
                           -1).astype(np.uint8)).save(path)


def _write_cityscapes_tree(tmp_path):
  """A one-image Cityscapes val split (road, two cars)."""
  root = tmp_path / 'cityscapes'
  image_dir = root / 'leftImg8bit' / 'val' / 'aachen'
  image_dir.mkdir(parents=True)
  Image.fromarray(np.full((4, 6, 3), 90, np.uint8)).save(
      image_dir / 'aachen_000000_000019_leftImg8bit.png')
  png_dir = root / 'gtFine' / 'cityscapes_panoptic_val_trainId'
  png_dir.mkdir(parents=True)
  ids = np.zeros((4, 6), np.int64)
  ids[:2] = 7         # road (train id 0)
  ids[2:, :3] = 26001  # car (train id 13), instance
  ids[2:, 3:5] = 26002  # another car
  _write_png_ids(png_dir / 'aachen_000000_000019_gtFine_panoptic.png', ids)
  (root / 'gtFine' / 'cityscapes_panoptic_val_trainId.json').write_text(
      json.dumps({'annotations': [{
          'image_id': 'aachen_000000_000019',
          'file_name': 'aachen_000000_000019_gtFine_panoptic.png',
          'segments_info': [
              {'id': 7, 'category_id': 0, 'iscrowd': 0, 'area': 12},
              {'id': 26001, 'category_id': 13, 'iscrowd': 0, 'area': 6},
              {'id': 26002, 'category_id': 13, 'iscrowd': 0, 'area': 4}]}]}))
  return root


def test_cityscapes_layout(tmp_path):
  root = _write_cityscapes_tree(tmp_path)
  tasks = panoptic_conversion.cityscapes_tasks(str(root), 'val')
  assert [t.stem for t in tasks] == ['aachen_000000_000019']
  shards = panoptic_conversion.write_split(
      tasks, panoptic_conversion.LabelSpec.from_dataset_info(
          dataset_info.CITYSCAPES_PANOPTIC), str(tmp_path / 'out'), 'val', 1,
      show_progress=False)
  values = tfrecord_codec.example_to_numpy(_records(shards[0])[0])
  assert values[tfrecord_codec.KEY_IMAGE_FORMAT] == b'png'
  expected = np.full((4, 6), 255000)
  expected[:2] = 0
  expected[2:, :3] = 13001
  expected[2:, 3:5] = 13002
  np.testing.assert_array_equal(values['panoptic_label'], expected)


def _write_ade20k_tree(tmp_path):
  """A one-image ADE20K val split (wall, bed, void)."""
  root = tmp_path / 'ade'
  (root / 'images' / 'validation').mkdir(parents=True)
  Image.fromarray(np.full((3, 4), 50, np.uint8)).save(  # Grayscale is fine.
      root / 'images' / 'validation' / 'ADE_val_00000001.jpg')
  (root / 'ade20k_panoptic_val').mkdir()
  ids = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 0, 0]])
  _write_png_ids(root / 'ade20k_panoptic_val' / 'ADE_val_00000001.png', ids)
  (root / 'ade20k_panoptic_val.json').write_text(json.dumps({'annotations': [{
      'image_id': 'ADE_val_00000001', 'file_name': 'ADE_val_00000001.png',
      'segments_info': [
          {'id': 1, 'category_id': 0, 'iscrowd': 0, 'area': 99},  # wall
          {'id': 2, 'category_id': 7, 'iscrowd': 0, 'area': 4},  # bed
          {'id': 3, 'category_id': 255, 'iscrowd': 0, 'area': 2}]}]}))
  return root


def test_ade20k_layout(tmp_path):
  root = _write_ade20k_tree(tmp_path)
  info = dataset_info.ADE20K_PANOPTIC
  shards = panoptic_conversion.write_split(
      panoptic_conversion.ade20k_tasks(str(root), 'val'),
      panoptic_conversion.ade20k_label_spec(info), str(tmp_path / 'out'),
      'val', 1, show_progress=False)
  label = tfrecord_codec.example_to_numpy(_records(shards[0])[0])[
      'panoptic_label']
  assert info.class_names[8] == 'bed' and 8 in info.thing_class_ids
  np.testing.assert_array_equal(
      label, [[1000, 1000, 8001, 8001], [1000, 1000, 8001, 8001],
              [0, 0, 0, 0]])


@pytest.mark.parametrize('script,root_flag,write_tree,release', [
    ('build_cityscapes_data.py', 'cityscapes_root', _write_cityscapes_tree,
     panoptic_conversion.CITYSCAPES_RELEASE),
    ('build_ade20k_data.py', 'ade20k_root', _write_ade20k_tree,
     panoptic_conversion.ADE20K_RELEASE),
])
def test_release_converter_scripts(script, root_flag, write_tree, release,
                                   tmp_path):
  """The Cityscapes / ADE20K command lines find the val split by its image
  folder and write what the library writes from the release's layout."""
  root = write_tree(tmp_path)
  result = subprocess.run(
      [sys.executable, os.path.join(_REPO, 'data', script),
       f'--{root_flag}={root}', f'--output_dir={tmp_path / "script"}',
       '--num_shards=1', '--num_workers=1'],
      capture_output=True, text=True, timeout=240, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'val: 1 images, 1 shards' in result.stdout
  shards = panoptic_conversion.write_split(
      release.tasks_of(str(root), 'val'), release.label_spec(True),
      str(tmp_path / 'library'), 'val', 1, show_progress=False)
  assert (_records(tmp_path / 'script' / os.path.basename(shards[0])) ==
          _records(shards[0]))
