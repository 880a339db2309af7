"""Dataset descriptors: what a panoptic label means for each dataset.

A panoptic label stores `semantic_id * panoptic_label_divisor + instance_id`.
Reading one needs the divisor, the void (ignore) label, the classes that carry
instances ("things") and, for visualisation and evaluation, class names,
colours and the category ids of the dataset's own panoptic JSON. DeepLab2 keeps
these in code; here the three benchmarks are built in (same values as
DeepLab2) and any other COCO-format panoptic dataset is described by a small
JSON file, referenced from the experiment config, so no code has to change.

Descriptor file (JSON):

    {
      "name": "my_dataset",
      "ignore_label": 0,                  # optional, default 0
      "panoptic_label_divisor": 256,      # optional, default 256
      "num_classes": 4,                   # optional, default max id + 1
      "classes": [
        {"id": 1, "name": "person", "isthing": true, "color": [220, 20, 60],
         "source_id": 1},                 # source_id: category_id in the JSON
        {"id": 2, "name": "car", "isthing": true},
        {"id": 3, "name": "sky", "isthing": false}
      ]
    }

`id` (the contiguous training id) may be left out everywhere: classes are
then numbered in order, skipping the ignore label. `source_id` defaults to
`id`; `color` defaults to a deterministic palette.

The same descriptor may be written as a textproto (`.textproto` / `.pbtxt`),
with the same field names:

    name: "my_dataset"
    panoptic_label_divisor: 256
    classes { id: 1 name: "person" isthing: true color: [220, 20, 60] }
    classes { id: 3 name: "sky" }
"""

import dataclasses
import functools
import json
import logging
import os
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from deeplab_kmax.data import category_tables
from deeplab_kmax.data import label_space as label_space_lib

Color = Tuple[int, int, int]

_VOID_COLOR = (0, 0, 0)
_DESCRIPTOR_SUFFIXES = ('.json', '.textproto', '.pbtxt')
_TEXTPROTO_SUFFIXES = ('.textproto', '.pbtxt', '.txt')


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Everything needed to interpret (and produce) a dataset's panoptic labels.

  Attributes:
    name: Dataset name as used in `DatasetOptions.dataset`.
    num_classes: Number of semantic classes the model predicts; includes the
      void class when the ignore label lies inside [0, num_classes).
    ignore_label: Semantic id of void / unlabelled pixels.
    panoptic_label_divisor: Multiplier of the semantic id in panoptic labels.
    class_has_instances_list: Contiguous ids of the thing classes.
    class_names: {contiguous id: name}.
    colormap: {contiguous id: (r, g, b)}.
    source_to_contiguous: {category_id in the panoptic JSON: contiguous id}.
      A source id mapped to `ignore_label` turns its segments into void.
    splits_to_sizes: Number of images per split, where known.
  """
  name: str
  num_classes: int
  ignore_label: int
  panoptic_label_divisor: int
  class_has_instances_list: Tuple[int, ...]
  class_names: Mapping[int, str]
  colormap: Mapping[int, Color]
  source_to_contiguous: Mapping[int, int]
  splits_to_sizes: Mapping[str, int] = dataclasses.field(default_factory=dict)
  is_video_dataset: bool = False
  is_depth_dataset: bool = False
  ignore_depth: Optional[int] = None
  camera_names: Optional[Tuple[str, ...]] = None

  def __post_init__(self):
    _validate(self)

  def __hash__(self):  # Mappings are unhashable; names identify datasets.
    return hash((self.name, self.num_classes, self.panoptic_label_divisor))

  @property
  def label_space(self) -> label_space_lib.LabelSpace:
    """The ids and class-head order every model part reads (built once)."""
    return self._label_space  # Set by _validate.

  @property
  def thing_class_ids(self) -> Tuple[int, ...]:
    return self.label_space.thing_class_ids

  @property
  def stuff_class_ids(self) -> Tuple[int, ...]:
    return self.label_space.stuff_class_ids

  @property
  def num_thing_stuff_classes(self) -> int:
    return self.label_space.num_thing_stuff_classes

  @property
  def panoptic_ignore_label(self) -> int:
    return self.label_space.panoptic_ignore_label

  def contiguous_to_source(self) -> Dict[int, int]:
    """Inverse of `source_to_contiguous` over non-void classes."""
    return {c: s for s, c in self.source_to_contiguous.items()
            if c != self.ignore_label}

  def colormap_array(self):
    """Colours as a uint8 array indexed by contiguous id (void black)."""
    size = max(self.num_classes, self.ignore_label + 1)
    table = np.zeros((size, 3), np.uint8)
    for class_id, color in self.colormap.items():
      table[class_id] = color
    return table

  def as_deeplab2_dict(self) -> Dict[str, Any]:
    """The fields of DeepLab2's DatasetDescriptor, under its field names."""
    return {
        'dataset_name': self.name,
        'splits_to_sizes': dict(self.splits_to_sizes),
        'num_classes': self.num_classes,
        'ignore_label': self.ignore_label,
        'panoptic_label_divisor': self.panoptic_label_divisor,
        'class_has_instances_list': tuple(self.class_has_instances_list),
        'is_video_dataset': self.is_video_dataset,
        'colormap': self.name,
        'is_depth_dataset': self.is_depth_dataset,
        'ignore_depth': self.ignore_depth,
        'camera_names': self.camera_names,
    }

  def to_json_dict(self) -> Dict[str, Any]:
    """A descriptor-file dict that `from_json_dict` reads back unchanged."""
    inverse = self.contiguous_to_source()
    classes = []
    for class_id in sorted(self.class_names):
      if class_id == self.ignore_label:
        continue
      classes.append({
          'id': class_id,
          'name': self.class_names[class_id],
          'isthing': class_id in self.class_has_instances_list,
          'color': list(self.colormap.get(class_id, _VOID_COLOR)),
          'source_id': inverse.get(class_id, class_id),
      })
    return {
        'name': self.name,
        'ignore_label': self.ignore_label,
        'panoptic_label_divisor': self.panoptic_label_divisor,
        'num_classes': self.num_classes,
        'classes': classes,
    }

  def save(self, path: str) -> None:
    """Writes the JSON descriptor atomically (a reader never sees half)."""
    folder, name = os.path.split(os.path.abspath(path))
    temp = os.path.join(folder, f'.{name}.{os.getpid()}.tmp')
    try:
      with open(temp, 'w') as f:
        json.dump(self.to_json_dict(), f, indent=1)
        f.write('\n')
      os.replace(temp, path)
    finally:
      if os.path.exists(temp):
        os.remove(temp)


def _validate(info: DatasetInfo) -> None:
  """Rejects descriptors whose labels could not be encoded or decoded, and
  builds the label space (stored once: the dataclass is frozen)."""
  where = f'dataset {info.name!r}'
  try:
    space = label_space_lib.LabelSpace(
        num_classes=info.num_classes, ignore_label=info.ignore_label,
        label_divisor=info.panoptic_label_divisor,
        thing_class_ids=info.class_has_instances_list)
  except ValueError as e:
    raise ValueError(f'{where}: {e}') from None
  object.__setattr__(info, '_label_space', space)
  for source_id, class_id in info.source_to_contiguous.items():
    if class_id != info.ignore_label and not 0 <= class_id < info.num_classes:
      raise ValueError(f'{where}: source category {source_id} maps to {class_id}'
                       f', outside [0, {info.num_classes}).')


def _build_info(name: str, rows: Sequence[Tuple[int, str, int, Color]],
                contiguous_of, ignore_label: int, divisor: int,
                num_classes: int, splits_to_sizes: Mapping[str, int],
                extra_sources: Optional[Mapping[int, int]] = None
                ) -> DatasetInfo:
  """Turns a category table into a descriptor."""
  names, colors, mapping, things = {}, {}, {}, []
  for index, (source_id, class_name, isthing, color) in enumerate(rows):
    class_id = contiguous_of(index, source_id)
    names[class_id] = class_name
    colors[class_id] = tuple(color)
    mapping[source_id] = class_id
    if isthing:
      things.append(class_id)
  mapping.update(extra_sources or {})
  if 0 <= ignore_label < num_classes:
    names.setdefault(ignore_label, 'void')
    colors.setdefault(ignore_label, _VOID_COLOR)
  return DatasetInfo(
      name=name, num_classes=num_classes, ignore_label=ignore_label,
      panoptic_label_divisor=divisor,
      class_has_instances_list=tuple(sorted(things)), class_names=names,
      colormap=colors, source_to_contiguous=mapping,
      splits_to_sizes=dict(splits_to_sizes))


# COCO ids run 1..200 with gaps; DeepLab2 packs them to 1..133 in table order.
COCO_PANOPTIC = _build_info(
    'coco_panoptic', category_tables.COCO_PANOPTIC_CATEGORIES,
    contiguous_of=lambda index, _: index + 1, ignore_label=0, divisor=256,
    num_classes=134,
    splits_to_sizes={'train': 118287, 'val': 5000, 'test': 40670})

CITYSCAPES_PANOPTIC = _build_info(
    'cityscapes_panoptic', category_tables.CITYSCAPES_CATEGORIES,
    contiguous_of=lambda _, source: source, ignore_label=255, divisor=1000,
    num_classes=19,
    splits_to_sizes={'train_fine': 2975, 'val_fine': 500,
                     'trainval_fine': 3475, 'test_fine': 1525},
    extra_sources={255: 255})

# The COCO-format ADE20K JSON numbers classes 0..149 and marks void as 255.
ADE20K_PANOPTIC = _build_info(
    'ade20k_panoptic', category_tables.ADE20K_CATEGORIES,
    contiguous_of=lambda _, source: source + 1, ignore_label=0, divisor=1000,
    num_classes=151, splits_to_sizes={'train': 20210, 'val': 2000},
    extra_sources={255: 0})

_REGISTRY: Dict[str, DatasetInfo] = {
    info.name: info for info in (COCO_PANOPTIC, CITYSCAPES_PANOPTIC,
                                 ADE20K_PANOPTIC)
}

# DatasetOptions fields that may hold a descriptor path (deeplab_kmax's
# extension of the DeepLab2 schema).
_DESCRIPTOR_FIELDS = ('dataset_descriptor',)


def registered_names() -> Tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def register(info: DatasetInfo) -> None:
  """Makes `info` reachable by name (e.g. from tests or notebooks)."""
  _REGISTRY[info.name] = info


def palette_color(class_id: int) -> Color:
  """A deterministic, well-spread colour for classes without one."""
  # Bit-reversal palette (as in PASCAL VOC): distinct for the first 256 ids.
  r = g = b = 0
  value = class_id
  for shift in range(7, -1, -1):
    r |= ((value >> 0) & 1) << shift
    g |= ((value >> 1) & 1) << shift
    b |= ((value >> 2) & 1) << shift
    value >>= 3
  return (r, g, b)


_CLASS_KEYS = frozenset({'id', 'name', 'isthing', 'color', 'source_id'})
_TOP_KEYS = frozenset({'name', 'ignore_label', 'panoptic_label_divisor',
                       'num_classes', 'classes', 'splits_to_sizes'})


def from_json_dict(spec: Mapping[str, Any], where: str = 'descriptor'
                   ) -> DatasetInfo:
  """Builds a descriptor from the JSON form documented in the module doc."""
  if not isinstance(spec, Mapping):
    raise ValueError(f'{where}: expected a JSON object, got {type(spec).__name__}.')
  unknown = set(spec) - _TOP_KEYS
  if unknown:
    raise ValueError(f'{where}: unknown keys {sorted(unknown)}; expected some '
                     f'of {sorted(_TOP_KEYS)}.')
  for key in ('name', 'classes'):
    if key not in spec:
      raise ValueError(f'{where}: missing required key {key!r}.')
  ignore_label = int(spec.get('ignore_label', 0))
  classes = spec['classes']
  if not isinstance(classes, list) or not classes:
    raise ValueError(f'{where}: "classes" must be a non-empty list.')

  names, colors, mapping, things = {}, {}, {}, []
  next_id = 0
  for position, entry in enumerate(classes):
    entry_where = f'{where}: classes[{position}]'
    if not isinstance(entry, Mapping):
      raise ValueError(f'{entry_where}: expected an object.')
    unknown = set(entry) - _CLASS_KEYS
    if unknown:
      raise ValueError(f'{entry_where}: unknown keys {sorted(unknown)}.')
    if 'name' not in entry:
      raise ValueError(f'{entry_where}: missing "name".')
    if 'id' in entry:
      class_id = int(entry['id'])
    else:
      if next_id == ignore_label:
        next_id += 1
      class_id = next_id
    next_id = class_id + 1
    if class_id == ignore_label:
      raise ValueError(f'{entry_where}: id {class_id} is the ignore label.')
    if class_id in names:
      raise ValueError(f'{entry_where}: duplicate id {class_id}.')
    source_id = int(entry.get('source_id', class_id))
    if source_id in mapping:
      raise ValueError(f'{entry_where}: duplicate source_id {source_id}.')
    color = tuple(int(c) for c in entry.get('color', palette_color(class_id)))
    if len(color) != 3 or not all(0 <= c <= 255 for c in color):
      raise ValueError(f'{entry_where}: color must be 3 ints in [0, 255], got '
                       f'{entry.get("color")}.')
    names[class_id] = str(entry['name'])
    colors[class_id] = color
    mapping[source_id] = class_id
    if bool(entry.get('isthing', False)):
      things.append(class_id)

  largest = max(names)
  num_classes = int(spec.get('num_classes', largest + 1))
  expected = set(range(num_classes)) - {ignore_label}
  if set(names) != expected:
    missing = sorted(expected - set(names))
    extra = sorted(set(names) - expected)
    raise ValueError(
        f'{where}: class ids must cover [0, num_classes={num_classes}) except '
        f'the ignore label {ignore_label}; missing {missing}, out of range '
        f'{extra}.')
  if 0 <= ignore_label < num_classes:
    names[ignore_label] = 'void'
    colors[ignore_label] = _VOID_COLOR
  return DatasetInfo(
      name=str(spec['name']), num_classes=num_classes,
      ignore_label=ignore_label,
      panoptic_label_divisor=int(spec.get('panoptic_label_divisor', 256)),
      class_has_instances_list=tuple(sorted(things)), class_names=names,
      colormap=colors, source_to_contiguous=mapping,
      splits_to_sizes=dict(spec.get('splits_to_sizes', {})))


@functools.lru_cache(maxsize=None)
def _textproto_message_class():
  """A message type for textproto descriptors, built at run time.

  Its fields mirror the JSON keys, so both forms go through `from_json_dict`.
  """
  from google.protobuf import descriptor_pb2
  from google.protobuf import descriptor_pool
  from google.protobuf import message_factory
  label = descriptor_pb2.FieldDescriptorProto
  file_proto = descriptor_pb2.FileDescriptorProto(
      name='deeplab_kmax_dataset_descriptor.proto',
      package='deeplab_kmax.data', syntax='proto2')

  def add(message, name, number, kind, repeated=False, type_name=None):
    field = message.field.add(
        name=name, number=number, type=kind,
        label=label.LABEL_REPEATED if repeated else label.LABEL_OPTIONAL)
    if type_name:
      field.type_name = type_name

  entry = file_proto.message_type.add(name='ClassEntry')
  add(entry, 'id', 1, label.TYPE_INT32)
  add(entry, 'name', 2, label.TYPE_STRING)
  add(entry, 'isthing', 3, label.TYPE_BOOL)
  add(entry, 'color', 4, label.TYPE_INT32, repeated=True)
  add(entry, 'source_id', 5, label.TYPE_INT32)
  top = file_proto.message_type.add(name='DatasetDescriptor')
  add(top, 'name', 1, label.TYPE_STRING)
  add(top, 'ignore_label', 2, label.TYPE_INT32)
  add(top, 'panoptic_label_divisor', 3, label.TYPE_INT32)
  add(top, 'num_classes', 4, label.TYPE_INT32)
  add(top, 'classes', 5, label.TYPE_MESSAGE, repeated=True,
      type_name='.deeplab_kmax.data.ClassEntry')
  pool = descriptor_pool.DescriptorPool()
  pool.Add(file_proto)
  return message_factory.GetMessageClass(
      pool.FindMessageTypeByName('deeplab_kmax.data.DatasetDescriptor'))


def _parse_textproto(text: str, path: str) -> Dict[str, Any]:
  """Textproto descriptor -> the equivalent JSON dict (set fields only)."""
  from google.protobuf import json_format
  from google.protobuf import text_format
  message = _textproto_message_class()()
  try:
    text_format.Parse(text, message)
  except text_format.ParseError as e:
    raise ValueError(f'Dataset descriptor {path} is not a valid descriptor '
                     f'textproto: {e}') from e
  return json_format.MessageToDict(message, preserving_proto_field_name=True)


def load(path: Union[str, os.PathLike]) -> DatasetInfo:
  """Reads a JSON or textproto descriptor file; errors name the file."""
  path = os.fspath(path)
  try:
    with open(path) as f:
      text = f.read()
  except FileNotFoundError:
    raise FileNotFoundError(f'Dataset descriptor {path} does not exist.') from None
  if path.endswith(_TEXTPROTO_SUFFIXES):
    spec = _parse_textproto(text, path)
  else:
    try:
      spec = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f'Dataset descriptor {path} is not valid JSON: {e}'
                       ) from e
  return from_json_dict(spec, where=path)


def from_coco_categories(name: str, categories: Iterable[Mapping[str, Any]],
                         panoptic_label_divisor: int = 256) -> DatasetInfo:
  """A descriptor for a COCO-format dataset, from its JSON "categories".

  Categories are numbered 1.. in the order given (void is 0), exactly the way
  DeepLab2 packs COCO's own ids.
  """
  classes = []
  for index, category in enumerate(categories):
    entry = {'id': index + 1, 'name': category['name'],
             'isthing': bool(category.get('isthing', 0)),
             'source_id': int(category['id'])}
    if 'color' in category:
      entry['color'] = list(category['color'])
    classes.append(entry)
  return from_json_dict({'name': name, 'ignore_label': 0,
                         'panoptic_label_divisor': panoptic_label_divisor,
                         'classes': classes}, where=f'categories of {name}')


def _looks_like_path(value: str) -> bool:
  return value.endswith(_DESCRIPTOR_SUFFIXES) or os.sep in value


def descriptor_path_of(options: Any) -> Optional[str]:
  """The custom-descriptor path set in a DatasetOptions message, if any."""
  for field in _DESCRIPTOR_FIELDS:
    value = getattr(options, field, None)
    if value:
      return str(value)
  return None


def get_dataset_info(name_or_options: Any) -> DatasetInfo:
  """Resolves a descriptor from a name, a descriptor path or DatasetOptions.

  With DatasetOptions, a descriptor path (the deeplab_kmax extension field)
  wins over `dataset`; `dataset` may itself be a registered name or a path to
  a descriptor file.
  """
  if isinstance(name_or_options, DatasetInfo):
    return name_or_options
  if isinstance(name_or_options, (str, os.PathLike)):
    key = os.fspath(name_or_options)
  else:
    path = descriptor_path_of(name_or_options)
    if path:
      info = load(path)
      dataset = getattr(name_or_options, 'dataset', '')
      if dataset and dataset != info.name and not _looks_like_path(dataset):
        logging.warning('DatasetOptions.dataset is %r but the descriptor %s '
                        'describes %r; using the descriptor.', dataset, path,
                        info.name)
      return info
    key = getattr(name_or_options, 'dataset', '')
  if key in _REGISTRY:
    return _REGISTRY[key]
  if key and (_looks_like_path(key) or os.path.isfile(key)):
    return load(key)
  raise ValueError(
      f'Unknown dataset {key!r}. Built in: {", ".join(registered_names())}. '
      'For another dataset, write a JSON descriptor (see '
      'deeplab_kmax/data/dataset_info.py) and reference it from the config.')
