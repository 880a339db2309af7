"""Category tables of the panoptic benchmarks, read from the CSV files in
`categories/` (columns source_id, name, isthing, r, g, b).

Each row is `(source id, name, isthing, (r, g, b))`. The source id is the id
the dataset's own panoptic JSON uses; `dataset_info` turns the rows into the
contiguous ids DeepLab2 trains with:

* COCO: 133 categories with the original (gappy) COCO ids 1..200. Contiguous
  id = row index + 1; 0 is void.
* Cityscapes: the 19 evaluation classes by train id. Contiguous id = train id;
  void is 255.
* ADE20K: the 150 ADE20K-150 classes, numbered from 1 (the converted panoptic
  JSON counts from 0, so contiguous id = JSON id + 1 and JSON 255 is void 0).
"""

import csv
import os
from typing import Tuple

CategoryRow = Tuple[int, str, int, Tuple[int, int, int]]

_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       'categories')
_COLUMNS = ['source_id', 'name', 'isthing', 'r', 'g', 'b']


def read_table(file_name: str) -> Tuple[CategoryRow, ...]:
  """The rows of one category CSV in `categories/`, in file order."""
  path = os.path.join(_FOLDER, file_name)
  with open(path, newline='', encoding='utf-8') as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if header != _COLUMNS:
      raise ValueError(f'{path}: expected the header {",".join(_COLUMNS)}, '
                       f'got {header}.')
    return tuple((int(source), name, int(isthing), (int(r), int(g), int(b)))
                 for source, name, isthing, r, g, b in reader)


COCO_PANOPTIC_CATEGORIES = read_table('coco_panoptic.csv')
CITYSCAPES_CATEGORIES = read_table('cityscapes_panoptic.csv')
ADE20K_CATEGORIES = read_table('ade20k_panoptic.csv')
