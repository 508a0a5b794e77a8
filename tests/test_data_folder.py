"""Listing of the MVTec AD folder layout and of VisA's split file."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from data_fixtures import index_image, make_mvtec_tree, make_visa_tree, write_image

from msrd_jax.data import (
  MVTEC_CATEGORIES,
  MVTEC_OBJECTS,
  MVTEC_TEXTURES,
  DataError,
  Sample,
  list_mvtec,
  list_samples,
  list_visa,
  load_mask,
)


def test_category_constants():
  assert len(MVTEC_CATEGORIES) == 15 and len(set(MVTEC_CATEGORIES)) == 15
  assert set(MVTEC_TEXTURES) == {'carpet', 'grid', 'leather', 'tile', 'wood'}
  assert len(MVTEC_OBJECTS) == 10
  assert set(MVTEC_TEXTURES) | set(MVTEC_OBJECTS) == set(MVTEC_CATEGORIES)
  assert {'bottle', 'metal_nut', 'zipper'} <= set(MVTEC_OBJECTS)


def test_listing(tmp_path):
  base = make_mvtec_tree(
    tmp_path, 'widget', n_train=6, n_test_good=2, defects=(('crack', 2), ('hole', 1))
  )
  train = list_mvtec(tmp_path, 'widget', 'train')
  assert len(train) == 6
  assert all(
    isinstance(s, Sample) and s.label == 0 and s.mask_path is None and s.defect_type == 'good'
    for s in train
  )
  assert [s.name for s in train] == [f'train/good/{i:03d}.png' for i in range(6)]
  assert train[0].image_path == os.path.join(base, 'train', 'good', '000.png')
  test = list_mvtec(tmp_path, 'widget', 'test')
  assert [(s.defect_type, s.name) for s in test] == [
    ('crack', 'test/crack/000.png'),
    ('crack', 'test/crack/001.png'),
    ('good', 'test/good/000.png'),
    ('good', 'test/good/001.png'),
    ('hole', 'test/hole/000.png'),
  ]
  assert [s.label for s in test] == [1, 1, 0, 0, 1]
  assert test[1].mask_path == os.path.join(base, 'ground_truth', 'crack', '001_mask.png')
  assert test[2].mask_path is None
  assert list_samples('mvtec', tmp_path, 'widget', 'test') == test
  with pytest.raises(AttributeError):  # frozen
    test[0].label = 0


def test_sorting_is_by_name_not_disk_order(tmp_path):
  make_mvtec_tree(tmp_path, 'w', n_train=0, defects=())
  for name in ('b.png', 'a.PNG', 'c.jpg', 'd.JPEG', 'e.bmp', 'f.tif'):
    write_image(tmp_path / 'w' / 'train' / 'good' / name, index_image(1))
  names = [s.name for s in list_mvtec(tmp_path, 'w', 'train')]
  assert names == [
    'train/good/a.PNG',
    'train/good/b.png',
    'train/good/c.jpg',
    'train/good/d.JPEG',
    'train/good/e.bmp',
    'train/good/f.tif',
  ]


def test_hidden_and_os_files_ignored(tmp_path):
  base = make_mvtec_tree(tmp_path, 'w', n_train=2)
  for junk in ('.DS_Store', '._000.png', 'Thumbs.db', 'desktop.ini'):
    (tmp_path / 'w' / 'train' / 'good' / junk).write_bytes(b'junk')
  (tmp_path / 'w' / 'test' / '.ipynb_checkpoints').mkdir()
  os.makedirs(os.path.join(base, 'ground_truth', 'crack', '.thumbs'))
  assert len(list_mvtec(tmp_path, 'w', 'train')) == 2
  assert len(list_mvtec(tmp_path, 'w', 'test')) == 5


def test_unknown_file_is_an_error(tmp_path):
  make_mvtec_tree(tmp_path, 'w')
  (tmp_path / 'w' / 'train' / 'good' / 'notes.txt').write_text('x')
  with pytest.raises(DataError, match=r'notes\.txt is not an image file'):
    list_mvtec(tmp_path, 'w', 'train')


def test_subfolder_in_image_folder_is_an_error(tmp_path):
  make_mvtec_tree(tmp_path, 'w')
  (tmp_path / 'w' / 'test' / 'crack' / 'more').mkdir()
  with pytest.raises(DataError, match=r'crack.more is a folder'):
    list_mvtec(tmp_path, 'w', 'test')


def test_root_missing(tmp_path):
  with pytest.raises(DataError, match='nowhere does not exist'):
    list_mvtec(tmp_path / 'nowhere', 'w', 'train')


def test_category_missing_lists_found(tmp_path):
  make_mvtec_tree(tmp_path, 'alpha')
  make_mvtec_tree(tmp_path, 'beta')
  with pytest.raises(DataError, match='gamma does not exist.*found.*alpha, beta'):
    list_mvtec(tmp_path, 'gamma', 'train')


def test_root_is_a_category_gives_a_hint(tmp_path):
  make_mvtec_tree(tmp_path, 'alpha')
  with pytest.raises(DataError, match="looks like a category folder.*'alpha'"):
    list_mvtec(tmp_path / 'alpha', 'alpha', 'train')


def test_not_in_layout_shows_expected_and_found(tmp_path):
  (tmp_path / 'w' / 'images').mkdir(parents=True)
  write_image(tmp_path / 'w' / 'images' / 'a.png', index_image(0))
  with pytest.raises(DataError) as info:
    list_mvtec(tmp_path, 'w', 'train')
  msg = str(info.value)
  assert 'not in the MVTec AD folder layout' in msg
  assert '<root>/<category>/ground_truth/<defect>/<name>_mask.png' in msg
  assert 'images/' in msg and 'a.png' in msg


def test_train_without_good(tmp_path):
  (tmp_path / 'w' / 'train' / 'normal').mkdir(parents=True)
  with pytest.raises(DataError, match=r'no folder .*train.good'):
    list_mvtec(tmp_path, 'w', 'train')


def test_empty_train_good(tmp_path):
  (tmp_path / 'w' / 'train' / 'good').mkdir(parents=True)
  (tmp_path / 'w' / 'train' / 'good' / '.DS_Store').write_bytes(b'')
  with pytest.raises(DataError, match=r'train.good holds no images'):
    list_mvtec(tmp_path, 'w', 'train')


def test_missing_mask_names_both(tmp_path):
  base = make_mvtec_tree(tmp_path, 'w')
  os.remove(os.path.join(base, 'ground_truth', 'crack', '001_mask.png'))
  with pytest.raises(DataError) as info:
    list_mvtec(tmp_path, 'w', 'test')
  msg = str(info.value)
  assert os.path.join(base, 'test', 'crack', '001.png') in msg
  assert os.path.join(base, 'ground_truth', 'crack', '001_mask.png') in msg


def test_missing_mask_folder(tmp_path):
  base = make_mvtec_tree(tmp_path, 'w')
  shutil.rmtree(os.path.join(base, 'ground_truth', 'hole'))
  with pytest.raises(DataError, match=r"'hole' has no mask folder"):
    list_mvtec(tmp_path, 'w', 'test')


def test_file_directly_in_test(tmp_path):
  make_mvtec_tree(tmp_path, 'w')
  write_image(tmp_path / 'w' / 'test' / 'loose.png', index_image(0))
  with pytest.raises(DataError, match=r'loose.png is a file'):
    list_mvtec(tmp_path, 'w', 'test')


def test_bad_split(tmp_path):
  make_mvtec_tree(tmp_path, 'w')
  with pytest.raises(DataError, match="'val'"):
    list_mvtec(tmp_path, 'w', 'val')


def test_btad_style(tmp_path):
  # BTAD: ok/ko folders, BMP images, masks named like their images.
  base = tmp_path / '01'
  for i in range(2):
    write_image(base / 'train' / 'ok' / f'{i:04d}.bmp', index_image(i))
    write_image(base / 'test' / 'ok' / f'{i:04d}.bmp', index_image(i))
    write_image(base / 'test' / 'ko' / f'{i:04d}.bmp', index_image(i))
    write_image(base / 'ground_truth' / 'ko' / f'{i:04d}.png', np.full((10, 12), 255, np.uint8))
  train = list_mvtec(tmp_path, '01', 'train')
  assert [s.defect_type for s in train] == ['ok'] * 2
  test = list_mvtec(tmp_path, '01', 'test')
  assert [(s.defect_type, s.label) for s in test] == ([('ko', 1)] * 2 + [('ok', 0)] * 2)
  assert test[0].mask_path.endswith(os.path.join('ground_truth', 'ko', '0000.png'))


def test_visa_listing(tmp_path):
  make_visa_tree(tmp_path, objects=('candle', 'pcb1'), n_train=3, n_test_good=2, n_anomaly=2)
  train = list_visa(tmp_path, 'candle', 'train')
  assert [s.name for s in train] == [f'Data/Images/Normal/{i:04d}.JPG' for i in range(3)]
  assert all(s.label == 0 and s.mask_path is None for s in train)
  test = list_visa(tmp_path, 'candle', 'test')
  assert [(s.defect_type, s.label) for s in test] == ([('anomaly', 1)] * 2 + [('good', 0)] * 2)
  assert test[0].mask_path == os.path.join(
    str(tmp_path), 'candle', 'Data', 'Masks', 'Anomaly', '000.png'
  )
  assert list_samples('visa', tmp_path, 'pcb1', 'test')[0].image_path.endswith(
    os.path.join('pcb1', 'Data', 'Images', 'Anomaly', '000.JPG')
  )
  # VisA masks hold 1 on defects, not 255.
  assert load_mask(test[0].mask_path).sum() == 5 * 6


def test_visa_errors(tmp_path):
  with pytest.raises(DataError, match=r'split_csv.1cls.csv does not exist'):
    list_visa(tmp_path, 'candle', 'train')
  make_visa_tree(tmp_path)
  with pytest.raises(DataError, match="no rows for the category 'fryum'.*candle, pcb1"):
    list_visa(tmp_path, 'fryum', 'train')
  os.remove(tmp_path / 'candle' / 'Data' / 'Images' / 'Normal' / '0001.JPG')
  with pytest.raises(DataError, match=r'1cls.csv line 3: the image .*0001.JPG does not exist'):
    list_visa(tmp_path, 'candle', 'train')
  csv = tmp_path / 'split_csv' / '1cls.csv'
  csv.write_text('object,split,label,image\n')
  with pytest.raises(DataError, match='lacks the column.*mask'):
    list_visa(tmp_path, 'candle', 'train')
  csv.write_text('object,split,label,image,mask\ncandle,train,good,x.JPG,\n')
  with pytest.raises(DataError, match="line 2: label 'good'"):
    list_visa(tmp_path, 'candle', 'train')


def test_list_samples_errors(tmp_path):
  with pytest.raises(DataError, match="unknown dataset 'btad'"):
    list_samples('btad', tmp_path, 'x', 'train')
  with pytest.raises(DataError, match='no data root'):
    list_samples('mvtec', None, 'x', 'train')
