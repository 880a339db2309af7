"""Shared pytest fixtures."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest  # pylint: disable=g-import-not-at-top

from deeplab_kmax.testing import reference  # pylint: disable=g-import-not-at-top


@pytest.fixture(scope='session')
def reference_dir():
  """../shared/reference; tests that need it fail loudly when it is absent."""
  path = reference.reference_dir()
  if path is None:
    pytest.fail('The DeepLab2 reference data (../shared/reference) is missing; '
                'set DEEPLAB_KMAX_REFERENCE to its location.')
  return path
