"""The wheel: console scripts and shipped configs work outside the checkout.

Builds the wheel from a clean copy of the sources, installs it into a fresh
virtualenv (`--system-site-packages`, so TensorFlow is not reinstalled; the
wheel itself with --no-deps), and from a directory outside the checkout
trains the demo model for two steps on a tiny generated dataset with
`kmax-train --config_file=demo/kmax_demo`, then exports it with
`kmax-export`; `kmax-predict` and `kmax-app` must print their help. Slow:
about two minutes on two cores.
"""

import glob
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

from deeplab_kmax.config import loader

REPO = pathlib.Path(__file__).resolve().parents[1]
# What the wheel is built from (a copy: no stale build/ or egg-info).
_SOURCES = ('setup.py', 'README.md', 'configs', 'deeplab_kmax')
_CROP = 65  # Smallest 32k+1 crop the demo model trains at quickly.
_TRAIN_OVERRIDES = (
    'trainer_options.solver_options.training_number_of_steps=2',
    'trainer_options.solver_options.warmup_steps=0',
    'trainer_options.steps_per_loop=1',
    'trainer_options.save_checkpoints_steps=2',
    'trainer_options.save_summaries_steps=2',
    'train_dataset_options.batch_size=2',
    f'train_dataset_options.crop_size=[{_CROP},{_CROP}]',
    f'train_dataset_options.min_resize_value=[{_CROP}]',
    f'train_dataset_options.max_resize_value=[{_CROP}]',
    f'eval_dataset_options.crop_size=[{_CROP},{_CROP}]',
    f'eval_dataset_options.min_resize_value=[{_CROP}]',
    f'eval_dataset_options.max_resize_value=[{_CROP}]',
)


def test_shipped_config_names_resolve_from_anywhere(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  by_name = loader.load_config('coco/kmax_meta_r50')
  by_path = loader.load_config(REPO / 'configs' / 'coco' /
                               'kmax_meta_r50.textproto')
  assert by_name == by_path
  assert loader.load_config('configs/demo/kmax_demo.textproto') == (
      loader.load_config('demo/kmax_demo'))
  assert 'demo/kmax_demo' in loader.shipped_config_names()
  with pytest.raises(loader.ConfigError) as error:
    loader.load_config('coco/kmax_meta_r51')
  message = str(error.value)
  assert 'coco/kmax_meta_r51' in message
  assert 'coco/kmax_meta_r50, ' in message and 'demo/kmax_demo' in message


def _run(args, cwd, env, timeout=900):
  result = subprocess.run(args, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
  assert result.returncode == 0, (
      f'{args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n'
      f'{result.stderr[-5000:]}')
  return result


@pytest.mark.slow
def test_wheel_console_scripts_train_and_export(tmp_path):
  source = tmp_path / 'source'
  for name in _SOURCES:
    if (REPO / name).is_dir():
      shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns(
          '__pycache__', '*.pyc', '*.egg-info'))
    else:
      source.mkdir(exist_ok=True)
      shutil.copy2(REPO / name, source / name)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PIP_NO_INDEX='1',
             PIP_DISABLE_PIP_VERSION_CHECK='1')
  env.pop('PYTHONPATH', None)
  outside = tmp_path / 'elsewhere'
  outside.mkdir()

  _run([sys.executable, '-m', 'pip', 'wheel', str(source), '--no-deps',
        '--no-build-isolation', '-q', '-w', str(tmp_path / 'wheel')],
       outside, env)
  wheels = glob.glob(str(tmp_path / 'wheel' / 'deeplab_kmax-*.whl'))
  assert len(wheels) == 1, wheels
  venv = tmp_path / 'venv'
  _run([sys.executable, '-m', 'venv', '--system-site-packages', str(venv)],
       outside, env)
  bin_dir = venv / 'bin'
  python = str(bin_dir / 'python')
  _run([python, '-m', 'pip', 'install', '--no-deps', '--force-reinstall',
        '-q', wheels[0]], outside, env)
  env['PATH'] = f'{bin_dir}{os.pathsep}{env.get("PATH", "")}'

  # The package and its configs come from the venv, not the checkout; the
  # same process writes the tiny dataset (one TensorFlow start-up for both).
  data = tmp_path / 'demo_data'
  probe = _run([python, '-c', textwrap.dedent(f'''
      import deeplab_kmax
      from deeplab_kmax.config import loader
      from deeplab_kmax.data import demo_dataset
      print(deeplab_kmax.__file__)
      print(loader.resolve_config_path('demo/kmax_demo'))
      demo_dataset.build({str(data)!r}, num_train=4, num_val=2, num_shards=1)
      ''')], outside, env).stdout.split()
  assert probe[0].startswith(str(venv)), probe
  assert probe[1].startswith(str(venv)), probe

  env['DEMO_DIR'] = str(data)
  model_dir = tmp_path / 'model'
  _run(['kmax-train', '--config_file=demo/kmax_demo', '--mode=train',
        f'--model_dir={model_dir}'] +
       [f'--config_override={o}' for o in _TRAIN_OVERRIDES], outside, env)
  experiment_dir = model_dir / 'kmax_demo'
  assert glob.glob(str(experiment_dir / 'ckpt-2.index'))
  assert (experiment_dir / 'train_log.jsonl').is_file()

  exported = tmp_path / 'saved_model' / '1'
  _run(['kmax-export', '--config_file=demo/kmax_demo',
        f'--checkpoint_path={experiment_dir}', f'--output_path={exported}'] +
       [f'--config_override={o}' for o in _TRAIN_OVERRIDES], outside, env)
  assert (exported / 'saved_model.pb').is_file()
  # absl's help flags exit with status 1 after printing.
  help_run = subprocess.run(['kmax-predict', '--help'], cwd=outside,
                            env=env, capture_output=True, text=True,
                            timeout=300, check=False)
  assert '--tflite_model' in help_run.stdout, help_run.stderr[-3000:]
  # The page's console script is installed too (absl prints the help and
  # exits; no Gradio server starts). --help (not only --helpfull) lists the
  # package's flags although the console script's own file defines none.
  app_help = subprocess.run(['kmax-app', '--help'], cwd=outside, env=env,
                            capture_output=True, text=True, timeout=300,
                            check=False)
  assert shutil.which('kmax-app', path=env['PATH']).startswith(str(venv))
  assert '--saved_model' in app_help.stdout, (app_help.stdout[-3000:],
                                              app_help.stderr[-3000:])
