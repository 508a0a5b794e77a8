"""Pictures are valid PNGs of plausible size; the table's means are the means of its rows."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from msrd_jax import visualize
from msrd_jax.data.folder import MVTEC_OBJECTS, MVTEC_TEXTURES


def small_category(rng, n=6, size=32):
  images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
  masks = np.zeros((n, size, size), np.uint8)
  masks[1::2, 8:16, 10:20] = 1
  amaps = rng.random((n, size, size)).astype(np.float32) + masks
  labels = masks.any(axis=(1, 2)).astype(int)
  return images, masks, amaps, amaps.max(axis=(1, 2)), labels


def read_png(path):
  with Image.open(path) as im:
    assert im.format == 'PNG'
    im.load()
    return im.size


def test_save_examples_writes_png(tmp_path):
  rng = np.random.default_rng(0)
  images, masks, amaps, scores, labels = small_category(rng)
  path = tmp_path / 'examples.png'
  visualize.save_examples(
    str(path),
    images,
    masks,
    amaps,
    [f'test/x/{i:03d}.png' for i in range(6)],
    scores,
    labels,
    max_rows=4,
  )
  assert path.stat().st_size > 0
  width, height = read_png(path)
  assert width >= 500 and height >= 4 * 150  # 3 columns, 4 rows
  # Grey float images and no scores/labels also work.
  path2 = tmp_path / 'grey.png'
  visualize.save_examples(str(path2), images[..., 0] / 255.0, masks, amaps, list('abcdef'))
  assert read_png(path2)[1] >= 6 * 150
  with pytest.raises(ValueError, match='one name per map'):
    visualize.save_examples(str(path2), images, masks, amaps, ['a'])


def test_save_curves_writes_png(tmp_path):
  rng = np.random.default_rng(1)
  _, masks, amaps, scores, labels = small_category(rng)
  path = tmp_path / 'curves.png'
  visualize.save_curves(str(path), scores, labels, amaps, masks)
  assert path.stat().st_size > 0
  width, height = read_png(path)
  assert width > 2 * height > 400  # three panels side by side


def test_thin_keeps_ends_and_monotone():
  x = np.sort(np.random.default_rng(2).random(100_000))
  y = np.sqrt(x)
  tx, ty = visualize._thin(x, y, n=100)
  assert tx.size <= 300 and tx[0] == x[0] and tx[-1] == x[-1]
  assert np.all(np.diff(tx) >= 0)


def table_rows(table):
  rows = {}
  for line in table.strip().splitlines()[2:]:
    cells = [c.strip() for c in line.strip('|').split('|')]
    rows[cells[0]] = [np.nan if c == '-' else float(c) for c in cells[1:]]
  return rows


def test_results_table_mvtec_layout_and_means():
  rng = np.random.default_rng(3)
  cats = list(MVTEC_TEXTURES + MVTEC_OBJECTS)
  results = {
    c: {
      'image_auroc': rng.uniform(0.9, 1),
      'pixel_auroc': rng.uniform(0.9, 1),
      'au_pro': rng.uniform(0.8, 1),
    }
    for c in sorted(cats)
  }
  table = visualize.results_table_markdown(results)
  lines = table.strip().splitlines()
  assert lines[0] == (
    '| Category | Image AUROC | Pixel AUROC | AU-PRO (MVTec) | AU-PRO (RD4AD code) |'
  )
  rows = table_rows(table)
  # Textures first, then objects, in the usual order.
  assert list(rows)[:15] == cats
  for j, key in enumerate(['image_auroc', 'pixel_auroc', 'au_pro']):
    assert rows['Mean'][j] == pytest.approx(
      100 * np.mean([results[c][key] for c in cats]), abs=0.05
    )
    # ... and within rounding of the mean of the printed rows.
    assert rows['Mean'][j] == pytest.approx(np.mean([rows[c][j] for c in cats]), abs=0.051)
    assert rows['Mean (Textures)'][j] == pytest.approx(
      100 * np.mean([results[c][key] for c in MVTEC_TEXTURES]), abs=0.05
    )
    assert rows['Mean (Objects)'][j] == pytest.approx(
      100 * np.mean([results[c][key] for c in MVTEC_OBJECTS]), abs=0.05
    )
  assert rows['carpet'][0] == pytest.approx(100 * results['carpet']['image_auroc'], abs=0.05)


def test_results_table_other_names_and_missing_values():
  results = {
    'zeta': {'image_auroc': 0.5, 'pixel_auroc': 0.7},
    'alpha': {'image_auroc': 1.0, 'pixel_auroc': 0.9, 'au_pro': 0.8},
  }
  table = visualize.results_table_markdown(results)
  rows = table_rows(table)
  assert list(rows) == ['alpha', 'zeta', 'Mean']  # sorted, no group rows
  assert np.isnan(rows['zeta'][2])
  assert rows['Mean'][:3] == [75.0, 80.0, 80.0] and np.isnan(rows['Mean'][3])
  rows = table_rows(
    visualize.results_table_markdown(
      results, categories_order=['zeta', 'alpha'], groups={'g': ['zeta']}
    )
  )
  assert list(rows) == ['zeta', 'alpha', 'Mean (g)', 'Mean']
  assert rows['Mean (g)'][:2] == [50.0, 70.0]
  with pytest.raises(ValueError, match='without results'):
    visualize.results_table_markdown(results, categories_order=['beta'])


def test_heatmap_overlay_blends_jet_half_and_half():
  image = np.full((8, 8, 3), 0.5, np.float32)
  amap = np.zeros((4, 4), np.float32)
  amap[0, 0] = 2.0  # above vmax: clipped to the top of the scale
  out = visualize.heatmap_overlay(image, amap, vmin=0.0, vmax=1.0)
  assert out.shape == (4, 4, 3) and out.dtype == np.uint8  # image resized to the map
  # jet's ends are dark blue (0, 0, 0.5) and dark red (0.5, 0, 0).
  np.testing.assert_array_equal(
    out[1, 1], np.round(255 * (0.25 + 0.5 * np.array([0.0, 0.0, 0.5]))).astype(np.uint8)
  )
  np.testing.assert_array_equal(
    out[0, 0], np.round(255 * (0.25 + 0.5 * np.array([0.5, 0.0, 0.0]))).astype(np.uint8)
  )
  # uint8 images give the same blend as their float version.
  as_uint8 = visualize.heatmap_overlay(np.full((4, 4, 3), 128, np.uint8), amap, 0.0, 1.0)
  assert np.abs(as_uint8.astype(int) - out.astype(int)).max() <= 1
