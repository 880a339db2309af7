"""Pictures of panoptic maps for people: colours, borders and class names.

A panoptic map stores `semantic_id * label_divisor + instance_id` per pixel.
To look at one, every segment gets its class colour from the dataset's
colormap; thing instances of the same class are told apart by a small,
deterministic shift of that colour (so instance 3 of "person" has the same
colour in every image and at every training step). Segment borders are drawn
on top, and segments large enough to hold text get their class name.

Everything here works on numpy arrays (and PIL for text). `tf_panoptic_overlay`
wraps the overlay for TensorBoard image summaries inside tf.function.
"""

from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont
from scipy import ndimage
import tensorflow as tf

from deeplab_kmax.data import dataset_info as dataset_info_lib

Color = Tuple[int, int, int]

VOID_COLOR: Color = (0, 0, 0)
BOUNDARY_COLOR: Color = (255, 255, 255)
# Largest per-channel shift that tells instances of one class apart while
# keeping them recognisably that class.
DEFAULT_JITTER = 48


def dataset_colormap(info: dataset_info_lib.DatasetInfo) -> np.ndarray:
  """[num_ids, 3] uint8 class colours, indexed by semantic id; void black.

  Classes the descriptor gives no colour get the deterministic palette.
  """
  size = max(info.num_classes, info.ignore_label + 1)
  table = np.zeros((size, 3), np.uint8)
  for class_id in range(size):
    if class_id == info.ignore_label:
      continue
    table[class_id] = info.colormap.get(
        class_id, dataset_info_lib.palette_color(class_id))
  return table


def split_panoptic(panoptic: np.ndarray,
                   label_divisor: int) -> Tuple[np.ndarray, np.ndarray]:
  """(semantic, instance) ids of a panoptic map."""
  panoptic = np.asarray(panoptic).astype(np.int64)
  return panoptic // label_divisor, panoptic % label_divisor


def _instance_offsets(instance_ids: np.ndarray, max_shift: int) -> np.ndarray:
  """[..., 3] int offsets in [-max_shift, max_shift], zero for instance 0.

  A multiplicative hash spreads consecutive ids over the colour cube, so
  neighbouring instances (ids 1, 2, 3, ...) get visibly different shifts.
  """
  ids = np.asarray(instance_ids).astype(np.uint64)
  hashed = (ids * np.uint64(2654435761)) & np.uint64(0xFFFFFF)
  channels = np.stack([(hashed >> np.uint64(shift)) & np.uint64(0xFF)
                       for shift in (0, 8, 16)], axis=-1).astype(np.int64)
  offsets = (channels * (2 * max_shift + 1)) // 256 - max_shift
  return np.where(ids[..., None] > 0, offsets, 0)


def instance_color(base: Sequence[int], instance_id: int,
                   max_shift: int = DEFAULT_JITTER) -> Color:
  """The colour of one instance: its class colour, deterministically shifted.

  Instance 0 (stuff, or a thing without instance) keeps the class colour.
  """
  offset = _instance_offsets(np.asarray(instance_id), max_shift)
  color = np.clip(np.asarray(base, np.int64) + offset, 0, 255)
  return tuple(int(c) for c in color)


def colorize_panoptic(panoptic: np.ndarray, label_divisor: int,
                      colormap: np.ndarray, ignore_label: int,
                      max_shift: int = DEFAULT_JITTER) -> np.ndarray:
  """[..., H, W] panoptic ids -> [..., H, W, 3] uint8 colours.

  Void pixels (semantic id == ignore_label) and semantic ids outside the
  colormap are black.
  """
  semantic, instance = split_panoptic(panoptic, label_divisor)
  colormap = np.asarray(colormap, np.int64)
  known = (semantic >= 0) & (semantic < len(colormap))
  base = colormap[np.where(known, semantic, 0)]
  colors = np.clip(base + _instance_offsets(instance, max_shift), 0, 255)
  colors[~known | (semantic == ignore_label)] = VOID_COLOR
  return colors.astype(np.uint8)


def segment_boundaries(panoptic: np.ndarray, thickness: int = 1) -> np.ndarray:
  """Bool [..., H, W]: pixels with a 4-neighbour in another segment.

  Both sides of a border are marked, so a border is about `2 * thickness`
  pixels wide and symmetric.
  """
  panoptic = np.asarray(panoptic)
  if panoptic.ndim < 2:
    raise ValueError(f'Expected a [..., H, W] map, got shape {panoptic.shape}.')
  edge = np.zeros(panoptic.shape, bool)
  vertical = panoptic[..., 1:, :] != panoptic[..., :-1, :]
  horizontal = panoptic[..., :, 1:] != panoptic[..., :, :-1]
  edge[..., 1:, :] |= vertical
  edge[..., :-1, :] |= vertical
  edge[..., :, 1:] |= horizontal
  edge[..., :, :-1] |= horizontal
  if thickness > 1:
    structure = np.zeros((3,) * panoptic.ndim, bool)
    cross = ndimage.generate_binary_structure(2, 1)
    structure[(1,) * (panoptic.ndim - 2)] = cross
    edge = ndimage.binary_dilation(edge, structure, iterations=thickness - 1)
  return edge


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim < 3 or image.shape[-1] != 3:
    raise ValueError(f'Expected an RGB image [..., H, W, 3], got shape '
                     f'{image.shape}.')
  return np.clip(image, 0, 255).astype(np.uint8)


def panoptic_overlay(image: np.ndarray, panoptic: np.ndarray,
                     label_divisor: int, colormap: np.ndarray,
                     ignore_label: int, alpha: float = 0.6,
                     boundary_color: Optional[Color] = BOUNDARY_COLOR,
                     boundary_thickness: int = 1,
                     max_shift: int = DEFAULT_JITTER) -> np.ndarray:
  """Segment colours blended over the image, with borders; void untouched.

  Args:
    image: [..., H, W, 3] RGB in 0..255 (any dtype).
    panoptic: [..., H, W] panoptic ids.
    label_divisor: the dataset's panoptic label divisor.
    colormap: [num_ids, 3] class colours, e.g. from `dataset_colormap`.
    ignore_label: the void semantic id.
    alpha: weight of the segment colour.
    boundary_color: colour of segment borders; None draws none.
    boundary_thickness: see `segment_boundaries`.
    max_shift: instance colour jitter, see `instance_color`.

  Returns:
    [..., H, W, 3] uint8.
  """
  image = _as_rgb_uint8(image)
  panoptic = np.asarray(panoptic)
  if image.shape[:-1] != panoptic.shape:
    raise ValueError(f'image {image.shape} and panoptic {panoptic.shape} must '
                     'agree on [..., H, W].')
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f'alpha must be in [0, 1], got {alpha}.')
  colors = colorize_panoptic(panoptic, label_divisor, colormap, ignore_label,
                             max_shift)
  semantic, _ = split_panoptic(panoptic, label_divisor)
  weight = np.where(semantic == ignore_label, 0.0, alpha)[..., None]
  blended = (1.0 - weight) * image + weight * colors
  if boundary_color is not None:
    blended[segment_boundaries(panoptic, boundary_thickness)] = boundary_color
  return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def label_anchor(mask: np.ndarray) -> Tuple[int, int]:
  """(row, col) of the pixel deepest inside a mask, where text reads best.

  Unlike the centroid, this always lies inside the segment (also for rings
  and L shapes).
  """
  mask = np.asarray(mask, bool)
  if not mask.any():
    raise ValueError('Cannot place a label on an empty mask.')
  depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
  row, col = np.unravel_index(int(np.argmax(depth)), depth.shape)
  return int(row), int(col)


def _font(image_height: int, image_width: int) -> ImageFont.ImageFont:
  size = int(np.clip(min(image_height, image_width) / 40, 10, 28))
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font.
    return ImageFont.load_default()


def draw_segment_names(image: np.ndarray, panoptic: np.ndarray,
                       label_divisor: int, class_names: Mapping[int, str],
                       ignore_label: int,
                       scores: Optional[Mapping[int, float]] = None,
                       min_area_fraction: float = 0.002) -> np.ndarray:
  """Writes each segment's class name (and score) inside the segment.

  Args:
    image: [H, W, 3] RGB.
    panoptic: [H, W] panoptic ids.
    label_divisor: the dataset's panoptic label divisor.
    class_names: {semantic id: name}; unknown ids are written as numbers.
    ignore_label: void semantic id (never labelled).
    scores: optional {panoptic id: score}, appended to the name.
    min_area_fraction: segments smaller than this fraction of the image get
      no text (it would hide them).

  Returns:
    [H, W, 3] uint8 with the names drawn on a dark box for contrast.
  """
  image = _as_rgb_uint8(image)
  panoptic = np.asarray(panoptic)
  if image.ndim != 3 or image.shape[:2] != panoptic.shape:
    raise ValueError(f'Expected image [H, W, 3] and panoptic [H, W], got '
                     f'{image.shape} and {panoptic.shape}.')
  canvas = Image.fromarray(image)
  draw = ImageDraw.Draw(canvas)
  font = _font(*panoptic.shape)
  min_area = max(1, int(min_area_fraction * panoptic.size))
  ids, areas = np.unique(panoptic, return_counts=True)
  for segment_id, area in zip(ids.tolist(), areas.tolist()):
    semantic = segment_id // label_divisor
    if semantic == ignore_label or area < min_area:
      continue
    text = class_names.get(semantic, str(semantic))
    if scores is not None and segment_id in scores:
      text = f'{text} {scores[segment_id]:.2f}'
    row, col = label_anchor(panoptic == segment_id)
    left, top, right, bottom = draw.textbbox((col, row), text, font=font,
                                             anchor='mm')
    draw.rectangle((left - 2, top - 1, right + 2, bottom + 1), fill=(0, 0, 0))
    draw.text((col, row), text, fill=(255, 255, 255), font=font, anchor='mm')
  return np.asarray(canvas)


def upscale_for_display(image: np.ndarray, panoptic: np.ndarray,
                        min_long_side: int) -> Tuple[np.ndarray, np.ndarray]:
  """Enlarges a small image and its map by a whole factor for viewing.

  The map is repeated pixel by pixel (ids stay ids, borders stay sharp); the
  image is resampled smoothly. Text drawn afterwards is then small relative
  to the segments instead of covering half of a 128-pixel picture.
  """
  image = _as_rgb_uint8(image)
  panoptic = np.asarray(panoptic)
  long_side = max(panoptic.shape[:2])
  factor = -(-int(min_long_side) // long_side) if long_side else 1
  if factor <= 1:
    return image, panoptic
  height, width = panoptic.shape[:2]
  resized = Image.fromarray(image).resize((width * factor, height * factor),
                                          Image.Resampling.BICUBIC)
  return (np.asarray(resized),
          np.repeat(np.repeat(panoptic, factor, axis=0), factor, axis=1))


def visualize_panoptic(image: np.ndarray, panoptic: np.ndarray,
                       info: dataset_info_lib.DatasetInfo,
                       scores: Optional[Mapping[int, float]] = None,
                       alpha: float = 0.6,
                       draw_names: bool = True,
                       min_long_side: int = 0) -> np.ndarray:
  """The human-facing picture: overlay, borders and class names.

  Args:
    image: [H, W, 3] RGB.
    panoptic: [H, W] panoptic ids in `info`'s label space.
    info: the dataset descriptor (divisor, void, colours, names).
    scores: optional {panoptic id: score} written after the names.
    alpha: weight of the segment colours.
    draw_names: write class names into the segments.
    min_long_side: enlarge smaller pictures by a whole factor until their
      long side reaches this (0: keep the input size).

  Returns:
    [H', W', 3] uint8 (the input size unless enlarged).
  """
  if min_long_side:
    image, panoptic = upscale_for_display(image, panoptic, min_long_side)
  picture = panoptic_overlay(image, panoptic, info.panoptic_label_divisor,
                             dataset_colormap(info), info.ignore_label, alpha)
  if draw_names:
    picture = draw_segment_names(picture, panoptic,
                                 info.panoptic_label_divisor, info.class_names,
                                 info.ignore_label, scores)
  return picture


def titled_grid(rows: Sequence[Sequence[np.ndarray]],
                titles: Sequence[str], gap: int = 6,
                background: Color = (255, 255, 255)) -> np.ndarray:
  """Pictures in a grid under one title per column, e.g. image | truth |
  prediction for a few images; every picture of a column has its width."""
  if not rows or any(len(row) != len(titles) for row in rows):
    raise ValueError(f'Expected rows of {len(titles)} pictures (one per '
                     f'title {list(titles)}).')
  rows = [[_as_rgb_uint8(picture) for picture in row] for row in rows]
  widths = [max(row[c].shape[1] for row in rows) for c in range(len(titles))]
  heights = [max(picture.shape[0] for picture in row) for row in rows]
  font = _font(heights[0], sum(widths))
  title_height = int(font.size * 1.8) if hasattr(font, 'size') else 20
  sheet = Image.new('RGB', (sum(widths) + gap * (len(widths) + 1),
                            title_height + sum(heights) + gap * len(rows)),
                    background)
  draw = ImageDraw.Draw(sheet)
  left = gap
  for title, width in zip(titles, widths):
    draw.text((left + width // 2, title_height // 2), title, fill=(0, 0, 0),
              font=font, anchor='mm')
    left += width + gap
  top = title_height
  for row, height in zip(rows, heights):
    left = gap
    for picture, width in zip(row, widths):
      sheet.paste(Image.fromarray(picture), (left, top))
      left += width + gap
    top += height + gap
  return np.asarray(sheet)


def segment_color_legend(panoptic: np.ndarray,
                         info: dataset_info_lib.DatasetInfo
                         ) -> Dict[int, Color]:
  """{panoptic id: colour drawn for it} for the segments in a map."""
  colormap = dataset_colormap(info)
  ids = np.unique(np.asarray(panoptic))
  colors = colorize_panoptic(ids, info.panoptic_label_divisor, colormap,
                             info.ignore_label)
  return {int(i): tuple(int(c) for c in color)
          for i, color in zip(ids.tolist(), colors)}


def tf_panoptic_overlay(images: tf.Tensor, panoptic: tf.Tensor,
                        label_divisor: int, colormap: np.ndarray,
                        ignore_label: int, alpha: float = 0.6,
                        boundary_color: Optional[Color] = BOUNDARY_COLOR
                        ) -> tf.Tensor:
  """`panoptic_overlay` as a TF op (usable in tf.function), for summaries.

  Args:
    images: [B, H, W, 3] in 0..255, any real dtype.
    panoptic: [B, H, W] integer panoptic ids.
    label_divisor, colormap, ignore_label, alpha, boundary_color: as in
      `panoptic_overlay`.

  Returns:
    [B, H, W, 3] uint8, ready for `tf.summary.image`.
  """
  colormap = np.asarray(colormap, np.uint8)

  def overlay(batch_images, batch_panoptic):
    return panoptic_overlay(batch_images, batch_panoptic, label_divisor,
                            colormap, ignore_label, alpha, boundary_color)

  images = tf.convert_to_tensor(images)
  panoptic = tf.convert_to_tensor(panoptic)
  result = tf.numpy_function(overlay, [images, panoptic], tf.uint8,
                             stateful=False)
  result.set_shape(panoptic.shape.concatenate([3]))
  return result
