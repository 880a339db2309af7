"""The serving graph: raw uint8 image in, panoptic maps at its size out.

A served model must not depend on the caller reproducing the evaluation
pipeline, so all of it lives inside the graph:

  uint8 image [H, W, 3]
    -> resize to range (the longer side fits the eval crop, bilinear, corners
       aligned) and pad bottom/right with the mean pixel to the crop,
       exactly as the evaluation input pipeline does
    -> kMaX-DeepLab + mask-wise post-processing at the crop size
    -> crop the padding off and resize back to H x W (nearest neighbour for
       ids and scores, bilinear for probabilities, corners aligned; the same
       way DeepLab2's evaluator undoes its preprocessing).

Outputs (all at the input resolution, one map per image):

  panoptic_pred   int32   semantic_id * label_divisor + instance_id; void
                          (the ignore label) where no segment survived.
  semantic_pred   int32   threshold-free semantic id of every pixel.
  instance_pred   int32   instance id (1 + the mask's rank); 1 where none.
  instance_scores float32 the largest mask probability of the pixel.
  semantic_scores float32 class confidence of the segment that owns the
                          pixel in panoptic_pred, 0 where void.
  semantic_probs  float32 probability of the class in semantic_pred:
                          sum over masks k of p(k | pixel) * p(class | k),
                          the mask transformer's class marginal, computed
                          at the output stride and bilinearly upsampled.

`semantic_probs` is the probability of the predicted class, not the full
[H, W, num_classes] map: at 1281 x 1281 the full map would be ~0.9 GB of
float32, far too much for a REST response; the marginal of any class can be
computed from the raw logits (`predict_raw`) when needed.

The network runs once per batch through one traced function
(`network_logits`) that every signature calls, so the SavedModel holds the
heavy graph only once. Besides the maps, the `serving_logits` signature gives
that function's outputs for one image (mask logits [h, w, N] at the output
stride and class logits [N, C + 1] on the padded crop, and the [2] size of the
image part of the crop), so a client can re-run the mask-wise merge with other
thresholds (`maps_from_logits`, then `undo_eval_preprocessing`), as the
try-a-model page does.
"""

import dataclasses
import json
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np
import tensorflow as tf

from deeplab_kmax import keys
from deeplab_kmax import precision
from deeplab_kmax.data import dataset_info as dataset_info_lib
from deeplab_kmax.data import preprocessing
from deeplab_kmax.ops import resize

# Outputs resized back with nearest neighbour (ids must stay ids) and with
# bilinear interpolation (a smooth probability map).
NEAREST_OUTPUTS = (keys.PANOPTIC_PRED, keys.SEMANTIC_PRED, keys.INSTANCE_PRED,
                   keys.INSTANCE_SCORES, keys.SEMANTIC_SCORES)
BILINEAR_OUTPUTS = (keys.SEMANTIC_PROBS,)
OUTPUT_KEYS = NEAREST_OUTPUTS + BILINEAR_OUTPUTS
# What the network gives the mask-wise merge; with the resized size, the
# outputs of the `serving_logits` signature.
LOGITS_KEYS = (keys.PIXEL_SPACE_MASK_LOGITS, keys.TRANSFORMER_CLASS_LOGITS)

METADATA_FILENAME = 'kmax_serving_metadata.json'
METADATA_VERSION = 1

Size = Tuple[int, int]


@dataclasses.dataclass(frozen=True)
class EvalPreprocessing:
  """Resize-to-range then pad-to-crop: the deterministic evaluation input.

  Attributes:
    crop_size: (height, width) the network runs at.
    min_resize_value: both sides are first scaled up/down to reach it.
    max_resize_value: then scaled down to fit; defaults to the crop size, so
      that any image fits the crop.
    resize_factor: resized sides become k * factor + 1 when set.
  """
  crop_size: Size
  min_resize_value: Optional[Size] = None
  max_resize_value: Optional[Size] = None
  resize_factor: Optional[int] = None

  def __post_init__(self):
    if len(self.crop_size) != 2 or min(self.crop_size) <= 0:
      raise ValueError(f'crop_size must be two positive ints, got '
                       f'{self.crop_size}.')
    object.__setattr__(self, 'crop_size', tuple(int(s) for s in
                                                self.crop_size))
    object.__setattr__(self, 'min_resize_value',
                       preprocessing.resize_spec(self.min_resize_value))
    maximum = preprocessing.resize_spec(self.max_resize_value)
    object.__setattr__(self, 'max_resize_value', maximum or self.crop_size)
    if (self.max_resize_value[0] > self.crop_size[0] or
        self.max_resize_value[1] > self.crop_size[1]):
      raise ValueError(f'max_resize_value {self.max_resize_value} exceeds the '
                       f'crop size {self.crop_size}: resized images would not '
                       'fit the crop.')
    object.__setattr__(self, 'resize_factor', self.resize_factor or None)

  @classmethod
  def from_dataset_options(cls, options: Any) -> 'EvalPreprocessing':
    """From DatasetOptions (normally `config.eval_dataset_options`)."""
    crop = tuple(options.crop_size)
    if len(crop) != 2:
      raise ValueError(f'eval_dataset_options.crop_size must have two values '
                       f'(height, width), got {list(crop)}.')
    return cls(crop_size=crop,
               min_resize_value=tuple(options.min_resize_value),
               max_resize_value=tuple(options.max_resize_value),
               resize_factor=int(getattr(options, 'resize_factor', 0)))

  def to_json_dict(self) -> Dict[str, Any]:
    return {
        'crop_size': list(self.crop_size),
        'min_resize_value': (list(self.min_resize_value)
                             if self.min_resize_value else None),
        'max_resize_value': list(self.max_resize_value),
        'resize_factor': self.resize_factor,
        'pad_value': preprocessing.MEAN_PIXEL,
    }

  @classmethod
  def from_json_dict(cls, spec: Mapping[str, Any]) -> 'EvalPreprocessing':
    return cls(crop_size=tuple(spec['crop_size']),
               min_resize_value=spec.get('min_resize_value'),
               max_resize_value=spec.get('max_resize_value'),
               resize_factor=spec.get('resize_factor'))

  def resized_size(self, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    """[2] int32: the size an H x W image is resized to before padding."""
    return preprocessing.range_resize_shape(
        height, width, self.min_resize_value, self.max_resize_value,
        self.resize_factor)

  def __call__(self, images: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
    """[B, H, W, 3] images of one size -> (padded crops, resized size).

    Returns:
      [B, crop_h, crop_w, 3] float32 in 0..255 padded with the mean pixel,
      and the [2] int32 size of the image part (top-left) of the crop.
    """
    pixels = tf.cast(images, tf.float32)
    shape = tf.shape(pixels)
    size = self.resized_size(shape[1], shape[2])
    resized = resize.bilinear(pixels, size)
    crop_h, crop_w = self.crop_size
    paddings = [[0, 0], [0, crop_h - size[0]], [0, crop_w - size[1]], [0, 0]]
    # Padded in mean-subtracted space, as the input pipeline does, so the
    # float rounding of the image part matches it bit for bit.
    padded = tf.pad(resized - preprocessing.MEAN_PIXEL,
                    paddings) + preprocessing.MEAN_PIXEL
    padded.set_shape([None, crop_h, crop_w, 3])
    return padded, size


def semantic_class_probability(
    pixel_space_mask_logits: tf.Tensor,  # [B, h, w, N]
    transformer_class_logits: tf.Tensor,  # [B, N, C + 1]
    class_index: tf.Tensor) -> tf.Tensor:
  """p(class | pixel) of a given class per pixel, marginalised over masks.

  p(c | x) = sum_k p(mask k | x) p(c | mask k) (void included in p(. | k))
  is computed at the network's output stride, as the mask logits are, and
  bilinearly interpolated (corners aligned) to the size of `class_index`.
  Only the requested class is interpolated, so the memory cost is that of a
  few [B, H, W] maps, not of an [B, H, W, N] tensor.

  Args:
    pixel_space_mask_logits: mask logits at the output stride.
    transformer_class_logits: class logits, void last.
    class_index: [B, H, W] class-head index wanted at each output pixel
      (normally that of `semantic_pred`).

  Returns:
    [B, H, W] float32 probabilities.
  """
  mask_probs = tf.nn.softmax(
      tf.cast(pixel_space_mask_logits, tf.float32), axis=-1)  # [B, h, w, N]
  class_probs = tf.nn.softmax(
      tf.cast(transformer_class_logits, tf.float32), axis=-1)  # [B, N, C+1]
  marginal = tf.einsum('bhwn,bnc->bhwc', mask_probs, class_probs)
  return resize.bilinear_lookup(marginal, class_index)


def network_logits(model, padded_images: tf.Tensor) -> Dict[str, tf.Tensor]:
  """The network alone on padded crops: float32 mask logits [B, h, w, N] at
  the output stride and class logits [B, N, C + 1] (`LOGITS_KEYS`), all the
  mask-wise merge needs."""
  raw = precision.to_float32(model.predict_raw(
      tf.convert_to_tensor(padded_images, tf.float32), training=False))
  return {key: raw[key] for key in LOGITS_KEYS}


def maps_from_logits(post_processor, logits: Mapping[str, tf.Tensor],
                     crop_size) -> Dict[str, tf.Tensor]:
  """Mask-wise merge of `network_logits`: the output maps [B, crop_h,
  crop_w]. Any `MaskWisePostProcessor` will do, so a client holding the
  logits can re-run the merge with other thresholds.

  `semantic_probs` reads the class marginal at the class-head index that
  post-processing picked for `semantic_pred`.
  """
  mask_logits = logits[keys.PIXEL_SPACE_MASK_LOGITS]
  class_logits = logits[keys.TRANSFORMER_CLASS_LOGITS]
  outputs = post_processor(mask_logits, class_logits, output_size=crop_size,
                           with_class_index=True)
  maps = {key: outputs[key] for key in NEAREST_OUTPUTS}
  maps[keys.SEMANTIC_PROBS] = semantic_class_probability(
      mask_logits, class_logits, outputs[keys.SEMANTIC_CLASS_INDEX])
  return maps


def network_maps(model, padded_images: tf.Tensor) -> Dict[str, tf.Tensor]:
  """Network + mask-wise merge on padded crops: the output maps at the crop
  size (the ONNX and TFLite graphs hold this)."""
  return maps_from_logits(model.post_processor,
                          network_logits(model, padded_images),
                          tf.shape(padded_images)[1:3])


def predict_around_crops(
    run_crops: Callable[[np.ndarray], Mapping[str, np.ndarray]],
    images: np.ndarray,
    spec: EvalPreprocessing) -> Dict[str, np.ndarray]:
  """The serving maps of images, from a graph that runs on padded crops.

  ONNX and TFLite graphs hold `network_maps` at a fixed crop size; the
  resize-and-pad before and the undo after depend on the image size and run
  here, eagerly, with the very ops of the SavedModel's graph, so they add no
  difference of their own.

  Args:
    run_crops: float32 [B, crop_h, crop_w, 3] -> maps [B, crop_h, crop_w].
    images: uint8 [B, H, W, 3], one size.
    spec: the evaluation preprocessing the graph expects.

  Returns:
    NumPy maps [B, H, W] keyed like the SavedModel's outputs.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f'Expected uint8 images, got {images.dtype}.')
  images = _check_images(tf.constant(images))
  padded, resized_size = spec(images)
  maps = {key: tf.convert_to_tensor(value)
          for key, value in run_crops(padded.numpy()).items()}
  restored = preprocessing.undo_eval_preprocessing(
      maps, resized_size, tf.shape(images)[1:3], BILINEAR_OUTPUTS)
  return {key: value.numpy() for key, value in restored.items()}


# File signatures of the formats `decode_image_file` reads (the formats of
# tf.io.decode_image): JPEG, PNG, GIF, BMP, WebP (RIFF....WEBP).
_DECODABLE_PREFIXES = (b'\xff\xd8\xff', b'\x89PNG\r\n\x1a\n', b'GIF87a',
                       b'GIF89a', b'BM')


def is_decodable_file(header: bytes) -> bool:
  """Whether `decode_image_file` reads a file starting with `header`
  (at least its first 12 bytes)."""
  return (header.startswith(_DECODABLE_PREFIXES) or
          (header[:4] == b'RIFF' and header[8:12] == b'WEBP'))


def decode_image_file(image_bytes: tf.Tensor) -> tf.Tensor:
  """An encoded image file -> uint8 [H, W, 3]: the one decoding rule.

  serving_encoded decodes with this function and the predict CLI calls it
  on the file's bytes, so one file gives one prediction both ways:

    * JPEG, PNG, GIF, BMP, WebP; an animation gives its first frame.
    * Pixels are used as stored: EXIF orientation is not applied (rotate the
      file first if the model should see it upright; TensorFlow's decoders
      do not read EXIF).
    * 16 bits per channel -> 8 bits by keeping the high byte (value >> 8),
      whatever the image's range.
    * Grayscale is repeated to RGB, palette images are expanded, an alpha
      channel is dropped (not composited); CMYK JPEGs are converted to RGB
      by TensorFlow's JPEG decoder.
  """
  image = tf.io.decode_image(image_bytes, channels=3, dtype=tf.uint8,
                             expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def _check_images(images: tf.Tensor) -> tf.Tensor:
  """Fails early, with a readable message, on images the model cannot use.

  Signatures fix the dtype and rank; channels and size are checked here,
  before the network's first convolution.
  """
  # The signatures leave the channel count open (None) on purpose: a served
  # graph does not check input shapes against the signature, and a static 3
  # would let graph optimisation fold this check away.
  shape = tf.shape(images)
  expected = ('kMaX-DeepLab serving expects uint8 RGB images [B, H, W, 3] '
              '(serving_default: one image [H, W, 3]) with H, W >= 1')
  checks = [
      tf.debugging.assert_equal(
          shape[-1], 3,
          message=f'{expected}; got another number of channels. Convert '
          'grayscale or RGBA images to RGB first, or send the encoded file '
          'to serving_encoded, which converts them.'),
      tf.debugging.assert_greater(
          tf.reduce_min(shape[1:3]), 0,
          message=f'{expected}; got an empty image.'),
  ]
  with tf.control_dependencies(checks):
    return tf.ensure_shape(tf.identity(images), [None, None, None, 3])


class _Untracked:
  """Holds an object out of sight of TensorFlow's dependency tracking.

  The Keras model must not be serialised as Keras layers (slow, and not
  needed): the SavedModel only needs its variables and the traced graph.
  """

  def __init__(self, value):
    self.value = value


class PanopticServingModule(tf.Module):
  """kMaX-DeepLab with evaluation pre- and post-processing, for export.

  Signatures (see module docstring for the outputs):
    serving_default(image: uint8 [H, W, 3]) -> maps [H, W]
    serving_batch(images: uint8 [B, H, W, 3]) -> maps [B, H, W]
      (one size per batch, like any tensor)
    serving_encoded(image_bytes: string []) -> maps [H, W]
      (a JPEG/PNG/BMP/GIF/WebP file, decoded by `decode_image_file`)
    serving_logits(image: uint8 [H, W, 3]) -> pixel_space_mask_logits,
      transformer_class_logits, resized_size (no merge)
  """

  def __init__(self, model, info: dataset_info_lib.DatasetInfo,
               eval_preprocessing: EvalPreprocessing,
               metadata: Optional[Mapping[str, Any]] = None,
               name: str = 'kmax_serving',
               jit_compile: bool = False):
    super().__init__(name=name)
    self._model = _Untracked(model)
    self._info = _Untracked(info)
    self._preprocessing = _Untracked(eval_preprocessing)
    # Variables only (see `_Untracked`): what the traced graph reads.
    self.model_variables = list(model.variables)
    self._metadata = _Untracked(dict(metadata or {}))
    crop_h, crop_w = eval_preprocessing.crop_size
    padded_spec = tf.TensorSpec([None, crop_h, crop_w, 3], tf.float32,
                                name=keys.INPUT_PADDED_IMAGES)
    # XLA (jit_compile): network and mask-wise merge.
    self.network_logits = tf.function(
        self._network_logits, input_signature=[padded_spec],
        jit_compile=jit_compile)
    self.network = tf.function(self._network, input_signature=[padded_spec],
                               jit_compile=jit_compile)

  @property
  def model(self):
    """The wrapped KMaXDeepLab (not part of the saved object graph)."""
    return self._model.value

  @property
  def metadata(self) -> Dict[str, Any]:
    """What a client needs to read the outputs (labels, names, colours)."""
    info = self._info.value
    space = info.label_space
    meta = {
        'format_version': METADATA_VERSION,
        keys.METADATA_DATASET: info.to_json_dict(),
        keys.METADATA_PREPROCESSING: (
            self._preprocessing.value.to_json_dict()),
        'post_processing': dataclasses.asdict(
            self._model.value.post_processor.options),
        'label_space': {
            'thing_class_ids': list(space.thing_class_ids),
            'stuff_class_ids': list(space.stuff_class_ids),
            'ignore_label': space.ignore_label,
            'label_divisor': space.label_divisor,
        },
        keys.METADATA_SIGNATURES: {
            keys.SIGNATURE_IMAGE: {keys.METADATA_INPUTS: {
                keys.INPUT_IMAGE: 'uint8 [H, W, 3]'}},
            keys.SIGNATURE_BATCH: {keys.METADATA_INPUTS: {
                keys.INPUT_IMAGES: 'uint8 [B, H, W, 3]'}},
            keys.SIGNATURE_ENCODED: {keys.METADATA_INPUTS: {
                keys.INPUT_ENCODED: 'string [] (encoded image file)'}},
            keys.SIGNATURE_LOGITS: {
                keys.METADATA_INPUTS: {keys.INPUT_IMAGE: 'uint8 [H, W, 3]'},
                keys.METADATA_OUTPUTS: {
                    keys.PIXEL_SPACE_MASK_LOGITS:
                        'float32 [h, w, N], mask logits on the padded crop '
                        'at the output stride',
                    keys.TRANSFORMER_CLASS_LOGITS:
                        'float32 [N, C + 1], class logits, void last',
                    keys.RESIZED_SIZE:
                        'int32 [2], size of the image part (top-left) of '
                        'the crop',
                }},
        },
        keys.METADATA_OUTPUTS: {
            keys.PANOPTIC_PRED: 'int32, semantic * label_divisor + instance',
            keys.SEMANTIC_PRED: 'int32, semantic id',
            keys.INSTANCE_PRED: 'int32, instance id (1 where none)',
            keys.INSTANCE_SCORES: 'float32, largest mask probability',
            keys.SEMANTIC_SCORES: 'float32, class confidence of the owning '
                                  'segment (0 where void)',
            keys.SEMANTIC_PROBS:
                'float32, probability of the semantic_pred class',
        },
    }
    meta.update(self._metadata.value)
    return meta

  def metadata_json(self) -> str:
    return json.dumps(self.metadata, indent=1, sort_keys=True)

  def _network_logits(self, padded_images: tf.Tensor
                      ) -> Dict[str, tf.Tensor]:
    return network_logits(self._model.value, padded_images)

  def _network(self, padded_images: tf.Tensor) -> Dict[str, tf.Tensor]:
    """Network + mask-wise merge on padded crops; maps at the crop size."""
    return maps_from_logits(self._model.value.post_processor,
                            self.network_logits(padded_images),
                            tf.shape(padded_images)[1:3])

  def predict_batch(self, images: tf.Tensor) -> Dict[str, tf.Tensor]:
    """uint8 [B, H, W, 3] -> output maps [B, H, W] (traced by signatures)."""
    images = _check_images(images)
    padded, resized_size = self._preprocessing.value(images)
    maps = self.network(padded)
    return preprocessing.undo_eval_preprocessing(
        maps, resized_size, tf.shape(images)[1:3], BILINEAR_OUTPUTS)

  @tf.function(input_signature=[
      tf.TensorSpec([None, None, None, None], tf.uint8,
                    name=keys.INPUT_IMAGES)])
  def serve_batch(self, images):
    return self.predict_batch(images)

  @tf.function(input_signature=[
      tf.TensorSpec([None, None, None], tf.uint8, name=keys.INPUT_IMAGE)])
  def serve_image(self, image):
    maps = self.predict_batch(image[tf.newaxis])
    return {key: value[0] for key, value in maps.items()}

  @tf.function(input_signature=[
      tf.TensorSpec([], tf.string, name=keys.INPUT_ENCODED)])
  def serve_encoded(self, image_bytes):
    image = decode_image_file(image_bytes)
    maps = self.predict_batch(image[tf.newaxis])
    return {key: value[0] for key, value in maps.items()}

  @tf.function(input_signature=[
      tf.TensorSpec([None, None, None], tf.uint8, name=keys.INPUT_IMAGE)])
  def serve_logits(self, image):
    """uint8 [H, W, 3] -> the network's logits on its padded crop and the
    resized size (see the module docstring): the merge left to the caller."""
    images = _check_images(image[tf.newaxis])
    padded, resized_size = self._preprocessing.value(images)
    outputs = {key: value[0]
               for key, value in self.network_logits(padded).items()}
    outputs[keys.RESIZED_SIZE] = resized_size
    return outputs

  def signatures(self) -> Dict[str, Any]:
    """The functions to export, keyed by signature name.

    The tf.functions themselves (their input signatures are fixed), not
    concrete functions: `tf.saved_model.save` traces every function once more
    in its save context, and a concrete function traced before the save
    would be written beside that trace, doubling the graph library (and the
    memory `tf.saved_model.load` takes to read it).
    """
    return {
        keys.SIGNATURE_IMAGE: self.serve_image,
        keys.SIGNATURE_BATCH: self.serve_batch,
        keys.SIGNATURE_ENCODED: self.serve_encoded,
        keys.SIGNATURE_LOGITS: self.serve_logits,
    }


def build_serving_module(model, config,
                         info: Optional[dataset_info_lib.DatasetInfo] = None,
                         extra_metadata: Optional[Mapping[str, Any]] = None,
                         jit_compile: bool = False
                         ) -> PanopticServingModule:
  """The serving module for a built model and its experiment config.

  Preprocessing comes from `config.eval_dataset_options`; the dataset
  descriptor from the same options unless `info` is given.
  """
  options = config.eval_dataset_options
  if info is None:
    info = dataset_info_lib.get_dataset_info(options)
  metadata = {
      'experiment_name': config.experiment_name,
      'backbone': config.model_options.backbone.name,
  }
  metadata.update(extra_metadata or {})
  return PanopticServingModule(model, info,
                               EvalPreprocessing.from_dataset_options(options),
                               metadata, jit_compile=jit_compile)


def dataset_info_from_metadata(metadata: Mapping[str, Any]
                               ) -> dataset_info_lib.DatasetInfo:
  """The DatasetInfo stored in a SavedModel's metadata."""
  return dataset_info_lib.from_json_dict(metadata[keys.METADATA_DATASET],
                                         where='serving metadata')
