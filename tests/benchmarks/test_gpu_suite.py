"""The GPU suite's --smoke run works on CPU, so the suite cannot rot."""

import pathlib
import subprocess
import sys

import pytest

_SUITE = pathlib.Path(__file__).resolve().parents[2] / 'benchmarks' / (
    'gpu_suite.py')


@pytest.mark.slow
def test_smoke_run_prints_every_setting():
  done = subprocess.run([sys.executable, str(_SUITE), '--smoke'],
                        capture_output=True, text=True, timeout=600,
                        check=False)
  assert done.returncode == 0, done.stdout + done.stderr[-3000:]
  lines = done.stdout.splitlines()
  assert lines[0].startswith('paper (kMaX-DeepLab, ECCV 2022): kMaX-R50 '
                             '22.8 images/s')
  measured = [line for line in lines if 'images/s' in line and
              line.startswith('ours')]
  assert len(measured) == 4, done.stdout
  for label in ('infer 33x33 b1 float32 ', 'infer 33x33 b1 bfloat16 ',
                'infer 33x33 b1 float32 + XLA', 'train 33x33 b1 bfloat16 + XLA'):
    assert any(label in line for line in measured), (label, done.stdout)
  assert all('peak RSS' in line or 'peak GPU' in line for line in measured)
