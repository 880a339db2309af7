"""`${VAR}` placeholder expansion shared by the trainer, export and predict."""

import pytest

from deeplab_kmax import config as config_lib

_TEXT = """
model_options { initial_checkpoint: "${KMAX_TEST_CKPT}" }
eval_dataset_options { file_pattern: "${KMAX_TEST_DATA}/val-*" }
"""


def test_set_variables_expand_and_unset_ones_are_named(monkeypatch):
  monkeypatch.setenv('KMAX_TEST_DATA', '/data')
  monkeypatch.delenv('KMAX_TEST_CKPT', raising=False)
  config = config_lib.parse_config(_TEXT)
  with pytest.raises(ValueError, match=r'\$\{KMAX_TEST_CKPT\} in '
                     r'model_options\.initial_checkpoint'):
    config_lib.expand_environment_variables(config, 'eval')
  lenient = config_lib.expand_environment_variables(config, 'eval',
                                                    strict=False)
  assert list(lenient.eval_dataset_options.file_pattern) == ['/data/val-*']
  assert lenient.model_options.initial_checkpoint == '${KMAX_TEST_CKPT}'
  # The input is not modified.
  assert list(config.eval_dataset_options.file_pattern) == [
      '${KMAX_TEST_DATA}/val-*']
