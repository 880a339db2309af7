r"""Exports a kMaX-DeepLab checkpoint as a SavedModel for TF Serving.

  python trainer/export_model.py \
      --config_file=configs/coco/kmax_meta_r50.textproto \
      --checkpoint_path=/path/to/ckpt-150000 \
      --output_path=/tmp/kmax_r50_coco/1

The checkpoint may be an official DeepLab2 kMaX-DeepLab checkpoint or one
written by this package's trainer (a directory means its latest checkpoint).
--onnx_path / --tflite_path also write ONNX / TFLite models. The main lives
in `deeplab_kmax/export/export_cli.py` (installed as `kmax-export`), which
documents all flags; see docs/serving.md and docs/tflite.md.
"""

import os
import sys

# Makes `deeplab_kmax` importable when run as `python trainer/export_model.py`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deeplab_kmax.export import export_cli  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == '__main__':
  export_cli.run()
