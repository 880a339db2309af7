"""Reads experiment configs (textproto) into `ExperimentOptions`.

A config mistake should cost seconds, not a failed multi-hour job, so every
failure is a `ConfigError` that names the file, the line and column, the full
dotted path of the offending field and, for misspelt names, the closest valid
field names.
"""

import dataclasses
import difflib
import os
import re
from typing import Iterator, List, Optional, Tuple

from google.protobuf import descriptor as descriptor_lib
from google.protobuf import text_format

from deeplab_kmax.config import config_pb2


class ConfigError(ValueError):
  """A config file or override is malformed, unknown or invalid.

  Attributes:
    source: File path (or '<string>'-like label) the text came from.
    line: 1-based line of the problem, when known.
    column: 1-based column of the problem, when known.
    field: Dotted path of the field involved, when known.
  """

  def __init__(self, message: str, source: Optional[str] = None,
               line: Optional[int] = None, column: Optional[int] = None,
               field: Optional[str] = None):
    super().__init__(message)
    self.source = source
    self.line = line
    self.column = column
    self.field = field


def parse_config(text: str,
                 source: str = '<string>') -> config_pb2.ExperimentOptions:
  """Parses textproto `text`; `source` labels it in error messages."""
  experiment = config_pb2.ExperimentOptions()
  try:
    text_format.Parse(text, experiment)
  except text_format.ParseError as e:
    raise _describe_parse_error(e, text, source) from None
  return experiment


# Shipped configs: in an installed package they are package data under
# deeplab_kmax/configs; in a source checkout they are the repository's
# configs/ folder (beside the package).
CONFIG_SUFFIX = '.textproto'
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_CONFIG_DIRS = (os.path.join(_PACKAGE_DIR, 'configs'),
                       os.path.join(os.path.dirname(_PACKAGE_DIR), 'configs'))


def shipped_config_names() -> List[str]:
  """Names of the shipped configs, e.g. 'coco/kmax_meta_r50', sorted."""
  names = set()
  for root in SHIPPED_CONFIG_DIRS:
    if not os.path.isdir(root):
      continue
    for folder, _, files in os.walk(root):
      for name in files:
        if name.endswith(CONFIG_SUFFIX):
          relative = os.path.relpath(os.path.join(folder, name), root)
          names.add(relative[:-len(CONFIG_SUFFIX)].replace(os.sep, '/'))
  return sorted(names)


def resolve_config_path(path: 'os.PathLike[str] | str') -> str:
  """A config file path, or the name of a shipped config -> a file path.

  An existing file (or a URL) is used as given. Otherwise the name, with or
  without `.textproto` and an optional leading `configs/`, is looked up
  among the shipped configs: `coco/kmax_meta_r50` and
  `configs/demo/kmax_demo.textproto` work from any directory.

  Raises:
    ConfigError: neither a file nor a shipped config; lists the shipped ones.
  """
  path = os.fspath(path)
  if '://' in path or os.path.exists(path):
    return path
  name = path.replace(os.sep, '/')
  if name.startswith('configs/'):
    name = name[len('configs/'):]
  if not name.endswith(CONFIG_SUFFIX):
    name += CONFIG_SUFFIX
  if not os.path.isabs(path):
    for root in SHIPPED_CONFIG_DIRS:
      candidate = os.path.join(root, *name.split('/'))
      if os.path.isfile(candidate):
        return candidate
  shipped = shipped_config_names()
  raise ConfigError(
      f'Config file not found: {path} (resolved to {os.path.abspath(path)}), '
      'and it is not the name of a shipped config. Shipped configs: '
      + (', '.join(shipped) if shipped else 'none found') + '.', source=path)


def load_config(path: 'os.PathLike[str] | str') -> config_pb2.ExperimentOptions:
  """Reads and parses a textproto config file or a shipped config.

  Local paths are read directly; paths with a URL scheme (gs://, ...) go
  through tf.io.gfile so that remote configs work like in DeepLab2. A path
  that does not exist may name a shipped config (`resolve_config_path`).
  """
  path = resolve_config_path(path)
  return parse_config(_read_text(path), source=path)


def _read_text(path: str) -> str:
  if '://' in path:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    if not tf.io.gfile.exists(path):
      raise ConfigError(f'Config file not found: {path}', source=path)
    with tf.io.gfile.GFile(path, 'r') as f:
      return f.read()
  if not os.path.exists(path):
    raise ConfigError(
        f'Config file not found: {path} (resolved to {os.path.abspath(path)})',
        source=path)
  if os.path.isdir(path):
    raise ConfigError(f'Config path is a directory, not a file: {path}',
                      source=path)
  try:
    with open(path, encoding='utf-8') as f:
      return f.read()
  except UnicodeDecodeError as e:
    raise ConfigError(f'{path}: config is not valid UTF-8 text ({e})',
                      source=path) from None


# ----------------------------------------------------------------------------
# Error reporting.

_POSITION_PREFIX = re.compile(r'^\d+:\d+\s*:\s*')
_UNKNOWN_FIELD = re.compile(
    r'Message type "(?P<type>[\w.]+)" has no field named "(?P<name>\w+)"')
_REPEATED_SINGULAR = re.compile(
    r'Message type "[\w.]+" should not have multiple "(?P<name>\w+)" fields')
# The tokenizer quotes the offending line before value errors; drop the quote.
_QUOTED_LINE = re.compile(r"^'.*?':\s*")


def _describe_parse_error(error: text_format.ParseError, text: str,
                          source: str) -> ConfigError:
  """Turns protobuf's terse ParseError into a ConfigError."""
  line, column = error.GetLine(), error.GetColumn()
  reason = _POSITION_PREFIX.sub('', str(error))
  where = f'{source}:{line}:{column}' if line else source
  path = _field_path_at(text, line, column) if line else []

  unknown = _UNKNOWN_FIELD.search(reason)
  if unknown:
    name = unknown.group('name')
    parent = '.'.join(path[:-1]) if path and path[-1] == name else '.'.join(
        path)
    message = f'{where}: unknown field "{name}" in '
    if parent:
      message += (f'{parent} (message '
                  f'{_short_type_name(unknown.group("type"))})')
    else:
      message += 'ExperimentOptions'
    suggestions = _close_field_names(unknown.group('type'), name)
    if suggestions:
      message += '; did you mean ' + ' or '.join(
          f'"{s}"' for s in suggestions) + '?'
    field = '.'.join(filter(None, [parent, name]))
  else:
    field = '.'.join(path) or None
    reason = _QUOTED_LINE.sub('', reason)
    repeated = _REPEATED_SINGULAR.search(reason)
    if repeated:
      message = (f'{where}: field {field or repeated.group("name")} is set '
                 'more than once but is not a repeated field')
    elif field:
      message = f'{where}: bad value or syntax at field {field}: {reason}'
    else:
      message = f'{where}: {reason}'
  excerpt = _excerpt(text, line, column)
  if excerpt:
    message += '\n' + excerpt
  return ConfigError(message, source=source, line=line or None,
                     column=column or None, field=field)


def _short_type_name(full_name: str) -> str:
  prefix = config_pb2.DESCRIPTOR.package + '.'
  return full_name[len(prefix):] if full_name.startswith(prefix) else full_name


def _close_field_names(type_name: str, name: str) -> List[str]:
  try:
    message = config_pb2.DESCRIPTOR.pool.FindMessageTypeByName(type_name)
  except KeyError:
    return []
  return suggest_field_names(message, name)


def is_repeated(field: descriptor_lib.FieldDescriptor) -> bool:
  """Whether a field is repeated, on every protobuf runtime (>= 6 has
  `is_repeated`; older ones only `label`)."""
  repeated = getattr(field, 'is_repeated', None)
  if repeated is None:
    return field.label == descriptor_lib.FieldDescriptor.LABEL_REPEATED
  return repeated


def suggest_field_names(message: descriptor_lib.Descriptor,
                        name: str) -> List[str]:
  """Field names of `message` that look like a misspelling of `name`."""
  names = [f.name for f in message.fields]
  return difflib.get_close_matches(name, names, n=2, cutoff=0.6)


def _excerpt(text: str, line: int, column: int) -> str:
  """The offending source line with a caret under the error column."""
  lines = text.splitlines()
  if not 1 <= line <= len(lines):
    return ''
  source_line = lines[line - 1].rstrip()
  caret = ' ' * max(column - 1, 0) + '^'
  return f'    {source_line}\n    {caret}'


@dataclasses.dataclass(frozen=True)
class _Token:
  text: str
  line: int  # 1-based.
  column: int  # 1-based.

  @property
  def is_name(self) -> bool:
    return self.text[0].isalpha() or self.text[0] == '_'


_TOKEN = re.compile(r"""
    (?P<skip>\s+|\#[^\n]*)
  | (?P<token>"(?:[^"\\\n]|\\.)*"?|'(?:[^'\\\n]|\\.)*'?   # strings
      |[A-Za-z_][\w]*                                    # names
      |[-+]?[\w.]+                                       # numbers
      |[{}<>\[\]:,;]|.)                                  # punctuation
""", re.VERBOSE)


def _tokens(text: str) -> Iterator[_Token]:
  line, line_start = 1, 0
  for match in _TOKEN.finditer(text):
    if match.group('token') is not None:
      yield _Token(match.group('token'), line,
                   match.start() - line_start + 1)
    newlines = match.group(0).count('\n')
    if newlines:
      line += newlines
      line_start = match.start() + match.group(0).rindex('\n') + 1


def _field_path_at(text: str, line: int, column: int) -> List[str]:
  """Dotted path (as a list) of the field being parsed at (line, column).

  Replays the textproto token stream up to the error position, tracking the
  enclosing message fields and the most recent field name at each level.
  """
  stack: List[Optional[str]] = []
  current: Optional[str] = None
  expecting_value = in_list = False
  error_position: Tuple[int, int] = (line, column)
  for token in _tokens(text):
    if (token.line, token.column) > error_position:
      break
    t = token.text
    if in_list:
      in_list = t != ']'
      expecting_value = expecting_value and in_list
    elif t == '[' and expecting_value:
      in_list = True
    elif t in ('{', '<'):
      stack.append(current)
      current, expecting_value = None, False
    elif t in ('}', '>'):
      current = stack.pop() if stack else None
      expecting_value = False
    elif t == ':':
      expecting_value = True
    elif t in (',', ';'):
      pass
    elif expecting_value:
      expecting_value = False
    elif token.is_name:
      current = t
  return [name for name in (*stack, current) if name]

