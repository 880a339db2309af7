"""Dataset descriptors: built-in values and custom descriptor files."""

import json

import pytest

from deeplab_kmax.config import dataset_pb2
from deeplab_kmax.data import dataset_info


def test_coco_panoptic(reference_dir):
  info = dataset_info.get_dataset_info('coco_panoptic')
  assert (info.num_classes, info.ignore_label,
          info.panoptic_label_divisor) == (134, 0, 256)
  assert info.thing_class_ids == tuple(range(1, 81))
  assert info.stuff_class_ids == tuple(range(81, 134))
  assert info.num_thing_stuff_classes == 133
  # The reference JSON lists DeepLab2's 133 categories with original ids.
  categories = json.loads((reference_dir / 'tfrecord' / 'coco_synth' /
                           'annotations' / 'panoptic_val2017.json'
                           ).read_text())['categories']
  for index, category in enumerate(categories):
    class_id = info.source_to_contiguous[category['id']]
    assert class_id == index + 1
    assert info.class_names[class_id] == category['name']
    assert info.colormap[class_id] == tuple(category['color'])
    assert (class_id in info.thing_class_ids) == bool(category['isthing'])
  assert info.source_to_contiguous[200] == 133  # rug-merged
  assert info.contiguous_to_source()[133] == 200
  assert info.class_names[0] == 'void'
  assert info.colormap_array().shape == (134, 3)


def test_cityscapes_and_ade20k():
  city = dataset_info.CITYSCAPES_PANOPTIC
  assert (city.num_classes, city.ignore_label,
          city.panoptic_label_divisor) == (19, 255, 1000)
  assert city.thing_class_ids == tuple(range(11, 19))
  assert city.stuff_class_ids == tuple(range(11))
  assert city.class_names[13] == 'car' and city.colormap[0] == (128, 64, 128)
  ade = dataset_info.ADE20K_PANOPTIC
  assert (ade.num_classes, ade.ignore_label,
          ade.panoptic_label_divisor) == (151, 0, 1000)
  assert len(ade.thing_class_ids) == 100 and len(ade.stuff_class_ids) == 50
  assert ade.class_names[1] == 'wall' and ade.class_names[150] == 'flag'
  assert ade.source_to_contiguous[0] == 1
  assert ade.source_to_contiguous[255] == 0
  assert ade.as_deeplab2_dict()['class_has_instances_list'][:3] == (8, 9, 11)


def test_json_descriptor_round_trip(tmp_path):
  spec = {
      'name': 'toy', 'ignore_label': 255, 'panoptic_label_divisor': 1000,
      'classes': [{'name': 'road'}, {'name': 'car', 'isthing': True,
                                     'source_id': 26, 'color': [0, 0, 142]}],
  }
  path = tmp_path / 'toy.json'
  path.write_text(json.dumps(spec))
  info = dataset_info.load(path)
  assert info.num_classes == 2 and info.thing_class_ids == (1,)
  assert info.source_to_contiguous == {0: 0, 26: 1}
  assert info.colormap[1] == (0, 0, 142)
  info.save(tmp_path / 'again.json')
  assert dataset_info.load(tmp_path / 'again.json') == info


def test_textproto_descriptor(tmp_path):
  path = tmp_path / 'toy.textproto'
  path.write_text('name: "toy"\npanoptic_label_divisor: 100\n'
                  'classes { id: 1 name: "ball" isthing: true '
                  'color: [1, 2, 3] source_id: 7 }\n'
                  'classes { name: "grass" }\n')
  info = dataset_info.load(path)
  assert info.num_classes == 3 and info.ignore_label == 0
  assert info.thing_class_ids == (1,) and info.stuff_class_ids == (2,)
  assert info.source_to_contiguous == {7: 1, 2: 2}
  assert info.colormap[1] == (1, 2, 3)
  path.write_text('name: "toy"\nclases { name: "x" }\n')
  with pytest.raises(ValueError, match='toy.textproto'):
    dataset_info.load(path)


@pytest.mark.parametrize('spec, message', [
    ({'name': 'x', 'classes': [{'id': 2, 'name': 'a'}]}, 'missing \\[1\\]'),
    ({'name': 'x', 'classes': [{'id': 1, 'name': 'a'},
                               {'id': 1, 'name': 'b'}]}, 'duplicate id'),
    ({'name': 'x', 'classes': [{'id': 0, 'name': 'a'}]}, 'ignore label'),
    ({'name': 'x', 'classes': [{'name': 'a', 'colour': [1, 2, 3]}]},
     'unknown keys'),
    ({'name': 'x', 'classes': [{'name': 'a', 'color': [1, 2]}]}, 'color'),
    ({'name': 'x', 'classes': []}, 'non-empty'),
    ({'classes': [{'name': 'a'}]}, "'name'"),
    ({'name': 'x', 'ignore_label': 300, 'classes': [{'name': 'a'}]},
     'ignore_label'),
])
def test_invalid_descriptors(spec, message):
  with pytest.raises(ValueError, match=message):
    dataset_info.from_json_dict(spec)


def test_lookup_from_dataset_options(tmp_path):
  options = dataset_pb2.DatasetOptions(dataset='cityscapes_panoptic')
  assert dataset_info.get_dataset_info(options).name == 'cityscapes_panoptic'
  path = tmp_path / 'mine.json'
  path.write_text(json.dumps({'name': 'mine', 'classes': [{'name': 'a'}]}))
  options = dataset_pb2.DatasetOptions(dataset='mine',
                                       dataset_descriptor=str(path))
  assert dataset_info.get_dataset_info(options).name == 'mine'
  # A descriptor path in `dataset` itself works too.
  assert dataset_info.get_dataset_info(str(path)).num_classes == 2
  with pytest.raises(ValueError, match='Unknown dataset'):
    dataset_info.get_dataset_info(dataset_pb2.DatasetOptions(dataset='nope'))
  with pytest.raises(FileNotFoundError, match='missing.json'):
    dataset_info.get_dataset_info(dataset_pb2.DatasetOptions(
        dataset_descriptor=str(tmp_path / 'missing.json')))
