"""The procedural benchmark: layout, mask guarantees, determinism, marker, CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import cli, mtimes
from PIL import Image
from scipy import ndimage

from msrd_jax.data import DataError, list_mvtec, load_image
from msrd_jax.data import procedural as proc

# Fewer images per category than the real benchmark, to keep the tests short.
SMALL_COUNTS = {'NUM_TRAIN': 4, 'NUM_TEST_GOOD': 2, 'NUM_PER_DEFECT': 2}


def _generate(root, seed, categories):
  with pytest.MonkeyPatch.context() as mp:
    for name, value in SMALL_COUNTS.items():
      mp.setattr(proc, name, value)
    args = [str(root), '--seed', str(seed), '--categories', ','.join(categories)]
    assert proc.main(args) == 0
  return str(root)


@pytest.fixture(scope='module')
def roots(tmp_path_factory):
  """wood and gear generated together through the CLI entry point, and gear
  alone, with small counts."""
  base = tmp_path_factory.mktemp('procedural')
  return {
    'both': _generate(base / 'both', 3, ['wood', 'gear']),
    'gear': _generate(base / 'gear', 3, ['gear']),
  }


def _files(top):
  """{path relative to top: bytes} of every file under top."""
  out = {}
  for d, _, names in os.walk(top):
    for n in names:
      with open(os.path.join(d, n), 'rb') as f:
        out[os.path.relpath(os.path.join(d, n), top)] = f.read()
  return out


def test_layout_is_read_by_the_mvtec_reader(roots):
  root = roots['both']
  for category in ('wood', 'gear'):
    train = list_mvtec(root, category, 'train')
    assert len(train) == SMALL_COUNTS['NUM_TRAIN']
    assert {(s.label, s.defect_type, s.mask_path) for s in train} == {(0, 'good', None)}
    test = list_mvtec(root, category, 'test')
    per_defect = SMALL_COUNTS['NUM_PER_DEFECT']
    assert len(test) == SMALL_COUNTS['NUM_TEST_GOOD'] + len(proc.DEFECT_TYPES) * per_defect
    assert {s.defect_type for s in test} == {'good', *proc.DEFECT_TYPES}
    for s in test:
      assert s.label == (s.defect_type != 'good')
      assert (s.mask_path is None) == (s.defect_type == 'good')
    assert load_image(test[0].image_path).shape == (256, 256, 3)
    assert sorted(os.listdir(os.path.join(root, category, 'ground_truth'))) == sorted(
      proc.DEFECT_TYPES
    )


def test_mask_files_are_binary_and_match_the_renders(roots):
  root = roots['both']
  for s in list_mvtec(root, 'gear', 'test'):
    if s.mask_path is None:
      continue
    raw = Image.open(s.mask_path)
    assert raw.mode == 'L' and raw.size == (256, 256)
    mask = np.asarray(raw)
    assert set(np.unique(mask)) == {0, 255}, s.mask_path
    assert (mask > 0).sum() >= proc.MIN_AREA, s.mask_path
    index = int(os.path.splitext(os.path.basename(s.image_path))[0])
    image, rendered, _ = proc.render_sample('gear', 'test', s.defect_type, index, seed=3)
    np.testing.assert_array_equal(np.asarray(Image.open(s.image_path)), image)
    np.testing.assert_array_equal(mask > 0, rendered)


@pytest.mark.parametrize('category', proc.CATEGORIES)
def test_mask_guarantees(category):
  """Outside the mask the image is its normal image byte for byte; the mask
  is large enough, without small parts, and mostly changed by MIN_CHANGE."""
  for defect in proc.DEFECT_TYPES:
    for index in range(2):
      image, mask, normal = proc.render_sample(category, 'test', defect, index, seed=0)
      where = f'{category}/{defect}/{index}'
      assert image.shape == normal.shape == (256, 256, 3) and image.dtype == np.uint8
      assert mask.shape == (256, 256) and mask.dtype == np.bool_
      np.testing.assert_array_equal(image[~mask], normal[~mask], err_msg=where)
      change = np.abs(image.astype(int) - normal).max(axis=-1)
      assert (change[mask] >= proc.MIN_CHANGE).mean() >= proc.MIN_STRONG_FRACTION, where
      min_area = proc.MIN_WARP_AREA if defect == 'warp' else proc.MIN_AREA
      assert min_area <= mask.sum() <= 0.1 * mask.size, where
      labels, count = ndimage.label(mask)
      assert np.bincount(labels.ravel())[1:].min() >= proc.MIN_COMPONENT, where


def test_good_images_have_no_masks(roots):
  for split in ('train', 'test'):
    image, mask, normal = proc.render_sample('marble', split, 'good', 0, seed=0)
    assert mask is None and image is normal
  assert not os.path.exists(os.path.join(roots['both'], 'wood', 'ground_truth', 'good'))
  with pytest.raises(DataError, match='no .hole. images in the .train. split'):
    proc.render_sample('marble', 'train', 'hole', 0, seed=0)


def test_defect_kinds_differ_in_nature():
  """Holes are dark with a lighter rim, worn patches brighten and lose
  contrast, specks are small dots (most changed pixels are within 2 px of
  unchanged ones)."""
  for index in range(2):
    image, mask, normal = proc.render_sample('tiles', 'test', 'hole', index, seed=0)
    lighter = image.mean(axis=-1) - normal.mean(axis=-1)
    assert (lighter[mask] < -50).mean() > 0.2 and (lighter[mask] > 10).mean() > 0.1
    image, mask, normal = proc.render_sample('weave', 'test', 'worn', index, seed=0)
    assert image[mask].mean() > normal[mask].mean()
    assert image[mask].std() < 0.8 * normal[mask].std()
    image, mask, normal = proc.render_sample('marble', 'test', 'specks', index, seed=0)
    changed = np.abs(image.astype(int) - normal).max(axis=-1) >= proc.MIN_CHANGE
    assert ndimage.binary_erosion(changed, iterations=2).sum() < 0.5 * changed.sum()


def test_normal_images_vary_and_are_not_constant():
  for category in proc.CATEGORIES:
    a, _, _ = proc.render_sample(category, 'train', 'good', 0, seed=0)
    b, _, _ = proc.render_sample(category, 'train', 'good', 1, seed=0)
    assert a.std() > 8 and b.std() > 8, category
    assert np.abs(a.astype(int) - b).mean() > 3, category


def test_deterministic_and_seed_dependent():
  a = proc.render_sample('weave', 'test', 'warp', 1, seed=0)
  b = proc.render_sample('weave', 'test', 'warp', 1, seed=0)
  c = proc.render_sample('weave', 'test', 'warp', 1, seed=1)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])


def test_category_alone_equals_category_with_others(roots):
  alone = _files(os.path.join(roots['gear'], 'gear'))
  together = _files(os.path.join(roots['both'], 'gear'))
  assert len(alone) == 4 + 2 + 4 * (2 + 2)  # images and masks
  assert alone == together


def test_marker(roots):
  root = roots['both']
  with open(os.path.join(root, proc.MARKER)) as f:
    marker = json.load(f)
  assert marker['version'] == proc.VERSION and marker['seed'] == 3
  assert marker['categories'] == ['gear', 'wood']


def test_complete_root_is_not_regenerated(roots, monkeypatch):
  root = roots['both']
  before = mtimes(root)

  def fail(*args, **kwargs):
    raise AssertionError('regenerated a complete benchmark')

  for name, value in SMALL_COUNTS.items():
    monkeypatch.setattr(proc, name, value)
  monkeypatch.setattr(proc, 'generate_category', fail)
  assert proc.ensure_procedural(root, seed=3, categories=['wood']) == root
  assert proc.ensure_procedural(root, seed=3, categories=['gear', 'wood']) == root
  assert mtimes(root) == before


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
  def explode(out_root, category, seed):
    os.makedirs(os.path.join(out_root, category, 'train', 'good'))
    raise KeyboardInterrupt

  monkeypatch.setattr(proc, 'generate_category', explode)
  with pytest.raises(KeyboardInterrupt):
    proc.ensure_procedural(tmp_path / 'bench', seed=0, categories=['tiles'])
  assert os.listdir(tmp_path) == []  # no root, no temporary folder


def test_refuses_foreign_folder_and_unknown_names(tmp_path):
  mine = tmp_path / 'mine'
  mine.mkdir()
  (mine / 'thesis.tex').write_text('x')
  with pytest.raises(DataError, match=r'mine is not empty .*refusing'):
    proc.ensure_procedural(mine, categories=['wood'])
  assert os.listdir(mine) == ['thesis.tex']
  with pytest.raises(DataError, match='unknown procedural categories'):
    proc.ensure_procedural(tmp_path / 'x', categories=['brick'])
  with pytest.raises(DataError, match='seed must be >= 0'):
    proc.ensure_procedural(tmp_path / 'x', seed=-1)


@pytest.mark.parametrize(
  'module,category', [('msrd_jax.data.procedural', 'wood'), ('msrd_jax.data.synthetic', 'brick')]
)
def test_cli_refuses_a_foreign_folder_with_status_2(tmp_path, module, category):
  """Both generators, from the command line: the README's exit status of an error in
  what was given, one `error:` line, the folder untouched."""
  mine = tmp_path / 'mine'
  mine.mkdir()
  (mine / 'notes.txt').write_text('x')
  result = cli(module, str(mine), '--categories', category)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and str(mine) in lines[0]
  assert os.listdir(mine) == ['notes.txt']
