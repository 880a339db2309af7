"""TFLite export of kMaX-DeepLab, mask-wise post-processing included.

What is in the TFLite graph: one padded crop float32 [1, H, W, 3] (0..255,
the evaluation resize-and-pad already applied) -> network -> mask-wise merge
-> the six serving maps [1, H, W] at the crop size (`serving.OUTPUT_KEYS`).
The crop size is fixed at conversion (`--tflite_size`, by default the eval
crop), so every shape in the graph is static. The resize to range, the
padding and the final crop-and-resize back to the image size stay on the
host (`serving.predict_around_crops`), as for ONNX: they depend on the image
size, which a fixed-size graph cannot.

The serving metadata (labels, colours, preprocessing, thresholds) is stored
in the flatbuffer's metadata list under `kmax_serving_metadata`, so a
`.tflite` file is all a client needs.

The converter accepts the whole graph with TFLite builtins (see
docs/tflite.md for the op list). `semantic_probs` reads the class marginal
at the class-head index post-processing returns, so the graph has no
semantic id -> index lookup (a clipped lookup there would become RELU6, a
float-only builtin that needs the Flex delegate).
"""

import dataclasses
import json
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from absl import logging
import numpy as np
import tensorflow as tf

from deeplab_kmax import keys
from deeplab_kmax.data import dataset_info as dataset_info_lib
from deeplab_kmax.export import serving

QUANTIZATIONS = ('none', 'float16', 'dynamic_range')
# Ops of the Flex delegate appear as custom ops with this prefix.
_FLEX_PREFIX = 'Flex'
_MODEL_SCHEMA_IDENTIFIER = b'TFL3'


@dataclasses.dataclass(frozen=True)
class Conversion:
  """A converted model and what it needs at run time."""
  model: bytes
  quantization: str
  ops: Tuple[str, ...]  # Distinct op names of the graph, sorted.
  select_tf_ops: Tuple[str, ...]  # The subset run by the Flex delegate.


def parse_size(text: str) -> Tuple[int, int]:
  """'HxW' (or one number for a square) -> (H, W)."""
  match = re.fullmatch(r'\s*(\d+)\s*(?:[xX,]\s*(\d+))?\s*', text or '')
  if not match:
    raise ValueError(f'--tflite_size must be HxW (e.g. 513x513) or one '
                     f'number, got {text!r}.')
  height = int(match.group(1))
  width = int(match.group(2) or height)
  return height, width


def preprocessing_for_size(spec: serving.EvalPreprocessing,
                           size: Optional[Sequence[int]]
                           ) -> serving.EvalPreprocessing:
  """The evaluation preprocessing at another crop size.

  The resize-to-range limits follow the crop: an image is scaled so that it
  fits (and, when the config sets a minimum, fills) the new crop.
  """
  if size is None or tuple(size) == spec.crop_size:
    return spec
  from deeplab_kmax.config import validation  # pylint: disable=g-import-not-at-top
  size = tuple(int(s) for s in size)
  validation.check_kmax_crop(size, '--tflite_size')
  return serving.EvalPreprocessing(
      crop_size=size,
      min_resize_value=size if spec.min_resize_value else None,
      max_resize_value=size,
      resize_factor=spec.resize_factor)


def panoptic_function(model, crop_size: Sequence[int]):
  """tf.function: one padded crop -> the serving maps at the crop size."""
  crop_h, crop_w = (int(s) for s in crop_size)

  @tf.function(input_signature=[
      tf.TensorSpec([1, crop_h, crop_w, 3], tf.float32,
                    name=keys.INPUT_PADDED_IMAGE)])
  def panoptic(padded_image):
    return serving.network_maps(model, padded_image)

  return panoptic


class _Variables(tf.Module):
  """Tracks only the model's variables: the converter saves this object with
  the function, and saving the Keras model itself (all its layer functions)
  made the demo conversion several times slower."""

  def __init__(self, model):
    super().__init__(name='kmax_tflite')
    self.model_variables = list(model.variables)


def _converter(function, model, quantization: str, select_tf_ops: bool):
  converter = tf.lite.TFLiteConverter.from_concrete_functions(
      [function.get_concrete_function()], _Variables(model))
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  if select_tf_ops:
    converter.target_spec.supported_ops.append(tf.lite.OpsSet.SELECT_TF_OPS)
  if quantization == 'float16':
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
  elif quantization == 'dynamic_range':
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
  return converter


def op_names(model: bytes) -> List[str]:
  """Distinct op names of a TFLite model (builtin names; custom and Flex ops
  by their custom code), sorted."""
  from tensorflow.lite.python import schema_py_generated as schema  # pylint: disable=g-import-not-at-top
  root = schema.Model.GetRootAs(model, 0)
  builtins = {value: name for name, value in
              vars(schema.BuiltinOperator).items() if not name.startswith('_')}
  names = set()
  for i in range(root.OperatorCodesLength()):
    code = root.OperatorCodes(i)
    builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
    if builtin == schema.BuiltinOperator.CUSTOM:
      names.add(code.CustomCode().decode('utf-8'))
    else:
      names.add(builtins.get(builtin, str(builtin)))
  return sorted(names)


def convert(model, crop_size: Sequence[int], quantization: str = 'none',
            allow_select_tf_ops: bool = True) -> Conversion:
  """Converts network + mask-wise merge to TFLite.

  TFLite builtins are tried first; only if the converter rejects the graph
  (and `allow_select_tf_ops`) is it converted again with select TF ops, and
  the ops that then need the Flex delegate are reported.
  """
  if quantization not in QUANTIZATIONS:
    raise ValueError(f'Unknown TFLite quantization {quantization!r}; '
                     f'expected one of {QUANTIZATIONS}.')
  function = panoptic_function(model, crop_size)
  try:
    data = _converter(function, model, quantization, False).convert()
  except Exception as e:  # pylint: disable=broad-except
    if not allow_select_tf_ops:
      raise
    logging.warning('TFLite builtins do not cover the graph (%s); converting '
                    'with select TF ops (needs the Flex delegate).',
                    str(e).strip().splitlines()[-1][:300])
    data = _converter(function, model, quantization, True).convert()
  ops = op_names(data)
  flex = tuple(op for op in ops if op.startswith(_FLEX_PREFIX))
  if flex:
    logging.warning('The TFLite model needs select TF ops: %s.',
                    ', '.join(flex))
  return Conversion(bytes(data), quantization, tuple(ops), flex)


def with_metadata(model: bytes, metadata: Mapping[str, Any]) -> bytes:
  """Adds (or replaces) the serving metadata entry of a TFLite model."""
  from tensorflow.lite.python import schema_py_generated as schema  # pylint: disable=g-import-not-at-top
  from tensorflow.lite.tools import flatbuffer_utils  # pylint: disable=g-import-not-at-top
  content = flatbuffer_utils.read_model_from_bytearray(bytearray(model))
  entries = [m for m in (content.metadata or [])
             if _as_text(m.name) != keys.METADATA_KEY]
  buffer = schema.BufferT()
  buffer.data = np.frombuffer(
      json.dumps(metadata, sort_keys=True).encode('utf-8'), np.uint8)
  content.buffers.append(buffer)
  entry = schema.MetadataT()
  entry.name = keys.METADATA_KEY
  entry.buffer = len(content.buffers) - 1
  content.metadata = entries + [entry]
  return bytes(flatbuffer_utils.convert_object_to_bytearray(content))


def _as_text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def read_metadata(model: bytes, where: str = 'TFLite model') -> Dict[str, Any]:
  """The serving metadata stored by `with_metadata`."""
  from tensorflow.lite.python import schema_py_generated as schema  # pylint: disable=g-import-not-at-top
  if model[4:8] != _MODEL_SCHEMA_IDENTIFIER:
    raise ValueError(f'{where} is not a TFLite flatbuffer (no TFL3 '
                     'identifier).')
  root = schema.Model.GetRootAs(model, 0)
  for i in range(root.MetadataLength()):
    entry = root.Metadata(i)
    if _as_text(entry.Name()) != keys.METADATA_KEY:
      continue
    buffer = root.Buffers(entry.Buffer())
    if buffer.DataLength():
      data = buffer.DataAsNumpy().tobytes()
    else:  # Stored after the flatbuffer (models over 2 GB).
      data = model[buffer.Offset():buffer.Offset() + buffer.Size()]
    return json.loads(data.decode('utf-8'))
  raise ValueError(f'{where} has no {keys.METADATA_KEY} metadata; was it '
                   'written by export_model.py --tflite_path?')


def write_atomically(path: str, data: bytes) -> None:
  """Writes via a temporary file and a rename (no half-written models)."""
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  partial = f'{path}.partial-{os.getpid()}'
  try:
    with open(partial, 'wb') as f:
      f.write(data)
    os.replace(partial, path)
  finally:
    if os.path.exists(partial):
      os.remove(partial)


def tflite_metadata(module: serving.PanopticServingModule,
                    spec: serving.EvalPreprocessing,
                    conversion: Conversion) -> Dict[str, Any]:
  """The serving metadata of `module`, describing the TFLite model."""
  metadata = dict(module.metadata)
  metadata[keys.METADATA_PREPROCESSING] = spec.to_json_dict()
  crop_h, crop_w = spec.crop_size
  metadata[keys.METADATA_SIGNATURES] = {keys.SIGNATURE_IMAGE: {
      keys.METADATA_INPUTS: {
          keys.INPUT_PADDED_IMAGE:
              f'float32 [1, {crop_h}, {crop_w}, 3], 0..255, resized to '
              'range and padded with the mean pixel (see preprocessing)'},
      keys.METADATA_OUTPUTS:
          f'maps [1, {crop_h}, {crop_w}] at the crop size'}}
  metadata['tflite'] = {'quantization': conversion.quantization,
                        'select_tf_ops': list(conversion.select_tf_ops)}
  return metadata


def export(module: serving.PanopticServingModule, output_path: str,
           size: Optional[Sequence[int]] = None,
           quantization: str = 'none') -> Conversion:
  """Converts a serving module's model and writes it with its metadata.

  Args:
    module: the serving module (model, dataset, eval preprocessing).
    output_path: the .tflite file to write.
    size: (H, W) crop the TFLite model runs at; defaults to the eval crop.
    quantization: one of QUANTIZATIONS.

  Returns:
    The conversion (its `model` without the metadata).
  """
  spec = preprocessing_for_size(
      serving.EvalPreprocessing.from_json_dict(
          module.metadata[keys.METADATA_PREPROCESSING]), size)
  conversion = convert(module.model, spec.crop_size, quantization)
  write_atomically(output_path, with_metadata(
      conversion.model, tflite_metadata(module, spec, conversion)))
  return conversion


class TFLitePanopticPredictor:
  """Runs an exported TFLite model with the host resize, pad and undo.

  `predictor(image)` takes uint8 [H, W, 3] of any size and returns the maps
  of the SavedModel's serving_default signature.
  """

  def __init__(self, model_path: str, num_threads: Optional[int] = None):
    with open(model_path, 'rb') as f:
      content = f.read()
    self.metadata: Dict[str, Any] = read_metadata(content, model_path)
    self._spec = serving.EvalPreprocessing.from_json_dict(
        self.metadata[keys.METADATA_PREPROCESSING])
    self.interpreter = tf.lite.Interpreter(model_content=content,
                                           num_threads=num_threads)
    self._runner = self.interpreter.get_signature_runner(keys.SIGNATURE_IMAGE)

  @property
  def crop_size(self) -> Tuple[int, int]:
    return self._spec.crop_size

  @property
  def info(self) -> dataset_info_lib.DatasetInfo:
    return serving.dataset_info_from_metadata(self.metadata)

  def run_crop(self, padded_image: np.ndarray) -> Dict[str, np.ndarray]:
    """Maps [1, crop_h, crop_w] of one padded float32 crop [1, h, w, 3]."""
    padded_image = np.asarray(padded_image, np.float32)
    expected = (1,) + self._spec.crop_size + (3,)
    if padded_image.shape != expected:
      raise ValueError(f'The TFLite model takes a padded crop of shape '
                       f'{expected}, got {padded_image.shape}.')
    return {key: np.asarray(value) for key, value in
            self._runner(**{keys.INPUT_PADDED_IMAGE: padded_image}).items()}

  def __call__(self, image: np.ndarray) -> Dict[str, np.ndarray]:
    image = np.asarray(image)
    if image.ndim != 3:
      raise ValueError(f'Expected one image [H, W, 3], got shape '
                       f'{image.shape}.')
    restored = serving.predict_around_crops(self.run_crop, image[None],
                                            self._spec)
    return {key: value[0] for key, value in restored.items()}
