r"""Panoptic segmentation of image files, written in COCO panoptic format.

  python -m deeplab_kmax.predict --saved_model=/tmp/kmax/1 \
      --inputs='images/*.jpg' --output_dir=/tmp/predictions

  python -m deeplab_kmax.predict \
      --config_file=configs/coco/kmax_meta_r50.textproto \
      --checkpoint_path=/path/to/ckpt --inputs='images/*.jpg' \
      --output_dir=/tmp/predictions

For every readable image `<stem>.<ext>` the output directory gets

  <stem>_panoptic.png   COCO panoptic PNG: segment id = R + 256 G + 256^2 B,
                        0 where void; ids are 1, 2, ... per image.
  <stem>_segments.json  the segments: id, category_id (the dataset's own
                        category id, e.g. COCO's), category_name,
                        semantic_id (training id), instance_id, isthing,
                        iscrowd (0), score, area, bbox [x, y, w, h].
  <stem>_overlay.png    the image with segment colours, borders and class
                        names, for a person to look at.

and `predictions.json` collects all segments in the COCO panoptic results
layout (`annotations` with `file_name` and `segments_info`, `categories`).

A video input (`--inputs=clip.mp4`; see `predict_video` for the suffixes)
gets `<stem>_<frame>_panoptic.png` and `<stem>_<frame>_segments.json` per
frame (frame numbered from 0, six digits) and `<stem>_overlay.mp4`, the
overlays at the source frame rate; its frames are annotations of
`predictions.json` like images. Needs the optional extra `[video]`
(imageio-ffmpeg).

Images are decoded exactly as the SavedModel's serving_encoded signature
decodes them (`serving.decode_image_file`: pixels as stored, EXIF orientation
not applied, 16-bit -> high byte, alpha dropped), so a file gives the same
prediction both ways. Formats TensorFlow cannot decode (TIFF, ...) are read
with Pillow under the same rules. Files that cannot be read (or predicted)
are skipped with a warning, and the command then exits with status 1; a bad
config, model or flag stops it with a one-line error (status 1, the
traceback only with --verbose).

Every file is written under a temporary name and renamed into place.
`predictions.json` is removed when a run starts and written when it ends,
listing exactly the images of that run whose files were all written; an
image's `_segments.json` is written after its PNG, overlay and raw file. So
after a run killed at any point, a folder without `predictions.json` is an
unfinished run, and an image whose `_segments.json` exists has all its files
from the same run. Temporaries of killed runs are removed by the next run
(see `temp_files`).

A segment's score is the class confidence of the mask that produced it
(for stuff merged from several masks, the pixel-weighted mean).
"""

import dataclasses
import glob
import io
import json
import os
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
import numpy as np
from PIL import Image
from PIL import UnidentifiedImageError

from deeplab_kmax import cli_errors
from deeplab_kmax import keys
from deeplab_kmax import model_source_flags
from deeplab_kmax import temp_files
from deeplab_kmax import visualization
from deeplab_kmax.data import coco_panoptic
from deeplab_kmax.data import dataset_info as dataset_info_lib
from deeplab_kmax.export import serving

Maps = Dict[str, np.ndarray]

PANOPTIC_SUFFIX = '_panoptic.png'
SEGMENTS_SUFFIX = '_segments.json'
OVERLAY_SUFFIX = '_overlay.png'
RAW_SUFFIX = '_raw.npz'


class ImageReadError(ValueError):
  """An input file is not an image this tool can use."""


def as_rgb_uint8(image: Any) -> np.ndarray:
  """Checks and converts an array to the model input, uint8 [H, W, 3].

  Conversions: [H, W] and [H, W, 1] grayscale are repeated to RGB; [H, W, 2]
  (gray + alpha) keeps the gray; [H, W, 4] drops the alpha channel. Any other
  dtype than uint8 is rejected (rescaling floats is a guess this function
  does not make: use np.clip(x, 0, 255).astype(np.uint8) for 0..255 floats).
  """
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f'Expected a uint8 image, got dtype {image.dtype}. '
                     'Convert it first, e.g. '
                     'np.clip(image, 0, 255).astype(np.uint8).')
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 2, 3, 4):
    raise ValueError(f'Expected an image [H, W] or [H, W, 1|2|3|4], got shape '
                     f'{image.shape}.')
  if image.shape[0] == 0 or image.shape[1] == 0:
    raise ValueError(f'The image is empty (shape {image.shape}).')
  channels = image.shape[-1]
  if channels in (1, 2):
    image = np.repeat(image[..., :1], 3, axis=-1)
  elif channels == 4:
    image = image[..., :3]
  return np.ascontiguousarray(image)


def load_image(path: str) -> np.ndarray:
  """Reads an image file as uint8 RGB [H, W, 3] (see module docstring)."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise ImageReadError(f'{path}: not a readable image ({e}).') from None
  if serving.is_decodable_file(data[:12]):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    try:
      return as_rgb_uint8(serving.decode_image_file(tf.constant(data)).numpy())
    except (tf.errors.OpError, ValueError) as e:
      reason = getattr(e, 'message', str(e)).strip().splitlines()[0]
      raise ImageReadError(f'{path}: not a readable image ({reason}).'
                           ) from None
  return _load_with_pillow(path, data)


# Pillow modes of 16-bit grayscale.
_PILLOW_16_BIT = ('I;16', 'I;16B', 'I;16L', 'I;16N')


def _load_with_pillow(path: str, data: bytes) -> np.ndarray:
  """Formats TensorFlow cannot decode, under `decode_image_file`'s rules."""
  try:
    with Image.open(io.BytesIO(data)) as picture:
      picture.load()
      mode = picture.mode
      if mode in _PILLOW_16_BIT:
        high_byte = np.asarray(picture).astype(np.uint16) >> 8
        return as_rgb_uint8(high_byte.astype(np.uint8))
      if mode in ('I', 'F'):
        raise ImageReadError(
            f'{path}: 32-bit images ({mode}) are not supported; save it with '
            '8 or 16 bits per channel.')
      if picture.width == 0 or picture.height == 0:
        raise ImageReadError(f'{path}: the image is empty.')
      # Alpha dropped, not composited; palette, CMYK, 1-bit -> RGB.
      rgba = picture.convert('RGBA') if 'A' in mode or 'a' in mode or (
          'transparency' in picture.info) else picture.convert('RGB')
      return as_rgb_uint8(np.asarray(rgba)[..., :3])
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    if isinstance(e, ImageReadError):
      raise
    raise ImageReadError(f'{path}: not a readable image ({e}).') from None


@dataclasses.dataclass
class Predictor:
  """A callable uint8 [H, W, 3] -> output maps, with its label space."""
  predict: Callable[[np.ndarray], Maps]
  info: dataset_info_lib.DatasetInfo
  description: str

  def __call__(self, image: np.ndarray) -> Maps:
    maps = self.predict(as_rgb_uint8(image))
    return {key: np.asarray(value) for key, value in maps.items()}


def saved_model_predictor(path: str) -> Predictor:
  """Runs the `serving_default` signature of an exported SavedModel."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from deeplab_kmax.export import saved_model  # pylint: disable=g-import-not-at-top
  loaded, function, metadata = saved_model.load(path)

  def run(image):
    outputs = function(**{keys.INPUT_IMAGE: tf.constant(image)})
    return {key: value.numpy() for key, value in outputs.items()}

  run.loaded = loaded  # The signature needs the loaded object alive.
  return Predictor(run, serving.dataset_info_from_metadata(metadata),
                   f'SavedModel {path}')


def checkpoint_predictor(config: Any, checkpoint_path: str,
                         allow_partial: bool = False) -> Predictor:
  """Builds the model of `config`, restores the checkpoint, serves in-process."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from deeplab_kmax.export import model_loading  # pylint: disable=g-import-not-at-top
  module = model_loading.build_serving_module_from_checkpoint(
      config, checkpoint_path, allow_partial)

  def run(image):
    outputs = module.serve_image(tf.constant(image))
    return {key: value.numpy() for key, value in outputs.items()}

  run.module = module
  info = dataset_info_lib.get_dataset_info(config.eval_dataset_options)
  return Predictor(run, info, f'checkpoint {checkpoint_path}')


def onnx_predictor(path: str) -> Predictor:
  """Runs an ONNX export (network and merge) with the host resize, pad and
  undo around it."""
  from deeplab_kmax.export import onnx_export  # pylint: disable=g-import-not-at-top
  runner = onnx_export.OnnxPanopticPredictor(path)
  return Predictor(runner, serving.dataset_info_from_metadata(runner.metadata),
                   f'ONNX {path}')


def tflite_predictor(path: str) -> Predictor:
  """Runs a TFLite export (network and merge) with the host resize, pad
  and undo around it."""
  from deeplab_kmax.export import tflite_export  # pylint: disable=g-import-not-at-top
  runner = tflite_export.TFLitePanopticPredictor(path)
  return Predictor(runner, runner.info, f'TFLite {path}')


IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff',
                  '.webp')


def expand_inputs(patterns: Sequence[str]) -> List[str]:
  """Files matching any of the glob patterns, sorted.

  A pattern may also name a file or a directory (its image files, by
  suffix, non-recursively).
  """
  files = set()
  for pattern in patterns:
    for match in glob.glob(os.path.expanduser(pattern), recursive=True):
      if os.path.isdir(match):
        files.update(os.path.join(match, name) for name in os.listdir(match)
                     if name.lower().endswith(IMAGE_SUFFIXES) and
                     os.path.isfile(os.path.join(match, name)))
      elif os.path.isfile(match):
        files.add(match)
  return sorted(files)


def _unique_stems(files: Sequence[str]) -> Dict[str, str]:
  """Output name stem per input file; duplicates get _2, _3, ..."""
  stems, used = {}, set()
  for path in files:
    base = os.path.splitext(os.path.basename(path))[0]
    stem, counter = base, 1
    while stem in used:
      counter += 1
      stem = f'{base}_{counter}'
    used.add(stem)
    stems[path] = stem
  return stems


def output_files(stem: str, save_raw: bool = False) -> List[str]:
  """The files written for one image, in writing order (segments last)."""
  suffixes = [PANOPTIC_SUFFIX, OVERLAY_SUFFIX]
  if save_raw:
    suffixes.append(RAW_SUFFIX)
  return [stem + suffix for suffix in suffixes + [SEGMENTS_SUFFIX]]


def _write_file(path: str, write: Callable[[Any], None]) -> None:
  """Writes through a temporary file and a rename (never half a file)."""

  def to_temporary(temporary):
    with open(temporary, 'wb') as f:
      write(f)

  temp_files.write_atomically(path, to_temporary)


def _save_png(path: str, array: np.ndarray) -> None:
  _write_file(path, lambda f: Image.fromarray(array).save(f, format='PNG'))


def remove_outputs(output_dir: str, stem: str) -> None:
  """Deletes the files of `stem` (segments first: it marks a complete set)."""
  for name in reversed(output_files(stem, save_raw=True)):
    path = os.path.join(output_dir, name)
    if os.path.lexists(path):
      os.remove(path)


def overlay_picture(image: np.ndarray, panoptic: np.ndarray,
                    segments: Sequence[Mapping[str, Any]],
                    info: dataset_info_lib.DatasetInfo,
                    draw_names: bool = True, alpha: float = 0.6,
                    min_long_side: int = 0) -> np.ndarray:
  """The overlay for people: segment colours, borders, names and the thing
  scores of `segments` (a segments_info list)."""
  scores = {s['panoptic_id']: s['score'] for s in segments if s['isthing']}
  return visualization.visualize_panoptic(image, panoptic, info, scores,
                                          alpha=alpha, draw_names=draw_names,
                                          min_long_side=min_long_side)


def write_prediction(output_dir: str, stem: str, image: np.ndarray,
                     maps: Mapping[str, np.ndarray],
                     info: dataset_info_lib.DatasetInfo,
                     draw_names: bool = True, alpha: float = 0.6,
                     save_raw: bool = False,
                     overlay_min_size: int = 0,
                     write_overlay: bool = True) -> Dict[str, Any]:
  """Writes the PNG, overlay (raw) and JSON of one image; returns its
  annotation. The overlay is enlarged (whole factor) until its long side
  reaches `overlay_min_size`; the PNG keeps the image's size. Video frames
  leave the overlay out (`write_overlay`): it goes into the overlay video.

  Files of an earlier run for `stem` are removed first and the segments JSON
  is written last, so it exists only beside a complete set of this run.
  """
  panoptic = maps[keys.PANOPTIC_PRED]
  segment_map, segments = coco_panoptic.panoptic_segments(
      panoptic, maps[keys.SEMANTIC_SCORES], info)
  remove_outputs(output_dir, stem)
  png_name = stem + PANOPTIC_SUFFIX
  _save_png(os.path.join(output_dir, png_name),
            coco_panoptic.encode_segment_ids(segment_map))
  annotation = {
      'image_id': stem,
      'file_name': png_name,
      'height': int(panoptic.shape[0]),
      'width': int(panoptic.shape[1]),
      'label_divisor': info.panoptic_label_divisor,
      'segments_info': segments,
  }
  if write_overlay:
    _save_png(os.path.join(output_dir, stem + OVERLAY_SUFFIX),
              overlay_picture(image, panoptic, segments, info, draw_names,
                              alpha, overlay_min_size))
  if save_raw:
    _write_file(os.path.join(output_dir, stem + RAW_SUFFIX),
                lambda f: np.savez_compressed(
                    f, **{k: np.asarray(v) for k, v in maps.items()}))
  text = json.dumps(annotation, indent=1).encode('utf-8')
  _write_file(os.path.join(output_dir, stem + SEGMENTS_SUFFIX),
              lambda f: f.write(text))
  return annotation


def predict_files(predictor: Predictor, files: Sequence[str], output_dir: str,
                  draw_names: bool = True, alpha: float = 0.6,
                  save_raw: bool = False,
                  progress: Optional[bool] = None,
                  overlay_min_size: int = 0) -> Tuple[int, List[str]]:
  """Predicts every file (images and videos); returns (number of images
  and video frames written, failed files)."""
  import tqdm  # pylint: disable=g-import-not-at-top
  from deeplab_kmax import predict_video  # pylint: disable=g-import-not-at-top
  os.makedirs(output_dir, exist_ok=True)
  temp_files.remove_stale(output_dir, temp_files.any_sibling_pattern('tmp'))
  summary = os.path.join(output_dir, coco_panoptic.PREDICTIONS_FILE)
  if os.path.lexists(summary):  # It would describe an earlier run.
    os.remove(summary)
  stems = _unique_stems(files)
  annotations, failed = [], []
  bar = tqdm.tqdm(files, unit='image', desc='kMaX-DeepLab',
                  disable=None if progress is None else not progress)
  for path in bar:
    try:
      if predict_video.is_video(path):
        annotations.extend(predict_video.predict_video(
            predictor, path, output_dir, stems[path], draw_names, alpha,
            save_raw, progress))
        continue
      image = load_image(path)
      maps = predictor(image)
      annotations.append(write_prediction(
          output_dir, stems[path], image, maps, predictor.info, draw_names,
          alpha, save_raw, overlay_min_size))
      continue
    except ImageReadError as e:
      logging.warning('Skipped %s', e)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('Skipped %s: prediction failed: %s: %s', path,
                      type(e).__name__, e)
    failed.append(path)
    # Files of an earlier run under this name would look like this run's.
    remove_outputs(output_dir, stems[path])
  results = {'annotations': annotations,
             'categories': coco_panoptic.categories(predictor.info),
             'failed': failed, 'model': predictor.description}
  text = json.dumps(results, indent=1).encode('utf-8')
  _write_file(summary, lambda f: f.write(text))
  return len(annotations), failed


# The exported-model flags (name -> help); one of them or --config_file.
_EXPORTED_MODEL_FLAGS = {
    'saved_model': 'SavedModel directory written by export_model.py.',
    'onnx_model': 'ONNX file written by export_model.py --onnx_path.',
    'tflite_model': 'TFLite file written by export_model.py --tflite_path.',
}


def _define_flags() -> None:
  """Defines the flags; only when run as a program, so imports stay free of
  side effects (and of clashes with other tools' flags)."""
  model_source_flags.define_flags(_EXPORTED_MODEL_FLAGS, 'an exported model')
  flags.DEFINE_list('inputs', None, 'Image files or glob patterns '
                    '(comma-separated, quote them in the shell).')
  flags.DEFINE_string('output_dir', None, 'Directory for the results.')
  flags.DEFINE_float('overlay_alpha', 0.6, 'Segment colour weight.')
  flags.DEFINE_bool('draw_names', True, 'Write class names in the overlay.')
  flags.DEFINE_integer('overlay_min_size', 512,
                       'Enlarge smaller overlays by a whole factor until '
                       'their long side is at least this (0: image size).')
  flags.DEFINE_bool('save_raw_predictions', False,
                    'Also save every output map as <stem>_raw.npz.')
  flags.mark_flags_as_required(['inputs', 'output_dir'])
  cli_errors.define_verbose_flag()


def _predictor_from_flags(values) -> Predictor:
  names = [*_EXPORTED_MODEL_FLAGS, model_source_flags.CONFIG_FILE]
  try:
    source = model_source_flags.chosen_source(
        {name: getattr(values, name) for name in names},
        values.checkpoint_path)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  exported = {'saved_model': saved_model_predictor,
              'onnx_model': onnx_predictor, 'tflite_model': tflite_predictor}
  if source in exported:
    return exported[source](getattr(values, source))
  from deeplab_kmax import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_experiment(values.config_file,
                                     values.config_override or (),
                                     mode=config_lib.INFERENCE)
  return checkpoint_predictor(config, values.checkpoint_path)


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  values = flags.FLAGS
  files = expand_inputs(values.inputs)
  if not files:
    logging.error('No file matches --inputs=%s.', ','.join(values.inputs))
    return 1
  from deeplab_kmax import predict_video  # pylint: disable=g-import-not-at-top
  if any(predict_video.is_video(path) for path in files):
    try:
      predict_video.require_ffmpeg()
    except ImportError as e:
      raise app.UsageError(str(e)) from None
  predictor = _predictor_from_flags(values)
  written, failed = predict_files(
      predictor, files, values.output_dir, values.draw_names,
      values.overlay_alpha, values.save_raw_predictions,
      overlay_min_size=values.overlay_min_size)
  if any(predict_video.is_video(path) for path in files):
    print(f'Wrote predictions for {written} images and video frames of '
          f'{len(files) - len(failed)} of {len(files)} inputs to '
          f'{values.output_dir}.')
  else:
    print(f'Wrote predictions for {written} of {len(files)} images to '
          f'{values.output_dir}.')
  if failed:
    print(f'{len(failed)} file(s) failed: {", ".join(failed)}',
          file=sys.stderr)
    return 1
  return 0


def _expected_errors():
  """Failures of the whole run the user can fix (bad config or model)."""
  from deeplab_kmax.config import loader  # pylint: disable=g-import-not-at-top
  from deeplab_kmax.export import model_loading  # pylint: disable=g-import-not-at-top
  return (loader.ConfigError, model_loading.IncompleteCheckpointError)


def run() -> None:
  """The `kmax-predict` console script (same as `python -m` this module)."""
  _define_flags()
  cli_errors.run(main, expected=_expected_errors())


if __name__ == '__main__':
  run()
