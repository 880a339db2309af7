"""Expected failures of the command-line tools: a message, no traceback
(the traceback only with --verbose), non-zero exit status."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from deeplab_kmax import cli_errors
from deeplab_kmax.data import demo_dataset
from tests.export import helpers

DEMO = helpers.REPO / 'configs' / 'demo' / 'kmax_demo.textproto'


def _run(args, demo_dir=None):
  """Runs a tool; `demo_dir` holds the demo descriptor (${DEMO_DIR})."""
  env = dict(helpers.SUBPROCESS_ENV)
  if demo_dir is not None:
    demo_dataset.dataset_info().save(
        os.path.join(demo_dir, demo_dataset.DESCRIPTOR_FILE))
    env['DEMO_DIR'] = str(demo_dir)
  return subprocess.run([sys.executable] + args, cwd=helpers.REPO, env=env,
                        timeout=300, capture_output=True, text=True,
                        check=False)


def _assert_message_only(result, *expected):
  assert result.returncode == cli_errors.EXPECTED_ERROR_STATUS, (
      result.stderr[-3000:])
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert 'ERROR: ' in result.stderr
  for text in expected:
    assert text in result.stderr, result.stderr[-3000:]


def _export_args(tmp_path, *extra):
  return [str(helpers.REPO / 'trainer' / 'export_model.py'),
          f'--config_file={DEMO}', f'--checkpoint_path={tmp_path}/none',
          f'--output_path={tmp_path}/out', *extra]


def test_export_reports_a_bad_config_without_traceback(tmp_path):
  args = _export_args(
      tmp_path, '--config_override=eval_dataset_options.crop_size=[128,128]')
  _assert_message_only(_run(args),
                       'eval_dataset_options.crop_size is [128, 128]')
  verbose = _run(args + ['--verbose'])
  assert verbose.returncode != 0 and 'Traceback' in verbose.stderr


def test_export_reports_a_missing_checkpoint_without_traceback(tmp_path):
  _assert_message_only(_run(_export_args(tmp_path), demo_dir=tmp_path),
                       f'{tmp_path}/none')


@pytest.fixture
def one_image(tmp_path):
  path = tmp_path / 'image.png'
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
  return path


def test_predict_reports_a_missing_model_without_traceback(tmp_path,
                                                           one_image):
  _assert_message_only(_run([
      '-m', 'deeplab_kmax.predict', f'--saved_model={tmp_path}/nothing',
      f'--inputs={one_image}', f'--output_dir={tmp_path}/out']),
      'holds no SavedModel')


def test_train_reports_a_bad_config_without_traceback(tmp_path):
  _assert_message_only(_run([
      str(helpers.REPO / 'trainer' / 'train.py'), f'--config_file={DEMO}',
      '--mode=train', f'--model_dir={tmp_path}',
      '--config_override=trainer_options.solver_options.'
      'base_learning_rate=inf'], demo_dir=tmp_path),
      'trainer_options.solver_options.base_learning_rate is inf')
