"""What the try-a-model page computes, without any web framework.

The page (`deeplab_kmax.app`) only wires widgets to the functions here, so
everything a person sees there can be tested without a browser:

  model = load_model(config_file=..., checkpoint_path=...)
  prepared = model.prepare(image)              # the network, once per image
  view = model.render(prepared, options)       # the merge, per slider move
  view.overlay, view.table_rows()              # picture and segment list
  view.write_downloads(folder)                 # COCO panoptic PNG + JSON

The mask-wise merge thresholds only change the post-processing, so a model
that gives the raw logits (a config + checkpoint, or a SavedModel through its
`serving_logits` signature) runs the network once per image and re-runs just
the merge when a slider moves (`TunableModel`). A SavedModel exported before
that signature existed has only the merge with its export-time thresholds
inside the graph, so there the thresholds are fixed (`FixedModel`;
`supports_thresholds` tells the page).
"""

import dataclasses
import os
import tempfile
from typing import (Any, Callable, Dict, List, Mapping, Optional, Sequence,
                    Tuple, Union)

import numpy as np

from deeplab_kmax import keys
from deeplab_kmax import model_source_flags
from deeplab_kmax import post_processing
from deeplab_kmax import predict
from deeplab_kmax.data import coco_panoptic
from deeplab_kmax.data import dataset_info as dataset_info_lib
from deeplab_kmax.data import label_space as label_space_lib

Maps = Dict[str, np.ndarray]

# The mask-wise merge options the page offers, with the label a person sees.
THRESHOLDS: Tuple[Tuple[str, str], ...] = (
    ('thing_confidence_threshold', 'Thing class confidence'),
    ('stuff_confidence_threshold', 'Stuff class confidence'),
    ('overlapping_threshold', 'Overlapping threshold'),
    ('pixel_confidence_threshold', 'Pixel confidence'),
)
TABLE_HEADERS = ('id', 'class', 'kind', 'score', 'area (%)', 'bbox x,y,w,h')
# Name stem of the downloaded files (`<stem>_panoptic.png`, `_segments.json`).
DOWNLOAD_STEM = 'prediction'


def with_thresholds(options: post_processing.MaskWiseOptions,
                    values: Sequence[float]) -> post_processing.MaskWiseOptions:
  """`options` with the THRESHOLDS set to `values` (in THRESHOLDS order)."""
  if len(values) != len(THRESHOLDS):
    raise ValueError(f'Expected {len(THRESHOLDS)} threshold values, got '
                     f'{len(values)}.')
  changes = {}
  for (field, label), value in zip(THRESHOLDS, values):
    value = float(value)
    if not 0.0 <= value <= 1.0:
      raise ValueError(f'{label} must be in [0, 1], got {value}.')
    changes[field] = value
  return dataclasses.replace(options, **changes)


def threshold_values(options: post_processing.MaskWiseOptions) -> List[float]:
  return [float(getattr(options, field)) for field, _ in THRESHOLDS]


@dataclasses.dataclass
class View:
  """One rendered prediction: what the page shows and offers."""
  image: np.ndarray  # [H, W, 3] uint8, the input.
  maps: Maps  # [H, W] output maps (panoptic_pred, semantic_scores, ...).
  info: dataset_info_lib.DatasetInfo
  overlay: np.ndarray  # [H, W, 3] uint8.
  segments: List[Dict[str, Any]]  # COCO panoptic segments_info.
  options: post_processing.MaskWiseOptions

  def table_rows(self) -> List[List[Any]]:
    """One row per segment, in TABLE_HEADERS order."""
    pixels = float(self.image.shape[0] * self.image.shape[1])
    return [[s['id'], s['category_name'],
             'thing' if s['isthing'] else 'stuff', round(s['score'], 3),
             round(100.0 * s['area'] / pixels, 2),
             ','.join(str(v) for v in s['bbox'])] for s in self.segments]

  def write_downloads(self, directory: str,
                      stem: str = DOWNLOAD_STEM) -> List[str]:
    """Writes the COCO panoptic PNG and segments JSON (as the predict CLI
    does); returns their paths."""
    predict.write_prediction(directory, stem, self.image, self.maps,
                             self.info)
    return [os.path.join(directory, stem + suffix)
            for suffix in (predict.PANOPTIC_SUFFIX, predict.SEGMENTS_SUFFIX)]


def render(image: np.ndarray, maps: Mapping[str, np.ndarray],
           info: dataset_info_lib.DatasetInfo,
           options: post_processing.MaskWiseOptions) -> View:
  """The overlay and segment list of output maps."""
  maps = {key: np.asarray(value) for key, value in maps.items()}
  panoptic = maps[keys.PANOPTIC_PRED]
  _, segments = coco_panoptic.panoptic_segments(
      panoptic, maps[keys.SEMANTIC_SCORES], info)
  overlay = predict.overlay_picture(image, panoptic, segments, info)
  return View(image, maps, info, overlay, segments, options)


@dataclasses.dataclass
class Prepared:
  """The network's part of one image's prediction (kept between renders)."""
  image: np.ndarray  # [H, W, 3] uint8.
  logits: Optional[Maps] = None  # serving.LOGITS_KEYS, batch 1, at the crop.
  resized_size: Optional[np.ndarray] = None  # [2] image part of the crop.
  maps: Optional[Maps] = None  # Final maps, for models without logits.


# uint8 [H, W, 3] -> (serving.LOGITS_KEYS maps with a batch of 1, the [2]
# resized size): the network on the padded evaluation crop, no merge.
LogitsFunction = Callable[[np.ndarray], Tuple[Maps, np.ndarray]]


class TunableModel:
  """A model that gives its logits, so the mask-wise merge is re-run here
  with any thresholds: a config + checkpoint, or a SavedModel with the
  `serving_logits` signature.

  The merge is the serving graph's (`serving.maps_from_logits` and
  `undo_eval_preprocessing`), so the default thresholds give exactly the
  maps of the SavedModel's `serving_default`.
  """

  supports_thresholds = True

  def __init__(self, logits_function: LogitsFunction,
               label_space: label_space_lib.LabelSpace,
               crop_size: Tuple[int, int],
               info: dataset_info_lib.DatasetInfo,
               default_options: post_processing.MaskWiseOptions,
               description: str):
    self._logits = logits_function
    self._label_space = label_space
    self._crop_size = tuple(crop_size)
    self.info = info
    self.default_options = default_options
    self.description = description

  @classmethod
  def from_keras(cls, model, config, description: str,
                 info: Optional[dataset_info_lib.DatasetInfo] = None
                 ) -> 'TunableModel':
    """A built KMaXDeepLab with its experiment config."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from deeplab_kmax.export import serving  # pylint: disable=g-import-not-at-top
    spec = serving.EvalPreprocessing.from_dataset_options(
        config.eval_dataset_options)
    crop_h, crop_w = spec.crop_size

    @tf.function(input_signature=[
        tf.TensorSpec([None, crop_h, crop_w, 3], tf.float32)])
    def network(padded):
      return serving.network_logits(model, padded)

    def logits(image):
      padded, resized_size = spec(tf.constant(image[None]))
      return ({k: v.numpy() for k, v in network(padded).items()},
              resized_size.numpy())

    return cls(logits, model.post_processor.label_space, spec.crop_size,
               info or dataset_info_lib.get_dataset_info(
                   config.eval_dataset_options),
               model.post_processor.options, description)

  @classmethod
  def from_saved_model(cls, path: str, loaded, metadata: Mapping[str, Any]
                       ) -> 'TunableModel':
    """A loaded SavedModel that has the `serving_logits` signature."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from deeplab_kmax.export import serving  # pylint: disable=g-import-not-at-top
    function = loaded.signatures[keys.SIGNATURE_LOGITS]
    spec = serving.EvalPreprocessing.from_json_dict(
        metadata[keys.METADATA_PREPROCESSING])
    info = serving.dataset_info_from_metadata(metadata)

    def logits(image):
      outputs = function(**{keys.INPUT_IMAGE: tf.constant(image)})
      return ({key: outputs[key].numpy()[None]
               for key in serving.LOGITS_KEYS},
              outputs[keys.RESIZED_SIZE].numpy())

    logits.loaded = loaded  # The signature needs the loaded object alive.
    return cls(logits, info.label_space, spec.crop_size, info,
               _options_of(metadata), f'SavedModel {path}')

  def prepare(self, image: np.ndarray) -> Prepared:
    image = predict.as_rgb_uint8(image)
    logits, resized_size = self._logits(image)
    return Prepared(image, logits=logits, resized_size=resized_size)

  def maps(self, prepared: Prepared,
           options: post_processing.MaskWiseOptions) -> Maps:
    """The serving maps at the image size under `options`."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from deeplab_kmax.data import preprocessing  # pylint: disable=g-import-not-at-top
    from deeplab_kmax.export import serving  # pylint: disable=g-import-not-at-top
    merge = post_processing.MaskWisePostProcessor(
        self._label_space, **dataclasses.asdict(options))
    logits = {key: tf.constant(value)
              for key, value in prepared.logits.items()}
    crop_maps = serving.maps_from_logits(merge, logits, self._crop_size)
    restored = preprocessing.undo_eval_preprocessing(
        crop_maps, tf.constant(prepared.resized_size),
        tf.constant(prepared.image.shape[:2]), serving.BILINEAR_OUTPUTS)
    return {key: value[0].numpy() for key, value in restored.items()}

  def render(self, prepared: Prepared,
             options: Optional[post_processing.MaskWiseOptions] = None
             ) -> View:
    options = options or self.default_options
    return render(prepared.image, self.maps(prepared, options), self.info,
                  options)


class FixedModel:
  """A predictor with the merge inside and no logits (a SavedModel exported
  before the `serving_logits` signature existed): fixed thresholds."""

  supports_thresholds = False

  def __init__(self, predictor: predict.Predictor,
               options: post_processing.MaskWiseOptions):
    self._predictor = predictor
    self.info = predictor.info
    self.default_options = options
    self.description = predictor.description

  def prepare(self, image: np.ndarray) -> Prepared:
    image = predict.as_rgb_uint8(image)
    return Prepared(image, maps=self._predictor(image))

  def render(self, prepared: Prepared,
             options: Optional[post_processing.MaskWiseOptions] = None
             ) -> View:
    if options is not None and options != self.default_options:
      raise ValueError(
          f'{self.description} has its thresholds built in (it has no '
          f'{keys.SIGNATURE_LOGITS} signature); export it again, or start '
          'the app with --config_file and --checkpoint_path, to change them.')
    return render(prepared.image, prepared.maps, self.info,
                  self.default_options)


AppModel = Union[TunableModel, FixedModel]


def _options_of(metadata: Mapping[str, Any]) -> post_processing.MaskWiseOptions:
  """The export-time merge options a SavedModel's metadata records."""
  return post_processing.MaskWiseOptions(**metadata['post_processing'])


def load_saved_model(path: str) -> AppModel:
  """Tunable when the SavedModel has the `serving_logits` signature, fixed
  (its `serving_default` as is) for older exports."""
  from deeplab_kmax.export import saved_model as saved_model_lib  # pylint: disable=g-import-not-at-top
  loaded, _, metadata = saved_model_lib.load(path)
  if keys.SIGNATURE_LOGITS in loaded.signatures:
    return TunableModel.from_saved_model(path, loaded, metadata)
  return FixedModel(predict.saved_model_predictor(path), _options_of(metadata))


def load_model(saved_model: Optional[str] = None,
               config_file: Optional[str] = None,
               checkpoint_path: Optional[str] = None,
               config_overrides: Sequence[str] = ()) -> AppModel:
  """The model of the page, from a SavedModel or a config + checkpoint."""
  source = model_source_flags.chosen_source(
      {'saved_model': saved_model,
       model_source_flags.CONFIG_FILE: config_file}, checkpoint_path)
  if source == 'saved_model':
    return load_saved_model(saved_model)
  from deeplab_kmax import config as config_lib  # pylint: disable=g-import-not-at-top
  from deeplab_kmax.export import model_loading  # pylint: disable=g-import-not-at-top
  config = config_lib.load_experiment(config_file, config_overrides,
                                      mode=config_lib.INFERENCE)
  model = model_loading.build_inference_model(config, checkpoint_path)
  return TunableModel.from_keras(model, config,
                                 f'checkpoint {checkpoint_path}')


def example_images(directory: Optional[str], limit: int = 8) -> List[str]:
  """Up to `limit` image files of a folder (sorted), for the page's
  examples; none without a folder."""
  if not directory:
    return []
  if not os.path.isdir(directory):
    raise ValueError(f'--examples_dir={directory} is not a directory.')
  return predict.expand_inputs([directory])[:limit]


def new_download_dir(root: Optional[str] = None) -> str:
  """A fresh folder (under `root`) for one render's downloads, never shared
  between visitors of the page."""
  return tempfile.mkdtemp(prefix='render_', dir=root)
