"""run_experiment end to end with stand-in model/loss/data, config checks."""

import glob
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from deeplab_kmax import config as config_lib
from deeplab_kmax.trainer import kmax_trainer
from deeplab_kmax.trainer import train_lib
from tests.trainer import standins


def _steps_of_checkpoints(model_dir):
  state = tf.train.get_checkpoint_state(model_dir)
  return sorted(int(p.rsplit('-', 1)[1])
                for p in state.all_model_checkpoint_paths)


def _one_device():
  return tf.distribute.OneDeviceStrategy('CPU:0')


def test_placeholders_expand_from_environment(monkeypatch, reference_dir):
  config = config_lib.load_config(
      reference_dir / 'deeplab2_configs' / 'coco_kmax_meta_r50_os32.textproto')
  for name in ('EXPERIMENT_NAME', 'INIT_CHECKPOINT', 'TRAIN_SET', 'VAL_SET'):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv('EXPERIMENT_NAME', 'exp1')
  monkeypatch.setenv('INIT_CHECKPOINT', '/ckpt/dir')
  monkeypatch.setenv('TRAIN_SET', '/data/train*.tfrecord')
  expanded = config_lib.expand_environment_variables(config, 'train')
  assert expanded.experiment_name == 'exp1'
  assert expanded.model_options.initial_checkpoint == '/ckpt/dir'
  assert list(expanded.train_dataset_options.file_pattern) == [
      '/data/train*.tfrecord']
  # The eval set is not used in train mode: left as written.
  assert list(expanded.eval_dataset_options.file_pattern) == ['${VAL_SET}']
  assert config.experiment_name == '${EXPERIMENT_NAME}'  # Input untouched.
  with pytest.raises(ValueError,
                     match=r'\$\{VAL_SET\} in eval_dataset_options.file_pattern'):
    config_lib.expand_environment_variables(config, 'train_and_eval')


def test_bad_config_values_give_clear_errors(reference_dir):
  good = standins.experiment_config(reference_dir)
  config_lib.prepare_config(good, 'train_and_eval')
  bad_crop = config_lib.override(good,
                                 {'train_dataset_options.crop_size': [128, 129]})
  with pytest.raises(ValueError, match=r'crop_size is \[128, 129\].*\[129, 129\]'):
    config_lib.prepare_config(bad_crop, 'train')
  bad_optimizer = config_lib.override(
      good, {'trainer_options.solver_options.optimizer': 'lamb'})
  with pytest.raises(config_lib.ConfigError, match="optimizer is 'lamb'"):
    config_lib.prepare_config(bad_optimizer, 'train')
  missing = config_lib.override(
      good, {'eval_dataset_options.file_pattern': ['/nonexistent/*.tfrecord']})
  with pytest.raises(FileNotFoundError, match='eval_dataset_options'):
    config_lib.prepare_config(missing, 'eval')
  config_lib.prepare_config(missing, 'train')  # Eval data unused in training.
  with pytest.raises(ValueError, match='Unknown mode'):
    config_lib.prepare_config(good, 'predict')
  # Evaluation runs one image per batch; training and serving do not care.
  batched = config_lib.override(good, {'eval_dataset_options.batch_size': 2})
  with pytest.raises(config_lib.ConfigError, match='one image per batch'):
    config_lib.prepare_config(batched, 'eval')
  config_lib.prepare_config(batched, 'train')
  config_lib.prepare_config(batched, config_lib.INFERENCE)
  with pytest.raises(ValueError, match='Unknown mode'):
    train_lib.run_experiment(config_lib.INFERENCE, good, '/nonexistent')


def test_aligned_loops_end_on_checkpoint_and_summary_steps():
  steps = train_lib.aligned_steps_per_loop(100, [1000, 300])
  assert steps(0) == 100
  assert steps(250) == 50
  assert steps(950) == 50
  assert steps(990) == 10


def test_train_resume_and_evaluate(tmp_path, reference_dir):
  model_dir = str(tmp_path / 'run')
  config = standins.experiment_config(reference_dir, total_steps=6)
  train_lib.run_experiment('train', config, model_dir,
                           strategy=_one_device(),
                           builders=standins.builders())
  assert _steps_of_checkpoints(model_dir) == [0, 3, 6]
  assert glob.glob(os.path.join(model_dir, 'train', 'events.out.tfevents.*'))

  # Same command, longer schedule: continues from step 6, not from 0.
  longer = config_lib.override(
      config, {'trainer_options.solver_options.training_number_of_steps': 9})
  result = train_lib.run_experiment('train_and_eval', longer, model_dir,
                                    strategy=_one_device(),
                                    builders=standins.builders())
  assert _steps_of_checkpoints(model_dir)[-1] == 9
  reader = tf.train.load_checkpoint(os.path.join(model_dir, 'ckpt-9'))
  assert reader.get_tensor('global_step/.ATTRIBUTES/VARIABLE_VALUE') == 9
  assert reader.get_tensor('optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE') == 9
  assert reader.get_tensor(
      'backbone_optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE') == 9

  for key in ('evaluation/pq/PQ', 'evaluation/pq/PQ_thing',
              'evaluation/pq/PQ_stuff', 'evaluation/iou/mIoU',
              'evaluation/ap/AP', 'evaluation/ap/AP50',
              'evaluation/ap/AP75'):
    assert 0.0 <= result[key] <= 1.0, key
  with open(os.path.join(model_dir, 'eval_metrics.json')) as f:
    report = json.load(f)
  assert report['step'] == 9 and report['num_examples'] == 3
  assert set(report['ap']['AP_per_class']) == {'blob'}
  assert report['metrics']['evaluation/ap/AP'] == pytest.approx(
      result['evaluation/ap/AP'])
  assert report['metrics']['evaluation/pq/PQ'] == pytest.approx(
      result['evaluation/pq/PQ'])
  assert os.path.exists(os.path.join(model_dir, 'eval', 'metrics_00000009.json'))
  assert not glob.glob(os.path.join(model_dir, '**', '*.tmp-*'),
                       recursive=True)

  # `eval` mode reads the latest checkpoint and reproduces the numbers.
  again = train_lib.run_experiment('eval', longer, model_dir,
                                   strategy=_one_device(),
                                   builders=standins.builders())
  assert again['evaluation/pq/PQ'] == pytest.approx(result['evaluation/pq/PQ'])
  assert again['evaluation/iou/mIoU'] == pytest.approx(
      result['evaluation/iou/mIoU'])
  assert again['evaluation/ap/AP'] == pytest.approx(result['evaluation/ap/AP'])
  # continuous_eval evaluates the newest checkpoint and stops after the
  # final training step's checkpoint.
  continuous = train_lib.run_experiment('continuous_eval', longer, model_dir,
                                        strategy=_one_device(),
                                        builders=standins.builders())
  assert continuous['evaluation/pq/PQ'] == pytest.approx(
      result['evaluation/pq/PQ'])


def test_eval_saves_coco_panoptic_predictions_that_rescore_the_same(
    tmp_path, reference_dir):
  model_dir = str(tmp_path / 'run')
  config = standins.experiment_config(reference_dir, total_steps=3)
  config = config_lib.override(config, {
      'evaluator_options.save_raw_predictions': True,
      'evaluator_options.raw_panoptic_format': 'coco_panoptic',
      'evaluator_options.detailed_ap_metrics': True})
  result = train_lib.run_experiment('train_and_eval', config, model_dir,
                                    strategy=_one_device(),
                                    builders=standins.builders())
  assert result['evaluation/raw_predictions/num_images'] == 3
  assert 0.0 <= result['evaluation/ap/AR100'] <= 1.0  # Detailed AP metrics.
  out = os.path.join(model_dir, 'vis', 'raw_predictions')
  with open(os.path.join(out, 'predictions.json')) as f:
    annotations = json.load(f)['annotations']
  assert len(annotations) == 3
  # Re-score from the files alone, as an official tool would.
  from deeplab_kmax import evaluation  # pylint: disable=g-import-not-at-top
  info = standins.dataset_info()
  quality = evaluation.PanopticQuality(
      info.num_classes, info.ignore_label, info.panoptic_label_divisor,
      thing_class_ids=info.thing_class_ids)
  crop = int(config.eval_dataset_options.crop_size[0])
  for annotation, example in zip(annotations, standins.eval_examples(crop)):
    rgb = np.asarray(Image.open(os.path.join(
        out, 'panoptic', annotation['file_name']))).astype(np.int64)
    segment_ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    panoptic = np.zeros_like(segment_ids)  # Void where no segment.
    for segment in annotation['segments_info']:
      category = segment['category_id']
      instance = segment['id'] if category in info.thing_class_ids else 0
      panoptic[segment_ids == segment['id']] = (
          category * info.panoptic_label_divisor + instance)
    quality.update(example['panoptic_raw'][0], panoptic)
  assert quality.result().to_flat_dict()['PQ'] == pytest.approx(
      result['evaluation/pq/PQ'])


def test_command_line_reports_unset_placeholders(tmp_path, reference_dir):
  env = {k: v for k, v in os.environ.items()
         if k not in ('EXPERIMENT_NAME', 'INIT_CHECKPOINT', 'TRAIN_SET',
                      'VAL_SET')}
  repo = pathlib.Path(__file__).resolve().parents[2]
  config = reference_dir / 'deeplab2_configs' / 'coco_kmax_meta_r50_os32.textproto'
  run = subprocess.run(
      [sys.executable, str(repo / 'trainer' / 'train.py'),
       f'--config_file={config}', '--mode=train', f'--model_dir={tmp_path}',
       '--config_override=trainer_options.steps_per_loop=10'],
      env=env, capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode != 0
  assert 'environment variables that are not set' in run.stderr
  assert '${TRAIN_SET} in train_dataset_options.file_pattern' in run.stderr


def test_nan_stops_training_and_keeps_last_good_checkpoint(tmp_path,
                                                           reference_dir):
  model_dir = str(tmp_path / 'nan')
  config = standins.experiment_config(reference_dir, total_steps=12,
                                      checkpoint_every=2, steps_per_loop=2)
  with pytest.raises(kmax_trainer.NonFiniteLossError, match='NaN/Inf'):
    train_lib.run_experiment('train', config, model_dir,
                             strategy=_one_device(),
                             builders=standins.builders(nan_after=5))
  # Steps 1-5 were finite, step 6 was not: the loop 4..6 is discarded.
  assert _steps_of_checkpoints(model_dir) == [0, 2, 4]
  reader = tf.train.load_checkpoint(os.path.join(model_dir, 'ckpt-4'))
  for key, _ in tf.train.list_variables(os.path.join(model_dir, 'ckpt-4')):
    value = reader.get_tensor(key)
    if isinstance(value, np.ndarray) and value.dtype.kind == 'f':
      assert np.all(np.isfinite(value)), key
