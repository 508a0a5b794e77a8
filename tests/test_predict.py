"""Prediction on new images with a trained run."""

from __future__ import annotations

import csv
import os

import pytest
from PIL import Image

from msrd_jax import evaluate, predict


@pytest.mark.slow
def test_predict_scores_new_images_as_evaluation_does(run_with_teacher_file, tmp_path):
  config, workdir, _ = run_with_teacher_file
  evaluate.evaluate(config, workdir, pictures=False)
  with open(os.path.join(workdir, 'test_scores.csv')) as f:
    expected = {row['name']: float(row['score']) for row in csv.DictReader(f)}
  folder = os.path.join(config.data.root, 'brick', 'test', 'scratch')
  paths = predict.find_images(folder)
  records = predict.predict(config, workdir, paths, str(tmp_path), root=folder)
  assert len(records) == len(paths) == 8
  for r in records:
    name = 'test/scratch/' + os.path.basename(r['file'])
    assert abs(r['score'] - expected[name]) <= 1e-5 * abs(expected[name])
    stem = os.path.splitext(os.path.basename(r['file']))[0]
    with Image.open(tmp_path / f'{stem}_heatmap.png') as im:
      assert im.size == (96, 96) and im.mode == 'RGB'
    assert 0 <= r['max_y'] < 96 and 0 <= r['max_x'] < 96
  with open(tmp_path / 'scores.csv') as f:
    assert len(list(csv.DictReader(f))) == 8
