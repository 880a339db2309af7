"""Shared pytest fixtures, and the order xdist hands tests out in."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest  # pylint: disable=g-import-not-at-top

from deeplab_kmax.testing import reference  # pylint: disable=g-import-not-at-top

# Files whose tests use tests/export/helpers.bundle() (a full-model build and
# CLI export, cached per process): one xdist worker runs them all, so that
# the bundle is built once. test_onnx.py comes first in collection order and
# has the ONNX file written by the same export run.
_BUNDLE_GROUP = 'export_bundle'
_BUNDLE_FILES = ('tests/export/test_onnx.py',
                 'tests/export/test_saved_model.py',
                 'tests/parity/test_export_parity.py',
                 'tests/test_predict.py')
_SHARED_SCOPES = ('module', 'package', 'class')


@pytest.fixture(scope='session')
def reference_dir():
  """../shared/reference; tests that need it fail loudly when it is absent."""
  path = reference.reference_dir()
  if path is None:
    pytest.fail('The DeepLab2 reference data (../shared/reference) is missing; '
                'set DEEPLAB_KMAX_REFERENCE to its location.')
  return path


def _shares_a_fixture(item) -> bool:
  """Whether the test uses a fixture set up once for several tests of its
  file (split across workers, each would build it)."""
  info = getattr(item, '_fixtureinfo', None)
  if info is None:
    return False
  return any(definition.scope in _SHARED_SCOPES
             for definitions in info.name2fixturedefs.values()
             for definition in definitions)


def _group(item):
  path = item.nodeid.split('::')[0]
  if path in _BUNDLE_FILES:
    return _BUNDLE_GROUP
  if _shares_a_fixture(item):
    return path.removeprefix('tests/').removesuffix('.py')
  return None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  """Groups and order for `-n 2` with `--dist loadgroup` (pytest.ini).

  xdist hands each worker one unit (a group, or a single ungrouped test) at
  a time, in collection order (`--no-loadscope-reorder`), whenever the
  worker runs low. So tests that share an expensive fixture form one group
  (one worker sets it up once), and in xdist workers the units holding a
  `slow` test move to the front: a long unit handed out last would keep one
  worker busy while the other idles.
  """
  units = {}
  for item in items:
    group = _group(item)
    if group:
      item.add_marker(pytest.mark.xdist_group(group))
    units[item.nodeid] = group or item.nodeid
  if hasattr(config, 'workerinput'):
    # The same order in every worker: xdist checks the collections match.
    slow = {units[item.nodeid] for item in items
            if item.get_closest_marker('slow')}
    items.sort(key=lambda item: units[item.nodeid] not in slow)
