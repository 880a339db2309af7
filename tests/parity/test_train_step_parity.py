"""Training steps of this project equal DeepLab2's, term by term.

Both sides run their own `train_lib.run_experiment('train', ...)` -- model,
loss builder, optimizers with warm-up + poly schedule and backbone multiplier,
backbone split, Orbit loop, checkpoint manager -- from the same starting
checkpoint on the same fixed batch; only the dataset factory is replaced.
DeepLab2 runs in its own process (deeplab2_step_script.py). The comparison
reads what each side wrote:

* loss terms: the per-step `losses/train_*` summaries (relative 1e-5);
* gradients: the Adam first moment after step 1, which is exactly
  (1 - beta_1) * gradient because it starts at zero (per variable, relative
  to the gradient's norm, 1e-4);
* everything in the trainer checkpoints after steps 1 and 3: weights, batch
  norm moving statistics, both optimizers' slots and counters.

Nothing is random: drop path is off, the batch comes from the eval pipeline,
and the instance-discrimination sample size equals the number of stride-4
pixels, so DeepLab2's Gumbel top-k draws every pixel (only the order is
random, and the loss does not depend on it). With warm-up the first step's
learning rate is 0 (the schedule reads the optimizer's iteration, which
starts at 0), so steps 2 and 3 are the ones that move the weights: one on
the warm-up ramp, one on the poly decay.

Status (2026-12-01, COCO R50 only; see docs/switching_from_deeplab2.md): the
checkpoint layout, the learning rates and every loss term of steps 1-2 match;
the gradients of the encoder, pixel decoder, heads and cluster centres match
within ~3e-6 of their norm. The gradients read for the 36 zero-initialised
batch-norm gammas/betas that close the kMaX blocks' residual branches do not
match, and they are not reproducible between two traced steps on either side
(same weights, same loss), so this test fails there today; the cause is not
found yet. Cityscapes R50 and ConvNeXt-T have not been run.
"""

import dataclasses
import glob
import os
import pathlib
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np
from google.protobuf import text_format
import pytest
import tensorflow as tf
import tf_keras

from deeplab_kmax import config as config_lib
from tests.parity import deeplab2_ckpt_export_support as support
from deeplab_kmax import model as model_lib
from deeplab_kmax.data import input_pipeline
from deeplab_kmax.testing import reference
from deeplab_kmax.trainer import train_lib

pytestmark = pytest.mark.slow

_SCRIPT = pathlib.Path(__file__).with_name('deeplab2_step_script.py')
_RECORD = 'tfrecord/val-00000-of-00001.tfrecord'
_OBJECT_GRAPH_KEY = '_CHECKPOINTABLE_OBJECT_GRAPH'
_SLOT = '/.OPTIMIZER_SLOT/'

BATCH_SIZE = 2
STEPS = 3
WARMUP_STEPS = 2
# The pixel-space outputs the losses read are at stride 4.
LOSS_STRIDE = 4
BATCH_KEYS = ('image', 'semantic_gt', 'thing_id_mask_gt', 'thing_id_class_gt',
              'semantic_loss_weight')

OPT_IN = 'DEEPLAB_KMAX_TRAIN_PARITY'

LOSS_RTOL = 1e-5
GRADIENT_RTOL = 1e-4
VALUE_RTOL = 1e-5
RMS_FLOOR = 1e-9
DEEPLAB2_TIMEOUT_S = 3600


@dataclasses.dataclass(frozen=True)
class Case:
  config_name: str             # DeepLab2's config, in deeplab2_configs/.
  crop: Tuple[int, int]
  cityscapes_labels: bool = False


CASES = {
    'coco_r50': Case('coco_kmax_meta_r50_os32', (129, 129)),
    'cityscapes_r50': Case('cityscapes_kmax_meta_r50_os32', (129, 257),
                           cityscapes_labels=True),
    'coco_convnext_tiny': Case('coco_kmax_meta_convnext_tiny_os32',
                               (129, 129)),
}


# --- Inputs. -------------------------------------------------------------------


def stride_grid(crop: Tuple[int, int]) -> Tuple[int, int]:
  return tuple((side - 1) // LOSS_STRIDE + 1 for side in crop)


def experiment_config(ref: pathlib.Path, case: Case, initial_checkpoint: str):
  """DeepLab2's published config, shrunk to a deterministic 3-step run."""
  config = config_lib.load_config(
      ref / 'deeplab2_configs' / f'{case.config_name}.textproto')
  config.experiment_name = f'train_step_parity_{case.config_name}'
  model_options = config.model_options
  model_options.initial_checkpoint = initial_checkpoint
  model_options.restore_semantic_last_layer_from_initial_checkpoint = True
  model_options.backbone.drop_path_keep_prob = 1.0
  model_options.backbone.ClearField('pretrained_weights')
  grid_h, grid_w = stride_grid(case.crop)
  model_options.max_deeplab.instance_discrimination_sample_k = grid_h * grid_w
  solver = config.trainer_options.solver_options
  solver.warmup_steps = WARMUP_STEPS
  solver.training_number_of_steps = STEPS
  trainer_options = config.trainer_options
  trainer_options.steps_per_loop = 1
  trainer_options.save_checkpoints_steps = 1
  trainer_options.num_checkpoints_to_keep = STEPS + 2
  # Loss summaries are written every loop anyway; this keeps image
  # summaries (extra forward passes) out of the run.
  trainer_options.save_summaries_steps = 1000
  record = str(ref / _RECORD)
  for options in (config.train_dataset_options, config.eval_dataset_options):
    options.file_pattern[:] = [record]
    options.crop_size[:] = list(case.crop)
  config.train_dataset_options.batch_size = BATCH_SIZE
  return config


def make_batch(ref: pathlib.Path, case: Case) -> Dict[str, np.ndarray]:
  """The first BATCH_SIZE reference records through the eval pipeline."""
  config = config_lib.load_config(
      ref / 'deeplab2_configs' / 'coco_kmax_meta_r50_os32.textproto')
  options = config.eval_dataset_options
  options.file_pattern[:] = [str(ref / _RECORD)]
  options.crop_size[:] = list(case.crop)
  options.min_resize_value[:] = [min(case.crop)]
  options.max_resize_value[:] = [max(case.crop)]
  # One by one: the eval samples also hold raw-size arrays that differ
  # between images.
  options.batch_size = 1
  samples = list(input_pipeline.create_dataset(options, False).take(
      BATCH_SIZE))
  batch = {key: np.concatenate([sample[key].numpy() for sample in samples])
           for key in BATCH_KEYS}
  if case.cityscapes_labels:
    batch = to_cityscapes_labels(batch)
  return batch


def to_cityscapes_labels(batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Renames COCO classes to Cityscapes ones so that both kinds occur.

  COCO: 0 void, 1-80 things, 81-133 stuff. Cityscapes: 255 void, 0-10 stuff,
  11-18 things. Instance ids are kept; only class ids change.
  """

  def rename(ids: np.ndarray) -> np.ndarray:
    ids = ids.astype(np.int64)
    out = np.where(ids <= 80, 11 + (ids - 1) % 8, (ids - 81) % 11)
    return np.where(ids == 0, 255, out)

  batch = dict(batch)
  semantic = batch['semantic_gt']
  batch['semantic_gt'] = rename(semantic).astype(semantic.dtype)
  classes = batch['thing_id_class_gt']
  batch['thing_id_class_gt'] = np.where(
      classes < 0, classes, rename(np.maximum(classes, 0))).astype(
          classes.dtype)
  return batch


def write_initial_checkpoint(config, crop, prefix: str) -> str:
  """Our model, seeded initialisation, in DeepLab2's checkpoint layout."""
  config = type(config).FromString(config.SerializeToString())
  config.model_options.ClearField('initial_checkpoint')
  tf_keras.utils.set_random_seed(0)
  model = model_lib.build_model(config, crop_size=crop)
  path = tf.train.Checkpoint(**model.checkpoint_items).write(prefix)
  del model
  return path


# --- Running both sides. ---------------------------------------------------------


def fixed_dataset(batch: Dict[str, np.ndarray]):

  def create(unused_options, unused_is_training, input_context=None):
    del input_context
    tensors = {name: tf.constant(value) for name, value in batch.items()}
    return tf.data.Dataset.from_tensors(tensors).repeat()

  return create


def run_ours(config, batch, model_dir: str) -> None:
  # As in deeplab2_step_script.disable_dropout: the ASPP's dropout masks
  # cannot be matched across code bases, so both sides run without them.
  original = tf_keras.layers.Dropout.call
  tf_keras.layers.Dropout.call = lambda self, inputs, training=None: inputs
  try:
    train_lib.run_experiment(
        'train', config, model_dir,
        builders=train_lib.Builders(dataset=fixed_dataset(batch)))
  finally:
    tf_keras.layers.Dropout.call = original


def start_deeplab2(bench: pathlib.Path, config, batch, work: pathlib.Path,
                   model_dir: str) -> subprocess.Popen:
  """Starts DeepLab2's run in its own process (it needs legacy Keras)."""
  config_path = work / 'deeplab2_config.textproto'
  config_path.write_text(text_format.MessageToString(config))
  batch_path = work / 'batch.npz'
  np.savez(batch_path, **batch)
  env = dict(os.environ, TF_USE_LEGACY_KERAS='1', PYTHONPATH=str(bench),
             TF_CPP_MIN_LOG_LEVEL='2')
  log = open(work / 'deeplab2.log', 'w')
  return subprocess.Popen(
      [sys.executable, str(_SCRIPT), str(config_path), str(batch_path),
       model_dir], env=env, stdout=log, stderr=subprocess.STDOUT)


def finish_deeplab2(process: subprocess.Popen, work: pathlib.Path) -> None:
  try:
    returncode = process.wait(timeout=DEEPLAB2_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    process.kill()
    raise
  if returncode:
    raise AssertionError('DeepLab2 training failed:\n' +
                         (work / 'deeplab2.log').read_text()[-6000:])


# --- Reading what they wrote. ------------------------------------------------------


def read_checkpoint(model_dir: str, step: int) -> Dict[str, np.ndarray]:
  prefix = os.path.join(model_dir, f'ckpt-{step}')
  if not tf.io.gfile.exists(prefix + '.index'):
    raise AssertionError(f'No checkpoint for step {step} in {model_dir}: '
                         f'{sorted(os.listdir(model_dir))}')
  reader = tf.train.load_checkpoint(prefix)
  return {key: reader.get_tensor(key)
          for key, _ in tf.train.list_variables(prefix)
          if key != _OBJECT_GRAPH_KEY}


def read_train_summaries(model_dir: str) -> Dict[Tuple[str, int], float]:
  """{(tag, step): value} of the scalar training summaries."""
  found = {}
  for path in glob.glob(os.path.join(model_dir, 'train', 'events.out.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.HasField('tensor'):
          number = float(tf.make_ndarray(value.tensor))
        else:
          number = float(value.simple_value)
        found[(value.tag, int(event.step))] = number
  return found


def relative_difference(ours: np.ndarray, theirs: np.ndarray) -> float:
  """||ours - theirs|| / ||theirs|| (0 when both are zero).

  The scale is at least RMS_FLOOR per element, so that quantities that are
  zero up to float noise (e.g. the moving mean of a batch norm whose input
  is centred, ~1e-13) are not compared relative to their noise.
  """
  ours = np.asarray(ours, np.float64)
  theirs = np.asarray(theirs, np.float64)
  error = np.linalg.norm(ours - theirs)
  scale = max(np.linalg.norm(theirs), RMS_FLOOR * np.sqrt(theirs.size))
  if error == 0:
    return 0.0
  return float(error / scale) if scale > 0 else float('inf')


def worst(differences: Dict[str, float]) -> Tuple[str, float]:
  key = max(differences, key=differences.get)
  return key, differences[key]


def is_slot(key: str, slot: str) -> bool:
  return _SLOT in key and f'/{slot}/.ATTRIBUTES' in key


def compare_checkpoints(ours: Dict[str, np.ndarray],
                        theirs: Dict[str, np.ndarray]) -> Dict[str, float]:
  assert sorted(ours) == sorted(theirs), (
      f'Checkpoint keys differ: only ours {sorted(set(ours) - set(theirs))[:5]}'
      f', only DeepLab2 {sorted(set(theirs) - set(ours))[:5]}')
  return {key: relative_difference(ours[key], theirs[key]) for key in theirs}


def loss_differences(ours: Dict[Tuple[str, int], float],
                     theirs: Dict[Tuple[str, int], float]) -> Dict[str, float]:
  loss_tags = lambda found: {tag for tag, _ in found
                             if tag.startswith('losses/')}
  assert loss_tags(ours) == loss_tags(theirs), (
      f'Loss terms differ: only ours {sorted(loss_tags(ours) - loss_tags(theirs))}'
      f', only DeepLab2 {sorted(loss_tags(theirs) - loss_tags(ours))}')
  differences = {}
  for (tag, step), value in theirs.items():
    if tag.startswith('losses/') or tag == 'learning_rate':
      assert (tag, step) in ours, f'We wrote no {tag} at step {step}.'
      differences[f'{tag}@{step}'] = abs(ours[(tag, step)] - value) / max(
          abs(value), 1e-12)
  return differences


def compare_runs(ours_dir: str, theirs_dir: str) -> Tuple[List[str], List[str]]:
  """Reads both runs; returns the report lines and the failures."""
  report = []
  losses = loss_differences(read_train_summaries(ours_dir),
                            read_train_summaries(theirs_dir))
  report.append('  worst loss term %s: %.3g' % worst(losses))

  initial_values = read_checkpoint(theirs_dir, 0)
  after = {}
  for step in (0, 1, STEPS):
    ours, theirs = read_checkpoint(ours_dir, step), read_checkpoint(
        theirs_dir, step)
    after[step] = (ours, theirs, compare_checkpoints(ours, theirs))

  gradients = {key: value for key, value in after[1][2].items()
               if is_slot(key, 'm')}
  report.append('  worst gradient %s: %.3g' % worst(gradients))
  for step in (0, 1, STEPS):
    values = {key: value for key, value in after[step][2].items()
              if _SLOT not in key}
    report.append(f'  worst value after step {step} '
                  '%s: %.3g' % worst(values))
  slots = {key: value for key, value in after[STEPS][2].items()
           if _SLOT in key}
  report.append(f'  worst optimizer slot after step {STEPS} '
                '%s: %.3g' % worst(slots))
  ours_final, theirs_final, _ = after[STEPS]
  updates = {key: relative_difference(ours_final[key] - initial_values[key],
                                      theirs_final[key] - initial_values[key])
             for key in theirs_final if key in initial_values and
             _SLOT not in key and
             np.issubdtype(theirs_final[key].dtype, np.floating) and
             np.any(theirs_final[key] != initial_values[key])}
  report.append(f'  worst update over {STEPS} steps (relative to the update) '
                '%s: %.3g' % worst(updates))

  failures = [f'{key}: {diff:.3g}' for key, diff in losses.items()
              if diff > LOSS_RTOL]
  failures += [f'gradient {key}: {diff:.3g}'
               for key, diff in gradients.items() if diff > GRADIENT_RTOL]
  for step in (0, 1, STEPS):
    failures += [f'step {step} {key}: {diff:.3g}'
                 for key, diff in after[step][2].items()
                 if not is_slot(key, 'm') or step != 1
                 if diff > (GRADIENT_RTOL if _SLOT in key else VALUE_RTOL)]
  return report, failures


# --- The test. -------------------------------------------------------------------------


@pytest.mark.parametrize('name', sorted(CASES))
def test_train_steps_match_deeplab2(name, tmp_path):
  if os.environ.get(OPT_IN) != '1':
    pytest.skip(f'Set {OPT_IN}=1 to run: each case builds and traces two '
                'full-size training steps side by side (about ten minutes '
                'per case on a quiet 2-core machine, far more under load), '
                'beyond the default suite budget.')
  bench = support.bench_dir()
  if bench is None:
    pytest.skip('DeepLab2 sources (../shared/bench/deeplab2) are absent; this '
                'test runs DeepLab2 training side by side.')
  ref = reference.reference_dir()
  case = CASES[name]
  initial = write_initial_checkpoint(
      experiment_config(ref, case, ''), case.crop,
      str(tmp_path / 'initial' / 'model'))
  config = experiment_config(ref, case, initial)
  batch = make_batch(ref, case)
  ours_dir = str(tmp_path / 'ours')
  theirs_dir = str(tmp_path / 'deeplab2')
  # The two sides run at the same time: each is mostly single-threaded
  # tracing.
  deeplab2 = start_deeplab2(bench, config, batch, tmp_path, theirs_dir)
  try:
    run_ours(config, batch, ours_dir)
  except BaseException:
    deeplab2.kill()
    raise
  finish_deeplab2(deeplab2, tmp_path)

  report, failures = compare_runs(ours_dir, theirs_dir)
  print('\n'.join([f'{name}:'] + report))
  assert not failures, '\n'.join(
      [f'{name}:'] + report + failures[:40] + [f'... {len(failures)} in all'])
