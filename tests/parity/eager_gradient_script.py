"""Loss terms, gradients and k-means assignments of one eager training step.

  python tests/parity/eager_gradient_script.py SIDE CONFIG BATCH_NPZ \
      INITIAL_CHECKPOINT OUT_DIR [--repeats=N]

SIDE is `ours` (this project) or `deeplab2` (then run it with
TF_USE_LEGACY_KERAS=1 PYTHONPATH=../shared/bench). Each side builds its own
model and loss from its textproto of the same experiment, restores INITIAL_CHECKPOINT (the
model items, all of them), and evaluates the trainer's objective -- the
batch mean of every per-example loss term -- and `tape.gradient` of it in
eager mode, REPEATS times on the same weights and batch (with --reorder,
every second repeat takes the batch's examples in reverse order: the same
objective in exact arithmetic, summed in another order). No optimizer,
no checkpoint manager, no tf.function: only the forward pass, the loss and
the backward pass.

Determinism is the caller's: set TF_ENABLE_ONEDNN_OPTS=0 in the environment
(it is read at import) and pass --deterministic for op determinism and one
thread per op pool.

Written to OUT_DIR:
* `gradients_<r>` -- a checkpoint with the model items' trainable variables
  holding repeat r's gradients, so that both sides' gradients are keyed by
  the shared checkpoint layout (a variable without gradient holds NaN; the
  moving statistics, the only non-trainable floats, are meaningless);
* `step.npz` -- `loss/<term>/<r>` (float64 batch means) and
  `logits/<layer>/<r>` (the [B, H, W, N] mask logits each k-means layer took
  its argmax over, in call order).
"""

import argparse
import os
from typing import Callable, Dict, List, Tuple

import numpy as np
import tensorflow as tf

MASK_LOGITS_KEY = 'pixel_space_mask_logits'


def configure_determinism() -> None:
  # Op determinism refuses unseeded random ops; drop path draws its masks
  # even at keep probability 1 (where they are all ones).
  tf.random.set_seed(0)
  tf.config.experimental.enable_op_determinism()
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)


def record_logits(owner: type, method: str, logits_of: Callable,
                  found: List[np.ndarray]) -> None:
  """Wraps `owner.method` to append the eager mask logits it produces."""
  original = getattr(owner, method)

  def wrapped(self, *args, **kwargs):
    result = original(self, *args, **kwargs)
    logits = logits_of(result)
    if tf.executing_eagerly() and hasattr(logits, 'numpy'):
      found.append(logits.numpy())
    return result

  setattr(owner, method, wrapped)


def build_ours(config_path: str, crop: List[int], found: List[np.ndarray]):
  """This project's model and loss; the ASPP dropout is the identity."""
  import tf_keras  # pylint: disable=g-import-not-at-top
  from deeplab_kmax import config as config_lib  # pylint: disable=g-import-not-at-top
  from deeplab_kmax.layers import kmeans_cross_attention  # pylint: disable=g-import-not-at-top
  from deeplab_kmax.trainer import train_lib  # pylint: disable=g-import-not-at-top

  tf_keras.layers.Dropout.call = lambda self, inputs, training=None: inputs
  layer = kmeans_cross_attention.KMaXTransformerLayer
  original = layer.pixel_cluster_update

  def pixel_cluster_update(self, mask_logits, *args, **kwargs):
    if tf.executing_eagerly():
      found.append(mask_logits.numpy())
    return original(self, mask_logits, *args, **kwargs)

  layer.pixel_cluster_update = pixel_cluster_update
  config = config_lib.load_config(config_path)
  builders = train_lib.Builders()
  info = builders.dataset_info(config.train_dataset_options)
  model = builders.model(config, info, crop)
  if not model.built:
    train_lib.build_model_variables(model, crop)
  loss = builders.loss(config, info, model)
  return model, loss, lambda: list(model.losses)


def build_deeplab2(config_path: str, crop: List[int],
                   found: List[np.ndarray]):
  """DeepLab2's model and loss, built as its train_lib does."""
  from google.protobuf import text_format  # pylint: disable=g-import-not-at-top
  from deeplab2 import config_pb2  # pylint: disable=g-import-not-at-top
  from deeplab2.data import dataset  # pylint: disable=g-import-not-at-top
  from deeplab2.model.layers import dual_path_transformer  # pylint: disable=g-import-not-at-top
  from deeplab2.model.loss import loss_builder  # pylint: disable=g-import-not-at-top
  from deeplab2.trainer import train_lib  # pylint: disable=g-import-not-at-top

  import deeplab2_determinism  # pylint: disable=g-import-not-at-top

  deeplab2_determinism.remove_randomness()
  record_logits(dual_path_transformer.DualPathTransformerLayer,
                'kmeans_assignment_step',
                lambda result: result[0][MASK_LOGITS_KEY], found)
  with open(config_path) as f:
    config = text_format.Parse(f.read(), config_pb2.ExperimentOptions())
  name = config.train_dataset_options.dataset
  info = dataset.MAP_NAME_TO_DATASET_INFO[name]
  model = train_lib.create_deeplab_model(config, info)
  train_lib.build_deeplab_model(model, crop)
  loss = loss_builder.DeepLabFamilyLoss(
      loss_options=config.trainer_options.loss_options,
      deeplab_options=config.model_options,
      num_classes=info.num_classes,
      ignore_label=info.ignore_label,
      ignore_depth=info.ignore_depth,
      thing_class_ids=info.class_has_instances_list,
      auxiliary_output_number=model.auxiliary_output_number)
  # DeepLab2's trainer adds no regularisation losses.
  return model, loss, lambda: []


def one_step(model, loss, regularisation, batch: Dict[str, tf.Tensor]
             ) -> Tuple[Dict[str, float], List[tf.Tensor]]:
  """The trainers' objective and its gradient, eagerly."""
  with tf.GradientTape() as tape:
    outputs = model(batch['image'], training=True)
    terms = loss(batch, outputs)
    means = {name: tf.reduce_mean(tf.cast(value, tf.float32))
             for name, value in terms.items()}
    objective = means['total_loss']
    extra = regularisation()
    if extra:
      objective += tf.add_n(extra)
  gradients = tape.gradient(objective, model.trainable_variables)
  return ({name: float(value) for name, value in means.items()},
          [g if g is None else tf.convert_to_tensor(g) for g in gradients])


def side_parser(description: str, *outputs: str) -> argparse.ArgumentParser:
  """SIDE CONFIG BATCH_NPZ, then `outputs`, and --deterministic: the
  arguments this script and trainer_step_script.py share."""
  parser = argparse.ArgumentParser(description=description)
  for name in ('side', 'config', 'batch') + outputs:
    parser.add_argument(name, **({'choices': ('ours', 'deeplab2')}
                                 if name == 'side' else {}))
  parser.add_argument('--deterministic', action='store_true')
  return parser


def main() -> None:
  parser = side_parser(__doc__, 'initial_checkpoint', 'out_dir')
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--reorder', action='store_true',
                      help='Odd repeats take the batch in reverse order.')
  args = parser.parse_args()
  if args.deterministic:
    configure_determinism()

  with np.load(args.batch) as arrays:
    batch = {name: tf.constant(arrays[name]) for name in arrays.files}
  crop = list(batch['image'].shape[1:3])
  found: List[np.ndarray] = []
  build = build_ours if args.side == 'ours' else build_deeplab2
  model, loss, regularisation = build(args.config, crop, found)
  items = tf.train.Checkpoint(**model.checkpoint_items)
  items.read(args.initial_checkpoint).assert_existing_objects_matched()

  arrays = {}
  all_gradients = []
  for repeat in range(args.repeats):
    found.clear()
    step_batch = batch
    if args.reorder and repeat % 2:
      step_batch = {name: tf.reverse(value, [0])
                    for name, value in batch.items()}
    means, gradients = one_step(model, loss, regularisation, step_batch)
    for name, value in means.items():
      arrays[f'loss/{name}/{repeat}'] = np.float64(value)
    for layer, logits in enumerate(found):
      arrays[f'logits/{layer}/{repeat}'] = logits
    all_gradients.append([None if g is None else g.numpy()
                          for g in gradients])
  os.makedirs(args.out_dir, exist_ok=True)
  np.savez(os.path.join(args.out_dir, 'step.npz'), **arrays)
  # The weights are not needed any more: they carry the gradients out.
  for repeat, gradients in enumerate(all_gradients):
    for variable, gradient in zip(model.trainable_variables, gradients):
      variable.assign(np.full(variable.shape, np.nan, np.float32)
                      if gradient is None else gradient)
    items.write(os.path.join(args.out_dir, f'gradients_{repeat}'))


if __name__ == '__main__':
  main()
