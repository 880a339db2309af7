"""Running DeepLab2's own scripts beside ours, for the interop tests.

DeepLab2 runs in a separate process with `TF_USE_LEGACY_KERAS=1` and
`../shared/bench` on PYTHONPATH (see ../shared/bench/README.md); the two code
bases exchange configs (textproto), checkpoints and SavedModels through
files only.
"""

import os
import pathlib
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

from google.protobuf import descriptor as descriptor_lib
from google.protobuf import message as message_lib
from google.protobuf import text_format
import pytest

from deeplab_kmax.testing import reference

REPO = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent
# Fields numbered from here on are this project's extensions; DeepLab2's
# schema does not know them.
FIRST_EXTENSION_FIELD = 100


def bench_dir() -> Optional[pathlib.Path]:
  """../shared/bench (beside the reference data), if it holds deeplab2/."""
  ref = reference.reference_dir()
  if ref is None:
    return None
  bench = ref.parent / 'bench'
  return bench if (bench / 'deeplab2' / 'trainer' / 'train_lib.py').is_file() \
      else None


def require_deeplab2() -> pathlib.Path:
  """The bench folder, or skips the test (DeepLab2 is needed to compare)."""
  bench = bench_dir()
  if bench is None:
    pytest.skip('DeepLab2 sources (../shared/bench/deeplab2) are absent; '
                'this interop test runs DeepLab2 itself.')
  return bench


def deeplab2_env(bench: pathlib.Path) -> Dict[str, str]:
  """Environment of a DeepLab2 process: legacy Keras, DeepLab2 importable."""
  return dict(os.environ, TF_USE_LEGACY_KERAS='1', PYTHONPATH=str(bench),
              TF_CPP_MIN_LOG_LEVEL='2')


def our_env() -> Dict[str, str]:
  """Environment of a fresh process of this project (no DeepLab2)."""
  env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL='2')
  env.pop('TF_USE_LEGACY_KERAS', None)
  return env


def run_python(args: Sequence[str], env: Dict[str, str],
               timeout: float = 900) -> str:
  """Runs `python args...`; returns its output, fails the test on error."""
  command: List[str] = [sys.executable, *map(str, args)]
  result = subprocess.run(command, cwd=REPO, env=env, timeout=timeout,
                          capture_output=True, text=True, check=False)
  output = result.stdout + result.stderr
  if result.returncode != 0:
    pytest.fail(f'{" ".join(command)} exited with {result.returncode}:\n'
                f'{output[-6000:]}')
  return output


def _extension_fields(message: message_lib.Message, path: str = ''
                      ) -> List[str]:
  found = []
  for field, value in message.ListFields():
    name = f'{path}{field.name}'
    if field.number >= FIRST_EXTENSION_FIELD:
      found.append(name)
    if field.type == descriptor_lib.FieldDescriptor.TYPE_MESSAGE:
      # A repeated field's value is a container, a singular one a message.
      values = [value] if isinstance(value, message_lib.Message) else value
      for item in values:
        found.extend(_extension_fields(item, f'{name}.'))
  return found


def write_deeplab2_config(config: message_lib.Message,
                          path: pathlib.Path) -> pathlib.Path:
  """Writes `config` as a textproto DeepLab2's schema parses.

  Raises:
    ValueError: the config sets one of this project's extension fields.
  """
  extensions = _extension_fields(config)
  if extensions:
    raise ValueError(f'DeepLab2 cannot read extension fields {extensions}.')
  path.write_text(text_format.MessageToString(config))
  return path
