"""ONNX export of kMaX-DeepLab (tf2onnx), run with onnxruntime.

What is in the ONNX graph: `serving.network_maps`, i.e. the network and the
mask-wise post-processing. Padded crops [B, crop_h, crop_w, 3] float32
(0..255, resized to range and padded with the mean pixel) -> the serving
maps [B, crop_h, crop_w] (`serving.OUTPUT_KEYS`: panoptic_pred,
semantic_pred, instance_pred, instance_scores, semantic_scores,
semantic_probs). The resize-and-pad before and the crop-and-resize back
after depend on the image size; `OnnxPanopticPredictor` runs them on the
host with the SavedModel's own ops (`serving.predict_around_crops`), as
described by the serving metadata stored in the file's metadata_props.

One conversion defect in the network is repaired here: tf2onnx turns each
static corner-aligned bilinear resize (e.g. 5 -> 9 pixels) into an ONNX
Resize with float `scales` (9 / 5 = 1.8). ONNX computes the output length as
floor(5 * float32(1.8)) = 8, so shape inference fails ("Incompatible
dimensions" at the pixel decoder's skip connection). With
coordinate_transformation_mode=align_corners the interpolation depends only
on the input and output lengths, so nudging such scales up by 1e-5
(relative) restores the intended length without changing any value.

tf2onnx and onnxruntime are optional: `pip install deeplab_kmax[onnx]`.
"""

import json
import os
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

from deeplab_kmax import keys
from deeplab_kmax import temp_files
from deeplab_kmax.export import serving

DEFAULT_OPSET = 17
# Relative increase of a Resize scale; keeps floor(in * scale) == out for
# outputs up to 1e5 pixels long.
_SCALE_NUDGE = 1e-5


def require_optional(module_name: str):
  """Imports an optional ONNX package, or says how to install it."""
  try:
    return __import__(module_name)
  except ImportError as e:
    raise ImportError(
        f'ONNX export needs the optional package {module_name!r}: install it '
        'with `pip install "deeplab_kmax[onnx]"` (tf2onnx, onnxruntime).'
    ) from e


def network_function(model, crop_size: Sequence[int]):
  """tf.function: padded crops -> the serving maps at the crop size."""
  crop_h, crop_w = (int(s) for s in crop_size)

  @tf.function(input_signature=[
      tf.TensorSpec([None, crop_h, crop_w, 3], tf.float32,
                    name=keys.INPUT_PADDED_IMAGES)])
  def network(padded_images):
    maps = serving.network_maps(model, padded_images)
    return {key: tf.identity(value, name=key) for key, value in maps.items()}

  return network


def fix_align_corners_resize_scales(model_proto) -> int:
  """Nudges constant Resize scales so ONNX output lengths are not floored
  one short (see module docstring). Returns the number of Resize ops fixed.
  """
  require_optional('onnx')
  from onnx import numpy_helper  # pylint: disable=g-import-not-at-top
  initializers = {i.name: i for i in model_proto.graph.initializer}
  fixed = 0
  for node in model_proto.graph.node:
    if node.op_type != 'Resize' or len(node.input) < 3:
      continue
    attributes = {a.name: a for a in node.attribute}
    mode = attributes.get('coordinate_transformation_mode')
    if mode is None or mode.s != b'align_corners':
      continue
    scales = initializers.get(node.input[2])
    if scales is None:
      continue  # Sizes computed at run time: nothing to fix.
    values = numpy_helper.to_array(scales).astype(np.float32)
    nudged = np.where(values > 1, values * np.float32(1 + _SCALE_NUDGE),
                      values).astype(np.float32)
    if np.any(values < 1):
      raise NotImplementedError(
          f'Resize {node.name} shrinks by constant scales {values}; floor '
          'rounding of downscaling scales is not handled.')
    scales.CopyFrom(numpy_helper.from_array(nudged, scales.name))
    fixed += 1
  return fixed


def convert_network(model, crop_size: Sequence[int], output_path: str,
                    metadata: Optional[Mapping[str, Any]] = None,
                    opset: int = DEFAULT_OPSET):
  """Converts network + post-processing to ONNX and writes it to a file.

  Args:
    model: a built KMaXDeepLab (its post_processor's options are baked in).
    crop_size: (height, width) of the padded crops the ONNX model takes.
    output_path: the .onnx file to write (written via a temporary file).
    metadata: serving metadata (from `PanopticServingModule.metadata`);
      stored in metadata_props under `kmax_serving_metadata`.
    opset: ONNX opset.

  Returns:
    The ONNX ModelProto.
  """
  tf2onnx = require_optional('tf2onnx')
  onnx = require_optional('onnx')
  function = network_function(model, crop_size)
  model_proto, _ = tf2onnx.convert.from_function(
      function, input_signature=function.input_signature, opset=opset)
  fix_align_corners_resize_scales(model_proto)
  if metadata is not None:
    entry = model_proto.metadata_props.add()
    entry.key = keys.METADATA_KEY
    entry.value = json.dumps(metadata, sort_keys=True)
  directory = os.path.dirname(output_path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  # Written under a hidden temporary name and renamed; the temporaries of
  # killed exports to the same file are removed first (see temp_files).
  temp_files.remove_stale(
      directory or '.',
      temp_files.sibling_pattern(os.path.basename(output_path), 'partial'))
  temp_files.write_atomically(
      output_path, lambda partial: onnx.save(model_proto, partial),
      tag='partial')
  return model_proto


class OnnxPanopticPredictor:
  """Runs an exported ONNX model, with the resize, pad and undo around it.

  `predictor(image)` takes uint8 [H, W, 3] of any size and returns the maps
  of the SavedModel's serving_default signature.
  """

  def __init__(self, onnx_path: str,
               metadata: Optional[Mapping[str, Any]] = None,
               providers: Optional[Sequence[str]] = None):
    ort = require_optional('onnxruntime')
    self._session = ort.InferenceSession(
        onnx_path, providers=list(providers or ['CPUExecutionProvider']))
    if metadata is None:
      stored = self._session.get_modelmeta().custom_metadata_map
      if keys.METADATA_KEY not in stored:
        raise ValueError(f'{onnx_path} has no {keys.METADATA_KEY} metadata; '
                         'pass the serving metadata explicitly.')
      metadata = json.loads(stored[keys.METADATA_KEY])
    self.metadata: Dict[str, Any] = dict(metadata)
    self._spec = serving.EvalPreprocessing.from_json_dict(
        self.metadata[keys.METADATA_PREPROCESSING])
    self._output_names = [o.name for o in self._session.get_outputs()]
    missing = set(serving.OUTPUT_KEYS) - set(self._output_names)
    if missing:
      raise ValueError(f'{onnx_path} lacks the outputs {sorted(missing)} '
                       f'(has {self._output_names}); re-export it with '
                       'export_model.py --onnx_path.')

  def network(self, padded_images: np.ndarray) -> Dict[str, np.ndarray]:
    """Maps [B, crop_h, crop_w] of padded float32 crops."""
    results = self._session.run(
        None, {keys.INPUT_PADDED_IMAGES: np.asarray(padded_images,
                                                    np.float32)})
    return dict(zip(self._output_names, results))

  def predict_batch(self, images: np.ndarray) -> Dict[str, np.ndarray]:
    """uint8 [B, H, W, 3] (one size) -> maps [B, H, W]."""
    return serving.predict_around_crops(self.network, images, self._spec)

  def __call__(self, image: np.ndarray) -> Dict[str, np.ndarray]:
    image = np.asarray(image)
    if image.ndim != 3:
      raise ValueError(f'Expected one image [H, W, 3], got shape '
                       f'{image.shape}.')
    maps = self.predict_batch(image[None])
    return {key: value[0] for key, value in maps.items()}
