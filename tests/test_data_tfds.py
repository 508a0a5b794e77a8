"""The MVTec AD TFDS builder, built and read back without TensorFlow."""

from __future__ import annotations

import os
import sys
import tarfile

import numpy as np
import pytest
from data_fixtures import make_mvtec_tree, write_image

from msrd_jax.data import DataError

tfds_mvtec = pytest.importorskip('msrd_jax.data.tfds_mvtec')


def _fake_mvtec(root):
  """A tiny 'bottle' with one grayscale image (MVTec's grid/screw/zipper are
  grayscale) and its own folder under the archive-style name."""
  base = make_mvtec_tree(
    root,
    'bottle',
    n_train=4,
    n_test_good=2,
    defects=(('broken_large', 2), ('contamination', 1)),
    size=(20, 16),
  )
  write_image(os.path.join(base, 'train', 'good', '004.png'), np.full((16, 20), 77, np.uint8))
  return base


def _read_all(builder, split):
  source = builder.as_data_source(split=split)
  return [source[i] for i in range(len(source))]


def _check(builder):
  train = _read_all(builder, 'train')
  test = _read_all(builder, 'test')
  assert len(train) == 5 and len(test) == 5
  for ex in train + test:
    assert ex['image'].shape == (16, 20, 3) and ex['image'].dtype == np.uint8
    assert ex['mask'].shape == (16, 20, 1) and ex['mask'].dtype == np.uint8
  by_name = {ex['file_name'].decode(): ex for ex in train + test}
  assert set(by_name) == {f'train/good/{i:03d}.png' for i in range(5)} | {
    'test/good/000.png',
    'test/good/001.png',
    'test/broken_large/000.png',
    'test/broken_large/001.png',
    'test/contamination/000.png',
  }
  gray = by_name['train/good/004.png']['image']
  assert (gray == 77).all()
  np.testing.assert_array_equal(by_name['train/good/002.png']['image'], 2)
  crack = by_name['test/broken_large/001.png']
  assert crack['label'] == 1 and crack['defect_type'] == b'broken_large'
  expected = np.zeros((16, 20), np.uint8)
  expected[4:8, 5:10] = 255
  np.testing.assert_array_equal(crack['mask'][..., 0], expected)
  good = by_name['test/good/000.png']
  assert good['label'] == 0 and not good['mask'].any()
  assert 'tensorflow' not in sys.modules


@pytest.mark.slow
def test_build_from_extracted_folder(tmp_path):
  _fake_mvtec(tmp_path / 'manual')
  builder = tfds_mvtec.prepare('bottle', tmp_path / 'data', tmp_path / 'manual')
  _check(builder)
  # Registered with TFDS: readable by name.
  import tensorflow_datasets as tfds

  source = tfds.data_source('mvtec_ad/bottle', split='test', data_dir=str(tmp_path / 'data'))
  assert len(source) == 5
  # Prepared once: the manual_dir is not needed any more.
  again = tfds_mvtec.prepare('bottle', tmp_path / 'data', tmp_path / 'gone')
  assert len(again.as_data_source(split='train')) == 5


@pytest.mark.slow
def test_build_from_archive(tmp_path):
  _fake_mvtec(tmp_path / 'extracted')
  (tmp_path / 'manual').mkdir()
  with tarfile.open(tmp_path / 'manual' / tfds_mvtec.ARCHIVE_NAME, 'w:xz') as t:
    t.add(tmp_path / 'extracted' / 'bottle', arcname='bottle')
    t.add(tmp_path / 'extracted' / 'bottle', arcname='cable')  # skipped
  builder = tfds_mvtec.prepare('bottle', tmp_path / 'data', tmp_path / 'manual')
  _check(builder)
  extracted = tmp_path / 'data' / 'downloads' / 'mvtec_ad'
  assert sorted(os.listdir(extracted)) == ['bottle', 'bottle.complete']


def test_empty_manual_dir(tmp_path):
  (tmp_path / 'manual').mkdir()
  with pytest.raises(DataError, match='holds neither mvtec_anomaly_detection'):
    tfds_mvtec.prepare('bottle', tmp_path / 'data', tmp_path / 'manual')
  with pytest.raises(DataError, match="unknown MVTec AD category 'bottles'"):
    tfds_mvtec.prepare('bottles', tmp_path / 'data', tmp_path / 'manual')
