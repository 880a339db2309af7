"""Experiment configs: the protobuf schema, loading, overrides and checks.

  from deeplab_kmax import config as config_lib

  config = config_lib.load_config('configs/coco/kmax_meta_r50.textproto')
  config = config_lib.override(config, {'train_dataset_options.batch_size': 8})
  config_lib.validate(config)

Entry points load configs with `load_experiment(path, overrides, mode=...)`
(load, overrides, `${VAR}`s, every check for the mode; see `prepare`).

The schema (`config_pb2.ExperimentOptions` and the messages it re-exports)
accepts DeepLab2's kMaX-DeepLab textproto configs unchanged.
"""

from deeplab_kmax.config import config_pb2
from deeplab_kmax.config import dataset_pb2
from deeplab_kmax.config import evaluator_pb2
from deeplab_kmax.config import model_pb2
from deeplab_kmax.config import trainer_pb2
from deeplab_kmax.config.environment import expand_environment_variables
from deeplab_kmax.config.loader import ConfigError
from deeplab_kmax.config.loader import load_config
from deeplab_kmax.config.loader import parse_config
from deeplab_kmax.config.overrides import apply_override_flags
from deeplab_kmax.config.overrides import override
from deeplab_kmax.config.overrides import override_from_text
from deeplab_kmax.config.overrides import parse_override_flags
from deeplab_kmax.config.prepare import load_experiment
from deeplab_kmax.config.prepare import prepare_config
from deeplab_kmax.config.resolve import transformer_decoder_drop_path_keep_prob
from deeplab_kmax.config.validation import find_problems
from deeplab_kmax.config.validation import INFERENCE
from deeplab_kmax.config.validation import TRAINING_MODES
from deeplab_kmax.config.validation import validate

ExperimentOptions = config_pb2.ExperimentOptions

__all__ = [
    'ConfigError',
    'ExperimentOptions',
    'INFERENCE',
    'TRAINING_MODES',
    'apply_override_flags',
    'config_pb2',
    'dataset_pb2',
    'evaluator_pb2',
    'expand_environment_variables',
    'find_problems',
    'load_config',
    'load_experiment',
    'model_pb2',
    'override',
    'override_from_text',
    'parse_config',
    'parse_override_flags',
    'prepare_config',
    'trainer_pb2',
    'transformer_decoder_drop_path_keep_prob',
    'validate',
]
