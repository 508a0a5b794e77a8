"""Builders of tiny data sets on disk for the data tests (plain functions, so
they need no conftest.py)."""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
from PIL import Image


def write_image(path, array: np.ndarray, **save_kwargs) -> str:
  """Writes a uint8/uint16/bool array with PIL; returns the path."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, **save_kwargs)
  return path


def write_png_16bit_rgb(path, array: np.ndarray) -> str:
  """Writes an (H, W, C) uint16 array as a 16-bit PNG, written here from the PNG
  specification (PIL cannot): C = 2 gray+alpha, 3 RGB, 4 RGBA."""
  path = os.fspath(path)
  h, w, c = array.shape
  colour_type = {2: 4, 3: 2, 4: 6}[c]
  raw = b''.join(b'\x00' + array[y].astype('>u2').tobytes() for y in range(h))

  def chunk(kind, data):
    return (
      struct.pack('>I', len(data))
      + kind
      + data
      + struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF)
    )

  png = (
    b'\x89PNG\r\n\x1a\n'
    + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 16, colour_type, 0, 0, 0))
    + chunk(b'IDAT', zlib.compress(raw))
    + chunk(b'IEND', b'')
  )
  with open(path, 'wb') as f:
    f.write(png)
  return path


def index_image(index: int, size=(12, 10)) -> np.ndarray:
  """(H, W, 3) uint8 of constant value `index`: resizing keeps it constant,
  so a batch row tells which sample it came from."""
  w, h = size
  return np.full((h, w, 3), index, np.uint8)


def make_mvtec_tree(
  root,
  category: str = 'widget',
  n_train: int = 6,
  n_test_good: int = 2,
  defects=(('crack', 2), ('hole', 1)),
  size=(12, 10),
  ext: str = '.png',
) -> str:
  """Writes `<root>/<category>` in the MVTec AD layout; returns the category
  folder. Train image i has value i, test images 100 + i, masks mark a box."""
  base = os.path.join(os.fspath(root), category)
  w, h = size
  for i in range(n_train):
    write_image(os.path.join(base, 'train', 'good', f'{i:03d}{ext}'), index_image(i, size))
  for i in range(n_test_good):
    write_image(os.path.join(base, 'test', 'good', f'{i:03d}{ext}'), index_image(100 + i, size))
  for defect, count in defects:
    for i in range(count):
      write_image(os.path.join(base, 'test', defect, f'{i:03d}{ext}'), index_image(200 + i, size))
      mask = np.zeros((h, w), np.uint8)
      mask[h // 4 : h // 2, w // 4 : w // 2] = 255
      write_image(os.path.join(base, 'ground_truth', defect, f'{i:03d}_mask.png'), mask)
  return base


def make_visa_tree(
  root,
  objects=('candle', 'pcb1'),
  n_train=3,
  n_test_good=2,
  n_anomaly=2,
  size=(12, 10),
  mask_value: int = 1,
) -> str:
  """Writes a tiny VisA tree with split_csv/1cls.csv; masks hold
  `mask_value` on defects (VisA stores small values, not 255)."""
  root = os.fspath(root)
  w, h = size
  rows = ['object,split,label,image,mask']
  for obj in objects:
    for i in range(n_train + n_test_good):
      rel = f'{obj}/Data/Images/Normal/{i:04d}.JPG'
      write_image(os.path.join(root, rel), index_image(i, size), quality=95)
      split = 'train' if i < n_train else 'test'
      rows.append(f'{obj},{split},normal,{rel},')
    for i in range(n_anomaly):
      rel = f'{obj}/Data/Images/Anomaly/{i:03d}.JPG'
      mrel = f'{obj}/Data/Masks/Anomaly/{i:03d}.png'
      write_image(os.path.join(root, rel), index_image(200 + i, size), quality=95)
      mask = np.zeros((h, w), np.uint8)
      mask[: h // 2, : w // 2] = mask_value
      write_image(os.path.join(root, mrel), mask)
      rows.append(f'{obj},test,anomaly,{rel},{mrel}')
  os.makedirs(os.path.join(root, 'split_csv'), exist_ok=True)
  with open(os.path.join(root, 'split_csv', '1cls.csv'), 'w') as f:
    f.write('\n'.join(rows) + '\n')
  return root
