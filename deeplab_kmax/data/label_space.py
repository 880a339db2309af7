"""Label space: the semantic ids of a dataset and the class head over them.

A dataset labels pixels with semantic ids 0..num_classes-1 plus a void
(ignore) id, which may lie inside that range (COCO: 0) or outside it
(Cityscapes: 255). Panoptic labels are `semantic_id * label_divisor +
instance_id`. The mask transformer's class head predicts the non-void classes
in a fixed order -- the thing classes first, then the stuff classes, each in
ascending id -- followed by one void output.

Every rule derived from these facts (stuff ids, the width of the class head,
class-head index <-> semantic id) is defined here once; the dataset
descriptor owns one `LabelSpace` (`DatasetInfo.label_space`), and the head,
the losses, post-processing and the exports read it from there.
"""

import dataclasses
from typing import Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class LabelSpace:
  """The semantic ids of a dataset and the class head's order over them.

  Attributes:
    num_classes: semantic ids are 0..num_classes-1; this counts the void id
      when it lies in that range (COCO: 134 with void 0; Cityscapes: 19 with
      void 255). The auxiliary semantic head has this many outputs.
    ignore_label: the void semantic id.
    label_divisor: panoptic = semantic * label_divisor + instance.
    thing_class_ids: semantic ids of the classes with instances, in
      class-head order (descriptors list them sorted).
  """
  num_classes: int
  ignore_label: int
  label_divisor: int
  thing_class_ids: Tuple[int, ...]

  def __post_init__(self):
    object.__setattr__(self, 'thing_class_ids',
                       tuple(int(c) for c in self.thing_class_ids))
    if self.label_divisor <= 0:
      raise ValueError('panoptic_label_divisor must be positive, got '
                       f'{self.label_divisor}.')
    if not 0 <= self.ignore_label < self.label_divisor:
      raise ValueError(f'ignore_label must be in [0, panoptic_label_divisor='
                       f'{self.label_divisor}), got {self.ignore_label}.')
    if self.num_classes <= 0:
      raise ValueError('num_classes must be positive.')
    if len(set(self.thing_class_ids)) != len(self.thing_class_ids):
      raise ValueError(f'thing class ids must be distinct, got '
                       f'{self.thing_class_ids}.')
    for class_id in self.thing_class_ids:
      if not 0 <= class_id < self.num_classes or class_id == self.ignore_label:
        raise ValueError(f'thing class {class_id} is not a class id in [0, '
                         f'{self.num_classes}) other than the ignore label.')

  @property
  def void_is_a_class(self) -> bool:
    """Whether the void id lies in [0, num_classes) (COCO) or not (Cityscapes).

    `ignore_label == num_classes` is outside: the ids 0..num_classes-1 are
    then all real classes and the class head adds void as an extra output.
    """
    return self.ignore_label < self.num_classes

  @property
  def stuff_class_ids(self) -> Tuple[int, ...]:
    """Every id in [0, num_classes) that is neither void nor a thing, sorted."""
    things = set(self.thing_class_ids)
    return tuple(c for c in range(self.num_classes)
                 if c != self.ignore_label and c not in things)

  @property
  def semantic_ids(self) -> Tuple[int, ...]:
    """The semantic id of each class-head index (void excluded)."""
    return self.thing_class_ids + self.stuff_class_ids

  @property
  def num_thing_classes(self) -> int:
    return len(self.thing_class_ids)

  @property
  def num_thing_stuff_classes(self) -> int:
    """Non-void classes: the class head's outputs before its void output."""
    return self.num_classes - int(self.void_is_a_class)

  @property
  def class_head_outputs(self) -> int:
    """Outputs of the transformer class head: the non-void classes, then void.

    COCO: 133 + 1 = 134; Cityscapes: 19 + 1 = 20.
    """
    return self.num_thing_stuff_classes + 1

  @property
  def panoptic_ignore_label(self) -> int:
    """The panoptic id of void pixels."""
    return self.ignore_label * self.label_divisor

  def class_index_table(self) -> np.ndarray:
    """[max semantic id + 1] int32: the class-head index of each semantic id,
    -1 for void and ids that are no class."""
    ids = self.semantic_ids
    table = np.full([max(ids, default=0) + 1], -1, np.int32)
    table[list(ids)] = np.arange(len(ids), dtype=np.int32)
    return table
