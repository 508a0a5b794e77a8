"""Metrics against independent truths: scikit-learn, hand computations, slow references."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import METRIC_NAMES
from scipy import ndimage
from sklearn import metrics as skm

from msrd_jax import metrics

# ----------------------------------------------------------------------------------
# Independent references.


def slow_pro_curve(amaps, masks):
  """Exact PRO curve by brute force: every distinct score, full masks at each threshold."""
  amaps = np.asarray(amaps, np.float64)
  masks = np.asarray(masks).astype(bool)
  # One full-size boolean mask per 8-connected region of each image.
  region_masks = []
  for k, m in enumerate(masks):
    lab, n = ndimage.label(m, structure=np.ones((3, 3)))
    for r in range(1, n + 1):
      full = np.zeros_like(masks)
      full[k] = lab == r
      region_masks.append(full)
  normal = ~masks
  fprs, pros = [0.0], [0.0]
  for t in np.unique(amaps)[::-1]:
    pred = amaps >= t
    fprs.append((pred & normal).sum() / normal.sum())
    pros.append(np.mean([(pred & r).sum() / r.sum() for r in region_masks]))
  return np.array(fprs), np.array(pros)


def slow_au_pro(amaps, masks, limit=0.3):
  fpr, pro = slow_pro_curve(amaps, masks)
  i = np.searchsorted(fpr, limit, side='right')
  x, y = list(fpr[:i]), list(pro[:i])
  if i < len(fpr):
    y.append(pro[i - 1] + (pro[i] - pro[i - 1]) * (limit - fpr[i - 1]) / (fpr[i] - fpr[i - 1]))
    x.append(limit)
  area = sum(0.5 * (y[j] + y[j + 1]) * (x[j + 1] - x[j]) for j in range(len(x) - 1))
  return area / limit


def rd4ad_compute_pro(masks, amaps, num_th=200):
  """Transcription of hq-deng/RD4AD test.py `compute_pro` (pandas replaced by lists)."""
  from skimage import measure

  assert set(masks.flatten()) == {0, 1}
  binary_amaps = np.zeros_like(amaps, dtype=bool)
  min_th, max_th = amaps.min(), amaps.max()
  delta = (max_th - min_th) / num_th
  rows = []
  for th in np.arange(min_th, max_th, delta):
    binary_amaps[amaps <= th] = 0
    binary_amaps[amaps > th] = 1
    pros = []
    for binary_amap, mask in zip(binary_amaps, masks):
      for region in measure.regionprops(measure.label(mask)):
        tp_pixels = binary_amap[region.coords[:, 0], region.coords[:, 1]].sum()
        pros.append(tp_pixels / region.area)
    inverse_masks = 1 - masks
    fp_pixels = np.logical_and(inverse_masks, binary_amaps).sum()
    rows.append((np.mean(pros), fp_pixels / inverse_masks.sum()))
  pro, fpr = np.array(rows).T
  keep = fpr < 0.3
  fpr, pro = fpr[keep], pro[keep]
  return skm.auc(fpr / fpr.max(), pro)


def rd4ad_evaluation_aupro(amaps, masks):
  """RD4AD's `evaluation`: compute_pro per defective image, then the mean."""
  return np.mean(
    [
      rd4ad_compute_pro(m[None].astype(int), a[None].astype(np.float64))
      for a, m in zip(amaps, masks)
      if m.any()
    ]
  )


def sk_f1_max(labels, scores):
  p, r, _ = skm.precision_recall_curve(labels, scores)
  with np.errstate(invalid='ignore', divide='ignore'):
    f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
  return f1.max()


# ----------------------------------------------------------------------------------
# Data.


def blob_category(rng, n=6, size=24, ties=False, dtype=np.float32):
  """Smooth maps with blob-shaped defects on some images."""
  amaps = ndimage.gaussian_filter(rng.random((n, size, size)), sigma=(0, 2, 2))
  masks = np.zeros((n, size, size), bool)
  yy, xx = np.mgrid[:size, :size]
  for i in range(1, n, 2):
    for _ in range(rng.integers(1, 3)):
      cy, cx, r = rng.integers(3, size - 3), rng.integers(3, size - 3), rng.integers(1, 4)
      masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
  amaps = amaps + 0.15 * ndimage.gaussian_filter(masks.astype(float), sigma=(0, 1, 1))
  if ties:
    amaps = np.round(amaps * 20) / 20
  return amaps.astype(dtype), masks


# ----------------------------------------------------------------------------------
# Binary metrics vs scikit-learn.


@pytest.mark.parametrize('ties', [False, True])
@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_binary_metrics_match_sklearn(ties, dtype):
  rng = np.random.default_rng(0)
  for _trial in range(5):
    n = int(rng.integers(20, 400))
    labels = rng.random(n) < rng.uniform(0.1, 0.9)
    labels[:2] = [True, False]
    scores = rng.normal(size=n) + labels * rng.uniform(0, 2)
    if ties:
      scores = np.round(scores, 1)
    scores = scores.astype(dtype)
    assert metrics.image_auroc(scores, labels) == pytest.approx(
      skm.roc_auc_score(labels, scores), abs=1e-9
    )
    assert metrics.image_ap(scores, labels) == pytest.approx(
      skm.average_precision_score(labels, scores), abs=1e-9
    )
    assert metrics.image_f1_max(scores, labels) == pytest.approx(
      sk_f1_max(labels, scores), abs=1e-9
    )
    fpr, tpr = metrics.roc_curve(scores, labels.astype(int))
    sk_fpr, sk_tpr, _ = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_array_equal(fpr, sk_fpr)
    np.testing.assert_array_equal(tpr, sk_tpr)


@pytest.mark.parametrize('ties', [False, True])
def test_pixel_metrics_match_sklearn(ties):
  rng = np.random.default_rng(1)
  amaps, masks = blob_category(rng, n=8, size=32, ties=ties)
  y, s = masks.ravel(), amaps.ravel()
  assert metrics.pixel_auroc(amaps, masks) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-9)
  assert metrics.pixel_ap(amaps, masks.astype(np.uint8)) == pytest.approx(
    skm.average_precision_score(y, s), abs=1e-9
  )
  assert metrics.pixel_f1_max(amaps, masks.astype(np.float32)) == pytest.approx(
    sk_f1_max(y, s), abs=1e-9
  )


def test_auroc_all_tied_is_half():
  scores = np.zeros(10)
  labels = np.arange(10) % 2
  assert metrics.image_auroc(scores, labels) == 0.5
  # One threshold: every image predicted anomalous; precision = recall-weighted 1/2.
  assert metrics.image_ap(scores, labels) == pytest.approx(0.5)


# ----------------------------------------------------------------------------------
# AU-PRO.


def test_au_pro_hand_computed():
  # Two 4x4 images. Image 0 is good; image 1 has one 2x2 region (4 pixels) at the top-left.
  # Normal pixels: 16 + 12 = 28.
  amaps = np.zeros((2, 4, 4))
  masks = np.zeros((2, 4, 4), int)
  masks[1, :2, :2] = 1
  amaps[1, 0, 0] = 0.9  # defect
  amaps[1, 0, 1] = amaps[1, 1, 0] = 0.5  # defect
  amaps[1, 1, 1] = 0.1  # defect (tied with the normal pixels below)
  amaps[0, 0, 0] = 0.7  # one normal pixel
  amaps[0, 3, 3] = amaps[1, 3, 3] = 0.1  # two normal pixels
  # Thresholds high to low (FPR = normal >= t / 28, PRO = region >= t / 4):
  #   above all: (0, 0); 0.9: (0, 1/4); 0.7: (1/28, 1/4); 0.5: (1/28, 3/4);
  #   0.1: (3/28, 1); 0.0: (1, 1).
  fpr, pro = metrics.pro_curve(amaps, masks)
  np.testing.assert_allclose(fpr, [0, 0, 1 / 28, 1 / 28, 3 / 28, 1])
  np.testing.assert_allclose(pro, [0, 0.25, 0.25, 0.75, 1, 1])
  # Area up to 0.3: 0.25 * 1/28 (flat) + (0.75 + 1) / 2 * 2/28 (tie step 0.1)
  # + 1 * (0.3 - 3/28) (flat at 1, the value interpolated at 0.3).
  expected = (0.25 / 28 + 1.75 / 28 + (0.3 - 3 / 28)) / 0.3
  assert metrics.au_pro(amaps, masks) == pytest.approx(expected, abs=1e-12)
  assert metrics.au_pro(amaps, masks) == pytest.approx(slow_au_pro(amaps, masks), abs=1e-12)
  # A limit inside the flat part at PRO 1/4: area 0.25 * 0.02 / 0.02.
  assert metrics.au_pro(amaps, masks, fpr_limit=0.02) == pytest.approx(0.25, abs=1e-12)


def test_au_pro_interpolates_inside_a_tie_step():
  # One 1x4 region scoring 1, and 4 normal pixels: 2 at 1 (tied) and 2 at 0.
  amaps = np.array([[[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]]])
  masks = np.array([[[1, 1, 1, 1, 0, 0, 0, 0]]])
  # Curve: (0, 0) -> (2/4, 1) diagonal -> (1, 1). At FPR 0.3 the PRO is 0.3 / 0.5 = 0.6;
  # area = 0.5 * 0.3 * 0.6 = 0.09, normalized 0.3.
  assert metrics.au_pro(amaps, masks) == pytest.approx(0.3, abs=1e-12)


def test_au_pro_curve_point_exactly_at_the_limit():
  # 10 normal pixels at 0.9, 0.8, ..., 0.0 and a region of 2 pixels at 0.95 and 0.75.
  # Curve: (0, 0) (0, .5) (.1, .5) (.2, .5) (.2, 1) (.3, 1) ...: the point at t = 0.7
  # is at FPR 3/10, exactly the limit, so nothing is interpolated.
  amaps = np.array([[[0.95, 0.75, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]]])
  masks = np.array([[[1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]]])
  expected = (0.5 * 0.2 + 1.0 * 0.1) / 0.3
  assert metrics.au_pro(amaps, masks) == pytest.approx(expected, abs=1e-12)
  fpr, pro = metrics.pro_curve(amaps, masks, fpr_limit=0.3)
  assert fpr[-1] == 0.3 and pro[-1] == 1.0


def test_au_pro_diagonal_regions_are_one_region():
  # Two 2x2 squares touching at a corner: one 8-connected region of 8 pixels. Scores
  # make only one square detected at high thresholds: PRO there is 4/8 with one region,
  # 1/2 (mean of 1 and 0) with two, so a third region elsewhere tells them apart.
  masks = np.zeros((1, 8, 8), int)
  masks[0, 0:2, 0:2] = 1
  masks[0, 2:4, 2:4] = 1
  masks[0, 6:8, 6:8] = 1  # a second, separate region
  amaps = np.zeros((1, 8, 8))
  amaps[0, 0:2, 0:2] = 1.0
  fpr, pro = metrics.pro_curve(amaps, masks)
  # At t = 1: the joined region has 4/8 detected, the separate one 0: PRO = 0.25.
  # (Four-connectivity would give regions {1, 0, 0}: PRO 1/3.)
  np.testing.assert_allclose(pro[1], 0.25)
  assert ndimage.label(masks[0])[1] == 3  # sanity: 4-connectivity sees three


def test_au_pro_single_region_and_perfect_map():
  masks = np.zeros((3, 16, 16), bool)
  masks[2, 4:8, 4:8] = True
  amaps = np.where(masks, 2.0, 1.0)
  assert metrics.au_pro(amaps, masks) == pytest.approx(1.0)
  amaps = np.where(masks, 0.0, 1.0)  # inverted: PRO stays 0 up to FPR 1
  assert metrics.au_pro(amaps, masks) == pytest.approx(0.0)


@pytest.mark.parametrize('ties', [False, True])
@pytest.mark.parametrize('limit', [0.3, 0.05, 1.0])
def test_au_pro_matches_slow_reference(ties, limit):
  rng = np.random.default_rng(2)
  for trial in range(3):
    amaps, masks = blob_category(
      rng, n=5, size=16, ties=ties, dtype=np.float32 if trial % 2 else np.float64
    )
    expected = slow_au_pro(amaps, masks, limit)
    assert metrics.au_pro(amaps, masks, fpr_limit=limit) == pytest.approx(expected, abs=1e-10)
    fpr, pro = metrics.pro_curve(amaps, masks)
    sfpr, spro = slow_pro_curve(amaps, masks)
    np.testing.assert_allclose(fpr, sfpr, atol=1e-12)
    np.testing.assert_allclose(pro, spro, atol=1e-12)
    # The truncated curve integrates to the same number.
    fpr, pro = metrics.pro_curve(amaps, masks, fpr_limit=limit)
    assert fpr[-1] == pytest.approx(limit)
    assert np.trapezoid(pro, fpr) / limit == pytest.approx(expected, abs=1e-10)


def test_au_pro_many_normal_ties_at_the_cut():
  # Most normal pixels share one score, so the FPR jumps over 0.3 in one tie block.
  rng = np.random.default_rng(3)
  amaps, masks = blob_category(rng, n=4, size=16)
  amaps = np.where(~masks & (rng.random(amaps.shape) < 0.8), 0.5, amaps)
  assert metrics.au_pro(amaps, masks) == pytest.approx(slow_au_pro(amaps, masks), abs=1e-10)
  res = metrics.evaluate_all(amaps.max(axis=(1, 2)), masks.any(axis=(1, 2)), amaps, masks)
  assert res['au_pro'] == pytest.approx(slow_au_pro(amaps, masks), abs=1e-10)


def test_au_pro_bad_input():
  amaps = np.random.default_rng(0).random((2, 8, 8))
  masks = np.zeros((2, 8, 8), int)
  with pytest.raises(ValueError, match='no defect pixel'):
    metrics.au_pro(amaps, masks)
  with pytest.raises(ValueError, match='every pixel'):
    metrics.au_pro(amaps, np.ones_like(masks))
  masks[1, 2:4, 2:4] = 1
  with pytest.raises(ValueError, match='shape'):
    metrics.au_pro(amaps, masks[:, :4])
  with pytest.raises(ValueError, match='shape'):
    metrics.au_pro(amaps[0], masks[0])
  with pytest.raises(ValueError, match='NaN'):
    metrics.au_pro(np.where(masks, np.nan, amaps), masks)
  with pytest.raises(ValueError, match='binary'):
    metrics.au_pro(amaps, masks * 255)
  with pytest.raises(ValueError, match='fpr_limit'):
    metrics.au_pro(amaps, masks, fpr_limit=0.0)
  with pytest.raises(ValueError, match='both classes'):
    metrics.pixel_auroc(amaps, np.zeros_like(masks))
  with pytest.raises(ValueError, match='both classes'):
    metrics.image_auroc([0.1, 0.2], [1, 1])


# ----------------------------------------------------------------------------------
# RD4AD's AU-PRO.


@pytest.mark.parametrize('ties', [False, True])
def test_au_pro_rd4ad_matches_transcription(ties):
  rng = np.random.default_rng(4)
  amaps, masks = blob_category(rng, n=5, size=24, ties=ties, dtype=np.float64)
  expected = rd4ad_evaluation_aupro(amaps, masks)
  assert metrics.au_pro_rd4ad(amaps, masks) == pytest.approx(expected, abs=1e-12)
  whole = rd4ad_compute_pro(masks.astype(int), amaps, num_th=50)
  assert metrics.au_pro_rd4ad(amaps, masks, num_thresholds=50, per_image=False) == (
    pytest.approx(whole, abs=1e-12)
  )


def test_au_pro_rd4ad_undefined_for_perfect_map():
  masks = np.zeros((2, 8, 8), bool)
  masks[1, 2:4, 2:4] = True
  amaps = masks.astype(float)
  with pytest.raises(ValueError, match='undefined'):
    metrics.au_pro_rd4ad(amaps, masks)
  res = metrics.evaluate_all([0.0, 1.0], [0, 1], amaps, masks)
  assert np.isnan(res['au_pro_rd4ad']) and res['au_pro'] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------
# evaluate_all.


def test_evaluate_all_matches_individual_functions():
  rng = np.random.default_rng(5)
  amaps, masks = blob_category(rng, n=8, size=32)
  scores, labels = amaps.max(axis=(1, 2)), masks.any(axis=(1, 2))
  res = metrics.evaluate_all(scores, labels, amaps, masks)
  assert set(res) == set(METRIC_NAMES)
  y, s = masks.ravel(), amaps.ravel()
  assert res['image_auroc'] == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-9)
  assert res['pixel_auroc'] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-9)
  assert res['pixel_ap'] == pytest.approx(skm.average_precision_score(y, s), abs=1e-9)
  assert res['pixel_f1_max'] == pytest.approx(sk_f1_max(y, s), abs=1e-9)
  assert res['image_f1_max'] == pytest.approx(sk_f1_max(labels, scores), abs=1e-9)
  assert res['au_pro'] == pytest.approx(metrics.au_pro(amaps, masks), abs=1e-12)
  assert res['au_pro_rd4ad'] == pytest.approx(metrics.au_pro_rd4ad(amaps, masks), abs=1e-12)
  with pytest.raises(ValueError, match='same images'):
    metrics.evaluate_all(scores[:-1], labels[:-1], amaps, masks)


def test_inputs_are_not_modified():
  rng = np.random.default_rng(6)
  amaps, masks = blob_category(rng, n=4, size=16)
  a0, m0 = amaps.copy(), masks.copy()
  metrics.evaluate_all(amaps.max(axis=(1, 2)), masks.any(axis=(1, 2)), amaps, masks)
  metrics.au_pro(amaps, masks)
  metrics.pro_curve(amaps, masks, fpr_limit=0.3)
  np.testing.assert_array_equal(amaps, a0)
  np.testing.assert_array_equal(masks, m0)


def test_max_near_border_counts_maps_that_peak_within_the_band():
  rng = np.random.default_rng(0)
  amaps = rng.random((200, 12, 9))
  for band in (1, 2, 3):
    expected = []
    for m in amaps:  # the definition, written out: the peak's distance to each edge
      y, x = divmod(int(np.argmax(m)), m.shape[1])
      expected.append(min(y, x, m.shape[0] - 1 - y, m.shape[1] - 1 - x) < band)
    assert metrics.max_near_border(amaps, band) == pytest.approx(np.mean(expected))
  peaks = np.zeros((4, 10, 10))
  peaks[0, 0, 5] = peaks[1, 5, 9] = peaks[2, 5, 5] = peaks[3, 2, 7] = 1.0
  assert metrics.max_near_border(peaks, 1) == 0.5  # the first two: on the edge
  assert metrics.max_near_border(peaks, 3) == 0.75  # (2, 7) is 2 px from the top
  with pytest.raises(ValueError, match='NaN'):
    metrics.max_near_border(np.full((1, 4, 4), np.nan), 1)
  with pytest.raises(ValueError, match='N >= 1'):
    metrics.max_near_border(np.zeros((0, 4, 4)), 1)
