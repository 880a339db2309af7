"""Overriding single fields of a loaded config."""

import pathlib

import pytest

from deeplab_kmax import config as config_lib
from deeplab_kmax.config import config_pb2

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

_COCO_R50 = REPO_ROOT / 'configs' / 'coco' / 'kmax_meta_r50.textproto'


@pytest.fixture(name='coco')
def fixture_coco():
  return config_lib.load_config(_COCO_R50)


def test_override_replaces_repeated_and_scalar_fields(coco):
  updated = config_lib.override(coco, {
      'train_dataset_options.crop_size': [129, 129],
      'train_dataset_options.batch_size': 2,
      'trainer_options.solver_options.base_learning_rate': 1e-4,
      'experiment_name': 'smoke',
  })
  assert list(updated.train_dataset_options.crop_size) == [129, 129]
  assert updated.train_dataset_options.batch_size == 2
  assert updated.trainer_options.solver_options.base_learning_rate == (
      pytest.approx(1e-4))
  assert updated.experiment_name == 'smoke'
  # Everything else is untouched, and the input is not modified.
  assert updated.train_dataset_options.max_resize_value == [1281]
  assert list(coco.train_dataset_options.crop_size) == [1281, 1281]
  assert coco.experiment_name == 'kmax_meta_r50_coco'


def test_command_line_strings_are_converted(coco):
  updated = config_lib.override(coco, config_lib.parse_override_flags([
      'train_dataset_options.crop_size=[129,129]',
      'eval_dataset_options.crop_size=161,257',
      'train_dataset_options.batch_size=4',
      'trainer_options.solver_options.use_sync_batchnorm=false',
      'model_options.max_deeplab.transformer_decoder_drop_path_keep_prob=0.9',
      'model_options.initial_checkpoint=/ckpt/{a,b}/model',
      'train_dataset_options.file_pattern=/data/train-*',
  ]))
  assert list(updated.train_dataset_options.crop_size) == [129, 129]
  assert list(updated.eval_dataset_options.crop_size) == [161, 257]
  assert updated.train_dataset_options.batch_size == 4
  assert updated.trainer_options.solver_options.use_sync_batchnorm is False
  assert updated.model_options.max_deeplab.HasField(
      'transformer_decoder_drop_path_keep_prob')
  assert (updated.model_options.max_deeplab
          .transformer_decoder_drop_path_keep_prob) == pytest.approx(0.9)
  assert updated.model_options.initial_checkpoint == '/ckpt/{a,b}/model'
  assert list(updated.train_dataset_options.file_pattern) == ['/data/train-*']


def test_none_clears_and_empty_string_empties(coco):
  updated = config_lib.override(coco, {
      'model_options.initial_checkpoint': None,
      'train_dataset_options.min_resize_value': '',
  })
  assert not updated.model_options.HasField('initial_checkpoint')
  assert list(updated.train_dataset_options.min_resize_value) == []


def test_mapping_updates_a_message_field_by_field(coco):
  updated = config_lib.override(coco, {
      'train_dataset_options.augmentations': {
          'min_scale_factor': 1.0,
          'panoptic_copy_paste.panoptic_copy_paste_scale': 0,
      }})
  augment = updated.train_dataset_options.augmentations
  assert augment.min_scale_factor == 1.0
  assert augment.max_scale_factor == pytest.approx(1.7)  # Kept.
  assert augment.panoptic_copy_paste.panoptic_copy_paste_scale == 0.0
  assert augment.panoptic_copy_paste.panoptic_copy_paste_thing_option == 'all'


def test_message_value_replaces_the_field(coco):
  head = config_pb2.HeadOptions(output_channels=20, head_channels=64)
  updated = config_lib.override(
      coco, {'model_options.max_deeplab.auxiliary_semantic_head': head})
  assert updated.model_options.max_deeplab.auxiliary_semantic_head == head


def test_repeated_messages_are_replaced(coco):
  updated = config_lib.override(coco, {
      'model_options.max_deeplab.auxiliary_low_level': [
          {'feature_key': 'res2', 'channels_project': 16}]})
  low_level = updated.model_options.max_deeplab.auxiliary_low_level
  assert [(x.feature_key, x.channels_project) for x in low_level] == [
      ('res2', 16)]


def test_override_from_text_replaces_what_the_snippet_sets(coco):
  updated = config_lib.override_from_text(
      coco, 'train_dataset_options { crop_size: [129, 129] batch_size: 1 }\n'
      'evaluator_options { maskwise_postprocessing { '
      'overlapping_threshold: 0.5 } }')
  assert list(updated.train_dataset_options.crop_size) == [129, 129]
  assert updated.train_dataset_options.batch_size == 1
  assert updated.train_dataset_options.dataset == 'coco_panoptic'
  maskwise = updated.evaluator_options.maskwise_postprocessing
  assert maskwise.overlapping_threshold == 0.5
  assert maskwise.transformer_class_confidence_threshold_stuff == 0.5
  assert maskwise.reorder_mask_weight == 1.0


def test_override_from_text_reports_errors_with_source(coco):
  with pytest.raises(config_lib.ConfigError,
                     match=r'^--override:1:\d+: unknown field "crop"') as info:
    config_lib.override_from_text(
        coco, 'train_dataset_options { crop: 1 }', source='--override')
  assert info.value.field == 'train_dataset_options.crop'


@pytest.mark.parametrize('updates, message', [
    ({'train_dataset_options.crop_sise': [1, 1]},
     "train_dataset_options has no field 'crop_sise'; did you mean "
     "'crop_size'"),
    ({'model_options.backbone.name.x': 'a'},
     'model_options.backbone.name is not a singular message field'),
    ({'train_dataset_options.batch_size': 'many'},
     "'train_dataset_options.batch_size'='many'"),
    ({'train_dataset_options.batch_size': 2.5}, 'expected an integer'),
    ({'trainer_options.solver_options.use_sync_batchnorm': 'yes'},
     'expected true or false'),
    ({'experiment_name': 3}, 'expected a string'),
    ({'train_dataset_options.augmentations': 3},
     'takes a mapping of its sub-fields'),
    ({'train_dataset_options.augmentations': {'min_scale': 1}},
     "train_dataset_options.augmentations has no field 'min_scale'; did you "
     "mean 'min_scale_factor'"),
    ({'bogus': 1}, "ExperimentOptions has no field 'bogus'"),
    ({'train_dataset_options.crop_size': '[129, 129'}, 'crop_size'),
])
def test_bad_overrides_name_the_path(coco, updates, message):
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.override(coco, updates)
  assert message in str(info.value)


def test_parse_override_flags_rejects_missing_equals():
  with pytest.raises(config_lib.ConfigError, match='FIELD.PATH=VALUE'):
    config_lib.parse_override_flags(['train_dataset_options.batch_size'])
  assert config_lib.parse_override_flags(['a.b = c=d']) == {'a.b': 'c=d'}
