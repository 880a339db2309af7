"""The one path from a config file to the config an entry point runs.

  load (a file or a shipped config's name)
    -> --config_override's (FIELD.PATH=VALUE or textproto, `overrides`)
    -> `${VAR}` expansion from the environment (`environment`)
    -> every rule for the mode (`validation`)
    -> the dataset files the mode opens exist

Training, evaluation, export and prediction all load configs with
`load_experiment`; `prepare_config` is the same minus the loading, for a
config built in memory (`train_lib.run_experiment` from Python).
"""

import os
from typing import Iterable, Optional

from deeplab_kmax.config import config_pb2
from deeplab_kmax.config import environment
from deeplab_kmax.config import loader
from deeplab_kmax.config import overrides as overrides_lib
from deeplab_kmax.config import validation


def load_experiment(path: 'os.PathLike[str] | str',
                    overrides: Iterable[str] = (),
                    *,
                    mode: str,
                    check_files: bool = True
                    ) -> config_pb2.ExperimentOptions:
  """Loads, overrides, expands and checks the config of a `mode` run.

  Args:
    path: a textproto file or the name of a shipped config.
    overrides: --config_override values, applied in order.
    mode: a key of `validation.MODE_NEEDS` (a trainer mode, or
      `validation.INFERENCE` for export and prediction).
    check_files: check that the dataset file patterns the mode reads match
      files.

  Raises:
    ConfigError: the file, an override or a value is bad, or a `${VAR}`
      the mode needs is unset.
    FileNotFoundError: a dataset file pattern matches no file.
  """
  path = loader.resolve_config_path(path)
  config = overrides_lib.apply_override_flags(loader.load_config(path),
                                              overrides)
  return prepare_config(config, mode, source=path, check_files=check_files)


def prepare_config(config: config_pb2.ExperimentOptions,
                   mode: str,
                   source: Optional[str] = None,
                   check_files: bool = True) -> config_pb2.ExperimentOptions:
  """Expands `${VAR}`s and checks `config` for a `mode` run (a copy).

  Placeholders must be set in the sections the mode reads, except for
  inference, which reads few paths.
  """
  needs = validation.mode_needs(mode)
  config = environment.expand_environment_variables(
      config, mode, strict=needs.reads_dataset_files)
  validation.validate(config, source=source, mode=mode)
  if check_files and needs.reads_dataset_files:
    for section in needs.datasets:
      _check_file_pattern(getattr(config, section), section)
  return config


def _check_file_pattern(dataset_options: config_pb2.DatasetOptions,
                        field: str) -> None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  patterns = list(dataset_options.file_pattern)
  if not patterns:
    raise loader.ConfigError(f'{field}.file_pattern is not set.',
                             field=f'{field}.file_pattern')
  for pattern in patterns:
    if not tf.io.gfile.glob(pattern):
      raise FileNotFoundError(f'{field}.file_pattern {pattern!r} matches no '
                              'file.')
