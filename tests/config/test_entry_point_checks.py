"""Every entry point checks a config with the same rules, floats included,
and --config_override takes any string value."""

import math

import pytest

from deeplab_kmax import config as config_lib
from deeplab_kmax.config import validation

from tests.export import helpers

DEMO = helpers.REPO / 'configs' / 'demo' / 'kmax_demo.textproto'


def _demo():
  return config_lib.load_config(DEMO)


def _for_inference(overrides=()):
  return config_lib.load_experiment(str(DEMO), overrides,
                                    mode=config_lib.INFERENCE)


@pytest.mark.parametrize('crop', ['[128,128]', '[129,130]', '[0,129]'])
def test_export_and_predict_reject_the_crops_training_rejects(crop,
                                                             monkeypatch):
  monkeypatch.setenv('DEMO_DIR', '/nonexistent/demo')
  override = f'eval_dataset_options.crop_size={crop}'
  with pytest.raises(config_lib.ConfigError,
                     match=r'eval_dataset_options.crop_size is \[.*32'):
    _for_inference([override])
  config = config_lib.override(_demo(),
                               config_lib.parse_override_flags([override]))
  with pytest.raises(config_lib.ConfigError,
                     match=r'eval_dataset_options.crop_size is \[.*32'):
    config_lib.prepare_config(config, 'eval', check_files=False)


def test_inference_checks_the_values_training_checks():
  with pytest.raises(config_lib.ConfigError,
                     match='maskwise_postprocessing.overlapping_threshold'):
    _for_inference([
        'evaluator_options.maskwise_postprocessing.overlapping_threshold=1.5'])
  config = _for_inference()
  assert list(config.eval_dataset_options.crop_size) == [129, 129]


_FLOAT_FIELDS = [
    'trainer_options.solver_options.base_learning_rate',
    'trainer_options.solver_options.weight_decay',
    'trainer_options.solver_options.adamw_weight_decay',
    'trainer_options.solver_options.poly_learning_power',
    'trainer_options.solver_options.batchnorm_epsilon',
    'trainer_options.loss_options.pq_style_loss.weight',
    'model_options.backbone.drop_path_keep_prob',
    'model_options.backbone.backbone_width_multiplier',
    'model_options.max_deeplab.transformer_decoder_drop_path_keep_prob',
    'model_options.max_deeplab.pixel_decoder_width_multiplier',
    'evaluator_options.pixel_confidence_threshold',
    'evaluator_options.maskwise_postprocessing.overlapping_threshold',
    'train_dataset_options.augmentations.min_scale_factor',
    'train_dataset_options.sigma',
]


@pytest.mark.parametrize('value', [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize('field', _FLOAT_FIELDS)
def test_non_finite_floats_are_rejected_by_name(field, value):
  config = config_lib.override(_demo(), {field: value})
  problems = validation.find_problems(config)
  assert any(p.startswith(f'{field} is ') and 'finite' in p
             for p in problems), problems
  with pytest.raises(config_lib.ConfigError, match=field.replace('.', r'\.')):
    config_lib.validate(config)


@pytest.mark.parametrize('field,value,expected', [
    ('model_options.backbone.backbone_width_multiplier', 0.0, 'positive'),
    ('model_options.max_deeplab.transformer_decoder_width_multiplier', -1.0,
     'positive'),
    ('train_dataset_options.sigma', 0.0, 'positive'),
    ('train_dataset_options.small_instance_weight', -1.0, '>= 0'),
    ('trainer_options.solver_options.poly_learning_power', -0.5, '>= 0'),
])
def test_float_ranges_are_checked(field, value, expected):
  config = config_lib.override(_demo(), {field: value})
  problems = validation.find_problems(config)
  assert any(p.startswith(f'{field} is ') and expected in p
             for p in problems), problems


def test_shipped_demo_config_has_no_problem():
  assert validation.find_problems(_demo(), 'train_and_eval') == []


@pytest.mark.parametrize('value', ['run{1}', 'a:b', 'x=y', 'has { brace }'])
def test_field_overrides_take_any_string(value, monkeypatch):
  flag = f'experiment_name={value}'
  config = config_lib.apply_override_flags(_demo(), [flag])
  assert config.experiment_name == value
  # Training and inference command lines load configs the same way.
  monkeypatch.setenv('DEMO_DIR', '/nonexistent/demo')
  trained = config_lib.load_experiment(str(DEMO), [flag], mode='train',
                                       check_files=False)
  assert trained.experiment_name == value
  assert _for_inference([flag]).experiment_name == value


def test_textproto_overrides_still_work():
  config = config_lib.apply_override_flags(
      _demo(), ['trainer_options { steps_per_loop: 7 }',
                'experiment_name: "a=b"'])
  assert config.trainer_options.steps_per_loop == 7
  assert config.experiment_name == 'a=b'
  with pytest.raises(config_lib.ConfigError, match='config_override'):
    config_lib.apply_override_flags(_demo(), ['trainer_options { nope: 1 }'])
