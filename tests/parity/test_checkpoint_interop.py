"""Trainer checkpoints resume across DeepLab2's trainer and ours, both ways.

One chain covers both directions (COCO kMaX-R50 at crop 129, batch 1, on the
reference TFRecord): our trainer trains from scratch, DeepLab2's trainer
resumes from our newest checkpoint and trains on, then ours resumes from
DeepLab2's newest and trains on. Right after each resuming trainer's
checkpoint manager has restored the checkpoint (before any step), its
objects are written out (deeplab2_ckpt_state.py): every one of the 2630
values (step counter, weights, both optimizers' iterations, hyper-parameters
and m/v slots) must equal the saved one bit for bit. Then the step counter
and both optimizers' iterations must have advanced from the saved values.

Steps run eagerly on both sides (see deeplab2_ckpt_state.eager_trainer_init).
"""

import dataclasses
import pathlib
import shutil

import numpy as np
import orbit
import pytest
import tensorflow as tf

from deeplab_kmax import config as config_lib
from deeplab_kmax.testing import reference
from deeplab_kmax.trainer import train_lib
from tests.parity import deeplab2_ckpt_export_support as support
from tests.parity import deeplab2_ckpt_state as state_lib

pytestmark = pytest.mark.slow

CROP = 129
# Global steps at which each trainer of the chain stops (and checkpoints).
STEPS_OURS = 1  # Ours, from scratch.
STEPS_DEEPLAB2 = 2  # DeepLab2, resumed from ours.
STEPS_RESUMED = 3  # Ours again, resumed from DeepLab2's.
_MANIFEST = 'coco_kmax_meta_r50_os32_trainer_checkpoint.tsv'
_STEP_KEYS = ('global_step/.ATTRIBUTES/VARIABLE_VALUE',
              'optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE',
              'backbone_optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE')


def _config(reference_dir: pathlib.Path):
  """DeepLab2's COCO R50 config, small and fast, the same for both sides."""
  config = config_lib.load_config(
      reference_dir / 'deeplab2_configs' / 'coco_kmax_meta_r50_os32.textproto')
  config = config_lib.override(config, {
      'experiment_name': 'checkpoint_interop',
      'model_options.initial_checkpoint': '',
      'train_dataset_options.file_pattern': [
          str(reference_dir / 'tfrecord' / 'val-00000-of-00001.tfrecord')],
      'train_dataset_options.crop_size': [CROP, CROP],
      'train_dataset_options.min_resize_value': [CROP],
      'train_dataset_options.max_resize_value': [CROP],
      'train_dataset_options.batch_size': 1,
      # A constant-free schedule: the first steps really move the weights.
      'trainer_options.solver_options.warmup_steps': 0,
      # At crop 129 the mask logits have 33 * 33 = 1089 pixels; DeepLab2's
      # Gumbel top-k cannot sample the config's 4096 of them.
      'model_options.max_deeplab.instance_discrimination_sample_k': 1024,
  })
  # Augmentations only cost time here (the data does not matter).
  augmentations = config.train_dataset_options.augmentations
  augmentations.ClearField('autoaugment_policy_name')
  augmentations.ClearField('panoptic_copy_paste')
  return config


def _run_deeplab2(bench, config_path, model_dir, steps, restored_state=''):
  args = [support.HERE / 'deeplab2_ckpt_train.py', config_path, model_dir,
          steps]
  if restored_state:
    args.append(f'--restored_state={restored_state}')
  support.run_python(args, support.deeplab2_env(bench))


def _run_ours(config, model_dir, steps, monkeypatch, restored_state=''):
  """Our run_experiment('train'); with restored_state, records the resumed
  objects right after the restore, as the DeepLab2 script does."""
  created = {}
  default_model = train_lib.Builders().model

  def model_fn(*args, **kwargs):
    created['model'] = default_model(*args, **kwargs)
    return created['model']

  strategy = tf.distribute.OneDeviceStrategy('CPU:0')
  monkeypatch.setattr(orbit.StandardTrainer, '__init__',
                      state_lib.eager_trainer_init(
                          orbit.StandardTrainer.__init__))
  if restored_state:
    original = tf.train.CheckpointManager.restore_or_initialize

    def restore_or_initialize(manager):
      path = original(manager)
      assert path is not None, f'nothing to resume from in {model_dir}'
      model = created['model']
      state_lib.write_restored_state(
          manager.checkpoint, model, model.checkpoint_items['encoder'],
          strategy, restored_state)
      return path

    monkeypatch.setattr(tf.train.CheckpointManager, 'restore_or_initialize',
                        restore_or_initialize)
  config = config_lib.override(
      config, {'trainer_options.solver_options.training_number_of_steps':
               steps})
  train_lib.run_experiment('train', config, str(model_dir), strategy=strategy,
                           builders=train_lib.Builders(model=model_fn))
  monkeypatch.undo()


def _hand_over(source_dir: pathlib.Path, target_dir: pathlib.Path) -> str:
  """Copies the newest checkpoint of source_dir alone into target_dir (the
  resuming trainer re-saves into its model_dir; the original stays intact)."""
  prefix = tf.train.latest_checkpoint(str(source_dir))
  assert prefix is not None, f'no checkpoint in {source_dir}'
  target_dir.mkdir(parents=True)
  for path in pathlib.Path(prefix).parent.glob(pathlib.Path(prefix).name +
                                               '.*'):
    shutil.copy2(path, target_dir / path.name)
  copied = str(target_dir / pathlib.Path(prefix).name)
  tf.compat.v1.train.update_checkpoint_state(str(target_dir), copied)
  return copied


def _steps(path: str):
  reader = tf.train.load_checkpoint(path)
  return tuple(int(reader.get_tensor(key)) for key in _STEP_KEYS)


def _check_resumed(saved: str, restored_state: str, model_dir: pathlib.Path,
                   reference_dir: pathlib.Path, saved_step: int,
                   final_step: int) -> None:
  expected_keys = set(reference.read_manifest(
      reference_dir / 'manifests' / _MANIFEST))
  saved_keys = set(state_lib.read_values(saved))
  assert saved_keys == expected_keys, sorted(saved_keys ^ expected_keys)[:10]
  assert _steps(saved) == (saved_step,) * 3

  only_saved, only_restored, differing = state_lib.differences(
      saved, restored_state)
  assert not only_saved, f'not restored: {only_saved[:10]}'
  assert not only_restored, f'not in the checkpoint: {only_restored[:10]}'
  assert not differing, f'restored with other values: {differing[:10]}'

  final = tf.train.latest_checkpoint(str(model_dir))
  assert _steps(final) == (final_step,) * 3, final
  before, after = state_lib.read_values(saved), state_lib.read_values(final)
  kernel = 'encoder/_stem/_conv/kernel/.ATTRIBUTES/VARIABLE_VALUE'
  moved = [key for key in (kernel, kernel.replace(
      '/.ATTRIBUTES', '/.OPTIMIZER_SLOT/backbone_optimizer/m/.ATTRIBUTES'))
           if key in before and not np.array_equal(before[key], after[key])]
  assert len(moved) == 2, f'training did not continue from {saved}'


@dataclasses.dataclass(frozen=True)
class _Handover:
  saved: str  # The checkpoint handed over (a copy of the writer's newest).
  restored_state: str  # What the resuming trainer held right after restoring.
  model_dir: pathlib.Path  # The resuming trainer's; its newest is the final.


@pytest.fixture(scope='module')
def handovers(tmp_path_factory, reference_dir):
  """One chain, both directions: ours trains from scratch, DeepLab2 resumes
  from our checkpoint, ours resumes from DeepLab2's. A single DeepLab2
  process serves both directions (its start-up and model build are most of
  the cost)."""
  bench = support.require_deeplab2()
  root = tmp_path_factory.mktemp('checkpoint_interop')
  config = _config(reference_dir)
  config_path = support.write_deeplab2_config(config,
                                              root / 'config.textproto')
  with pytest.MonkeyPatch.context() as monkeypatch:
    _run_ours(config, root / 'ours', STEPS_OURS, monkeypatch)
  to_deeplab2 = _Handover(_hand_over(root / 'ours', root / 'deeplab2'),
                          str(root / 'restored_by_deeplab2' / 'state'),
                          root / 'deeplab2')
  _run_deeplab2(bench, config_path, to_deeplab2.model_dir, STEPS_DEEPLAB2,
                to_deeplab2.restored_state)
  to_ours = _Handover(_hand_over(root / 'deeplab2', root / 'ours_resumed'),
                      str(root / 'restored_by_ours' / 'state'),
                      root / 'ours_resumed')
  with pytest.MonkeyPatch.context() as monkeypatch:
    _run_ours(config, to_ours.model_dir, STEPS_RESUMED, monkeypatch,
              to_ours.restored_state)
  return {'to_deeplab2': to_deeplab2, 'to_ours': to_ours}


def test_deeplab2_checkpoint_resumes_in_our_trainer(handovers, reference_dir):
  handover = handovers['to_ours']
  _check_resumed(handover.saved, handover.restored_state, handover.model_dir,
                 reference_dir, STEPS_DEEPLAB2, STEPS_RESUMED)


def test_our_checkpoint_resumes_in_deeplab2_trainer(handovers, reference_dir):
  handover = handovers['to_deeplab2']
  _check_resumed(handover.saved, handover.restored_state, handover.model_dir,
                 reference_dir, STEPS_OURS, STEPS_DEEPLAB2)
