"""validate() catches values that parse but cannot work."""

import pathlib

import pytest

from deeplab_kmax import config as config_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

_CITYSCAPES_R50 = (REPO_ROOT / 'configs' / 'cityscapes' /
                   'kmax_meta_r50.textproto')


@pytest.fixture(name='cityscapes')
def fixture_cityscapes():
  return config_lib.load_config(_CITYSCAPES_R50)


def test_published_reference_configs_are_valid(reference_configs):
  for name, path in reference_configs.items():
    assert config_lib.find_problems(config_lib.load_config(path)) == [], name


def test_validate_returns_a_valid_config(cityscapes):
  assert config_lib.validate(cityscapes) is cityscapes


@pytest.mark.parametrize('updates, expected', [
    ({'train_dataset_options.crop_size': [129, 129, 3]},
     'train_dataset_options.crop_size has 3 entries [129, 129, 3]; expected '
     'exactly 2'),
    ({'eval_dataset_options.crop_size': [129]},
     'eval_dataset_options.crop_size has 1 entry [129]'),
    ({'train_dataset_options.crop_size': [0, 129]}, 'must be positive'),
    ({'train_dataset_options.max_resize_value': [1, 2, 3]},
     'train_dataset_options.max_resize_value has 3 entries'),
    ({'train_dataset_options.batch_size': 0},
     'train_dataset_options.batch_size is 0; expected a positive value'),
    ({'trainer_options.solver_options.optimizer': 'adagrad'},
     "trainer_options.solver_options.optimizer is 'adagrad'; expected one of "
     "'adam', 'adamw', 'sgd'"),
    ({'trainer_options.solver_options.learning_policy': 'step'},
     'learning_policy'),
    ({'model_options.backbone.output_stride': 16},
     'kMaX-DeepLab backbones (kmax_resnet50) need 32'),
    ({'model_options.backbone.drop_path_keep_prob': 1.5},
     'drop_path_keep_prob is 1.5; expected a value in (0, 1]'),
    ({'model_options.backbone.drop_path_schedule': 'cosine'},
     'drop_path_schedule'),
    ({'model_options.decoder.atrous_rates': [6, 12]},
     'atrous_rates has 2 entries [6, 12]'),
    ({'model_options.max_deeplab.pixel_space_head.output_channels': 0},
     'pixel_space_head.output_channels is 0'),
    ({'model_options.max_deeplab.transformer_decoder_drop_path_keep_prob': 0},
     'transformer_decoder_drop_path_keep_prob'),
    ({'trainer_options.save_summaries_steps': 150},
     'save_summaries_steps (150) must be a multiple of '
     'trainer_options.steps_per_loop (100)'),
    ({'trainer_options.loss_options.semantic_loss.top_k_percent': 0},
     'semantic_loss.top_k_percent is 0'),
    ({'trainer_options.loss_options.pq_style_loss.weight': -1},
     'pq_style_loss.weight is -1'),
    ({'train_dataset_options.augmentations.min_scale_factor': 3.0},
     'min_scale_factor (3) is larger than max_scale_factor (2)'),
    ({'train_dataset_options.augmentations.panoptic_copy_paste.'
      'panoptic_copy_paste_thing_option': 'some'},
     "panoptic_copy_paste_thing_option is 'some'"),
    ({'evaluator_options.transformer_post_processing': 'boxwise'},
     "transformer_post_processing is 'boxwise'"),
    ({'evaluator_options.maskwise_postprocessing.overlapping_threshold': 1.2},
     'overlapping_threshold is 1.2'),
])
def test_each_problem_is_reported(cityscapes, updates, expected):
  broken = config_lib.override(cityscapes, updates)
  problems = config_lib.find_problems(broken)
  assert len(problems) == 1, problems
  assert expected in problems[0]


def test_kmax_backbone_needs_max_deeplab_section(cityscapes):
  broken = config_lib.override(cityscapes, {'model_options.max_deeplab': None})
  assert any('no max_deeplab' in p for p in config_lib.find_problems(broken))


def test_validate_reports_all_problems_at_once(cityscapes):
  broken = config_lib.override(cityscapes, {
      'train_dataset_options.crop_size': [129],
      'trainer_options.solver_options.optimizer': 'lamb',
  })
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(broken, source='exp.textproto')
  message = str(info.value)
  assert message.startswith('exp.textproto: invalid config (2 problems)')
  assert 'crop_size has 1 entry' in message
  assert "optimizer is 'lamb'" in message
