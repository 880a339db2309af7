"""COCO-format panoptic annotations -> DeepLab2 panoptic labels -> TFRecords.

A COCO-format panoptic dataset stores, per image, a PNG whose colour encodes a
segment id (R + 256 G + 65536 B) and a JSON list of segments (id, category_id,
iscrowd, area). DeepLab2 trains on one int32 map per image,

    panoptic = contiguous_semantic_id * divisor + instance_id,

where thing instances are numbered 1, 2, ... per class in JSON order, stuff has
instance 0, pixels of no segment are void (ignore label, instance 0) and crowd
thing segments become void too (by default) so they are neither trained on nor
counted. This module builds those maps and writes them, DeepLab2-style, to
sharded TFRecords. It is shared by the COCO, Cityscapes, ADE20K and demo
converters.

The per-image work is free of TensorFlow so it can run in worker processes;
only `write_split` (the TFRecord writer) imports it. Worker processes end with
the converter, even when it is killed (SIGKILL).

Images are stored as the bytes of their file, whatever their colour mode
(RGB, grayscale, CMYK JPEGs all occur in COCO): readers decode them with
three channels, as DeepLab2 does.
"""

import concurrent.futures
import ctypes
import dataclasses
import io
import json
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from PIL import ImageOps

from deeplab_kmax import cli_errors
from deeplab_kmax.data import coco_panoptic
from deeplab_kmax.data import dataset_info as dataset_info_lib
from deeplab_kmax.data import shard_files
from deeplab_kmax.data.label_format import encode_panoptic_label


class ConversionError(ValueError, cli_errors.ExpectedError):
  """Bad input data; the message names the image and file concerned.

  The converters print it alone, without a traceback (`cli_errors`).
  """


@dataclasses.dataclass(frozen=True)
class LabelSpec:
  """How source segments become panoptic ids (derived from a DatasetInfo)."""
  source_to_contiguous: Mapping[int, int]
  thing_ids: frozenset
  ignore_label: int
  divisor: int
  treat_crowd_as_ignore: bool = True
  check_area: bool = True

  @classmethod
  def from_dataset_info(cls, info: dataset_info_lib.DatasetInfo,
                        **overrides) -> 'LabelSpec':
    return cls(source_to_contiguous=dict(info.source_to_contiguous),
               thing_ids=frozenset(info.class_has_instances_list),
               ignore_label=info.ignore_label,
               divisor=info.panoptic_label_divisor, **overrides)


@dataclasses.dataclass(frozen=True)
class ImageTask:
  """One image to convert. `label_path` is None for unlabelled splits."""
  image_path: str
  image_format: str          # 'jpeg' or 'png', as stored in the record.
  stem: str                  # image/filename feature.
  image_id: Any = None       # For error messages (JSON image_id).
  label_path: Optional[str] = None
  segments: Optional[Tuple[Mapping[str, Any], ...]] = None


@dataclasses.dataclass(frozen=True)
class ConvertedImage:
  image_data: bytes
  image_format: str
  stem: str
  height: int
  width: int
  label_data: Optional[bytes]


def _describe(task: ImageTask) -> str:
  return f'image id {task.image_id} ({task.image_path})'


def read_panoptic_json(path: str) -> Dict[str, Any]:
  """Loads a panoptic JSON; missing or corrupt files raise naming the file."""
  try:
    with open(path, 'rb') as f:
      content = json.loads(f.read())
  except FileNotFoundError:
    raise ConversionError(f'Panoptic annotation file {path} does not exist.'
                          ) from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConversionError(f'Panoptic annotation file {path} is not valid JSON: '
                          f'{e}') from e
  if not isinstance(content, dict) or not isinstance(
      content.get('annotations'), list):
    raise ConversionError(f'Panoptic annotation file {path} has no '
                          '"annotations" list.')
  return content


def index_annotations(content: Mapping[str, Any], json_path: str,
                      key: str = 'file_stem'
                      ) -> Dict[Any, Tuple[Any, str, Tuple[Mapping, ...]]]:
  """{lookup key: (image_id, label file name, segments)}.

  key='file_stem' indexes by the label file's stem (how COCO and ADE20K pair
  images with labels); key='image_id' by the JSON image id (Cityscapes).
  """
  index = {}
  seen_ids = set()
  for position, annotation in enumerate(content['annotations']):
    try:
      image_id, file_name, segments = (annotation['image_id'],
                                       annotation['file_name'],
                                       annotation['segments_info'])
    except (KeyError, TypeError):
      raise ConversionError(
          f'{json_path}: annotations[{position}] lacks image_id, file_name or '
          'segments_info.') from None
    if image_id in seen_ids:
      raise ConversionError(f'{json_path}: image id {image_id} is annotated '
                            'twice.')
    seen_ids.add(image_id)
    lookup = (os.path.splitext(file_name)[0] if key == 'file_stem'
              else image_id)
    index[lookup] = (image_id, file_name, tuple(segments))
  return index


def read_image_file(path: str, task: ImageTask) -> bytes:
  try:
    with open(path, 'rb') as f:
      return f.read()
  except FileNotFoundError:
    raise ConversionError(f'{_describe(task)}: file {path} does not exist.'
                          ) from None


def open_image(data: bytes, path: str, task: ImageTask) -> Image.Image:
  """Decodes with PIL and applies the EXIF orientation (as DeepLab2 does)."""
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
  except Exception as e:  # PIL raises many error types for broken files.
    raise ConversionError(f'{_describe(task)}: cannot decode {path}: {e}'
                          ) from e
  try:
    return ImageOps.exif_transpose(image)
  except TypeError:  # Broken EXIF data; keep the stored orientation.
    return image


def build_panoptic_label(segment_ids: np.ndarray,
                         segments: Sequence[Mapping[str, Any]],
                         spec: LabelSpec, where: str) -> np.ndarray:
  """Segment-id map + segments_info -> [H, W] int32 DeepLab2 panoptic label."""
  present, inverse, counts = np.unique(segment_ids, return_inverse=True,
                                       return_counts=True)
  area_of = dict(zip(present.tolist(), counts.tolist()))
  # Per present segment id: (semantic, instance); absent ids stay void.
  semantic_of = np.full(len(present), spec.ignore_label, np.int64)
  instance_of = np.zeros(len(present), np.int64)
  position_of = {segment_id: i for i, segment_id in enumerate(present.tolist())}
  instances_so_far: Dict[int, int] = {}
  seen = set()
  for segment in segments:
    try:
      segment_id = int(segment['id'])
      source_category = int(segment['category_id'])
    except (KeyError, TypeError, ValueError):
      raise ConversionError(f'{where}: segment {segment} lacks an integer id or '
                            'category_id.') from None
    if segment_id in seen:
      raise ConversionError(f'{where}: segment id {segment_id} is listed twice.')
    seen.add(segment_id)
    area = area_of.get(segment_id, 0)
    if spec.check_area and 'area' in segment and int(segment['area']) != area:
      raise ConversionError(
          f'{where}: segment {segment_id} should cover {segment["area"]} '
          f'pixels, the PNG has {area}.')
    if source_category not in spec.source_to_contiguous:
      raise ConversionError(
          f'{where}: segment {segment_id} has category_id {source_category}, '
          'which is not a category of this dataset.')
    semantic = spec.source_to_contiguous[source_category]
    is_crowd = bool(segment.get('iscrowd', 0))
    instance = 0
    if semantic in spec.thing_ids:
      if is_crowd:
        if spec.treat_crowd_as_ignore:
          semantic = spec.ignore_label
      else:
        instance = instances_so_far.get(semantic, 0) + 1
        instances_so_far[semantic] = instance
        if instance >= spec.divisor:
          raise ConversionError(
              f'{where}: more than {spec.divisor - 1} instances of class '
              f'{semantic}; they do not fit under the label divisor.')
    elif is_crowd:
      raise ConversionError(f'{where}: segment {segment_id} of non-thing '
                            f'category {source_category} is marked iscrowd.')
    if segment_id in position_of:
      semantic_of[position_of[segment_id]] = semantic
      instance_of[position_of[segment_id]] = instance
  panoptic_of = semantic_of * spec.divisor + instance_of
  return panoptic_of[inverse.reshape(segment_ids.shape)].astype(np.int32)


def convert_image(task: ImageTask, spec: LabelSpec) -> ConvertedImage:
  """Reads one image (+ label) and returns what its Example needs."""
  image_data = read_image_file(task.image_path, task)
  # Any colour mode: the bytes are stored as they are (see module doc).
  image = open_image(image_data, task.image_path, task)
  width, height = image.size
  label_data = None
  if task.label_path is not None:
    png_data = read_image_file(task.label_path, task)
    png = open_image(png_data, task.label_path, task)
    if png.mode != 'RGB':
      raise ConversionError(f'{_describe(task)}: panoptic PNG {task.label_path} '
                            f'must be RGB, got mode {png.mode}.')
    if png.size != image.size:
      raise ConversionError(
          f'{_describe(task)}: panoptic PNG {task.label_path} is '
          f'{png.size[1]}x{png.size[0]} but the image is {height}x{width}.')
    where = f'{_describe(task)}, label {task.label_path}'
    label = build_panoptic_label(coco_panoptic.decode_segment_ids(png),
                                 task.segments or (), spec, where)
    label_data = encode_panoptic_label(label)
  return ConvertedImage(image_data, task.image_format, task.stem, height,
                        width, label_data)


def _convert_star(args):
  return convert_image(*args)


_PR_SET_PDEATHSIG = 1  # From <sys/prctl.h>.
_PARENT_POLL_SECONDS = 1.0


def _watch_parent(parent_pid: int) -> None:
  while True:
    if os.getppid() != parent_pid:
      os._exit(1)  # pylint: disable=protected-access
    time.sleep(_PARENT_POLL_SECONDS)


def exit_with_parent(parent_pid: int) -> None:
  """Worker initializer: the worker dies when the converter does.

  A converter killed with SIGKILL cannot stop its pool, so the workers
  would run on, orphaned. On Linux the kernel kills them (PR_SET_PDEATHSIG);
  elsewhere a thread polls the parent id. A parent that died before this
  ran is caught by the id check.
  """
  armed = False
  if sys.platform.startswith('linux'):
    try:
      libc = ctypes.CDLL(None, use_errno=True)
      armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
      armed = False
  if os.getppid() != parent_pid:
    os._exit(1)  # pylint: disable=protected-access
  if not armed:
    threading.Thread(target=_watch_parent, args=(parent_pid,),
                     daemon=True).start()


def convert_all(tasks: Sequence[ImageTask], spec: LabelSpec,
                num_workers: int = 1) -> Iterator[ConvertedImage]:
  """Converted images in task order; num_workers > 1 uses processes."""
  if num_workers <= 1 or len(tasks) <= 1:
    for task in tasks:
      yield convert_image(task, spec)
    return
  context = multiprocessing.get_context('spawn')
  with concurrent.futures.ProcessPoolExecutor(
      max_workers=num_workers, mp_context=context,
      initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:
    chunk = max(1, min(16, len(tasks) // (4 * num_workers)))
    yield from pool.map(_convert_star, [(t, spec) for t in tasks],
                        chunksize=chunk)


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool):
  if not enabled:
    return iterable
  try:
    import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return iterable
  return tqdm.tqdm(iterable, total=total, desc=desc, unit='img')


def _require_tasks(tasks: Sequence[ImageTask], split: str,
                   output_dir: str) -> None:
  if not tasks:
    raise ConversionError(f'Split {split!r} has no image to convert; nothing '
                          f'written to {output_dir}.')


def write_split(tasks: Sequence[ImageTask], spec: LabelSpec, output_dir: str,
                split: str, num_shards: int, num_workers: int = 1,
                show_progress: bool = True) -> List[str]:
  """Converts `tasks` into `<split>-SSSSS-of-NNNNN.tfrecord` shards.

  The new shards replace the split's old ones as a set (any shard count):
  they are written under hidden in-progress names, renamed only after every
  image converted, and the old shards of the split are deleted only then. A
  failed run leaves no shard behind that looks complete and keeps the old
  ones; the in-progress files of a killed run are removed by the next run
  into the same folder (`shard_files`). Returns the shard paths.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from deeplab_kmax.data import tfrecord_codec  # pylint: disable=g-import-not-at-top

  _require_tasks(tasks, split, output_dir)
  tf.io.gfile.makedirs(output_dir)
  for path in shard_files.remove_stale_partials(output_dir, split):
    logging.info('Removed %s, left behind by an interrupted run.', path)
  ranges = shard_files.shard_ranges(len(tasks), num_shards)
  finals = [os.path.join(output_dir,
                         shard_files.shard_filename(split, s, num_shards))
            for s in range(num_shards)]
  temps = [os.path.join(output_dir,
                        shard_files.partial_filename(os.path.basename(p)))
           for p in finals]
  results = convert_all(tasks, spec, num_workers)
  converted = iter(_progress(results, len(tasks), split, show_progress))
  try:
    for (start, end), temp in zip(ranges, temps):
      with tf.io.TFRecordWriter(temp) as writer:
        for _ in range(start, end):
          item = next(converted)
          example = tfrecord_codec.make_example(
              item.image_data, item.image_format, item.stem, item.height,
              item.width, item.label_data)
          # Map fields sorted: the same input always gives the same bytes.
          writer.write(example.SerializeToString(deterministic=True))
    for temp, final in zip(temps, finals):
      tf.io.gfile.rename(temp, final, overwrite=True)
    for path in shard_files.remove_other_shards(output_dir, split, finals):
      logging.info('Removed %s, replaced by the new shards.', path)
  except BaseException:
    for temp in temps:
      if tf.io.gfile.exists(temp):
        tf.io.gfile.remove(temp)
    raise
  finally:
    # Closes the progress bar and cancels queued work after an error.
    for stream in (converted, results):
      close = getattr(stream, 'close', None)
      if close:
        close()
  logging.info('Wrote %d images of split %s to %d shards in %s.', len(tasks),
               split, num_shards, output_dir)
  return finals


def write_splits(tasks_by_split: Mapping[str, Sequence[ImageTask]],
                 spec: LabelSpec, output_dir: str, num_shards: int,
                 num_workers: int = 1, show_progress: bool = True
                 ) -> Dict[str, List[str]]:
  """`write_split` for each split; every split is checked non-empty first.

  Checking all splits before writing any keeps a run that must fail (an
  empty split) from replacing the shards of the splits before it.
  """
  for split, tasks in tasks_by_split.items():
    _require_tasks(tasks, split, output_dir)
  return {split: write_split(tasks, spec, output_dir, split, num_shards,
                             num_workers, show_progress=show_progress)
          for split, tasks in tasks_by_split.items()}


def sorted_files(folder: str, suffix: str) -> List[str]:
  """Files in `folder` ending with `suffix`, sorted (DeepLab2's order)."""
  if not os.path.isdir(folder):
    raise ConversionError(f'Image folder {folder} does not exist.')
  return sorted(os.path.join(folder, name) for name in os.listdir(folder)
                if name.endswith(suffix))


def _require_images(images: Sequence[str], folder: str, suffix: str) -> None:
  if not images:
    raise ConversionError(f'Image folder {folder} holds no *{suffix} file: '
                          'nothing to convert.')


def coco_layout_tasks(image_folder: str, json_path: Optional[str],
                      label_folder: Optional[str], image_suffix: str = '.jpg',
                      image_format: str = 'jpeg') -> List[ImageTask]:
  """Tasks for a COCO-style split: images paired with labels by file stem.

  Images are taken in sorted file order (the record order DeepLab2 writes).
  """
  images = sorted_files(image_folder, image_suffix)
  _require_images(images, image_folder, image_suffix)
  if json_path is None:
    return [ImageTask(path, image_format,
                      os.path.splitext(os.path.basename(path))[0],
                      image_id=os.path.splitext(os.path.basename(path))[0])
            for path in images]
  index = index_annotations(read_panoptic_json(json_path), json_path)
  stems = {os.path.splitext(os.path.basename(p))[0] for p in images}
  for stem, (image_id, file_name, _) in index.items():
    if stem not in stems:
      raise ConversionError(
          f'{json_path}: image id {image_id} ({file_name}) is annotated but '
          f'{os.path.join(image_folder, stem + image_suffix)} does not exist.')
  tasks = []
  for path in images:
    stem = os.path.splitext(os.path.basename(path))[0]
    if stem not in index:
      raise ConversionError(f'Image {path} has no annotation in {json_path}.')
    image_id, file_name, segments = index[stem]
    tasks.append(ImageTask(path, image_format, stem, image_id=image_id,
                           label_path=os.path.join(label_folder, file_name),
                           segments=segments))
  return tasks


COCO_SPLIT_FOLDERS = {'train': 'train2017', 'val': 'val2017', 'test': 'test2017'}


def coco_split_paths(coco_root: str, split: str
                     ) -> Tuple[str, Optional[str], Optional[str]]:
  """(image folder, panoptic JSON, PNG folder) of a split in COCO's layout.

  The test split has no labels: JSON and PNG folder are None.
  """
  if split not in COCO_SPLIT_FOLDERS:
    raise ConversionError(f'Unknown split {split!r}; expected one of '
                          f'{sorted(COCO_SPLIT_FOLDERS)}.')
  images = os.path.join(coco_root, COCO_SPLIT_FOLDERS[split])
  if split == 'test':
    return images, None, None
  annotations = os.path.join(coco_root, 'annotations')
  return (images, os.path.join(annotations, f'panoptic_{split}2017.json'),
          os.path.join(annotations, f'panoptic_{split}2017'))


def convert_coco_panoptic(coco_root: str, output_dir: str,
                          splits: Sequence[str], num_shards: int,
                          info: dataset_info_lib.DatasetInfo,
                          num_workers: int = 1,
                          treat_crowd_as_ignore: bool = True,
                          show_progress: bool = True
                          ) -> Dict[str, List[str]]:
  """Converts splits of a COCO-layout dataset; returns {split: shard paths}."""
  spec = LabelSpec.from_dataset_info(
      info, treat_crowd_as_ignore=treat_crowd_as_ignore)
  if not splits:
    raise ConversionError(f'No split to convert under {coco_root}.')
  tasks = {split: coco_layout_tasks(*coco_split_paths(coco_root, split))
           for split in splits}
  return write_splits(tasks, spec, output_dir, num_shards, num_workers,
                      show_progress=show_progress)


def cityscapes_tasks(cityscapes_root: str, split: str) -> List[ImageTask]:
  """Tasks for Cityscapes panoptic (train-id version of the panoptic JSON).

  Images: leftImg8bit/<split>/<city>/<prefix>_leftImg8bit.png. Labels:
  gtFine/cityscapes_panoptic_<split>_trainId.json and PNGs in the folder of
  the same name, paired by image id (= prefix). The test split has no labels.
  """
  image_root = os.path.join(cityscapes_root, 'leftImg8bit', split)
  if not os.path.isdir(image_root):
    raise ConversionError(f'Image folder {image_root} does not exist.')
  suffix = '_leftImg8bit.png'
  images = []
  for city in sorted(os.listdir(image_root)):
    city_folder = os.path.join(image_root, city)
    if os.path.isdir(city_folder):
      images.extend(sorted_files(city_folder, suffix))
  images.sort()
  _require_images(images, image_root + '/<city>', suffix)
  if split == 'test':
    return [ImageTask(path, 'png', os.path.basename(path)[:-len(suffix)],
                      image_id=os.path.basename(path)[:-len(suffix)])
            for path in images]
  gt_root = os.path.join(cityscapes_root, 'gtFine')
  json_path = os.path.join(gt_root,
                           f'cityscapes_panoptic_{split}_trainId.json')
  png_folder = os.path.join(gt_root, f'cityscapes_panoptic_{split}_trainId')
  index = index_annotations(read_panoptic_json(json_path), json_path,
                            key='image_id')
  tasks = []
  for path in images:
    prefix = os.path.basename(path)[:-len(suffix)]
    if prefix not in index:
      raise ConversionError(f'Image {path} has no annotation in {json_path}.')
    image_id, file_name, segments = index[prefix]
    tasks.append(ImageTask(path, 'png', prefix, image_id=image_id,
                           label_path=os.path.join(png_folder, file_name),
                           segments=segments))
  return tasks


ADE20K_SPLIT_FOLDERS = {'train': 'training', 'val': 'validation'}


def ade20k_tasks(ade20k_root: str, split: str) -> List[ImageTask]:
  """Tasks for ADE20K panoptic in its COCO-format conversion.

  Images: images/{training,validation}/*.jpg. Labels: ade20k_panoptic_<split>
  .json and PNGs in the folder ade20k_panoptic_<split>/, paired by stem.
  """
  if split not in ADE20K_SPLIT_FOLDERS:
    raise ConversionError(f'Unknown ADE20K split {split!r}; expected one of '
                          f'{sorted(ADE20K_SPLIT_FOLDERS)}.')
  return coco_layout_tasks(
      os.path.join(ade20k_root, 'images', ADE20K_SPLIT_FOLDERS[split]),
      os.path.join(ade20k_root, f'ade20k_panoptic_{split}.json'),
      os.path.join(ade20k_root, f'ade20k_panoptic_{split}'))


def ade20k_label_spec(info: dataset_info_lib.DatasetInfo,
                      treat_crowd_as_ignore: bool = True) -> LabelSpec:
  """ADE20K's JSON areas are not checked."""
  return LabelSpec.from_dataset_info(
      info, treat_crowd_as_ignore=treat_crowd_as_ignore, check_area=False)


@dataclasses.dataclass(frozen=True)
class ReleaseLayout:
  """What a converter script needs to know about one benchmark's release
  beyond the common flags (`converter_flags`): where its images are, how
  its splits turn into tasks, and how its labels are read."""
  root_flag: str  # The command-line flag naming the release's root folder.
  root_help: str
  num_shards: int  # Default shards per split.
  image_folders: Mapping[str, str]  # split -> image folder under the root.
  tasks_of: Callable[[str, str], List[ImageTask]]  # (root, split) -> tasks.
  label_spec: Callable[[bool], LabelSpec]  # treat_crowd_as_ignore -> spec.


CITYSCAPES_RELEASE = ReleaseLayout(
    'cityscapes_root', 'Cityscapes dataset root folder.', num_shards=10,
    image_folders={split: os.path.join('leftImg8bit', split)
                   for split in ('train', 'val', 'test')},
    tasks_of=cityscapes_tasks,
    label_spec=lambda crowd_as_void: LabelSpec.from_dataset_info(
        dataset_info_lib.CITYSCAPES_PANOPTIC,
        treat_crowd_as_ignore=crowd_as_void))

ADE20K_RELEASE = ReleaseLayout(
    'ade20k_root', 'ADE20K dataset root folder.', num_shards=1000,
    image_folders={split: os.path.join('images', folder)
                   for split, folder in ADE20K_SPLIT_FOLDERS.items()},
    tasks_of=ade20k_tasks,
    label_spec=lambda crowd_as_void: ade20k_label_spec(
        dataset_info_lib.ADE20K_PANOPTIC, crowd_as_void))
