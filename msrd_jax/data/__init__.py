"""Data sets, decoding and input pipelines of msrd_jax.

`list_samples(config.data.dataset, config.data.root, config.data.category,
split)` lists a split; `TrainLoader` and `EvalLoader` turn it into batches.
The TFDS builder lives in `msrd_jax.data.tfds_mvtec` and is not imported
here, so that using the folder layout never imports tensorflow_datasets.
"""

from __future__ import annotations

import os

from msrd_jax.data.checks import check_files
from msrd_jax.data.errors import DataError
from msrd_jax.data.folder import (
  IMAGE_EXTENSIONS,
  MVTEC_CATEGORIES,
  MVTEC_OBJECTS,
  MVTEC_TEXTURES,
  Sample,
  list_mvtec,
)
from msrd_jax.data.images import load_image, load_mask, resize_image, resize_mask
from msrd_jax.data.pipeline import EvalLoader, TrainLoader, shard_batch
from msrd_jax.data.visa import list_visa

DATASETS = ('mvtec', 'visa')


def __getattr__(name: str):
  # Imported on first use: `python -m msrd_jax.data.synthetic` must not find
  # the module already imported by this package.
  if name == 'ensure_synthetic':
    from msrd_jax.data import synthetic  # pylint: disable=g-import-not-at-top

    return synthetic.ensure_synthetic
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def list_samples(dataset: str, root: str | os.PathLike, category: str, split: str) -> list[Sample]:
  """Lists a split of a category.

  Args:
    dataset: 'mvtec' (the MVTec AD folder layout, also BTAD, MPDD, own data
      and the synthetic benchmark) or 'visa' (VisA's split_csv/1cls.csv).
    root: the data set root.
    category: the category (folder or VisA object name).
    split: 'train' or 'test'.

  Returns:
    Samples sorted by (defect_type, file name).
  """
  if root is None:
    raise DataError('no data root given (config.data.root is None)')
  if dataset == 'mvtec':
    return list_mvtec(root, category, split)
  if dataset == 'visa':
    return list_visa(root, category, split)
  raise DataError(f'unknown dataset {dataset!r}; expected one of {DATASETS}')


__all__ = [
  'DATASETS',
  'DataError',
  'EvalLoader',
  'IMAGE_EXTENSIONS',
  'MVTEC_CATEGORIES',
  'MVTEC_OBJECTS',
  'MVTEC_TEXTURES',
  'Sample',
  'TrainLoader',
  'check_files',
  'ensure_synthetic',
  'list_mvtec',
  'list_samples',
  'list_visa',
  'load_image',
  'load_mask',
  'resize_image',
  'resize_mask',
  'shard_batch',
]
