"""The decision threshold: learned on good images, stored, applied, recalibrated."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil

import numpy as np
import pytest
from conftest import cli as _cli
from conftest import tiny_config

from msrd_jax import calibrate, checkpoint, evaluate, train
from msrd_jax import data as data_lib


def test_the_conformal_threshold_and_its_limit():
  scores = np.arange(1.0, 301.0)  # 300 scores 1..300
  # k = ceil(301 * 0.99) = 298: two calibration scores lie above the threshold.
  assert calibrate.conformal_threshold(scores, 0.01) == (298.0, False)
  assert calibrate.conformal_threshold(scores, 0.5) == (151.0, False)
  # 80 images cannot vouch for 1 %: the threshold is the largest score, flagged.
  assert calibrate.conformal_threshold(scores[:80], 0.01) == (80.0, True)
  # Only the tail is kept (pixels): the same threshold from the largest values.
  tail = calibrate._Tail(calibrate._tail_size(300, [0.01, 0.05]))
  rng = np.random.default_rng(0)
  for chunk in np.array_split(rng.permutation(scores), 7):
    tail.add(chunk)
  assert len(tail.values) == 15  # 300 - ceil(301 * 0.95) + 1
  for rate in (0.01, 0.05):
    got = calibrate.conformal_threshold(tail.sorted(), rate, total=300)
    assert got == calibrate.conformal_threshold(scores, rate)


def test_the_f1_optimal_threshold_separates_what_it_should():
  scores = np.array([0.1, 0.2, 0.3, 0.4, 0.9, 0.8])
  labels = np.array([0, 0, 0, 1, 1, 1])
  threshold, f1 = calibrate.f1_optimal_threshold(scores, labels)
  assert 0.3 < threshold < 0.4 and f1 == 1.0
  report = calibrate.threshold_report(
    scores,
    labels,
    np.zeros((6, 2, 2)),
    np.zeros((6, 2, 2)),
    {
      'source': 'folder',
      'images': 10,
      'image_threshold': 0.35,
      'false_alarm_rate': 0.01,
      'pixel_threshold': 1.0,
      'pixel_false_alarm_rate': 0.001,
    },
  )
  assert report['false_alarm_rate'] == 0.0 and report['detection_rate'] == 1.0
  assert report['f1_at_threshold'] == 1.0 and report['pixel_false_alarm_rate'] == 0.0
  assert math.isnan(report['pixel_detection_rate'])  # no defect pixel at all


def test_a_holdout_leaves_training_and_joins_the_identity(synthetic_root, monkeypatch):
  config = tiny_config(synthetic_root)
  config.calibration.source = 'holdout'
  config.calibration.holdout_fraction = 0.25
  held, source, _ = calibrate.calibration_samples(config)
  assert source == 'holdout' and len(held) == 20  # of 80 training images
  assert calibrate.calibration_samples(config)[0] == held  # deterministic
  ident = checkpoint.identity(config)
  assert ident['calibration.holdout_fraction'] == 0.25
  config.calibration.source = 'train'
  assert 'calibration.holdout_fraction' not in checkpoint.identity(config)
  config.calibration.source = 'holdout'

  # Training never sees the held-out images.
  seen = []

  class Stop(Exception):
    pass

  def loader(samples, *args, **kwargs):
    seen.extend(samples)
    raise Stop

  monkeypatch.setattr(train.data_lib, 'TrainLoader', loader)
  with pytest.raises(Stop):
    train.train(config, 'unused')
  assert len(seen) == 60 and not set(s.name for s in seen) & set(s.name for s in held)


def test_calibration_is_stored_with_the_run(calibrated_run):
  config, workdir, good, record = calibrated_run
  with open(os.path.join(workdir, calibrate.FILE)) as f:
    assert json.load(f) == record
  assert record['source'] == 'folder' and record['images'] == 8
  assert record['checkpoint_step'] == 2 and record['false_alarm_rate'] == 0.01
  scores = np.array(record['image_scores'])
  assert len(scores) == 8 and np.all(np.diff(scores) >= 0)
  # 8 images cannot vouch for 1 %: the largest score, and the file says so.
  assert record['image_threshold'] == scores[-1] and record['limited']
  vmin, vmax = record['color_scale']
  assert vmin < record['pixel_threshold'] < vmax
  assert record['pixel_threshold'] == pytest.approx((vmin + vmax) / 2)
  assert record['map_settings']['resolution'] == 96
  # Read back under other map settings, its scores would be on another scale.
  other = config.copy_and_resolve_references()
  other.eval.sigma = 2.0
  with pytest.raises(calibrate.CalibrationError, match='sigma'):
    calibrate.load(workdir, other)


def test_recalibrate_then_evaluate_at_the_stored_threshold(calibrated_run, tmp_path):
  config, workdir, _, _ = calibrated_run
  test_good = os.path.join(config.data.root, config.data.category, 'test', 'good')
  run = str(tmp_path / 'run')
  shutil.copytree(workdir, run)
  out = _cli(
    'msrd_jax.calibrate',
    '--workdir',
    run,
    '--good',
    test_good,
    '--config.calibration.false_alarm_rate=0.2',
  )
  assert out.returncode == 0, out.stderr[-3000:]
  record = calibrate.load(run)
  assert record['source'] == 'folder' and record['images'] == 20
  scores = np.array(record['image_scores'])
  # k = ceil(21 * 0.8) = 17: the 17th of 20 sorted scores.
  assert record['image_threshold'] == scores[16] and not record['limited']

  results = evaluate.evaluate(config, run, pictures=False)['brick']
  with open(os.path.join(run, 'test_scores.csv')) as f:
    rows = list(csv.DictReader(f))
  good = np.array([float(r['score']) for r in rows if r['label'] == '0'])
  bad = np.array([float(r['score']) for r in rows if r['label'] == '1'])
  # Evaluation scores the same images as calibration did.
  np.testing.assert_allclose(np.sort(good), scores, rtol=2e-5)
  threshold = record['image_threshold']
  assert results['false_alarm_rate'] == pytest.approx(np.mean(good > threshold))
  assert results['false_alarm_rate'] == pytest.approx(3 / 20)  # on its own images
  assert results['detection_rate'] == pytest.approx(np.mean(bad > threshold))
  for key in ('pixel_false_alarm_rate', 'pixel_detection_rate'):
    assert 0.0 <= results[key] <= 1.0
  with open(os.path.join(run, 'evaluation.json')) as f:
    report = json.load(f)['threshold']
  assert report['image_threshold'] == threshold and report['nominal_false_alarm_rate'] == 0.2
  labels = np.r_[np.zeros(len(good)), np.ones(len(bad))]
  expected = calibrate.f1_optimal_threshold(np.r_[good, bad], labels)
  assert report['f1_optimal_threshold'] == pytest.approx(expected[0])
  assert report['f1_max'] == pytest.approx(expected[1])


def test_calibrating_on_nothing_says_what_to_give(synthetic_root, tmp_path):
  config = tiny_config(synthetic_root)  # calibration.source = 'none'
  with pytest.raises(calibrate.CalibrationError, match='--good'):
    calibrate.calibration_samples(config)
  with pytest.raises(data_lib.DataError, match='no images'):
    calibrate.calibration_samples(config, good=str(tmp_path))
