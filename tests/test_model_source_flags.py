"""The model-choosing flags shared by the predict CLI and the web page."""

import subprocess
import sys

import pytest

from deeplab_kmax import model_source_flags
from tests.export import helpers


def _sources(**values):
  names = ('saved_model', 'onnx_model', model_source_flags.CONFIG_FILE)
  return {name: values.get(name) for name in names}


def test_exactly_one_source_is_chosen():
  assert model_source_flags.chosen_source(
      _sources(onnx_model='m.onnx'), None) == 'onnx_model'
  assert model_source_flags.chosen_source(
      _sources(config_file='c.textproto'), 'ckpt-1') == 'config_file'
  expected = ('Give exactly one of --saved_model, --onnx_model or '
              r'--config_file \(with --checkpoint_path\)')
  with pytest.raises(ValueError, match=expected):
    model_source_flags.chosen_source(_sources(), None)
  with pytest.raises(ValueError, match=expected):
    model_source_flags.chosen_source(
        _sources(saved_model='dir', config_file='c.textproto'), 'ckpt-1')
  with pytest.raises(ValueError, match='needs --checkpoint_path'):
    model_source_flags.chosen_source(_sources(config_file='c.textproto'),
                                     None)


def test_predict_cli_names_its_sources(tmp_path):
  (tmp_path / 'x.png').write_bytes(b'')  # Inputs are checked first.
  result = subprocess.run(
      [sys.executable, '-m', 'deeplab_kmax.predict', '--saved_model=a',
       '--onnx_model=b', f'--inputs={tmp_path}/x.png',
       f'--output_dir={tmp_path}/out'],
      capture_output=True, text=True, env=helpers.SUBPROCESS_ENV,
      cwd=helpers.REPO, check=False, timeout=300)
  assert result.returncode != 0
  assert ('Give exactly one of --saved_model, --onnx_model, --tflite_model '
          'or --config_file (with --checkpoint_path).') in result.stderr, (
              result.stderr[-3000:])
