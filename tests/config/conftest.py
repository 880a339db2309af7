"""Fixtures shared by the config tests."""

import pytest


@pytest.fixture(scope='session')
def reference_configs(reference_dir):
  """{file name: path} of DeepLab2's published kMaX configs."""
  paths = sorted((reference_dir / 'deeplab2_configs').glob('*.textproto'))
  if not paths:
    pytest.fail(f'no DeepLab2 configs under {reference_dir}/deeplab2_configs')
  return {p.name: p for p in paths}
