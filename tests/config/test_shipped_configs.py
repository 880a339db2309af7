"""The configs under configs/ are DeepLab2's published experiments."""

import pathlib
import re

import pytest

from deeplab_kmax import config as config_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

_DATASETS = ('coco', 'cityscapes', 'ade20k')
# DeepLab2 file name -> our file name, e.g.
# coco_kmax_meta_r50_os32.textproto -> coco/kmax_meta_r50.textproto.
_REFERENCE_NAME = re.compile(
    r'^(?P<dataset>[a-z0-9]+)_kmax_meta_(?P<backbone>\w+?)_os32'
    r'(?P<variant>_res\d+)?\.textproto$')


def _shipped_configs():
  return sorted(p for dataset in _DATASETS
                for p in (REPO_ROOT / 'configs' / dataset).glob('*.textproto'))


def _shipped_name(reference_name):
  match = _REFERENCE_NAME.match(reference_name)
  if not match:
    return None
  return (f'{match["dataset"]}/kmax_meta_{match["backbone"]}'
          f'{match["variant"] or ""}.textproto')


def test_every_reference_experiment_is_shipped(reference_configs):
  expected = {_shipped_name(n) for n in reference_configs} - {None}
  shipped = {f'{p.parent.name}/{p.name}' for p in _shipped_configs()}
  assert len(expected) == 16
  assert expected == shipped


def test_shipped_configs_equal_reference_configs(reference_configs):
  """Same experiment as DeepLab2: every value but experiment_name matches."""
  for reference_name, reference_path in reference_configs.items():
    shipped_name = _shipped_name(reference_name)
    if shipped_name is None:
      continue
    reference = config_lib.load_config(reference_path)
    shipped = config_lib.load_config(REPO_ROOT / 'configs' / shipped_name)
    assert shipped.experiment_name, shipped_name
    reference.ClearField('experiment_name')
    shipped.ClearField('experiment_name')
    assert shipped == reference, (
        f'{shipped_name} differs from {reference_name}:\n'
        f'ours:\n{shipped}\nDeepLab2:\n{reference}')


@pytest.mark.parametrize('path', _shipped_configs(), ids=lambda p: p.name)
def test_shipped_config_is_valid_and_documented(path):
  config = config_lib.validate(config_lib.load_config(path), source=str(path))
  text = path.read_text()
  assert text.startswith('# proto-file: deeplab_kmax/config/config.proto')
  assert f'--config_file=configs/{path.parent.name}/{path.name}' in text
  # Every ${NAME} placeholder used in the file is explained in its header.
  for name in set(re.findall(r'"\$\{(\w+)\}"', text)):
    assert re.search(rf'^#\s+{name}\s', text, re.MULTILINE), name
  assert config.experiment_name.endswith(path.parent.name)
