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


def test_page_help_lists_the_shared_flags():
  # The page's --config_file family is defined in model_source_flags, not in
  # the program file: --help must still list it (and the page's own flags).
  result = subprocess.run(
      [sys.executable, '-m', 'deeplab_kmax.app', '--help'],
      capture_output=True, text=True, env=helpers.SUBPROCESS_ENV,
      cwd=helpers.REPO, check=False, timeout=300)
  for flag in ('--saved_model', '--config_file', '--checkpoint_path',
               '--config_override', '--examples_dir', '--[no]verbose'):
    assert flag in result.stdout, (flag, result.stdout[-3000:],
                                   result.stderr[-3000:])


def test_page_rejects_two_sources():
  from deeplab_kmax import app_logic  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match='Give exactly one of --saved_model '
                     r'or --config_file \(with --checkpoint_path\)'):
    app_logic.load_model('a', 'b.textproto', 'ckpt')
  with pytest.raises(ValueError, match='needs --checkpoint_path'):
    app_logic.load_model(None, 'b.textproto', None)
