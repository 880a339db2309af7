"""Mixed-precision training: the config switch, bfloat16 and float16 steps."""

import numpy as np
import orbit
import pytest
import tensorflow as tf

from deeplab_kmax import config as config_lib
from deeplab_kmax import keys
from deeplab_kmax.config import trainer_pb2
from deeplab_kmax.trainer import kmax_trainer
from deeplab_kmax.trainer import optimizer as optimizer_lib
from tests.trainer import demo_step

_CROP = 33


def test_unknown_precision_is_rejected_naming_the_field():
  config = demo_step.demo_config()
  config.trainer_options.mixed_precision = 'float8'
  problems = config_lib.find_problems(config)
  assert any(p.startswith("trainer_options.mixed_precision is 'float8'; "
                          "expected one of 'float32', 'bfloat16', "
                          "'mixed_float16'") for p in problems), problems


def test_default_is_float32_without_xla():
  options = trainer_pb2.TrainerOptions()
  assert options.mixed_precision == 'float32'
  assert not options.jit_compile


def _one_step(config, precision, weights_from=None, jit_compile=False,
              use_tf_function=False):
  """Loss logs of one training step on the synthetic batch, and the model."""
  model = demo_step.build_model(config, _CROP, precision)
  if weights_from is not None:
    demo_step.copy_weights(weights_from, model)
  solver = config.trainer_options.solver_options
  optimizers = optimizer_lib.build_optimizers(solver)
  batch = demo_step.synthetic_batch(_CROP)
  trainer = kmax_trainer.KMaXTrainer(
      model, demo_step.build_loss(config, model),
      tf.data.Dataset.from_tensors(batch).repeat(), optimizers.main,
      tf.Variable(0, dtype=tf.int64), backbone_optimizer=optimizers.backbone,
      backbone_variables=lambda: model.backbone_variables,
      options=orbit.StandardTrainerOptions(use_tf_function=use_tf_function,
                                           use_tf_while_loop=False),
      mixed_precision=precision, jit_compile=jit_compile)
  return trainer.train(tf.constant(1)), model


@pytest.mark.slow
def test_mixed_precision_steps_are_finite_and_close_to_float32():
  config = demo_step.demo_config()
  # The first step's learning rate is 0 during warm-up.
  config.trainer_options.solver_options.warmup_steps = 0
  start = demo_step.build_model(config, _CROP)
  reference_logs, reference = _one_step(config, 'float32', weights_from=start)
  for precision in ('bfloat16', 'mixed_float16'):
    logs, model = _one_step(config, precision, weights_from=start)
    for term in (keys.TOTAL_LOSS, keys.SEMANTIC_LOSS,
                 keys.PQ_STYLE_MASK_DICE_TERM, keys.MASK_ID_CROSS_ENTROPY):
      name = f'losses/train_{term}'
      ours, theirs = float(logs[name]), float(reference_logs[name])
      print(f'{precision} {term}: {ours:.6g} (float32 {theirs:.6g})')
      assert np.isfinite(ours), (precision, name, ours)
      assert ours == pytest.approx(theirs, rel=0.05), (precision, name)
    # float16's first steps may overflow at the initial loss scale and be
    # skipped; bfloat16 needs no scaling and always updates.
    _check_variables(model, reference, start,
                     must_move=precision == 'bfloat16')


def _check_variables(model, reference, start, must_move: bool):
  # Variables stay float32 and keep their names (checkpoints unchanged).
  assert demo_step.variable_names(model) == demo_step.variable_names(
      reference)
  assert all(v.dtype == tf.float32 for v in model.variables)
  # The weights stay finite and (unless the step was skipped) moved.
  moved = [np.abs(a.numpy() - b.numpy()).max()
           for a, b in zip(model.trainable_variables,
                           start.trainable_variables)]
  assert np.all(np.isfinite(moved))
  assert max(moved) > 0 or not must_move


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason=(
    'After one XLA step 1.4% of the stem kernel differs from the plain step '
    'beyond atol 1e-5 (2026-12-01): XLA rounding or a real difference, not '
    'yet analysed. Issue 13 open.'))
def test_jit_compiled_step_matches_the_plain_step():
  config = demo_step.demo_config()
  config.trainer_options.solver_options.warmup_steps = 0
  start = demo_step.build_model(config, _CROP)
  plain_logs, plain = _one_step(config, 'float32', weights_from=start)
  xla_logs, compiled = _one_step(config, 'float32', weights_from=start,
                                 jit_compile=True)
  for name, value in plain_logs.items():
    if name.startswith('losses/'):
      # XLA's CPU fusions reorder float sums; one observed run differed by
      # 5.6e-4 relative in the semantic loss after the first update.
      assert float(xla_logs[name]) == pytest.approx(float(value), rel=2e-3,
                                                    abs=1e-6), name
  for ours, theirs in zip(compiled.trainable_variables,
                          plain.trainable_variables):
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-5,
                               err_msg=ours.name)
