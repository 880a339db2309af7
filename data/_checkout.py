"""Puts this checkout first on the module path, so that the scripts in data/
run from a checkout whether or not the package is installed."""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)
