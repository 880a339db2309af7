"""Access to the DeepLab2 compatibility contract in ../shared/reference.

The contract (manifests, goldens, TFRecords) is data produced by the official
DeepLab2 code. This module finds it, parses manifests and reproduces the
deterministic weight-fill rule so that any model part can be loaded with the
exact values the goldens were computed with.
"""

import os
import pathlib
import tempfile
import zlib
from typing import Dict, Mapping, Optional, Tuple

from google.protobuf import json_format
import numpy as np
import tensorflow as tf

from deeplab_kmax.config import evaluator_pb2

_OBJECT_GRAPH_KEY = '_CHECKPOINTABLE_OBJECT_GRAPH'
_VALUE_SUFFIX = '/.ATTRIBUTES/VARIABLE_VALUE'


def assert_close_to_golden(actual, golden: np.ndarray, what: str,
                           rtol: float = 1e-5) -> None:
  """Same shape, and within `rtol` of the golden's largest magnitude: the
  tolerance of float32 rounding, well below what a wrong wiring moves."""
  actual = np.asarray(actual)
  assert actual.shape == golden.shape, what
  scale = np.abs(golden).max()
  diff = np.abs(actual - golden).max()
  assert diff <= rtol * scale, (
      f'{what}: max abs diff {diff:.3g} > {rtol:g} x absmax {scale:.3g}')


def reference_dir() -> Optional[pathlib.Path]:
  """Returns the reference folder, or None when it is not beside the repo.

  DEEPLAB_KMAX_REFERENCE overrides the default `<repo>/../shared/reference`.
  """
  override = os.environ.get('DEEPLAB_KMAX_REFERENCE')
  if override:
    path = pathlib.Path(override)
  else:
    repo = pathlib.Path(__file__).resolve().parents[2]
    path = repo.parent / 'shared' / 'reference'
  return path if path.is_dir() else None


def read_manifest(path) -> Dict[str, Tuple[int, ...]]:
  """Parses a manifest TSV into {checkpoint key: shape}."""
  entries = {}
  with open(path) as f:
    for line_no, line in enumerate(f, 1):
      line = line.rstrip('\n')
      if not line:
        continue
      parts = line.split('\t')
      if len(parts) != 3:
        raise ValueError(f'{path}:{line_no}: expected key<TAB>shape<TAB>dtype, '
                         f'got {line!r}')
      key, shape, _ = parts
      entries[key] = tuple(int(d) for d in shape.split(',')) if shape else ()
  return entries


def fill_value(key: str, shape) -> np.ndarray:
  """The deterministic value the reference README assigns to a variable."""
  name = key.split('/.ATTRIBUTES')[0].split('/')[-1]
  rng = np.random.default_rng(zlib.crc32(key.encode('utf-8')))
  shape = tuple(int(d) for d in shape)
  if name in ('gamma', 'moving_variance'):
    value = rng.uniform(0.5, 1.5, shape)
  elif name in ('beta', 'bias', 'moving_mean'):
    value = 0.1 * rng.standard_normal(shape)
  else:
    fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    fan_in = fan_in or 1
    value = rng.standard_normal(shape) / np.sqrt(fan_in)
  return value.astype(np.float32)


def checkpoint_shapes(items: Mapping[str, tf.Module]) -> Dict[str, Tuple[int, ...]]:
  """Keys and shapes of `tf.train.Checkpoint(**items)`, as in a manifest."""
  with tempfile.TemporaryDirectory() as tmp:
    path = tf.train.Checkpoint(**items).write(os.path.join(tmp, 'ckpt'))
    return {
        key: tuple(shape)
        for key, shape in tf.train.list_variables(path)
        if key != _OBJECT_GRAPH_KEY
    }


def fill_with_reference_rule(items: Mapping[str, tf.Module]) -> int:
  """Sets every variable of `Checkpoint(**items)` by the fill rule.

  Works through a checkpoint (write, rewrite the values under the same keys,
  restore with assert_consumed) so the keys used are exactly the checkpoint
  keys, the same path the reference took. Returns the number of variables.
  """
  ckpt = tf.train.Checkpoint(**items)
  with tempfile.TemporaryDirectory() as tmp:
    original = ckpt.write(os.path.join(tmp, 'original'))
    reader = tf.train.load_checkpoint(original)
    names, tensors = [], []
    for key, shape in tf.train.list_variables(original):
      names.append(key)
      if key == _OBJECT_GRAPH_KEY:
        tensors.append(tf.constant(reader.get_tensor(key)))
      else:
        tensors.append(tf.constant(fill_value(key, shape)))
    filled = os.path.join(tmp, 'filled')
    tf.raw_ops.SaveV2(prefix=filled, tensor_names=names,
                      shape_and_slices=[''] * len(names), tensors=tensors)
    ckpt.read(filled).assert_consumed()
  return len(names) - 1


def reference_input(seed: int = 0, height: int = 129,
                    width: int = 129) -> np.ndarray:
  """The golden input image: uniform(0, 255) with numpy's default_rng."""
  rng = np.random.default_rng(seed)
  return rng.uniform(0, 255, (1, height, width, 3)).astype(np.float32)


def strip_suffix(key: str) -> str:
  """`a/b/kernel/.ATTRIBUTES/VARIABLE_VALUE` -> `a/b/kernel`."""
  return key[:-len(_VALUE_SUFFIX)] if key.endswith(_VALUE_SUFFIX) else key


def golden_evaluator_options(options: Mapping) -> evaluator_pb2.EvaluatorOptions:
  """A golden's `evaluator_options` (its mask-wise settings under
  `maskwise`) as the config message."""
  fields = dict(options)
  fields['maskwise_postprocessing'] = fields.pop('maskwise', {})
  return json_format.ParseDict(fields, evaluator_pb2.EvaluatorOptions())
