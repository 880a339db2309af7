"""Checkpoint keys and the one way model weights are read from a checkpoint.

A TF2 object-based checkpoint names each variable by the attribute path that
reaches it from the root (`encoder/_stage2/_block1/_conv1_bn_act/_conv/kernel`),
found breadth-first. `variables_by_key` recomputes that mapping in memory, so
that we can restore variable by variable: skip layers whose shape depends on
the label set, restore whatever sub-modules a checkpoint has (a backbone-only
checkpoint, say), and report exactly what was and was not restored.

`restore_model` is what every caller uses, with a `RestoreMode` that says
what the restore is for (a trainer resuming its own run reads its whole
checkpoint through `tf.train.CheckpointManager` instead):

  mode                  last layers              missing variables
  fine_tune             as the caller chooses    kept initialised, warned
  resume_or_evaluate    restored                 kept initialised, warned
  strict_inference      restored                 IncompleteCheckpointError

In every mode a checkpoint that shares no variable with the model is an
IncompleteCheckpointError.
"""

import collections
import dataclasses
import re
from typing import Dict, List, Mapping, Sequence, Tuple

from absl import logging
import tensorflow as tf

VALUE_SUFFIX = '/.ATTRIBUTES/VARIABLE_VALUE'
_OBJECT_GRAPH_KEY = '_CHECKPOINTABLE_OBJECT_GRAPH'

# Layers whose shape depends on the number of classes, as key patterns.
SEMANTIC_LAST_LAYER = (r'^semantic_last_layer/',)
CLASS_LAST_LAYER = (r'^transformer_class_head/',
                    r'/_auxiliary_clustering_predictor/_transformer_class_head/')


def variables_by_key(items: Mapping[str, tf.Module]) -> Dict[str, tf.Variable]:
  """{checkpoint key: variable} as `tf.train.Checkpoint(**items)` writes it.

  Walks the object graph breadth-first like the checkpoint writer does, so a
  variable reachable along several paths gets the same (shortest, first)
  path. Slot variables and non-variable state are not included.
  """
  root = tf.train.Checkpoint(**items)
  view = tf.train.TrackableView(root)
  seen = {id(root)}
  queue = collections.deque([(root, ())])
  found = {}
  while queue:
    obj, path = queue.popleft()
    for name, child in view.children(obj).items():
      if id(child) in seen:
        continue
      seen.add(id(child))
      child_path = path + (name,)
      if isinstance(child, tf.Variable):
        found['/'.join(child_path) + VALUE_SUFFIX] = child
      else:
        queue.append((child, child_path))
  return found


@dataclasses.dataclass
class RestoreReport:
  """What an initial-checkpoint restore did, key by key."""
  restored: List[str] = dataclasses.field(default_factory=list)
  skipped: List[str] = dataclasses.field(default_factory=list)
  missing: List[str] = dataclasses.field(default_factory=list)
  unused: List[str] = dataclasses.field(default_factory=list)

  def missing_by_item(self) -> Dict[str, int]:
    """Number of unrestored model variables per top-level item."""
    counts = collections.Counter(key.split('/', 1)[0] for key in self.missing)
    return dict(sorted(counts.items()))

  def summary(self) -> str:
    lines = [f'restored {len(self.restored)} variables, skipped '
             f'{len(self.skipped)} on purpose, {len(self.missing)} not found '
             f'in the checkpoint, {len(self.unused)} checkpoint values unused.']
    for item, count in self.missing_by_item().items():
      lines.append(f'  not restored: {item} ({count} variables)')
    return '\n'.join(lines)


def restore(items: Mapping[str, tf.Module],
            checkpoint_path: str,
            skip_patterns: Sequence[str] = (),
            strict_shapes: bool = True) -> RestoreReport:
  """Restores every variable of `items` that the checkpoint holds.

  Args:
    items: top-level checkpoint items (e.g. `model.checkpoint_items`).
    checkpoint_path: a checkpoint prefix or a directory (latest checkpoint).
    skip_patterns: regular expressions; matching keys are left untouched.
    strict_shapes: raise on a shape mismatch instead of skipping the key.

  Returns:
    A RestoreReport.

  Raises:
    FileNotFoundError: no checkpoint at `checkpoint_path`.
    ValueError: a value's shape differs from the variable's (strict mode).
  """
  path = resolve_checkpoint_path(checkpoint_path)
  reader = tf.train.load_checkpoint(path)
  available = reader.get_variable_to_shape_map()
  skip = [re.compile(p) for p in skip_patterns]
  report = RestoreReport()
  used = set()
  for key, variable in variables_by_key(items).items():
    if any(p.search(key) for p in skip):
      report.skipped.append(key)
      used.add(key)  # Deliberately left out, so not "unused" either.
      continue
    if key not in available:
      report.missing.append(key)
      continue
    used.add(key)
    shape = tuple(available[key])
    if shape != tuple(variable.shape):
      message = (f'{path}: {key} has shape {shape} in the checkpoint but '
                 f'{tuple(variable.shape)} in the model')
      if strict_shapes:
        raise ValueError(message + '; skip it (e.g. the class/semantic last '
                         'layers when the label set differs).')
      logging.warning('%s; not restored.', message)
      report.missing.append(key)
      continue
    variable.assign(reader.get_tensor(key))
    report.restored.append(key)
  report.unused = sorted(
      k for k in available
      if k not in used and k != _OBJECT_GRAPH_KEY and VALUE_SUFFIX in k and
      '.OPTIMIZER_SLOT' not in k and k.split('/', 1)[0] in items)
  return report


def resolve_checkpoint_path(path: str) -> str:
  """A checkpoint prefix from a prefix or a directory, or a clear error."""
  if tf.io.gfile.isdir(path):
    latest = tf.train.latest_checkpoint(path)
    if latest is None:
      raise FileNotFoundError(f'No checkpoint found in directory {path}.')
    return latest
  if not tf.io.gfile.glob(path + '.index') and not tf.io.gfile.exists(path):
    raise FileNotFoundError(
        f'Checkpoint {path} not found (expected {path}.index and data files, '
        'or a directory holding checkpoints).')
  return path


class IncompleteCheckpointError(ValueError):
  """The checkpoint lacks variables that the restore mode requires."""


@dataclasses.dataclass(frozen=True)
class RestoreMode:
  """What a restore is for; build one with the class methods."""
  name: str
  restore_semantic_last_layer: bool = True
  restore_class_last_layer: bool = True
  allow_missing: bool = True

  @classmethod
  def fine_tune(cls, restore_semantic_last_layer: bool,
                restore_class_last_layer: bool) -> 'RestoreMode':
    """Initialises a model for training (`model_options.initial_checkpoint`).

    The last layers are class-count specific: skip them when the label set
    differs from the checkpoint's.
    """
    return cls('fine-tune', restore_semantic_last_layer,
               restore_class_last_layer)

  @classmethod
  def resume_or_evaluate(cls) -> 'RestoreMode':
    """Reads a checkpoint of the same experiment: every layer it holds."""
    return cls('resume-or-evaluate')

  @classmethod
  def strict_inference(cls, allow_partial: bool = False) -> 'RestoreMode':
    """Export and prediction: inference must not run half-initialised
    weights, so every model variable must be in the checkpoint."""
    return cls('strict inference', allow_missing=allow_partial)

  @property
  def skip_patterns(self) -> Tuple[str, ...]:
    """Key patterns this mode leaves untouched."""
    patterns = ()
    if not self.restore_semantic_last_layer:
      patterns += SEMANTIC_LAST_LAYER
    if not self.restore_class_last_layer:
      patterns += CLASS_LAST_LAYER
    return patterns


def restore_model(items: Mapping[str, tf.Module], checkpoint_path: str,
                  mode: RestoreMode) -> RestoreReport:
  """Restores the model `items` (`model.checkpoint_items`) as `mode` says.

  Accepts a checkpoint prefix or a directory, DeepLab2's or ours (a trainer
  checkpoint's optimizer state is ignored). Logs what it did.

  Raises:
    FileNotFoundError: no checkpoint at `checkpoint_path`.
    ValueError: a value's shape differs from its variable's.
    IncompleteCheckpointError: the checkpoint shares no variable with the
      model, or (strict inference) lacks some.
  """
  report = restore(items, checkpoint_path, skip_patterns=mode.skip_patterns)
  logging.info('%s restore from %s: %s', mode.name, checkpoint_path,
               report.summary())
  if report.missing and not mode.allow_missing:
    listed = '\n  '.join(report.missing[:10])
    raise IncompleteCheckpointError(
        f'{checkpoint_path} lacks {len(report.missing)} of the model\'s '
        f'variables ({report.missing_by_item()}), e.g.\n  {listed}\n'
        'Is it a checkpoint of this config (same backbone and dataset)? '
        'Pass --allow_partial_checkpoint to export anyway.')
  if not report.restored:
    raise IncompleteCheckpointError(
        f'Checkpoint {checkpoint_path!r} shares no variable with the model; '
        'is it a kMaX-DeepLab / DeepLab2 checkpoint of the same backbone?')
  if report.missing:
    logging.warning('%d model variables were not in %s and keep their '
                    'initialisation, e.g. %s', len(report.missing),
                    checkpoint_path, report.missing[:5])
  return report
