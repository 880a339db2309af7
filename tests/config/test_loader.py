"""Loading configs and the errors a malformed config produces."""

import pytest

from deeplab_kmax import config as config_lib

_GOOD = """
# A small but complete kMaX config.
experiment_name: "tiny"
model_options {
  backbone { name: "kmax_resnet50" }
  max_deeplab {
    pixel_space_head { output_channels: 128 head_channels: 256 }
    auxiliary_semantic_head { output_channels: 134 head_channels: 256 }
  }
}
train_dataset_options { crop_size: [129, 129] batch_size: 2 }
"""


def _write(tmp_path, text, name='exp.textproto'):
  path = tmp_path / name
  path.write_text(text)
  return path


def _load_error(tmp_path, text) -> config_lib.ConfigError:
  path = _write(tmp_path, text)
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.load_config(path)
  assert info.value.source == str(path)
  assert str(path) in str(info.value)
  return info.value


def test_load_config_reads_file(tmp_path):
  config = config_lib.load_config(_write(tmp_path, _GOOD))
  assert isinstance(config, config_lib.ExperimentOptions)
  assert config.experiment_name == 'tiny'
  assert list(config.train_dataset_options.crop_size) == [129, 129]
  assert config.model_options.max_deeplab.pixel_space_head.output_channels == (
      128)


def test_load_config_accepts_str_path(tmp_path):
  path = _write(tmp_path, _GOOD)
  assert config_lib.load_config(str(path)) == config_lib.load_config(path)


def test_parse_config_matches_load_config(tmp_path):
  assert config_lib.parse_config(_GOOD) == config_lib.load_config(
      _write(tmp_path, _GOOD))


def test_unknown_field_names_file_line_column_and_field(tmp_path):
  text = _GOOD.replace('backbone { name: "kmax_resnet50" }',
                       'backbone {\n    nmae: "kmax_resnet50"\n  }')
  error = _load_error(tmp_path, text)
  line = text.splitlines().index('    nmae: "kmax_resnet50"') + 1
  assert (error.line, error.column) == (line, 5)
  assert error.field == 'model_options.backbone.nmae'
  message = str(error)
  assert f'exp.textproto:{line}:5:' in message
  assert 'unknown field "nmae" in model_options.backbone' in message
  assert 'did you mean "name"' in message


def test_unknown_top_level_field(tmp_path):
  error = _load_error(tmp_path, 'experiment_name: "x"\nlearning_rate: 0.1\n')
  assert (error.line, error.column, error.field) == (2, 1, 'learning_rate')
  assert 'unknown field "learning_rate" in ExperimentOptions' in str(error)


def test_bad_value_names_the_field(tmp_path):
  text = ('train_dataset_options {\n  batch_size: 2\n'
          '  crop_size: [129, big]\n}\n')
  error = _load_error(tmp_path, text)
  assert error.line == 3
  assert error.field == 'train_dataset_options.crop_size'
  assert 'train_dataset_options.crop_size' in str(error)
  assert "Couldn't parse integer: big" in str(error)
  # The offending line is quoted with a caret under the column.
  assert '  crop_size: [129, big]' in str(error)
  assert '^' in str(error).splitlines()[-1]


def test_bad_value_inside_deep_message(tmp_path):
  text = ('evaluator_options {\n'
          '  maskwise_postprocessing {\n'
          '    overlapping_threshold: high\n'
          '  }\n'
          '}\n')
  error = _load_error(tmp_path, text)
  assert (error.line, error.field) == (
      3, 'evaluator_options.maskwise_postprocessing.overlapping_threshold')


def test_comments_and_strings_do_not_confuse_field_paths(tmp_path):
  text = ('# model_options { backbone {\n'
          'experiment_name: "a { b"  # }\n'
          'model_options { backbone { name: "x" } }\n'
          'train_dataset_options { batch_size: two }\n')
  error = _load_error(tmp_path, text)
  assert (error.line, error.field) == (4, 'train_dataset_options.batch_size')


def test_repeated_singular_field(tmp_path):
  error = _load_error(tmp_path, 'experiment_name: "a"\nexperiment_name: "b"\n')
  assert error.line == 2
  assert error.field == 'experiment_name'
  assert 'more than once' in str(error)


def test_unbalanced_braces(tmp_path):
  error = _load_error(tmp_path, 'model_options {\n  backbone {\n')
  assert error.line is not None
  assert 'exp.textproto:' in str(error)


def test_missing_file_names_the_path(tmp_path):
  missing = tmp_path / 'nope' / 'missing.textproto'
  with pytest.raises(config_lib.ConfigError, match='not found') as info:
    config_lib.load_config(missing)
  assert str(missing) in str(info.value)


def test_directory_is_rejected(tmp_path):
  with pytest.raises(config_lib.ConfigError, match='directory'):
    config_lib.load_config(tmp_path)


def test_parse_config_labels_errors_with_source():
  with pytest.raises(config_lib.ConfigError, match=r'^<flag>:1:1: unknown'):
    config_lib.parse_config('bogus: 1', source='<flag>')


def test_config_error_is_a_value_error():
  assert issubclass(config_lib.ConfigError, ValueError)
