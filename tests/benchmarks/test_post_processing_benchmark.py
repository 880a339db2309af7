"""The post-processing benchmark runs at a tiny size, so it cannot rot."""

import pathlib
import re
import subprocess
import sys

_SCRIPT = pathlib.Path(__file__).resolve().parents[2] / 'benchmarks' / (
    'post_processing_benchmark.py')


def test_tiny_run_prints_a_line_per_setting():
  done = subprocess.run(
      [sys.executable, str(_SCRIPT), '--sizes=33,41', '--sharpness=1,30',
       '--slots=16', '--repeats=1'],
      capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stdout + done.stderr[-3000:]
  rows = [line for line in done.stdout.splitlines()
          if re.match(r'^\d+x\d+ sharpness ', line)]
  assert len(rows) == 4, done.stdout
  for row in rows:
    assert re.search(r'shared band +\d+\.\d%.*merge +\d+ ms.*dense +\d+ ms'
                     r'.*gathered +\d+ ms.*gathered / dense \d+\.\d\d$',
                     row), row
  # Sharp masks put pixels in the shared band, so the gathered pass runs.
  assert ' 0.0%' not in rows[1], done.stdout
