"""The serving pre- and post-processing in NumPy, for runtimes without TF.

An ONNX export holds the network only (padded crop in, raw logits out):
tf2onnx cannot convert the mask-wise merge (see `onnx_export`). These
functions do the rest on the host, mirroring the TensorFlow ops of the
SavedModel step by step in float32:

  preprocess(image)            -> padded crop, resized size
  maskwise_postprocess(...)    -> maps at the crop size
  undo_preprocessing(...)      -> maps at the input size

Resizes reproduce TF's legacy corner-aligned kernels (the same sample
positions and interpolation weights); results agree with TF up to float
rounding, which can only matter for values sitting exactly on a threshold.
"""

from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from deeplab_kmax import post_processing
from deeplab_kmax.data import preprocessing
from deeplab_kmax.export import serving

_F32 = np.float32


def range_resize_shape(height: int, width: int,
                       spec: serving.EvalPreprocessing) -> Tuple[int, int]:
  """`preprocessing.range_resize_shape` in NumPy (same float32 rounding)."""
  size = np.array([height, width], np.int64)

  def scaled(size, ratio):
    return np.maximum(np.floor(size.astype(_F32) * _F32(ratio)),
                      preprocessing.MIN_RESIZED_SIDE).astype(np.int64)

  if spec.min_resize_value is not None:
    ratio = max(spec.min_resize_value[0] / np.float64(size[0]),
                spec.min_resize_value[1] / np.float64(size[1]))
    size = scaled(size, _F32(ratio))
  maximum = spec.max_resize_value
  factor = spec.resize_factor
  if maximum is not None:
    if factor:
      maximum = (maximum[0] - (maximum[0] - 1) % factor,
                 maximum[1] - (maximum[1] - 1) % factor)
    ratio = min(maximum[0] / np.float64(size[0]),
                maximum[1] / np.float64(size[1]))
    size = scaled(size, min(_F32(ratio), _F32(1.0)))
  if factor:
    size += (factor - (size - 1) % factor) % factor
  return int(size[0]), int(size[1])


def _corner_aligned_positions(in_size: int, out_size: int) -> np.ndarray:
  """float32 source coordinate of each output index (TF's legacy scaler)."""
  scale = (_F32(in_size - 1) / _F32(out_size - 1) if out_size > 1 else
           _F32(in_size) / _F32(out_size))
  return np.arange(out_size).astype(_F32) * scale


def resize_bilinear(images: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """[B, H, W, C] -> [B, h, w, C] float32, corners aligned (as TF legacy)."""
  images = np.asarray(images, _F32)
  out_h, out_w = (int(s) for s in size)
  in_h, in_w = images.shape[1:3]

  def weights(in_size, out_size):
    position = _corner_aligned_positions(in_size, out_size)
    lower = np.floor(position)
    upper = np.minimum(np.ceil(position), in_size - 1).astype(np.int64)
    lerp = (position - lower).astype(_F32)
    return np.maximum(lower, 0).astype(np.int64), upper, lerp

  top, bottom, y_lerp = weights(in_h, out_h)
  left, right, x_lerp = weights(in_w, out_w)
  x_lerp = x_lerp[None, None, :, None]
  y_lerp = y_lerp[None, :, None, None]
  rows_top, rows_bottom = images[:, top], images[:, bottom]
  upper_row = rows_top[:, :, left] + (
      rows_top[:, :, right] - rows_top[:, :, left]) * x_lerp
  lower_row = rows_bottom[:, :, left] + (
      rows_bottom[:, :, right] - rows_bottom[:, :, left]) * x_lerp
  return upper_row + (lower_row - upper_row) * y_lerp


def resize_nearest(maps: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """[B, H, W] -> [B, h, w], corners aligned, rounding half up (as TF)."""
  maps = np.asarray(maps)
  in_h, in_w = maps.shape[1:3]

  def indices(in_size, out_size):
    position = _corner_aligned_positions(in_size, out_size)
    return np.minimum(np.floor(position + _F32(0.5)).astype(np.int64),
                      in_size - 1)

  return maps[:, indices(in_h, size[0])][:, :, indices(in_w, size[1])]


def corner_aligned_lookup(table: np.ndarray,
                          channel: np.ndarray) -> np.ndarray:
  """NumPy twin of `serving.corner_aligned_lookup`."""
  table = np.asarray(table, _F32)
  _, in_h, in_w, _ = table.shape
  out_h, out_w = channel.shape[1:3]

  def axis(in_size, out_size):
    position = (np.arange(out_size).astype(_F32) *
                (_F32(in_size - 1) / _F32(max(out_size - 1, 1))))
    low = np.floor(position).astype(np.int64)
    return low, np.minimum(low + 1, in_size - 1), position - low.astype(_F32)

  top, bottom, y_weight = axis(in_h, out_h)
  left, right, x_weight = axis(in_w, out_w)
  batch = np.arange(table.shape[0])[:, None, None]

  def read(rows, cols):
    return table[batch, rows[None, :, None], cols[None, None, :], channel]

  x_weight = x_weight[None, None, :]
  y_weight = y_weight[None, :, None]
  upper = read(top, left) + (read(top, right) - read(top, left)) * x_weight
  lower = read(bottom, left) + (
      read(bottom, right) - read(bottom, left)) * x_weight
  return upper + (lower - upper) * y_weight


def preprocess(images: np.ndarray, spec: serving.EvalPreprocessing
               ) -> Tuple[np.ndarray, Tuple[int, int]]:
  """uint8 [B, H, W, 3] -> (float32 [B, crop_h, crop_w, 3], resized size)."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3 or min(images.shape[1:3]) < 1:
    raise ValueError(f'Expected non-empty images [B, H, W, 3], got shape '
                     f'{images.shape}.')
  size = range_resize_shape(images.shape[1], images.shape[2], spec)
  resized = resize_bilinear(images, size)
  crop_h, crop_w = spec.crop_size
  mean = _F32(preprocessing.MEAN_PIXEL)
  padded = np.zeros((images.shape[0], crop_h, crop_w, 3), _F32)
  padded[:, :size[0], :size[1]] = resized - mean
  return padded + mean, size


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
  logits = np.asarray(logits, _F32)
  shifted = np.exp(logits - logits.max(axis=axis, keepdims=True))
  return shifted / shifted.sum(axis=axis, keepdims=True)


def _area_of_own_segment(segment_ids: np.ndarray) -> np.ndarray:
  """Per pixel, the pixel count of its segment in its own image ([B, P])."""
  areas = np.zeros_like(segment_ids)
  for b, ids in enumerate(segment_ids):
    _, inverse, counts = np.unique(ids, return_inverse=True,
                                   return_counts=True)
    areas[b] = counts[inverse.reshape(-1)]
  return areas


def maskwise_postprocess(
    pixel_space_mask_logits: np.ndarray,
    transformer_class_logits: np.ndarray,
    output_size: Sequence[int],
    label_space: post_processing.PanopticLabelSpace,
    options: post_processing.MaskWiseOptions,
) -> Dict[str, np.ndarray]:
  """NumPy twin of `post_processing.maskwise_panoptic_inference`.

  Also returns `semantic_probs` (see `serving.semantic_class_probability`).

  Args:
    pixel_space_mask_logits: [B, h, w, N].
    transformer_class_logits: [B, N, C + 1], void last.
    output_size: (H, W).
    label_space: class-head index -> dataset id mapping.
    options: the mask-wise merge settings.

  Returns:
    [B, H, W] maps keyed like the SavedModel outputs.
  """
  mask_logits = np.asarray(pixel_space_mask_logits, _F32)
  class_probs = softmax(transformer_class_logits)  # [B, N, C+1]
  batch, _, _, num_slots = mask_logits.shape
  non_void = class_probs[..., :-1]
  classes = non_void.argmax(-1)  # [B, N]
  confidence = non_void.max(-1)

  low_res = softmax(mask_logits).reshape(batch, -1, num_slots)
  claimed = low_res > _F32(options.pixel_confidence_threshold)
  claimed_sum = claimed.sum(1).astype(_F32)
  quality = np.where(claimed_sum > 0, (low_res * claimed).sum(1) /
                     np.maximum(claimed_sum, 1), _F32(0))
  score = (np.power(confidence, _F32(options.reorder_class_weight)) *
           np.power(quality, _F32(options.reorder_mask_weight)))
  rank_to_slot = np.argsort(-score, axis=-1, kind='stable')  # [B, N]
  ranked_classes = np.take_along_axis(classes, rank_to_slot, -1)
  ranked_confidence = np.take_along_axis(confidence, rank_to_slot, -1)
  ranked_is_thing = ranked_classes < label_space.num_thing_classes
  pasteable = np.where(
      ranked_is_thing,
      ranked_confidence >= _F32(options.thing_confidence_threshold),
      ranked_confidence >= _F32(options.stuff_confidence_threshold))
  has_detection = (confidence >= _F32(min(
      options.thing_confidence_threshold,
      options.stuff_confidence_threshold))).any(-1)  # [B]

  height, width = (int(s) for s in output_size)
  upsampled = resize_bilinear(mask_logits, (height, width)).reshape(
      batch, height * width, num_slots)
  probs = softmax(upsampled)  # [B, P, N]
  above = probs > _F32(options.pixel_confidence_threshold)
  binary = np.take_along_axis(above, rank_to_slot[:, None, :], -1)

  canvas = np.zeros((batch, height * width), np.int32)
  overlap = _F32(options.overlapping_threshold)
  for rank in range(num_slots):
    mask = binary[:, :, rank]  # [B, P]
    free = mask & (canvas == 0)
    accept = pasteable[:, rank] & (
        free.sum(-1).astype(_F32) > mask.sum(-1).astype(_F32) * overlap)
    canvas = np.where(free & accept[:, None], rank + 1, canvas)

  semantic_ids = np.asarray(label_space.semantic_ids, np.int32)
  assigned = canvas > 0
  owner_rank = np.maximum(canvas - 1, 0)
  owner_class = np.take_along_axis(ranked_classes, owner_rank, -1)
  owner_is_thing = owner_class < label_space.num_thing_classes
  is_thing = assigned & owner_is_thing
  is_stuff = assigned & ~owner_is_thing
  thing_kept = is_thing
  if options.thing_area_limit > 0:
    thing_kept = is_thing & (_area_of_own_segment(
        np.where(is_thing, canvas, 0)) >= options.thing_area_limit)
  stuff_kept = is_stuff
  if options.stuff_area_limit > 0:
    stuff_kept = is_stuff & (_area_of_own_segment(
        np.where(is_stuff, owner_class + 1, 0)) >= options.stuff_area_limit)

  owner_semantic = semantic_ids[owner_class]
  divisor = label_space.label_divisor
  panoptic = np.where(
      thing_kept, owner_semantic * divisor + canvas,
      np.where(stuff_kept, owner_semantic * divisor,
               label_space.ignore_label * divisor))
  semantic_scores = np.where(
      assigned, np.take_along_axis(ranked_confidence, owner_rank, -1), 0)
  instance_scores = np.where(has_detection[:, None], probs.max(-1), 0)

  best_slot = upsampled.argmax(-1)  # [B, P]
  pixel_class = np.take_along_axis(classes, best_slot, -1)
  semantic = semantic_ids[pixel_class]
  # p(c | x) = sum_k p(k | x) p(c | k) at the output stride, interpolated.
  marginal = np.einsum('bhwn,bnc->bhwc', softmax(mask_logits), class_probs)
  semantic_probs = corner_aligned_lookup(
      marginal, pixel_class.reshape(batch, height, width))

  def image(x, dtype):
    return np.asarray(x).reshape(batch, height, width).astype(dtype)

  return {
      serving.PANOPTIC_PRED: image(panoptic, np.int32),
      serving.SEMANTIC_PRED: image(semantic, np.int32),
      serving.INSTANCE_PRED: image(np.maximum(canvas, 1), np.int32),
      serving.INSTANCE_SCORES: image(instance_scores, _F32),
      serving.SEMANTIC_SCORES: image(semantic_scores, _F32),
      serving.SEMANTIC_PROBS: image(semantic_probs, _F32),
  }


def undo_preprocessing(maps: Mapping[str, np.ndarray],
                       resized_size: Sequence[int],
                       output_size: Sequence[int]) -> Dict[str, np.ndarray]:
  """NumPy twin of `serving.undo_preprocessing`."""
  restored = {}
  for key, value in maps.items():
    part = np.asarray(value)[:, :resized_size[0], :resized_size[1]]
    if key in serving.BILINEAR_OUTPUTS:
      restored[key] = resize_bilinear(part[..., None], output_size)[..., 0]
    else:
      restored[key] = resize_nearest(part, output_size)
    restored[key] = restored[key].astype(value.dtype)
  return restored


def label_space_from_metadata(metadata: Mapping[str, object]
                              ) -> post_processing.PanopticLabelSpace:
  """The class-head -> dataset id mapping stored in serving metadata."""
  space = metadata['label_space']
  return post_processing.PanopticLabelSpace(
      thing_class_ids=tuple(space['thing_class_ids']),
      stuff_class_ids=tuple(space['stuff_class_ids']),
      ignore_label=int(space['ignore_label']),
      label_divisor=int(space['label_divisor']))


def options_from_metadata(metadata: Mapping[str, object]
                          ) -> post_processing.MaskWiseOptions:
  return post_processing.MaskWiseOptions(**metadata['post_processing'])


def run_pipeline(
    network, images: np.ndarray, metadata: Mapping[str, object],
    label_space: Optional[post_processing.PanopticLabelSpace] = None
) -> Dict[str, np.ndarray]:
  """Full serving pipeline around `network(padded) -> (mask, class logits)`.

  Args:
    network: callable on float32 [B, crop_h, crop_w, 3] returning
      (pixel_space_mask_logits, transformer_class_logits) as arrays.
    images: uint8 [B, H, W, 3] (one size).
    metadata: serving metadata (preprocessing, dataset, post_processing).
    label_space: overrides the one derived from the metadata.

  Returns:
    [B, H, W] maps like the SavedModel's serving_batch signature.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f'Expected uint8 images, got {images.dtype}.')
  spec = serving.EvalPreprocessing.from_json_dict(metadata['preprocessing'])
  padded, resized_size = preprocess(images, spec)
  mask_logits, class_logits = network(padded)
  maps = maskwise_postprocess(
      mask_logits, class_logits, spec.crop_size,
      label_space or label_space_from_metadata(metadata),
      options_from_metadata(metadata))
  return undo_preprocessing(maps, resized_size, images.shape[1:3])
