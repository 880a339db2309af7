"""Sanity checks of experiment configs, run before anything expensive starts.

The checks catch values that parse but cannot work (a crop size with three
entries, an optimizer name the trainer does not know, a keep probability of
1.5, ...) and report all of them at once. Rules that depend on what runs
(training needs the train data, evaluation one image per batch) are keyed by
the run's mode (`MODE_NEEDS`). They do not check that files or datasets
exist: that is the job of the code that opens them (`prepare`).
"""

import dataclasses
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from google.protobuf import descriptor as descriptor_lib

from deeplab_kmax.config import config_pb2
from deeplab_kmax import precision_options
from deeplab_kmax.config import loader
from deeplab_kmax.layers import cluster_options

OPTIMIZERS = ('adam', 'adamw', 'sgd')
LEARNING_POLICIES = ('poly', 'cosine')
DROP_PATH_SCHEDULES = ('constant', 'linear')
CONV_TYPES = ('depthwise_separable_conv', 'standard_conv')
TRANSFORMER_POST_PROCESSINGS = ('pixelwise', 'maskwise')
COPY_PASTE_OPTIONS = ('none', 'random', 'all')
RAW_PANOPTIC_FORMATS = ('two_channel_png', 'three_channel_png',
                        'two_channel_numpy_array', 'coco_panoptic')
# The kMaX pixel decoder consumes the encoder's stride-32 features.
KMAX_OUTPUT_STRIDE = 32
OUTPUT_STRIDES = (8, 16, 32)


DATASET_SECTIONS = ('train_dataset_options', 'eval_dataset_options')


@dataclasses.dataclass(frozen=True)
class ModeNeeds:
  """What a mode runs, hence which mode-specific rules apply to it."""
  trains: bool = False
  evaluates: bool = False  # Runs the evaluator over eval_dataset_options.
  serves: bool = False  # Export / prediction with the eval preprocessing.

  @property
  def datasets(self) -> Tuple[str, ...]:
    """Dataset sections the model runs on: they must be present and, for
    kMaX backbones, have a 32k+1 crop."""
    return tuple(name for name, used in zip(
        DATASET_SECTIONS, (self.trains, self.evaluates or self.serves))
                 if used)

  @property
  def reads_dataset_files(self) -> bool:
    """Whether the mode opens the datasets' files (and every `${VAR}` of the
    sections it reads must be set)."""
    return self.trains or self.evaluates


INFERENCE = 'inference'
MODE_NEEDS: Dict[str, ModeNeeds] = {
    'train': ModeNeeds(trains=True),
    'eval': ModeNeeds(evaluates=True),
    'train_and_eval': ModeNeeds(trains=True, evaluates=True),
    'continuous_eval': ModeNeeds(evaluates=True),
    INFERENCE: ModeNeeds(serves=True),
}
# The modes of the trainer (`trainer/train.py --mode`).
TRAINING_MODES = tuple(m for m in MODE_NEEDS if m != INFERENCE)


def mode_needs(mode: str) -> ModeNeeds:
  if mode not in MODE_NEEDS:
    raise ValueError(f'Unknown mode {mode!r}; expected one of '
                     f'{tuple(MODE_NEEDS)}.')
  return MODE_NEEDS[mode]


def kmax_crop_problem(crop_size: Sequence[int], field: str) -> Optional[str]:
  """Why `crop_size` cannot feed a kMaX backbone, or None if it can.

  kMaX backbones downsample by 32 with corner-aligned resampling, so every
  crop side must be 32 * k + 1 (e.g. 641, 1025, 1281).
  """
  crop_size = list(crop_size)
  if len(crop_size) == 2 and not any(
      c < 1 or (c - 1) % KMAX_OUTPUT_STRIDE for c in crop_size):
    return None
  suggestion = [max(round((c - 1) / KMAX_OUTPUT_STRIDE), 1) *
                KMAX_OUTPUT_STRIDE + 1 for c in crop_size] or [
                    KMAX_OUTPUT_STRIDE * 20 + 1] * 2
  return (f'{field} is {crop_size}; kMaX-DeepLab needs [height, width] with '
          f'(size - 1) divisible by {KMAX_OUTPUT_STRIDE}, e.g. {suggestion}')


def check_kmax_crop(crop_size: Sequence[int], field: str) -> None:
  """Raises ConfigError unless `crop_size` can feed a kMaX backbone."""
  problem = kmax_crop_problem(crop_size, field)
  if problem:
    raise loader.ConfigError(problem + '.', field=field)


def find_problems(config: config_pb2.ExperimentOptions,
                  mode: Optional[str] = None) -> List[str]:
  """Returns one human-readable line per invalid value (empty if none).

  Args:
    config: the experiment config.
    mode: what will run (a key of `MODE_NEEDS`); None checks only the
      rules that hold whatever runs.
  """
  problems: List[str] = []
  report = problems.append
  _check_finite(config, '', report)
  if mode is not None:
    _check_mode(config, mode_needs(mode), report)
  _check_model(config.model_options, report)
  _check_trainer(config.trainer_options, report)
  for name in ('train_dataset_options', 'eval_dataset_options'):
    if config.HasField(name):
      _check_dataset(getattr(config, name), name, report)
  _check_evaluator(config.evaluator_options, report)
  return problems


def validate(config: config_pb2.ExperimentOptions,
             source: Optional[str] = None,
             mode: Optional[str] = None) -> config_pb2.ExperimentOptions:
  """Raises ConfigError listing every problem; returns `config` if none.

  Every entry point (training, evaluation, export, prediction) calls this
  through `prepare.prepare_config`, naming its mode (see `find_problems`).
  """
  problems = find_problems(config, mode)
  if problems:
    where = f'{source}: ' if source else ''
    raise loader.ConfigError(
        f'{where}invalid config ({len(problems)} problem'
        f'{"s" if len(problems) > 1 else ""}):\n  - ' +
        '\n  - '.join(problems), source=source)
  return config


_Report = Callable[[str], None]


def _entries(values) -> str:
  count = len(values)
  return f'{count} entr{"y" if count == 1 else "ies"} {list(values)}'


def _one_of(value: str, allowed, name: str, report: _Report) -> None:
  if value not in allowed:
    report(f'{name} is {value!r}; expected one of '
           f'{", ".join(repr(a) for a in allowed)}')


def _check_mode(config: config_pb2.ExperimentOptions, needs: ModeNeeds,
                report: _Report) -> None:
  is_kmax = config.model_options.backbone.name.startswith('kmax_')
  for name in needs.datasets:
    if not config.HasField(name):
      report(f'{name} is missing; it is needed to run the model')
    elif is_kmax:
      problem = kmax_crop_problem(getattr(config, name).crop_size,
                                  f'{name}.crop_size')
      if problem:
        report(problem)
  batch_size = config.eval_dataset_options.batch_size
  if (needs.evaluates and config.HasField('eval_dataset_options') and
      batch_size != 1):
    report(f'eval_dataset_options.batch_size is {batch_size}; evaluation '
           'runs one image per batch (set it to 1)')


def _check_finite(message, prefix: str, report: _Report) -> None:
  """Every float set anywhere in the config must be a finite number."""
  for field, value in message.ListFields():
    name = f'{prefix}{field.name}'
    if field.type == descriptor_lib.FieldDescriptor.TYPE_MESSAGE:
      repeated = loader.is_repeated(field)
      for index, item in enumerate(value if repeated else [value]):
        where = f'{name}[{index}]' if repeated else name
        _check_finite(item, f'{where}.', report)
    elif field.cpp_type in (descriptor_lib.FieldDescriptor.CPPTYPE_FLOAT,
                            descriptor_lib.FieldDescriptor.CPPTYPE_DOUBLE):
      for item in (value if loader.is_repeated(field) else [value]):
        if not math.isfinite(item):
          report(f'{name} is {item}; expected a finite number')


def _in_range(value: float, name: str, report: _Report, low: float,
              high: float, low_open: bool = False) -> None:
  if not math.isfinite(value):
    return  # Reported by _check_finite.
  too_low = value <= low if low_open else value < low
  if too_low or value > high:
    left = '(' if low_open else '['
    report(f'{name} is {value:g}; expected a value in {left}{low:g}, {high:g}]')


def _positive(value: float, name: str, report: _Report) -> None:
  if math.isfinite(value) and value <= 0:
    report(f'{name} is {value:g}; expected a positive value')


def _non_negative(value: float, name: str, report: _Report) -> None:
  if math.isfinite(value) and value < 0:
    report(f'{name} is {value:g}; expected a value >= 0')


def _check_model(model: config_pb2.ModelOptions, report: _Report) -> None:
  backbone = model.backbone
  is_kmax = backbone.name.startswith('kmax_')
  if is_kmax and backbone.output_stride != KMAX_OUTPUT_STRIDE:
    report(f'model_options.backbone.output_stride is {backbone.output_stride};'
           f' kMaX-DeepLab backbones ({backbone.name}) need '
           f'{KMAX_OUTPUT_STRIDE}')
  elif backbone.output_stride not in OUTPUT_STRIDES:
    report(f'model_options.backbone.output_stride is {backbone.output_stride};'
           f' expected one of {", ".join(map(str, OUTPUT_STRIDES))}')
  _in_range(backbone.drop_path_keep_prob,
            'model_options.backbone.drop_path_keep_prob', report, 0.0, 1.0,
            low_open=True)
  _one_of(backbone.drop_path_schedule,
          DROP_PATH_SCHEDULES, 'model_options.backbone.drop_path_schedule',
          report)
  for name in ('stem_width_multiplier', 'backbone_width_multiplier',
               'backbone_layer_multiplier'):
    _positive(getattr(backbone, name), f'model_options.backbone.{name}',
              report)

  if model.HasField('decoder'):
    decoder = model.decoder
    _one_of(decoder.decoder_conv_type, CONV_TYPES,
            'model_options.decoder.decoder_conv_type', report)
    if (not decoder.aspp_use_only_1x1_proj_conv and
        len(decoder.atrous_rates) != 3):
      report('model_options.decoder.atrous_rates has '
             f'{_entries(decoder.atrous_rates)}; the ASPP needs exactly 3 '
             '(or set aspp_use_only_1x1_proj_conv: true)')

  if is_kmax and model.WhichOneof('meta_architecture') != 'max_deeplab':
    report(f'model_options.backbone.name is {backbone.name!r} (kMaX-DeepLab) '
           'but model_options has no max_deeplab { ... } section')
  if model.HasField('max_deeplab'):
    _check_max_deeplab(model.max_deeplab, report)


def _check_max_deeplab(options, report: _Report) -> None:
  prefix = 'model_options.max_deeplab'
  for head in ('pixel_space_head', 'auxiliary_semantic_head'):
    for channels in ('output_channels', 'head_channels'):
      _positive(getattr(getattr(options, head), channels),
                f'{prefix}.{head}.{channels}', report)
    _one_of(getattr(options, head).head_conv_type, CONV_TYPES,
            f'{prefix}.{head}.head_conv_type', report)
  for name in ('instance_discrimination_sample_k', 'semantic_sample_k'):
    _non_negative(getattr(options, name), f'{prefix}.{name}', report)
  for name in ('instance_discrimination_sample_temperature',
               'semantic_sample_temperature'):
    _positive(getattr(options, name), f'{prefix}.{name}', report)
  _in_range(options.transformer_decoder_drop_path_keep_prob,
            f'{prefix}.transformer_decoder_drop_path_keep_prob', report, 0.0,
            1.0, low_open=True)
  for name in ('pixel_decoder_width_multiplier',
               'transformer_decoder_width_multiplier'):
    _positive(getattr(options, name), f'{prefix}.{name}', report)
  _check_cluster_family(options, prefix, report)


def _check_cluster_family(options, prefix: str, report: _Report) -> None:
  """The clustering-family switches (docs/clustering_family.md)."""
  _one_of(options.pixel_cluster_interaction,
          cluster_options.PIXEL_CLUSTER_INTERACTIONS,
          f'{prefix}.pixel_cluster_interaction', report)
  _one_of(options.cluster_decoder, cluster_options.CLUSTER_DECODERS,
          f'{prefix}.cluster_decoder', report)
  _non_negative(options.clusterformer_iterations,
                f'{prefix}.clusterformer_iterations', report)
  decoder = options.cluster_decoder
  interaction = options.pixel_cluster_interaction
  if (decoder == cluster_options.CMT and
      interaction == cluster_options.SPATIAL_SOFTMAX):
    allowed = ', '.join(
        repr(a) for a in cluster_options.CLUSTER_AXIS_INTERACTIONS)
    report(f'{prefix}.pixel_cluster_interaction is {interaction!r} but '
           'cluster_decoder "cmt" adds its own cross-attention; expected '
           f'one of {allowed}')
  if (decoder == cluster_options.CLUSTERFORMER and
      options.HasField('pixel_cluster_interaction') and
      interaction != cluster_options.CLUSTER_ARGMAX):
    report(f'{prefix}.pixel_cluster_interaction is {interaction!r} but '
           'cluster_decoder "clusterformer" clusters with its own softmax '
           'over the clusters; leave it unset')
  if (decoder != cluster_options.CLUSTERFORMER and
      options.HasField('clusterformer_iterations')):
    report(f'{prefix}.clusterformer_iterations is set but cluster_decoder '
           f'is {decoder!r}; it only applies to "clusterformer"')


def _check_trainer(trainer: config_pb2.TrainerOptions,
                   report: _Report) -> None:
  solver = trainer.solver_options
  prefix = 'trainer_options.solver_options'
  _one_of(solver.optimizer, OPTIMIZERS, f'{prefix}.optimizer', report)
  _one_of(solver.learning_policy, LEARNING_POLICIES,
          f'{prefix}.learning_policy', report)
  _positive(solver.base_learning_rate, f'{prefix}.base_learning_rate', report)
  _positive(solver.training_number_of_steps,
            f'{prefix}.training_number_of_steps', report)
  for name in ('warmup_steps', 'weight_decay', 'adamw_weight_decay',
               'poly_end_learning_rate', 'backbone_learning_rate_multiplier',
               'poly_learning_power'):
    _non_negative(getattr(solver, name), f'{prefix}.{name}', report)
  _in_range(solver.batchnorm_momentum, f'{prefix}.batchnorm_momentum', report,
            0.0, 1.0)
  _positive(solver.batchnorm_epsilon, f'{prefix}.batchnorm_epsilon', report)
  if solver.use_gradient_clipping:
    _positive(solver.clip_gradient_norm, f'{prefix}.clip_gradient_norm',
              report)

  for name in ('save_checkpoints_steps', 'save_summaries_steps',
               'steps_per_loop', 'num_checkpoints_to_keep'):
    _positive(getattr(trainer, name), f'trainer_options.{name}', report)
  if (trainer.steps_per_loop > 0 and
      trainer.save_summaries_steps % trainer.steps_per_loop):
    report(f'trainer_options.save_summaries_steps '
           f'({trainer.save_summaries_steps}) must be a multiple of '
           f'trainer_options.steps_per_loop ({trainer.steps_per_loop})')

  losses = trainer.loss_options
  for field, loss in losses.ListFields():
    if field.message_type is None:  # deeplab_kmax's scalar loss switches.
      continue
    name = f'trainer_options.loss_options.{field.name}'
    _non_negative(loss.weight, f'{name}.weight', report)
    _in_range(loss.top_k_percent, f'{name}.top_k_percent', report, 0.0, 1.0,
              low_open=True)
  _one_of(losses.hungarian_matcher, ('deeplab2', 'exact'),
          'trainer_options.loss_options.hungarian_matcher', report)
  _one_of(trainer.mixed_precision, precision_options.TRAINING_PRECISIONS,
          'trainer_options.mixed_precision', report)
  if (losses.HasField('semantic_loss') and
      losses.semantic_loss.name != 'softmax_cross_entropy'):
    report('trainer_options.loss_options.semantic_loss.name is '
           f'{losses.semantic_loss.name!r}; expected "softmax_cross_entropy"')


def _check_dataset(dataset: config_pb2.DatasetOptions, name: str,
                   report: _Report) -> None:
  crop = list(dataset.crop_size)
  if len(crop) != 2:
    report(f'{name}.crop_size has {_entries(crop)}; expected exactly 2: '
           '[height, width]')
  elif min(crop) <= 0:
    report(f'{name}.crop_size is {crop}; both entries must be positive')
  for field in ('min_resize_value', 'max_resize_value'):
    values = list(getattr(dataset, field))
    if len(values) > 2:
      report(f'{name}.{field} has {_entries(values)}; expected 0, 1 '
             '(shorter/longer side) or 2 ([height, width])')
  _positive(dataset.batch_size, f'{name}.batch_size', report)
  _positive(dataset.max_thing_id, f'{name}.max_thing_id', report)
  _non_negative(dataset.small_instance_threshold,
                f'{name}.small_instance_threshold', report)
  _positive(dataset.sigma, f'{name}.sigma', report)
  _non_negative(dataset.small_instance_weight,
                f'{name}.small_instance_weight', report)

  if dataset.HasField('augmentations'):
    augment = dataset.augmentations
    prefix = f'{name}.augmentations'
    _positive(augment.min_scale_factor, f'{prefix}.min_scale_factor', report)
    if augment.min_scale_factor > augment.max_scale_factor:
      report(f'{prefix}.min_scale_factor ({augment.min_scale_factor:g}) is '
             f'larger than max_scale_factor ({augment.max_scale_factor:g})')
    _non_negative(augment.scale_factor_step_size,
                  f'{prefix}.scale_factor_step_size', report)
    if augment.HasField('panoptic_copy_paste'):
      paste = augment.panoptic_copy_paste
      _non_negative(paste.panoptic_copy_paste_scale,
                    f'{prefix}.panoptic_copy_paste.panoptic_copy_paste_scale',
                    report)
      for kind in ('thing', 'stuff', 'void'):
        option = f'panoptic_copy_paste_{kind}_option'
        _one_of(getattr(paste, option), COPY_PASTE_OPTIONS,
                f'{prefix}.panoptic_copy_paste.{option}', report)


def _check_evaluator(evaluator: config_pb2.EvaluatorOptions,
                     report: _Report) -> None:
  prefix = 'evaluator_options'
  _one_of(evaluator.transformer_post_processing, TRANSFORMER_POST_PROCESSINGS,
          f'{prefix}.transformer_post_processing', report)
  _one_of(evaluator.raw_panoptic_format, RAW_PANOPTIC_FORMATS,
          f'{prefix}.raw_panoptic_format', report)
  for name in ('thing_area_limit', 'stuff_area_limit', 'num_vis_samples'):
    _non_negative(getattr(evaluator, name), f'{prefix}.{name}', report)
  for name in ('pixel_confidence_threshold',
               'transformer_class_confidence_threshold'):
    _in_range(getattr(evaluator, name), f'{prefix}.{name}', report, 0.0, 1.0)
  maskwise = evaluator.maskwise_postprocessing
  for name in ('transformer_class_confidence_threshold_thing',
               'transformer_class_confidence_threshold_stuff',
               'overlapping_threshold'):
    _in_range(getattr(maskwise, name),
              f'{prefix}.maskwise_postprocessing.{name}', report, 0.0, 1.0)
  for name in ('reorder_class_weight', 'reorder_mask_weight'):
    _non_negative(getattr(maskwise, name),
                  f'{prefix}.maskwise_postprocessing.{name}', report)
