"""VisA end to end, through the command line, against the same images in the MVTec layout.

A tiny VisA tree (split_csv/1cls.csv, JPEG photographs of a textured object, masks that
hold 1 on defects as VisA's do) is written here, and the same image files are laid out
a second time as an MVTec AD category (masks 255). Training and evaluation through
`python -m msrd_jax.train` must then give the same numbers on both: the two readers list
the same images in the same order, and a VisA mask of 1 marks the same pixels as an
MVTec mask of 255. A reader that dropped a row, mislabelled a split or read the masks
as empty would make the two runs differ.
"""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest
from conftest import METRIC_NAMES, cli
from data_fixtures import write_image

OBJECT = 'candle'
N_TRAIN, N_GOOD, N_ANOMALY = 8, 3, 3
ARGS = {
  'model.backbone': 'resnet18',
  'data.image_size': '96',
  'data.num_threads': '2',
  'train.batch_size': '4',
  'train.steps': '2',
  'train.checkpoint_every_steps': '2',
  'eval.batch_size': '4',
  'eval.num_pictures': '0',
  'calibration.source': 'none',
}


def _photo(rng, size=(120, 104), defect=False):
  """A smooth coloured texture; a defect is a dark scratch. Returns (image, mask)."""
  w, h = size
  coarse = rng.uniform(60, 200, (h // 8 + 1, w // 8 + 1, 3))
  img = np.kron(coarse, np.ones((8, 8, 1)))[:h, :w] + rng.normal(0, 6, (h, w, 3))
  mask = np.zeros((h, w), bool)
  if defect:
    r, c = rng.integers(10, h - 30), rng.integers(10, w - 40)
    mask[r : r + 6, c : c + 30] = True
    img[mask] = 20
  return np.clip(img, 0, 255).astype(np.uint8), mask


def _write_trees(tmp_path):
  """The VisA tree and its MVTec-layout twin; returns (visa_root, mvtec_root, rows)."""
  rng = np.random.default_rng(0)
  visa, mvtec = tmp_path / 'visa', tmp_path / 'mvtec'
  rows = [('object', 'split', 'label', 'image', 'mask')]
  kinds = [('train', 'normal')] * N_TRAIN + [('test', 'normal')] * N_GOOD
  kinds += [('test', 'anomaly')] * N_ANOMALY
  for i, (split, label) in enumerate(kinds):
    image, mask = _photo(rng, defect=label == 'anomaly')
    folder = 'Normal' if label == 'normal' else 'Anomaly'
    rel = f'{OBJECT}/Data/Images/{folder}/{i:04d}.JPG'
    write_image(visa / rel, image, quality=92)
    twin = {('train', 'normal'): 'train/good', ('test', 'normal'): 'test/good'}
    twin_dir = twin.get((split, label), 'test/anomaly')
    os.makedirs(mvtec / OBJECT / twin_dir, exist_ok=True)
    shutil.copy(visa / rel, mvtec / OBJECT / twin_dir / f'{i:04d}.JPG')  # the same bytes
    mrel = ''
    if label == 'anomaly':
      mrel = f'{OBJECT}/Data/Masks/Anomaly/{i:04d}.png'
      write_image(visa / mrel, mask.astype(np.uint8))  # VisA: 1 on defects
      write_image(
        mvtec / OBJECT / 'ground_truth' / 'anomaly' / f'{i:04d}_mask.png',
        mask.astype(np.uint8) * 255,
      )
    rows.append((OBJECT, split, label, rel, mrel))
  os.makedirs(visa / 'split_csv')
  with open(visa / 'split_csv' / '1cls.csv', 'w', newline='') as f:
    csv.writer(f).writerows(rows)
  return str(visa), str(mvtec), rows[1:]


def _train_and_evaluate(root, dataset, workdir):
  out = cli(
    'msrd_jax.train',
    f'--config=configs/mvtec.py:{OBJECT}',
    f'--workdir={workdir}',
    f'--config.data.dataset={dataset}',
    f'--config.data.root={root}',
    *(f'--config.{k}={v}' for k, v in ARGS.items()),
  )
  assert out.returncode == 0, out.stderr[-3000:]
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)[OBJECT]
  with open(os.path.join(workdir, 'test_scores.csv')) as f:
    scores = list(csv.DictReader(f))
  return results, scores


@pytest.mark.slow
def test_visa_trains_and_evaluates_like_the_same_images_in_the_mvtec_layout(tmp_path):
  visa, mvtec, rows = _write_trees(tmp_path)
  got, got_scores = _train_and_evaluate(visa, 'visa', tmp_path / 'run_visa')
  want, want_scores = _train_and_evaluate(mvtec, 'mvtec', tmp_path / 'run_mvtec')

  # Every test row of the split file was scored, with its label.
  test_rows = [r for r in rows if r[1] == 'test']
  labels = {os.path.relpath(r[3], OBJECT): int(r[2] == 'anomaly') for r in test_rows}
  assert {s['name']: int(s['label']) for s in got_scores} == labels

  for key in METRIC_NAMES:
    assert np.isfinite(got[key]), (key, got)
  assert set(got) == set(want)
  for key in got:
    assert got[key] == pytest.approx(want[key], abs=1e-6), key
  # The same image (by file name) has the same score in both layouts.
  by_file = lambda scores: {os.path.basename(s['name']): float(s['score']) for s in scores}
  got_by_file, want_by_file = by_file(got_scores), by_file(want_scores)
  assert set(got_by_file) == set(want_by_file)
  for name, score in got_by_file.items():
    assert score == pytest.approx(want_by_file[name], rel=1e-6), name
