"""The embedded synthetic benchmark: exact masks, determinism, atomic writes."""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from msrd_jax.data import DataError, list_mvtec, load_image, load_mask
from msrd_jax.data import synthetic as syn


@pytest.fixture(scope='module')
def sources():
  return syn.Sources()


@pytest.fixture(scope='module')
def brick_root(tmp_path_factory):
  """One category generated through the command line entry point."""
  out = tmp_path_factory.mktemp('bench') / 'synthetic'
  assert syn.main([str(out), '--seed', '7', '--categories', 'brick']) == 0
  return str(out)


def _png_bytes(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='PNG', compress_level=6)
  return buf.getvalue()


@pytest.mark.parametrize('category', syn.CATEGORIES)
def test_masks_are_exactly_the_changed_pixels(category, sources):
  for defect in syn.DEFECT_TYPES:
    for index in range(2):
      image, mask, normal = syn.render_sample(
        category, 'test', defect, index, seed=0, sources=sources
      )
      assert image.shape == (256, 256, 3) and image.dtype == np.uint8
      assert mask.shape == (256, 256) and mask.dtype == np.bool_
      change = np.abs(image.astype(int) - normal).max(axis=-1)
      where = f'{category}/{defect}/{index}'
      np.testing.assert_array_equal(change > 0, mask, err_msg=where)
      assert change[mask].min() >= syn.MIN_CHANGE, where
      # Visible but not trivial: a small part of the image.
      assert 20 <= mask.sum() <= 0.06 * mask.size, where


def test_defect_types_differ_in_nature(sources):
  """Scratches are thin, colour defects keep brightness, misplaced and stains
  are blobs."""

  def stats(defect):
    widths, lum = [], []
    for i in range(4):
      image, mask, normal = syn.render_sample('gravel', 'test', defect, i, 0, sources)
      widths.append(ndimage.distance_transform_edt(mask).max())
      lum.append(abs(image[mask].mean() - normal[mask].mean()))
    return np.mean(widths), np.mean(lum)

  scratch_w, _ = stats('scratch')
  stain_w, stain_l = stats('stain')
  color_w, color_l = stats('color')
  assert scratch_w <= 2.5 < stain_w and color_w > 2.5
  assert color_l < stain_l


def test_deterministic_and_seed_dependent(sources):
  a = syn.render_sample('coffee', 'test', 'scratch', 3, seed=0, sources=sources)
  b = syn.render_sample('coffee', 'test', 'scratch', 3, seed=0)
  c = syn.render_sample('coffee', 'test', 'scratch', 3, seed=1, sources=sources)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])


def test_generated_layout_and_counts(brick_root):
  marker = json.load(open(os.path.join(brick_root, syn.MARKER)))
  assert marker['version'] == syn.VERSION and marker['seed'] == 7
  assert marker['categories'] == ['brick']
  train = list_mvtec(brick_root, 'brick', 'train')
  test = list_mvtec(brick_root, 'brick', 'test')
  assert len(train) == syn.NUM_TRAIN
  assert len(test) == syn.NUM_TEST_GOOD + 4 * syn.NUM_PER_DEFECT
  assert {s.defect_type for s in test} == {'good', *syn.DEFECT_TYPES}
  img = load_image(test[0].image_path)
  assert img.shape == (256, 256, 3)
  raw = np.asarray(Image.open(test[0].mask_path))
  assert raw.dtype == np.uint8 and set(np.unique(raw)) == {0, 255}
  assert load_mask(test[0].mask_path).any()


def test_files_match_renders_byte_for_byte(brick_root, sources):
  image, mask, _ = syn.render_sample('brick', 'test', 'stain', 5, 7, sources)
  base = os.path.join(brick_root, 'brick')
  with open(os.path.join(base, 'test', 'stain', '005.png'), 'rb') as f:
    assert f.read() == _png_bytes(image)
  with open(os.path.join(base, 'ground_truth', 'stain', '005_mask.png'), 'rb') as f:
    assert f.read() == _png_bytes(mask.astype(np.uint8) * 255)


def test_test_images_are_not_training_copies(brick_root):
  def digests(split):
    return {
      hashlib.sha256(np.asarray(Image.open(s.image_path)).tobytes()).hexdigest()
      for s in list_mvtec(brick_root, 'brick', split)
    }

  train, test = digests('train'), digests('test')
  assert len(train) == syn.NUM_TRAIN and not train & test


def test_ensure_is_idempotent_and_subset_aware(brick_root):
  marker = os.path.join(brick_root, syn.MARKER)
  before = os.stat(marker).st_mtime_ns
  assert syn.ensure_synthetic(brick_root, seed=7, categories=['brick']) == (brick_root)
  assert os.stat(marker).st_mtime_ns == before


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
  calls = []

  def explode(out_root, category, seed, sources=None):
    calls.append(category)
    os.makedirs(os.path.join(out_root, category, 'train', 'good'))
    raise KeyboardInterrupt

  monkeypatch.setattr(syn, 'generate_category', explode)
  with pytest.raises(KeyboardInterrupt):
    syn.ensure_synthetic(tmp_path / 'bench', seed=0, categories=['grass'])
  assert calls == ['grass']
  assert os.listdir(tmp_path) == []  # no root, no temporary folder


def test_refuses_foreign_folder(tmp_path):
  (tmp_path / 'mine').mkdir()
  (tmp_path / 'mine' / 'thesis.tex').write_text('x')
  with pytest.raises(DataError, match=r'mine is not empty .*refusing'):
    syn.ensure_synthetic(tmp_path / 'mine', categories=['brick'])
  with pytest.raises(DataError, match='unknown synthetic categories'):
    syn.ensure_synthetic(tmp_path / 'x', categories=['carpet'])
