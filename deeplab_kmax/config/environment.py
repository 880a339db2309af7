"""`${VAR}` placeholders in config strings, filled from the environment.

DeepLab2's published configs leave paths (file patterns, checkpoints) as
placeholders such as `${TRAIN_SET}`; every entry point expands them the same
way before use.
"""

import os
import re
from typing import List

from deeplab_kmax.config import loader
from deeplab_kmax.config import validation

_PLACEHOLDER = re.compile(r'\$\{(\w+)\}')


def _sections_for_mode(mode: str) -> List[str]:
  """Top-level config sections a mode reads (for placeholder checks)."""
  return ['experiment_name', 'model_options', 'trainer_options',
          'evaluator_options', *validation.mode_needs(mode).datasets]


def expand_environment_variables(config, mode: str = 'train_and_eval',
                                 strict: bool = True):
  """Returns a copy of `config` with `${VAR}` in string fields expanded.

  Placeholders come from the environment. An unset variable in a section the
  mode uses is an error that names the variables and fields (unless not
  `strict`, for tools such as export that read few paths); elsewhere (e.g.
  the eval file pattern while training) the text is left as it is.
  """
  config = type(config).FromString(config.SerializeToString())
  used = set(_sections_for_mode(mode))
  unset = []

  def expand(value: str, path: str) -> str:
    def replace(match):
      name = match.group(1)
      if name in os.environ:
        return os.environ[name]
      if path.split('.')[0] in used:
        unset.append((name, path))
      return match.group(0)
    return _PLACEHOLDER.sub(replace, value)

  def walk(message, prefix: str):
    for field, value in message.ListFields():
      path = f'{prefix}{field.name}'
      repeated = getattr(field, 'is_repeated', None)
      if repeated is None:  # protobuf < 6.
        repeated = field.label == field.LABEL_REPEATED
      if field.type == field.TYPE_MESSAGE:
        for item in (value if repeated else [value]):
          walk(item, path + '.')
      elif field.type == field.TYPE_STRING:
        if repeated:
          value[:] = [expand(v, path) for v in value]
        else:
          setattr(message, field.name, expand(value, path))

  walk(config, '')
  if unset and strict:
    details = ', '.join(f'${{{name}}} in {path}' for name, path in unset)
    names = sorted({name for name, _ in unset})
    raise loader.ConfigError(
        f'The config uses environment variables that are not set: {details}. '
        f'Set them (e.g. export {names[0]}=...) or replace the placeholders '
        'in the config.')
  return config


