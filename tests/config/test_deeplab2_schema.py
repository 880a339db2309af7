"""The schema equals DeepLab2's compiled protos on every field they share.

Binary configs (and text ones relying on defaults) mean the same in both code
bases only if each shared field has the same number, type, label, default and
message/enum type. DeepLab2's modules are described in a subprocess (they
need ../shared/bench on the path), ours in this process, with the same code.
"""

import json
import os
import pathlib
import subprocess
import sys

from google.protobuf import descriptor
import pytest

from deeplab_kmax.config import config_pb2
from deeplab_kmax.config import schema_description
from deeplab_kmax.testing import reference

_FACTS = ('number', 'type', 'label', 'default', 'type_name')
_RUN_BY_PATH = '\n'.join([
    'import importlib.util, sys',
    'spec = importlib.util.spec_from_file_location("schema", sys.argv[1])',
    'module = importlib.util.module_from_spec(spec)',
    'spec.loader.exec_module(module)',
    'sys.exit(module.main(sys.argv[1:]))'])


def _bench_dir() -> pathlib.Path:
  ref = reference.reference_dir()
  bench = None if ref is None else ref.parent / 'bench'
  if bench is None or not (bench / 'deeplab2' / 'config_pb2.py').is_file():
    pytest.skip('DeepLab2 compiled protos (../shared/bench/deeplab2/'
                'config_pb2.py) are absent; cannot compare the schemas.')
  return bench


@pytest.fixture(scope='module')
def deeplab2_schema():
  bench = _bench_dir()
  env = dict(os.environ, PYTHONPATH=str(bench))
  # Loaded by file path so that neither our package nor the folder of our
  # *_pb2 modules is importable there.
  result = subprocess.run(
      [sys.executable, '-c', _RUN_BY_PATH, schema_description.__file__,
       'deeplab2.config_pb2', 'ExperimentOptions'],
      capture_output=True, text=True, env=env, cwd=bench, check=False,
      timeout=120)
  assert result.returncode == 0, result.stderr
  return json.loads(result.stdout)


@pytest.fixture(scope='module')
def our_schema():
  # The same JSON round trip as DeepLab2's, so both sides compare alike.
  return json.loads(json.dumps(
      schema_description.describe(config_pb2.ExperimentOptions.DESCRIPTOR)))


def _shared_fields(ours, theirs):
  """(message, field, our facts, their facts) of every shared field.

  Walks from the root through shared message fields only, so messages that
  DeepLab2 reaches only through fields we leave out are not required.
  """
  pending, seen = ['ExperimentOptions'], set()
  while pending:
    message = pending.pop()
    if message in seen:
      continue
    seen.add(message)
    if message not in ours:
      continue  # The field leading here already differs in type_name.
    for name, facts in theirs[message].items():
      if name in ours[message]:
        yield message, name, ours[message][name], facts
        if facts['type'] == descriptor.FieldDescriptor.TYPE_MESSAGE:
          pending.append(facts['type_name'])


def test_every_shared_field_matches_deeplab2(our_schema, deeplab2_schema):
  mismatches, count = [], 0
  for message, name, ours, theirs in _shared_fields(our_schema,
                                                    deeplab2_schema):
    count += 1
    for fact in _FACTS:
      if ours[fact] != theirs[fact]:
        mismatches.append(f'{message}.{name}: {fact} is {ours[fact]!r} here, '
                          f'{theirs[fact]!r} in DeepLab2')
  assert not mismatches, '\n'.join(mismatches)
  # Every field of ours below the extension range was compared: a walk that
  # stopped early would pass vacuously.
  ours_below_100 = sum(
      facts['number'] < schema_description.FIRST_EXTENSION_NUMBER
      for fields in our_schema.values() for facts in fields.values())
  assert count == ours_below_100


def test_the_four_former_differences_hold_deeplab2_defaults():
  # These defaults used to be the COCO config's values; DeepLab2 HEAD's are
  # below (the comparison above covers them too when DeepLab2 is present).
  maskwise = config_pb2.EvaluatorOptions().maskwise_postprocessing
  assert maskwise.overlapping_threshold == 0.5
  assert maskwise.reorder_mask_weight == 0.0
  assert maskwise.transformer_class_confidence_threshold_stuff == (
      pytest.approx(0.7))
  paste = config_pb2.DatasetOptions().augmentations.panoptic_copy_paste
  assert paste.panoptic_copy_paste_void_option == 'none'


def test_extensions_are_numbered_apart_from_deeplab2(our_schema,
                                                     deeplab2_schema):
  problems = []
  for message, fields in our_schema.items():
    theirs = deeplab2_schema.get(message)
    if theirs is None:
      problems.append(f'{message} is not a DeepLab2 message')
      continue
    their_numbers = {f['number']: n for n, f in theirs.items()}
    for name, facts in fields.items():
      if name in theirs:
        continue
      if facts['number'] < schema_description.FIRST_EXTENSION_NUMBER:
        problems.append(f'{message}.{name} is ours but numbered '
                        f'{facts["number"]} (< 100)')
      if facts['number'] in their_numbers:
        problems.append(f'{message}.{name} reuses DeepLab2 number '
                        f'{facts["number"]} ({their_numbers[facts["number"]]})')
  assert not problems, '\n'.join(problems)


def test_comparison_sees_a_changed_default(deeplab2_schema):
  # The comparison is not vacuous: a schema with one default changed fails.
  altered = json.loads(json.dumps(deeplab2_schema))
  field = altered['EvaluatorOptions.MaskwisePostProcessingOptions'][
      'overlapping_threshold']
  field['default'] = 0.8
  diffs = [(m, n) for m, n, ours, theirs in _shared_fields(altered,
                                                           deeplab2_schema)
           if ours != theirs]
  assert diffs == [('EvaluatorOptions.MaskwisePostProcessingOptions',
                    'overlapping_threshold')]
