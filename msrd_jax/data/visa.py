"""Listing of VisA through its official one-class split file.

VisA's release holds `<root>/split_csv/1cls.csv` with the columns
object,split,label,image,mask: split is 'train' or 'test', label is 'normal'
or 'anomaly', and image/mask are paths relative to `<root>` (mask empty for
normal images). Samples use defect_type 'good' for normal images and
'anomaly' for anomalous ones (VisA's one-class split has no defect types).
VisA masks store small nonzero values on defects; `load_mask` binarizes
lossless masks at > 0, which handles them.
"""

from __future__ import annotations

import csv
import os

from msrd_jax.data.errors import DataError
from msrd_jax.data.folder import SPLITS, Sample

SPLIT_CSV = os.path.join('split_csv', '1cls.csv')
_COLUMNS = ('object', 'split', 'label', 'image', 'mask')
_LABELS = {'normal': 0, 'anomaly': 1}


def _read_rows(csv_path: str) -> list[tuple[int, dict[str, str]]]:
  try:
    with open(csv_path, newline='', encoding='utf-8-sig') as f:
      reader = csv.DictReader(f)
      header = [h.strip() for h in (reader.fieldnames or [])]
      missing = [c for c in _COLUMNS if c not in header]
      if missing:
        raise DataError(
          f'{csv_path} lacks the column(s) {", ".join(missing)}; expected '
          f'the header {",".join(_COLUMNS)} (found {",".join(header)}).'
        )
      reader.fieldnames = header
      return [
        (i + 2, {k: (v or '').strip() for k, v in row.items() if k is not None})
        for i, row in enumerate(reader)
      ]
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise DataError(f'cannot read the VisA split file {csv_path}: {e}') from e


def list_visa(root: str | os.PathLike, category: str, split: str) -> list[Sample]:
  """Lists one split of one VisA category from `split_csv/1cls.csv`.

  Args:
    root: the VisA root (holding split_csv/ and the category folders).
    category: a VisA object name, e.g. 'candle'.
    split: 'train' or 'test'.

  Returns:
    The samples sorted by (defect_type, file name); absolute paths; names
    relative to the category folder (e.g. 'Data/Images/Anomaly/000.JPG').

  Raises:
    DataError: naming the file (and CSV line) concerned.
  """
  if split not in SPLITS:
    raise DataError(f'split must be one of {SPLITS}, got {split!r}')
  root = os.path.abspath(os.fspath(root))
  if not os.path.isdir(root):
    raise DataError(f'VisA root {root} does not exist or is not a folder')
  csv_path = os.path.join(root, SPLIT_CSV)
  if not os.path.isfile(csv_path):
    raise DataError(
      f'the VisA split file {csv_path} does not exist; the VisA root must '
      'hold split_csv/1cls.csv (columns object,split,label,image,mask) '
      'next to the category folders, as in the VisA release.'
    )
  objects = set()
  samples = []
  for line, row in _read_rows(csv_path):
    where = f'{csv_path} line {line}'
    if row['split'] not in SPLITS:
      raise DataError(f'{where}: split {row["split"]!r} is not one of {SPLITS}')
    if row['label'] not in _LABELS:
      raise DataError(f'{where}: label {row["label"]!r} is not one of {tuple(_LABELS)}')
    objects.add(row['object'])
    if row['object'] != category or row['split'] != split:
      continue
    label = _LABELS[row['label']]
    image_path = os.path.join(root, row['image'])
    if not os.path.isfile(image_path):
      raise DataError(f'{where}: the image {image_path} does not exist')
    mask_path = None
    if label:
      if not row['mask']:
        raise DataError(f'{where}: the anomalous image {image_path} has no mask path')
      mask_path = os.path.join(root, row['mask'])
      if not os.path.isfile(mask_path):
        raise DataError(f'{where}: the mask {mask_path} of {image_path} does not exist')
    rel = row['image'].replace('\\', '/')
    prefix = category + '/'
    name = rel[len(prefix) :] if rel.startswith(prefix) else rel
    samples.append(Sample(image_path, mask_path, label, 'anomaly' if label else 'good', name))
  if category not in objects:
    raise DataError(
      f'{csv_path} has no rows for the category {category!r}; categories '
      f'found: {", ".join(sorted(objects)) or "(none)"}'
    )
  if not samples:
    raise DataError(f'{csv_path} has no {split!r} rows for {category!r}')
  samples.sort(key=lambda s: (s.defect_type, os.path.basename(s.image_path), s.name))
  return samples


def visa_categories(root: str | os.PathLike) -> list[str]:
  """The object names of VisA's split file, sorted."""
  csv_path = os.path.join(os.path.abspath(os.fspath(root)), SPLIT_CSV)
  if not os.path.isfile(csv_path):
    raise DataError(f'the VisA split file {csv_path} does not exist')
  return sorted({row['object'] for _, row in _read_rows(csv_path)})
