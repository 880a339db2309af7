"""Command-line style overrides of an experiment config.

Two spellings, one semantic: whatever an override names is *replaced*
(repeated fields included: overriding crop_size with [129, 129] yields exactly
two values, never four), and everything it does not name is kept.

  override(config, {'train_dataset_options.crop_size': [129, 129],
                    'trainer_options.solver_options.base_learning_rate': 1e-4})
  override(config, parse_override_flags(['experiment_name=debug',
                                         'model_options.initial_checkpoint=']))
  override_from_text(config, 'train_dataset_options { batch_size: 2 }')

Values may be Python values or strings (as they come from a command line);
strings are converted to the field's type: "true"/"false" for bools,
"[129, 129]" or "129,129" for repeated numbers, JSON objects (lists of them)
for (repeated) message fields.

Every command line (train, export, predict) takes --config_override values
in one grammar that accepts both spellings, flag by flag
(`apply_override_flags`), through `prepare.load_experiment`.
"""

import json
import re
from typing import Any, Iterable, List, Mapping, Tuple

from google.protobuf import descriptor as descriptor_lib
from google.protobuf import message as message_lib

from deeplab_kmax.config import config_pb2
from deeplab_kmax.config import loader

_FieldDescriptor = descriptor_lib.FieldDescriptor
ConfigError = loader.ConfigError


def override(config: config_pb2.ExperimentOptions,
             updates: Mapping[str, Any]) -> config_pb2.ExperimentOptions:
  """Returns a copy of `config` with the dotted-path fields in `updates` set.

  A value of None clears the field (back to its default). A Mapping value
  for a message field updates that message field by field; a message value
  replaces it.
  """
  result = config_pb2.ExperimentOptions()
  result.CopyFrom(config)
  for path, value in updates.items():
    parent, field = _resolve(result, path)
    _assign(parent, field, value, path)
  return result


def override_from_text(config: config_pb2.ExperimentOptions, text: str,
                       source: str = '<override>'
                       ) -> config_pb2.ExperimentOptions:
  """Returns a copy of `config` updated by the fields set in textproto `text`.

  Every field that `text` sets replaces the one in `config`; nested messages
  are merged recursively, repeated fields are replaced as a whole.
  """
  patch = loader.parse_config(text, source=source)
  result = config_pb2.ExperimentOptions()
  result.CopyFrom(config)
  _replace_set_fields(result, patch)
  return result


# `FIELD.PATH=VALUE`: a dotted field name, then `=`. Anything else given to
# --config_override is a textproto snippet (`trainer_options { ... }`).
_FIELD_ASSIGNMENT = re.compile(r'\s*[A-Za-z_][\w.]*\s*=')


def is_field_assignment(flag: str) -> bool:
  """Whether a --config_override value is FIELD.PATH=VALUE (not textproto).

  Decided by the text before the first `=` alone, so the value may be any
  string (`experiment_name=run{1}`, `...file_pattern=a:b`).
  """
  return bool(_FIELD_ASSIGNMENT.match(flag))


def apply_override_flags(config: config_pb2.ExperimentOptions,
                         flags: Iterable[str]
                         ) -> config_pb2.ExperimentOptions:
  """Applies --config_override values in order; each is FIELD.PATH=VALUE or
  a textproto snippet (see `is_field_assignment`)."""
  for flag in flags or ():
    if is_field_assignment(flag):
      config = override(config, parse_override_flags([flag]))
    else:
      config = override_from_text(config, flag,
                                  source=f'--config_override={flag!r}')
  return config


def parse_override_flags(flags: Iterable[str]) -> dict:
  """Parses ['a.b=value', ...] into {'a.b': 'value'} for `override`."""
  updates = {}
  for flag in flags:
    path, sep, value = flag.partition('=')
    if not sep or not path.strip():
      raise ConfigError(
          f'Bad config override {flag!r}: expected FIELD.PATH=VALUE, e.g. '
          'train_dataset_options.crop_size=[129,129]')
    updates[path.strip()] = value.strip()
  return updates


def _resolve(root: message_lib.Message, path: str, prefix: str = ''
             ) -> Tuple[message_lib.Message, _FieldDescriptor]:
  """Walks `path` down to the message that owns its last field.

  `prefix` is the dotted path of `root` itself, used in error messages.
  """
  names = path.split('.')
  shown = [prefix] if prefix else []
  full_path = '.'.join(shown + names)
  message = root
  for depth, name in enumerate(names):
    field = message.DESCRIPTOR.fields_by_name.get(name)
    if field is None:
      where = '.'.join(shown + names[:depth]) or message.DESCRIPTOR.name
      hint = loader.suggest_field_names(message.DESCRIPTOR, name)
      raise ConfigError(
          f'Bad config override {full_path!r}: {where} has no field {name!r}' +
          (f'; did you mean {" or ".join(map(repr, hint))}?' if hint else ''),
          field=full_path)
    if depth == len(names) - 1:
      return message, field
    if field.type != _FieldDescriptor.TYPE_MESSAGE or _is_repeated(field):
      raise ConfigError(
          f'Bad config override {full_path!r}: '
          f'{".".join(shown + names[:depth + 1])} is not a singular message '
          'field, so it has no sub-fields', field=full_path)
    message = getattr(message, name)
  raise AssertionError('unreachable')


def _assign(parent: message_lib.Message, field: _FieldDescriptor, value: Any,
            path: str) -> None:
  """Sets one field, converting command-line strings to its type."""
  if value is None:
    parent.ClearField(field.name)
    return
  try:
    if field.type == _FieldDescriptor.TYPE_MESSAGE:
      _assign_message(parent, field, value, path)
    elif _is_repeated(field):
      items = (_as_list(field, value) if isinstance(value, str) else
               list(value))
      converted = [_convert_scalar(field, item) for item in items]
      parent.ClearField(field.name)
      getattr(parent, field.name).extend(converted)
    else:
      setattr(parent, field.name, _convert_scalar(field, value))
  except ConfigError:
    raise
  except (TypeError, ValueError) as e:
    raise ConfigError(f'Bad config override {path!r}={value!r}: {e}',
                      field=path) from None


def _assign_message(parent, field, value, path) -> None:
  if isinstance(value, str):
    # From a command line: a JSON object, or a JSON list for repeated fields.
    value = json.loads(value) if value.strip() else []
  if _is_repeated(field):
    target = getattr(parent, field.name)
    del target[:]
    for item in value:
      _fill_message(target.add(), item, path)
  else:
    target = getattr(parent, field.name)
    if isinstance(value, message_lib.Message):
      target.CopyFrom(value)
    else:
      target.SetInParent()  # An empty mapping still marks the field present.
      _fill_message(target, value, path)


def _fill_message(target: message_lib.Message, value: Any, path: str) -> None:
  if isinstance(value, message_lib.Message):
    target.CopyFrom(value)
  elif isinstance(value, Mapping):
    for key, item in value.items():
      sub_parent, sub_field = _resolve(target, key, prefix=path)
      _assign(sub_parent, sub_field, item, f'{path}.{key}')
  else:
    raise ConfigError(
        f'Bad config override {path!r}: a message field takes a mapping of '
        f'its sub-fields or a {target.DESCRIPTOR.name}, got {value!r}',
        field=path)


def _convert_scalar(field: _FieldDescriptor, value: Any) -> Any:
  """Converts `value` (possibly a command-line string) to the field's type."""
  kind = field.cpp_type
  if kind == _FieldDescriptor.CPPTYPE_STRING:
    if not isinstance(value, str):
      raise TypeError(f'expected a string, got {value!r}')
    return value
  if kind == _FieldDescriptor.CPPTYPE_ENUM:
    if isinstance(value, str):
      return field.enum_type.values_by_name[value].number
    return value
  if kind == _FieldDescriptor.CPPTYPE_BOOL:
    if isinstance(value, str):
      lowered = value.lower()
      if lowered not in ('true', 'false', '1', '0'):
        raise ValueError(f'expected true or false, got {value!r}')
      return lowered in ('true', '1')
    if not isinstance(value, bool):
      raise TypeError(f'expected a bool, got {value!r}')
    return value
  if kind in (_FieldDescriptor.CPPTYPE_FLOAT, _FieldDescriptor.CPPTYPE_DOUBLE):
    return float(value)
  # Integer fields: accept "129" but never silently truncate 1.5.
  if isinstance(value, str):
    return int(value)
  if isinstance(value, float) and not value.is_integer():
    raise ValueError(f'expected an integer, got {value!r}')
  return int(value)


def _as_list(field: _FieldDescriptor, text: str) -> List[Any]:
  """Splits a command-line value for a repeated field into items.

  '[129, 129]' (JSON) and '129,129' both give two items. A string field
  takes a non-JSON value as one item, since globs may contain commas.
  """
  text = text.strip()
  if text.startswith('['):
    parsed = json.loads(text)
    if not isinstance(parsed, list):
      raise ValueError(f'expected a list, got {text!r}')
    return parsed
  if not text:
    return []
  if field.cpp_type == _FieldDescriptor.CPPTYPE_STRING:
    return [text]
  return [item.strip() for item in text.split(',')]


_is_repeated = loader.is_repeated


def _replace_set_fields(target: message_lib.Message,
                        patch: message_lib.Message) -> None:
  for field, value in patch.ListFields():
    if _is_repeated(field):
      target.ClearField(field.name)
      getattr(target, field.name).extend(value)
    elif field.type == _FieldDescriptor.TYPE_MESSAGE:
      sub_target = getattr(target, field.name)
      sub_target.SetInParent()
      _replace_set_fields(sub_target, value)
    else:
      setattr(target, field.name, value)
