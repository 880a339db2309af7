"""The tf.data pipeline on the demo dataset: training, evaluation, replicas."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image
import pytest

from deeplab_kmax import keys
from deeplab_kmax.config import dataset_pb2
from deeplab_kmax.data import dataset_info
from deeplab_kmax.data import demo_dataset
from deeplab_kmax.data import input_pipeline

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _options(demo_data, split='train', **fields):
  settings = dict(
      dataset=demo_dataset.NAME, dataset_descriptor=demo_data['descriptor'],
      file_pattern=[demo_data[f'{split}_pattern']], batch_size=2,
      crop_size=[65, 65], min_resize_value=[65], max_resize_value=[65],
      thing_id_mask_annotations=True, max_thing_id=32)
  settings.update(fields)
  return dataset_pb2.DatasetOptions(**settings)


def _training_options(demo_data):
  options = _options(demo_data)
  augment = options.augmentations
  augment.min_scale_factor = 0.5
  augment.max_scale_factor = 1.5
  augment.scale_factor_step_size = 0.25
  augment.autoaugment_policy_name = 'simple_classification_policy'
  paste = augment.panoptic_copy_paste
  paste.panoptic_copy_paste_scale = 0.5
  paste.panoptic_copy_paste_thing_option = 'all'
  paste.panoptic_copy_paste_stuff_option = 'random'
  paste.panoptic_copy_paste_void_option = 'none'
  return options


def test_training_batches_are_consistent(demo_data):
  info = dataset_info.load(demo_data['descriptor'])
  dataset = input_pipeline.create_dataset(_training_options(demo_data),
                                          is_training=True,
                                          shuffle_buffer_size=16)
  for batch in dataset.take(4):
    assert batch[keys.IMAGE].shape == (2, 65, 65, 3)
    assert batch[keys.GT_THING_ID_CLASS].shape == (2, 32)
    image = batch[keys.IMAGE].numpy()
    assert image.min() >= 0 and image.max() <= 255
    panoptic = batch[keys.GT_PANOPTIC].numpy()
    semantic = batch[keys.GT_SEMANTIC].numpy()
    np.testing.assert_array_equal(semantic, panoptic // 256)
    assert set(np.unique(semantic)) <= set(range(info.num_classes))
    crowd = batch[keys.GT_IS_CROWD].numpy()
    thing = np.isin(semantic, info.thing_class_ids)
    ids = batch[keys.GT_THING_ID_MASK].numpy()
    np.testing.assert_array_equal(ids >= 0, thing & ~crowd)
    classes = batch[keys.GT_THING_ID_CLASS].numpy()
    for b in range(2):
      for k in np.unique(ids[b][ids[b] >= 0]):
        assert (semantic[b][ids[b] == k] == classes[b, k]).all()
      assert (classes[b, len(np.unique(ids[b][ids[b] >= 0])):] == -1).all()
    # kMaX's targets only: no Panoptic-DeepLab centre/offset targets.
    assert set(batch) == {
        keys.IMAGE, keys.GT_SEMANTIC, keys.GT_PANOPTIC, keys.GT_IS_CROWD,
        keys.SEMANTIC_LOSS_WEIGHT, keys.GT_THING_ID_MASK, keys.GT_THING_ID_CLASS}


def test_center_targets_on_request(demo_data):
  options = _training_options(demo_data)
  with_centers = input_pipeline.create_dataset(
      options, is_training=True, shuffle_buffer_size=16, seed=3,
      center_targets=True)
  batch = next(iter(with_centers))
  center_keys = {keys.CENTER_LOSS_WEIGHT, keys.REGRESSION_LOSS_WEIGHT,
                 keys.GT_INSTANCE_CENTER, keys.GT_INSTANCE_REGRESSION}
  assert center_keys <= set(batch)
  assert batch[keys.GT_INSTANCE_CENTER].shape == (2, 65, 65)
  assert batch[keys.GT_INSTANCE_REGRESSION].shape == (2, 65, 65, 2)
  # Heatmap peaks (value 1) exactly at some pixel of every visible instance.
  assert float(batch[keys.GT_INSTANCE_CENTER].numpy().max()) == 1.0


def _expected_panoptic(demo_data, stem, info):
  """Independent decoding of a demo PNG + JSON into DeepLab2's encoding."""
  annotations = os.path.join(demo_data['coco_root'], 'annotations')
  content = json.load(open(os.path.join(annotations,
                                        'panoptic_val2017.json')))
  entry = next(a for a in content['annotations']
               if a['file_name'] == stem + '.png')
  png = np.asarray(Image.open(os.path.join(
      annotations, 'panoptic_val2017', stem + '.png'))).astype(np.int64)
  ids = png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2]
  expected = np.zeros(ids.shape, np.int64)
  counts = {}
  for segment in entry['segments_info']:
    semantic = info.source_to_contiguous[segment['category_id']]
    if semantic in info.thing_class_ids:
      if segment['iscrowd']:
        continue
      counts[semantic] = counts.get(semantic, 0) + 1
      expected[ids == segment['id']] = semantic * 256 + counts[semantic]
    else:
      expected[ids == segment['id']] = semantic * 256
  return expected


def test_evaluation_round_trip_and_determinism(demo_data):
  info = dataset_info.load(demo_data['descriptor'])
  options = _options(demo_data, split='val', batch_size=1)
  dataset = input_pipeline.create_dataset(options, is_training=False)
  first = list(dataset)
  second = list(dataset)
  names = [s[keys.IMAGE_NAME].numpy()[0].decode() for s in first]
  assert names == [f'{500001 + i:012d}' for i in range(4)]  # All, in order.
  for a, b in zip(first, second):
    for key in a:
      if a[key].dtype.is_floating:  # Computed: equal to float32 rounding.
        np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), rtol=1e-6,
                                   atol=1e-6 * np.abs(a[key].numpy()).max(),
                                   err_msg=key)
      else:  # Labels, ids, names: exact.
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy(),
                                      err_msg=key)
  for sample, name in zip(first, names):
    raw = sample[keys.GT_PANOPTIC_RAW].numpy()[0]
    np.testing.assert_array_equal(raw, _expected_panoptic(demo_data, name,
                                                          info))
    # 128 -> 65: the full image fits the crop, nothing is padded.
    assert sample[keys.RESIZED_IMAGE].shape == (1, 65, 65, 3)


def test_every_sample_is_seen_once_per_eval_pass(demo_data):
  options = _options(demo_data, split='val', batch_size=3)
  batches = list(input_pipeline.create_dataset(options, is_training=False))
  assert [b[keys.IMAGE].shape[0] for b in batches] == [3, 1]


def test_missing_files_are_reported(demo_data, tmp_path):
  options = _options(demo_data)
  options.file_pattern[0] = str(tmp_path / 'nothing-*.tfrecord')
  with pytest.raises(ValueError, match='nothing-'):
    input_pipeline.create_dataset(options, is_training=True)


_REPLICA_SCRIPT = textwrap.dedent('''
    import sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices('CPU')[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from deeplab_kmax.config import dataset_pb2
    from deeplab_kmax.data import input_pipeline
    options = dataset_pb2.DatasetOptions(
        dataset_descriptor=sys.argv[1], file_pattern=[sys.argv[2]],
        batch_size=4, crop_size=[33, 33], thing_id_mask_annotations=True)
    strategy = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])
    contexts = []
    def dataset_fn(context):
      contexts.append(context)
      return input_pipeline.create_dataset(options, True, context,
                                           shuffle_buffer_size=8)
    batches = iter(strategy.distribute_datasets_from_function(dataset_fn))
    batch = next(batches)
    shapes = [tuple(t.shape) for t in
              strategy.experimental_local_results(batch['image'])]
    print('REPLICAS', strategy.num_replicas_in_sync, shapes,
          contexts[0].num_replicas_in_sync)
''')


def test_per_replica_batching_with_two_logical_cpus(demo_data):
  result = subprocess.run(
      [sys.executable, '-c', _REPLICA_SCRIPT, demo_data['descriptor'],
       demo_data['train_pattern']],
      capture_output=True, text=True, timeout=240, check=False,
      env={**os.environ, 'PYTHONPATH': _REPO, 'TF_CPP_MIN_LOG_LEVEL': '2'})
  assert result.returncode == 0, result.stderr[-3000:]
  line = [l for l in result.stdout.splitlines() if l.startswith('REPLICAS')]
  assert line == ['REPLICAS 2 [(2, 33, 33, 3), (2, 33, 33, 3)] 2']


def test_demo_dataset_is_deterministic(tmp_path):
  a = demo_dataset.build(str(tmp_path / 'a'), num_train=2, num_val=1,
                         seed=3, num_shards=1)
  b = demo_dataset.build(str(tmp_path / 'b'), num_train=2, num_val=1,
                         seed=3, num_shards=1)
  for split in ('train', 'val'):
    name = f'{split}-00000-of-00001.tfrecord'
    with open(os.path.join(a['tfrecord_dir'], name), 'rb') as f1, open(
        os.path.join(b['tfrecord_dir'], name), 'rb') as f2:
      assert f1.read() == f2.read()
  # A subset equals the first images of a bigger build (seeded per image).
  rgb, ids, segments = demo_dataset.render_scene((3, 0, 1))
  stored = np.asarray(Image.open(os.path.join(
      a['coco_root'], 'annotations', 'panoptic_train2017',
      '000000000002.png'))).astype(np.int64)
  np.testing.assert_array_equal(
      stored[..., 0] + 256 * stored[..., 1] + 65536 * stored[..., 2], ids)
  assert rgb.shape == (128, 128, 3) and segments
  other = demo_dataset.render_scene((4, 0, 1))[1]
  assert not np.array_equal(other, ids)


def test_demo_content(demo_data):
  """Stuff, several things with occlusion, crowd somewhere, void somewhere."""
  annotations = os.path.join(demo_data['coco_root'], 'annotations')
  content = json.load(open(os.path.join(annotations,
                                        'panoptic_train2017.json')))
  info = dataset_info.load(demo_data['descriptor'])
  assert info.num_classes == 7 and info.thing_class_ids == (1, 2, 3)
  categories = {c['id'] for c in content['categories']}
  assert set(info.source_to_contiguous) == categories
  seen = {'crowd': 0, 'things': 0, 'void': 0}
  for entry in content['annotations']:
    segments = entry['segments_info']
    seen['crowd'] += any(s['iscrowd'] for s in segments)
    things = [s for s in segments if info.source_to_contiguous[
        s['category_id']] in info.thing_class_ids]
    seen['things'] += len(things) >= 2
    seen['void'] += sum(s['area'] for s in segments) < 128 * 128
  assert seen['things'] >= 6 and seen['crowd'] >= 1 and seen['void'] >= 1


def test_unlabelled_records_give_image_only_samples(demo_data):
  options = _options(demo_data, split='val', batch_size=1,
                     decode_groundtruth_label=False)
  sample = next(iter(input_pipeline.create_dataset(options,
                                                   is_training=False)))
  assert set(sample) == {keys.IMAGE, keys.RESIZED_IMAGE, keys.IMAGE_NAME,
                         keys.GT_SIZE_RAW}
