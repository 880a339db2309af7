"""The demo-size kMaX model and a synthetic labelled batch, for tests of the
training step's performance options (precision, recomputation, XLA)."""

import pathlib
from typing import Dict, Sequence

import numpy as np
import tensorflow as tf

from deeplab_kmax import config as config_lib
from deeplab_kmax import keys
from deeplab_kmax import model as model_lib
from deeplab_kmax import precision
from deeplab_kmax.data import demo_dataset
from deeplab_kmax.losses import kmax_loss

DEMO_CONFIG = (pathlib.Path(__file__).resolve().parents[2] / 'configs' /
               'demo' / 'kmax_demo.textproto')
_MAX_THING_ID = 8


def demo_config():
  return config_lib.load_config(DEMO_CONFIG)


def build_model(config, crop: int, mixed_precision: str = 'float32'):
  with precision.keras_policy(mixed_precision):
    return model_lib.build_model(config, demo_dataset.dataset_info(),
                                 crop_size=(crop, crop))


def build_loss(config, model):
  return kmax_loss.KMaXLoss.from_config(
      config.trainer_options.loss_options, config.model_options,
      demo_dataset.dataset_info(),
      auxiliary_output_number=model.auxiliary_output_number)


def synthetic_batch(crop: int, batch: int = 2,
                    seed: int = 0) -> Dict[str, tf.Tensor]:
  """Stuff bands with a few thing boxes, images coloured by class + noise."""
  info = demo_dataset.dataset_info()
  things, stuff = list(info.thing_class_ids), list(info.stuff_class_ids)
  rng = np.random.default_rng(seed)
  semantic = np.zeros([batch, crop, crop], np.int32)
  thing_id = np.full([batch, crop, crop], -1, np.int32)
  thing_class = np.full([batch, _MAX_THING_ID], -1, np.int32)
  for b in range(batch):
    cut = int(rng.integers(crop // 4, 3 * crop // 4))
    semantic[b, :cut], semantic[b, cut:] = rng.choice(stuff, 2, replace=False)
    for instance in range(3):
      y, x = rng.integers(0, crop - crop // 3, 2)
      size = int(rng.integers(crop // 6, crop // 3))
      cls = int(rng.choice(things))
      semantic[b, y:y + size, x:x + size] = cls
      thing_id[b, y:y + size, x:x + size] = instance
      thing_class[b, instance] = cls
  palette = rng.uniform(0, 255, [info.num_classes, 3])
  images = palette[semantic] + rng.normal(0, 10, semantic.shape + (3,))
  return {
      keys.IMAGE: tf.constant(np.clip(images, 0, 255), tf.float32),
      keys.GT_SEMANTIC: tf.constant(semantic),
      keys.GT_THING_ID_MASK: tf.constant(thing_id),
      keys.GT_THING_ID_CLASS: tf.constant(thing_class),
      keys.SEMANTIC_LOSS_WEIGHT: tf.ones([batch, crop, crop]),
  }


def copy_weights(source, target) -> None:
  """Same variables (float32 in every precision), in the same order."""
  names = [v.name for v in target.variables]
  assert names == [v.name for v in source.variables]
  for src, dst in zip(source.variables, target.variables):
    dst.assign(src)


def variable_names(model) -> Sequence[str]:
  return [v.name for v in model.variables]
