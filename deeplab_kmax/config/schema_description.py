"""A package-independent description of a config schema, for comparing two.

Binary configs are interchangeable with DeepLab2's only while every field the
two schemas share has the same number, wire type, label and default. The
description keys messages by their name relative to the proto package, so
`deeplab2.ModelOptions` and `deeplab_kmax.config.ModelOptions` line up.

DeepLab2's compiled modules are best described in a process of their own
(their package must be on the path), so this file also runs as a script that
prints the description of any root message as JSON:

  PYTHONPATH=../shared/bench python deeplab_kmax/config/schema_description.py \
      deeplab2.config_pb2 ExperimentOptions

It imports only the standard library and protobuf, so it runs without this
package being importable (tests/config/test_deeplab2_schema.py loads it by
file path).
"""

import importlib
import json
import sys
from typing import Any, Dict

from google.protobuf import descriptor as descriptor_lib
from google.protobuf import descriptor_pb2

# Fields numbered from here on are deeplab_kmax's own additions.
FIRST_EXTENSION_NUMBER = 100

# {message name relative to its package: {field name: field facts}}
SchemaDescription = Dict[str, Dict[str, Dict[str, Any]]]


def _relative_name(full_name: str, package: str) -> str:
  prefix = package + '.'
  return full_name[len(prefix):] if full_name.startswith(prefix) else full_name


def _default(field: descriptor_lib.FieldDescriptor) -> Any:
  """The value an unset field reads as, in a JSON-comparable form."""
  if field.type == descriptor_lib.FieldDescriptor.TYPE_MESSAGE:
    return None
  value = field.default_value
  if isinstance(value, list):  # Repeated fields.
    return []
  if isinstance(value, bytes):
    return value.hex()
  return value


def describe(root: descriptor_lib.Descriptor) -> SchemaDescription:
  """Describes `root` and every message reachable from its fields."""
  package = root.file.package
  description: SchemaDescription = {}
  pending = [root]
  while pending:
    message = pending.pop()
    name = _relative_name(message.full_name, package)
    if name in description:
      continue
    proto = descriptor_pb2.DescriptorProto()
    message.CopyToProto(proto)
    labels = {f.name: f.label for f in proto.field}
    fields = {}
    for field in message.fields:
      referenced = field.message_type or field.enum_type
      fields[field.name] = {
          'number': field.number,
          'type': field.type,
          'label': labels[field.name],
          'default': _default(field),
          'type_name': (_relative_name(referenced.full_name, package)
                        if referenced else None),
      }
      if field.message_type is not None:
        pending.append(field.message_type)
    description[name] = fields
  return description


def main(argv) -> int:
  if len(argv) != 3:
    print(f'usage: {argv[0]} MODULE ROOT_MESSAGE', file=sys.stderr)
    return 2
  module = importlib.import_module(argv[1])
  root = getattr(module, argv[2]).DESCRIPTOR
  json.dump(describe(root), sys.stdout, sort_keys=True)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
