"""A synthetic COCO-panoptic-format dataset: no download, seconds to build.

Scenes are 128x128 by default: textured stuff (sky with clouds, grass, a lake
of rippled water) under a wavy horizon, two to five thing instances (discs,
squares, triangles) that occlude one another and often touch a shape of the
same class, each coloured from its class's (overlapping) colour family with a
random pattern, sometimes a crowd (a cluster of small discs annotated as one iscrowd
segment) and sometimes unlabelled debris (void). Files follow COCO's panoptic
layout exactly, with gappy category ids like COCO's, so the demo exercises
the same converter, category remapping and crowd handling as real data:

  <root>/coco/{train2017,val2017}/<12-digit id>.jpg
  <root>/coco/annotations/panoptic_{train,val}2017.json
  <root>/coco/annotations/panoptic_{train,val}2017/<12-digit id>.png
  <root>/tfrecord/{train,val}-SSSSS-of-NNNNN.tfrecord
  <root>/demo_shapes.json                         (dataset descriptor)

The descriptor is written last and removed first: it marks a complete
build, so an interrupted build is redone rather than reused (`is_complete`).

Every image is drawn from its own seed (seed, split, index), so a subset (the
first n images) is identical to the same images of a larger build.
"""

import json
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

from deeplab_kmax.data import coco_panoptic
from deeplab_kmax.data import dataset_info as dataset_info_lib
from deeplab_kmax.data import panoptic_conversion
from deeplab_kmax.data import shard_files

NAME = 'demo_shapes'
DESCRIPTOR_FILE = f'{NAME}.json'

# (contiguous id, COCO-style source id, name, isthing, colour).
_CLASSES = (
    (1, 11, 'disc', True, (220, 60, 60)),
    (2, 12, 'square', True, (240, 200, 40)),
    (3, 13, 'triangle', True, (150, 70, 200)),
    (4, 21, 'sky', False, (110, 170, 230)),
    (5, 22, 'grass', False, (60, 150, 60)),
    (6, 23, 'water', False, (30, 80, 160)),
)
_SPLIT_ID_BASE = {'train': 0, 'val': 500_000}
# Instances occluded below this many pixels are dropped: at the model's
# stride-4 mask resolution they would cover about two mask pixels.
_MIN_AREA = 40
# Shape sizes (the radius of the circumscribed circle at 128x128): big enough
# that a narrow network tells a disc from a square at stride 4.
_THING_RADIUS = (11.0, 24.0)
_TOUCHING_PROBABILITY = 0.4


def dataset_info() -> dataset_info_lib.DatasetInfo:
  """The demo's descriptor: 7 classes (void 0, 3 things, 3 stuff)."""
  return dataset_info_lib.from_json_dict({
      'name': NAME,
      'ignore_label': 0,
      'panoptic_label_divisor': 256,
      'classes': [{'id': i, 'source_id': s, 'name': n, 'isthing': t,
                   'color': list(c)} for i, s, n, t, c in _CLASSES],
  }, where='demo dataset')


def _source_id(name: str) -> int:
  return next(s for _, s, n, _, _ in _CLASSES if n == name)


def _noise(rng: np.random.Generator, height: int, width: int,
           cell: int) -> np.ndarray:
  """Smooth noise in [0, 1]: bilinearly upsampled random grid."""
  grid = rng.random((height // cell + 2, width // cell + 2))
  ys = np.arange(height) / cell
  xs = np.arange(width) / cell
  y0, x0 = ys.astype(int), xs.astype(int)
  fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
  top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
  bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
  return top * (1 - fy) + bottom * fy


class _Canvas:
  """An RGB image and its segment-id map, painted back to front."""

  def __init__(self, height: int, width: int):
    self.height, self.width = height, width
    self.rgb = np.zeros((height, width, 3), np.float64)
    self.ids = np.zeros((height, width), np.int64)
    self.yy, self.xx = np.mgrid[0:height, 0:width]

  def paint(self, mask: np.ndarray, texture: np.ndarray, segment_id: int):
    self.rgb[mask] = texture[mask] if texture.ndim == 3 else texture
    self.ids[mask] = segment_id


def _stuff(canvas: _Canvas, rng: np.random.Generator, ids: List[int]):
  """Sky above a wavy horizon, grass below, maybe a lake. Returns segments."""
  h, w = canvas.height, canvas.width
  yy, xx = canvas.yy, canvas.xx
  horizon = (rng.uniform(0.3, 0.55) * h + rng.uniform(2, 6) * np.sin(
      xx / w * rng.uniform(2, 7) + rng.uniform(0, 6.3)))
  sky = yy < horizon
  gradient = (yy / h)[..., None]
  sky_rgb = (np.array([150, 200, 250]) * (1 - gradient) +
             np.array([60, 120, 210]) * gradient)
  clouds = _noise(rng, h, w, 16)[..., None]
  sky_rgb = np.where(clouds > 0.7, 245.0, sky_rgb)
  grass_rgb = (np.array([50, 140, 45]) + 50 * (_noise(rng, h, w, 4)[..., None]
                                              - 0.5)
               + rng.normal(0, 12, (h, w, 1)))
  segments = []
  for name, mask, texture in (('sky', sky, sky_rgb),
                              ('grass', ~sky, grass_rgb)):
    segment_id = ids.pop()
    canvas.paint(mask, texture, segment_id)
    segments.append((segment_id, name, False))
  if rng.random() < 0.6:  # A lake on the ground.
    cy = rng.uniform(horizon.max() + 6, h)
    cx, ry, rx = rng.uniform(0, w), rng.uniform(6, 18), rng.uniform(15, 45)
    lake = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1) & ~sky
    if lake.sum() >= _MIN_AREA:
      ripples = np.sin(yy * rng.uniform(0.8, 1.4) + 0.3 * np.sin(xx * 0.3))
      water = (np.array([30, 80, 170]) + 25 * ripples[..., None])
      segment_id = ids.pop()
      canvas.paint(lake, water, segment_id)
      segments.append((segment_id, 'water', False))
  return segments


def _shape_mask(canvas: _Canvas, kind: str, cy: float, cx: float,
                radius: float, angle: float) -> np.ndarray:
  dy, dx = canvas.yy - cy, canvas.xx - cx
  if kind == 'disc':
    return dy ** 2 + dx ** 2 <= radius ** 2
  # Rotate into the shape's frame.
  u = dx * np.cos(angle) + dy * np.sin(angle)
  v = -dx * np.sin(angle) + dy * np.cos(angle)
  if kind == 'square':
    return (np.abs(u) <= radius * 0.85) & (np.abs(v) <= radius * 0.85)
  # Equilateral triangle: inside three half-planes.
  # Inradius 0.7 r: a triangle's area (2.5 r^2) then comes close to the
  # square's (2.9 r^2) and the disc's (3.1 r^2).
  inside = np.ones_like(u, bool)
  for k in range(3):
    theta = angle + np.pi / 2 + k * 2 * np.pi / 3
    inside &= (dx * np.cos(theta) + dy * np.sin(theta)) <= radius * 0.7
  return inside


# The colour family typical of each thing class (hue ranges in degrees that
# overlap their neighbours', like fruit or traffic signs), with random
# saturation, brightness and pattern: colour is a strong cue but not a
# certain one, and the outline still matters where the ranges overlap.
_CLASS_HUES = {'disc': (-40.0, 50.0), 'square': (40.0, 170.0),
               'triangle': (160.0, 300.0)}


def _hue_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
  hue = (hue % 360.0) / 60.0
  chroma = value * saturation
  x = chroma * (1 - abs(hue % 2 - 1))
  rgb = [(chroma, x, 0), (x, chroma, 0), (0, chroma, x), (0, x, chroma),
         (x, 0, chroma), (chroma, 0, x)][int(hue) % 6]
  return (np.array(rgb) + value - chroma) * 255.0


def _thing_texture(canvas: _Canvas, rng: np.random.Generator,
                   kind: str) -> np.ndarray:
  """A colour from the class's family, plain or with a random pattern."""
  hue = rng.uniform(*_CLASS_HUES[kind])
  base = _hue_to_rgb(hue, rng.uniform(0.45, 0.95), rng.uniform(0.55, 0.95))
  other = _hue_to_rgb(hue + rng.uniform(-20, 20), rng.uniform(0.2, 0.9),
                      rng.uniform(0.35, 0.95))
  pattern = rng.integers(3)
  period = rng.uniform(3, 6)
  if pattern == 0:  # Stripes.
    angle = rng.uniform(0, np.pi)
    wave = np.sin((canvas.xx * np.cos(angle) + canvas.yy * np.sin(angle))
                  / period) > 0
  elif pattern == 1:  # Checker.
    wave = ((canvas.xx // period).astype(int) +
            (canvas.yy // period).astype(int)) % 2 == 0
  else:  # Plain.
    wave = np.zeros_like(canvas.xx, bool)
  texture = np.where(wave[..., None], other, base)
  shading = 1.0 + 0.15 * (canvas.yy / canvas.height - 0.5)[..., None]
  return texture * shading


def _things(canvas: _Canvas, rng: np.random.Generator, ids: List[int]):
  """2-5 shapes; some placed touching an earlier shape of the same kind.

  Touching same-class pairs are what instance separation is about: their
  union is one connected region of one class, and only the outlines tell
  the instances apart.
  """
  segments = []
  scale = min(canvas.height, canvas.width) / 128
  placed = []  # (kind, cy, cx, radius)
  for _ in range(rng.integers(2, 6)):
    radius = rng.uniform(*_THING_RADIUS) * scale
    if placed and rng.random() < _TOUCHING_PROBABILITY:
      kind, py, px, pr = placed[rng.integers(len(placed))]
      direction = rng.uniform(0, 2 * np.pi)
      distance = (pr + radius) * rng.uniform(0.8, 0.95)
      cy, cx = py + distance * np.sin(direction), px + distance * np.cos(
          direction)
    else:
      kind = ('disc', 'square', 'triangle')[rng.integers(3)]
      cy = rng.uniform(0.3, 0.95) * canvas.height
      cx = rng.uniform(0.1, 0.9) * canvas.width
    mask = _shape_mask(canvas, kind, cy, cx, radius, rng.uniform(0, np.pi))
    if mask.sum() < _MIN_AREA:
      continue
    segment_id = ids.pop()
    canvas.paint(mask, _thing_texture(canvas, rng, kind), segment_id)
    segments.append((segment_id, kind, False))
    placed.append((kind, cy, cx, radius))
  return segments


def _crowd(canvas: _Canvas, rng: np.random.Generator, ids: List[int]):
  """A cluster of small discs labelled as one crowd segment."""
  scale = min(canvas.height, canvas.width) / 128
  cy = rng.uniform(0.5, 0.9) * canvas.height
  cx = rng.uniform(0.1, 0.9) * canvas.width
  mask = np.zeros((canvas.height, canvas.width), bool)
  for _ in range(rng.integers(6, 13)):
    mask |= _shape_mask(canvas, 'disc', cy + rng.normal(0, 6 * scale),
                        cx + rng.normal(0, 10 * scale),
                        rng.uniform(1.5, 3) * scale, 0.0)
  segment_id = ids.pop()
  canvas.paint(mask, rng.uniform(40, 255, 3), segment_id)
  return [(segment_id, 'disc', True)]


def _debris(canvas: _Canvas, rng: np.random.Generator):
  """Unlabelled pixels: a dark pole or blob that belongs to no segment."""
  if rng.random() < 0.5:
    x = rng.integers(0, canvas.width - 3)
    mask = ((canvas.xx >= x) & (canvas.xx < x + rng.integers(1, 4)) &
            (canvas.yy >= rng.integers(0, canvas.height // 2)))
  else:
    mask = _shape_mask(canvas, 'disc', rng.uniform(0, canvas.height),
                       rng.uniform(0, canvas.width), rng.uniform(2, 5), 0.0)
  canvas.paint(mask, np.array([40.0, 35.0, 30.0]), 0)


def render_scene(seed: Sequence[int], height: int = 128, width: int = 128
                 ) -> Tuple[np.ndarray, np.ndarray, List[Dict]]:
  """One scene: (uint8 RGB, int segment-id map, COCO segments_info)."""
  rng = np.random.default_rng(list(seed))
  canvas = _Canvas(height, width)
  # Random 24-bit segment ids (several use all three PNG bytes).
  ids = list(dict.fromkeys(int(i) for i in rng.integers(1, 1 << 24, 40)))[:32]
  segments = _stuff(canvas, rng, ids)
  if rng.random() < 0.3:
    segments += _crowd(canvas, rng, ids)
  segments += _things(canvas, rng, ids)
  if rng.random() < 0.4:
    _debris(canvas, rng)
  rgb = np.clip(canvas.rgb + rng.normal(0, 4, canvas.rgb.shape), 0, 255)
  info = []
  for segment_id, name, is_crowd in segments:
    mask = canvas.ids == segment_id
    area = int(mask.sum())
    if area == 0:  # Fully painted over.
      continue
    ys, xs = np.nonzero(mask)
    info.append({
        'id': segment_id,
        'category_id': _source_id(name),
        'iscrowd': int(is_crowd),
        'area': area,
        'bbox': [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                 int(ys.max() - ys.min() + 1)],
    })
  return rgb.astype(np.uint8), canvas.ids, info


def _remove_other_images(folder: str, suffix: str,
                         entries: Sequence[Dict[str, object]]) -> None:
  """Drops demo files of an earlier, bigger build (they have no annotation)."""
  keep = {entry['file_name'] for entry in entries}
  for name in os.listdir(folder):
    if (name not in keep and name.endswith(suffix) and
        name[:-len(suffix)].isdigit() and len(name) == 12 + len(suffix)):
      os.remove(os.path.join(folder, name))


def write_coco_split(coco_root: str, split: str, num_images: int, seed: int,
                     height: int, width: int) -> str:
  """Renders a split in COCO panoptic layout; returns the JSON path."""
  image_folder, json_path, png_folder = panoptic_conversion.coco_split_paths(
      coco_root, split)
  os.makedirs(image_folder, exist_ok=True)
  os.makedirs(png_folder, exist_ok=True)
  images, annotations = [], []
  for index in range(num_images):
    image_id = _SPLIT_ID_BASE[split] + index + 1
    stem = f'{image_id:012d}'
    rgb, segment_ids, segments = render_scene(
        (seed, _SPLIT_ID_BASE[split], index), height, width)
    Image.fromarray(rgb).save(os.path.join(image_folder, stem + '.jpg'),
                              quality=95)
    Image.fromarray(coco_panoptic.encode_segment_ids(segment_ids)).save(
        os.path.join(png_folder, stem + '.png'))
    images.append({'id': image_id, 'file_name': stem + '.jpg',
                   'height': height, 'width': width})
    annotations.append({'image_id': image_id, 'file_name': stem + '.png',
                        'segments_info': segments})
  _remove_other_images(image_folder, '.jpg', images)
  _remove_other_images(png_folder, '.png', annotations)
  categories = [{'id': s, 'name': n, 'isthing': int(t), 'color': list(c),
                 'supercategory': 'shape' if t else 'scene'}
                for _, s, n, t, c in _CLASSES]
  with open(json_path, 'w') as f:
    json.dump({'images': images, 'annotations': annotations,
               'categories': categories}, f)
  return json_path


def build(output_dir: str, num_train: int = 1000, num_val: int = 64,
          seed: int = 0, height: int = 128, width: int = 128,
          num_shards: int = 4, num_workers: int = 1,
          show_progress: bool = False) -> Dict[str, object]:
  """Renders the demo dataset and converts it to TFRecords.

  Returns paths: 'coco_root', 'descriptor', 'tfrecord_dir' and the file
  patterns 'train_pattern' / 'val_pattern'.
  """
  coco_root = os.path.join(output_dir, 'coco')
  tfrecord_dir = os.path.join(output_dir, 'tfrecord')
  descriptor = os.path.join(output_dir, DESCRIPTOR_FILE)
  if os.path.exists(descriptor):  # No longer complete from here on.
    os.remove(descriptor)
  splits = {'train': num_train, 'val': num_val}
  for split, count in splits.items():
    write_coco_split(coco_root, split, count, seed, height, width)
  info = dataset_info()
  panoptic_conversion.convert_coco_panoptic(
      coco_root, tfrecord_dir, [s for s, n in splits.items() if n > 0],
      num_shards, info, num_workers=num_workers, show_progress=show_progress)
  info.save(descriptor)
  return _paths(output_dir)


def is_complete(output_dir: str) -> bool:
  """Whether a finished build is there: descriptor and full shard sets."""
  tfrecord_dir = os.path.join(output_dir, 'tfrecord')
  return (os.path.isfile(os.path.join(output_dir, DESCRIPTOR_FILE)) and
          all(shard_files.is_complete_split(tfrecord_dir, split)
              for split in ('train', 'val')))


def _paths(output_dir: str) -> Dict[str, object]:
  coco_root = os.path.join(output_dir, 'coco')
  tfrecord_dir = os.path.join(output_dir, 'tfrecord')
  descriptor = os.path.join(output_dir, DESCRIPTOR_FILE)
  return {
      'coco_root': coco_root,
      'descriptor': descriptor,
      'tfrecord_dir': tfrecord_dir,
      'train_pattern': os.path.join(tfrecord_dir, 'train-*.tfrecord'),
      'val_pattern': os.path.join(tfrecord_dir, 'val-*.tfrecord'),
  }
