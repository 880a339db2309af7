"""What a trainer holds right after resuming, as a checkpoint to compare.

Shared by both sides of the checkpoint interop test (DeepLab2's process and
ours), so it imports TensorFlow only. The legacy Keras optimizers create
their slot variables lazily (first `apply_gradients`) and a restore only
queues their values, so the slots are created here first; the live objects
are then written with `Checkpoint.write`, which gives their values under the
very keys the resumed checkpoint used.
"""

from typing import Any, Dict, List, Tuple

import numpy as np
import orbit
import tensorflow as tf

OBJECT_GRAPH_KEY = '_CHECKPOINTABLE_OBJECT_GRAPH'


def eager_trainer_init(original_init):
  """Wraps `orbit.StandardTrainer.__init__` to run the steps eagerly.

  Tracing the full training step costs far more than the two or three steps
  these runs take; what is checked (the state a checkpoint carries) does not
  depend on eager versus graph execution.
  """

  def init(self, train_dataset, options=None):
    del options
    original_init(self, train_dataset, orbit.StandardTrainerOptions(
        use_tf_function=False, use_tf_while_loop=False))

  return init


def create_optimizer_slots(checkpoint: tf.train.Checkpoint, model: Any,
                           encoder: Any, strategy: tf.distribute.Strategy
                           ) -> None:
  """Creates iterations, hyper-parameters and m/v slots of both optimizers.

  Both trainers give the encoder's trainable variables to
  `backbone_optimizer` (when it exists) and every other trainable variable
  to `optimizer`; the split is reproduced so that exactly the slots the
  trainer would create exist.
  """
  backbone_optimizer = getattr(checkpoint, 'backbone_optimizer', None)
  encoder_refs = ({v.ref() for v in encoder.trainable_variables}
                  if backbone_optimizer is not None else set())
  main = [v for v in model.trainable_variables if v.ref() not in encoder_refs]
  with strategy.scope():
    checkpoint.optimizer._create_all_weights(main)  # pylint: disable=protected-access
    if backbone_optimizer is not None:
      backbone_optimizer._create_all_weights(  # pylint: disable=protected-access
          list(encoder.trainable_variables))


def write_restored_state(checkpoint: tf.train.Checkpoint, model: Any,
                         encoder: Any, strategy: tf.distribute.Strategy,
                         prefix: str) -> str:
  """Writes what the restored objects hold (slots included) to `prefix`."""
  create_optimizer_slots(checkpoint, model, encoder, strategy)
  return checkpoint.write(prefix)


def read_values(path: str) -> Dict[str, np.ndarray]:
  """{key: value} of every variable in a checkpoint (object graph left out)."""
  reader = tf.train.load_checkpoint(path)
  return {key: reader.get_tensor(key)
          for key in reader.get_variable_to_shape_map()
          if key != OBJECT_GRAPH_KEY}


def differences(expected: str, actual: str) -> Tuple[List[str], List[str],
                                                      List[str]]:
  """(keys only in expected, keys only in actual, keys whose values differ).

  Values must be bit-identical: a restore copies them.
  """
  want, got = read_values(expected), read_values(actual)
  differing = [key for key in sorted(set(want) & set(got))
               if want[key].dtype != got[key].dtype
               or want[key].shape != got[key].shape
               or not np.array_equal(want[key], got[key])]
  return (sorted(set(want) - set(got)), sorted(set(got) - set(want)),
          differing)
