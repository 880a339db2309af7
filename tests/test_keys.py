"""Every dict key of the package is spelled once, in deeplab_kmax/keys.py."""

import ast
import collections
import pathlib
import tokenize

from deeplab_kmax import keys
from deeplab_kmax.config import trainer_pb2

_PACKAGE = pathlib.Path(keys.__file__).parent


def _string_literals_by_file():
  """String literal -> the library files (not keys.py) that contain it."""
  found = collections.defaultdict(set)
  for path in _PACKAGE.rglob('*.py'):
    if path.name.endswith('_pb2.py') or path.name == 'keys.py':
      continue
    with open(path, 'rb') as f:
      for token in tokenize.tokenize(f.readline):
        if token.type != tokenize.STRING:
          continue
        try:
          value = ast.literal_eval(token.string)
        except (ValueError, SyntaxError):  # f-strings
          continue
        if isinstance(value, str):
          found[value].add(str(path.relative_to(_PACKAGE)))
  return found


def test_compound_key_names_are_not_spelled_outside_keys_py():
  # Single words ('image', 'height', 'inputs', ...) also name other things
  # (COCO JSON fields, flags, progress-bar units), so only the compound
  # names are checked; the loss names double as LossOptions fields, which
  # the config readers may name.
  config_fields = set(trainer_pb2.LossOptions.DESCRIPTOR.fields_by_name)
  names = {value for name, value in vars(keys).items()
           if name.isupper() and isinstance(value, str) and '_' in value}
  assert len(names) > 40
  found = _string_literals_by_file()
  spelled_elsewhere = {name: sorted(found[name]) for name in names
                       if found.get(name) and name not in config_fields}
  assert not spelled_elsewhere, (
      f'Use deeplab_kmax.keys instead of these literals: {spelled_elsewhere}')

