"""Evaluation metrics for anomaly detection: AUROC, AP, F1-max and AU-PRO.

Everything here is plain numpy (scipy.ndimage only labels connected components) and
exact: AUROC and AP equal scikit-learn's `roc_auc_score` and `average_precision_score`,
ties included (one threshold per distinct score), and AU-PRO follows the MVTec AD
definition (Bergmann et al., IJCV 2021) on the exact curve. RD4AD's 200-threshold
AU-PRO, which papers built on RD4AD report, is `au_pro_rd4ad`.

Conventions: a pixel or image is predicted anomalous at threshold t when its score is
>= t (except in `au_pro_rd4ad`, which copies RD4AD's `>`); label 1 / True is anomalous.
Nothing is sorted more than once: the scores of each class are sorted separately
(values only, no argsort) and the counts of either class above any threshold are read
off with `np.searchsorted`; that gives every point of the curves in integer arithmetic.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import ndimage

# 8-connectivity, as in the MVTec AD evaluation code (and skimage.measure.label's 2-D
# default): regions touching only at a corner are one defect.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# ----------------------------------------------------------------------------------
# Input checking.


def _as_scores(x, name: str) -> np.ndarray:
  """Real-valued scores as an array, rejecting NaN and infinity."""
  a = np.asarray(x)
  if a.dtype == bool or not (
    np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)
  ):
    raise ValueError(f'{name} must hold real numbers; got an array of dtype {a.dtype}.')
  # min and max propagate NaN and expose infinities without a full-size temporary.
  if a.size and not (np.isfinite(a.min()) and np.isfinite(a.max())):
    raise ValueError(f'{name} contains NaN or infinity; anomaly scores must be finite.')
  return a


def _as_binary(x, name: str, shape: tuple[int, ...], like: str) -> np.ndarray:
  """A {0, 1} or bool array of the given shape as bool (no copy when already bool)."""
  m = np.asarray(x)
  if m.shape != shape:
    raise ValueError(f'{name} must have the shape of {like}, {shape}; got {m.shape}.')
  if m.dtype == bool:
    return m
  if not (np.issubdtype(m.dtype, np.number)):
    raise ValueError(f'{name} must be bool or numeric 0/1; got dtype {m.dtype}.')
  b = m != 0
  bad = m[b] != 1
  if bad.any():
    raise ValueError(
      f'{name} must be binary (0/1 or bool); found the value {m[b][bad][0]!r}. '
      'Binarize ground-truth masks first (e.g. mask > 0.5).'
    )
  return b


def _check_maps(amaps, masks) -> tuple[np.ndarray, np.ndarray]:
  """(N, H, W) anomaly maps and the matching bool defect masks."""
  a = _as_scores(amaps, 'amaps')
  if a.ndim != 3:
    raise ValueError(f'amaps must have shape (N, H, W); got shape {a.shape}.')
  return a, _as_binary(masks, 'masks', a.shape, 'amaps')


class _Split(NamedTuple):
  """Scores of the two classes, each sorted ascending."""

  neg: np.ndarray
  pos: np.ndarray


def _select(scores: np.ndarray, keep: np.ndarray, negate: bool) -> np.ndarray:
  """scores[keep] (or scores[~keep]) as a new 1-D array, filled image by image so that
  no full-size temporary (such as ~keep) is made."""
  if scores.ndim < 2:
    return scores[~keep] if negate else scores[keep]
  count = np.count_nonzero(keep)
  out = np.empty(keep.size - count if negate else count, scores.dtype)
  start = 0
  for s, k in zip(scores, keep):
    part = s[~k] if negate else s[k]
    out[start : start + part.size] = part
    start += part.size
  return out


def _split(scores: np.ndarray, positive: np.ndarray, what: str) -> _Split:
  n_pos = int(np.count_nonzero(positive))
  if n_pos == 0 or n_pos == positive.size:
    raise ValueError(
      f'{what} needs both classes: got {n_pos} anomalous and {positive.size - n_pos} '
      'normal ' + ('pixels.' if 'pixel' in what else 'images.')
    )
  neg = _select(scores, positive, negate=True)
  neg.sort()  # in place: a private copy
  pos = _select(scores, positive, negate=False)
  pos.sort()
  return _Split(neg, pos)


def _image_split(scores, labels) -> _Split:
  s = _as_scores(scores, 'scores')
  if s.ndim != 1:
    raise ValueError(f'scores must have shape (N,); got {s.shape}.')
  return _split(s, _as_binary(labels, 'labels', s.shape, 'scores'), 'image-level metric')


def _pixel_split(amaps, masks) -> _Split:
  a = _as_scores(amaps, 'amaps')
  return _split(a, _as_binary(masks, 'masks', a.shape, 'amaps'), 'pixel-level metric')


# ----------------------------------------------------------------------------------
# Binary classification metrics.


def _auroc(s: _Split) -> float:
  # Area under the ROC drawn with one point per distinct score = Mann-Whitney U / (P N):
  # a (positive, negative) pair counts 1 when the positive scores higher and 1/2 on a
  # tie (the diagonal step of the curve). Integer counts, one rounding at the end.
  below = np.searchsorted(s.neg, s.pos, side='left').sum(dtype=np.int64)
  below_or_tied = np.searchsorted(s.neg, s.pos, side='right').sum(dtype=np.int64)
  return (int(below) + int(below_or_tied)) / (2 * s.pos.size * s.neg.size)


def _pr_points(s: _Split) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(tp, fp, n_equal) at each distinct positive score, as float64.

  Recall only moves at thresholds equal to a positive's score, and between two of them
  the best F1 and the AP terms are at the higher one, so these points are all AP and
  F1-max need.
  """
  pos = s.pos
  starts = np.flatnonzero(np.concatenate(([True], pos[1:] != pos[:-1])))
  n_equal = np.diff(np.append(starts, pos.size))
  tp = pos.size - starts
  fp = s.neg.size - np.searchsorted(s.neg, pos[starts], side='left')
  return tp.astype(np.float64), fp.astype(np.float64), n_equal.astype(np.float64)


def _ap(s: _Split) -> float:
  # sum_n (R_n - R_{n-1}) P_n: each distinct positive score raises recall by
  # n_equal / P at precision tp / (tp + fp).
  tp, fp, n_equal = _pr_points(s)
  return float(np.sum(n_equal * (tp / (tp + fp))) / s.pos.size)


def _f1_max(s: _Split) -> float:
  tp, fp, _ = _pr_points(s)
  # F1 = 2 tp / (2 tp + fp + fn) with fn = P - tp.
  return float(np.max(2.0 * tp / (tp + fp + s.pos.size)))


def _roc(s: _Split) -> tuple[np.ndarray, np.ndarray]:
  thresholds = np.unique(np.concatenate((s.neg, s.pos)))[::-1]
  tp = s.pos.size - np.searchsorted(s.pos, thresholds, side='left')
  fp = s.neg.size - np.searchsorted(s.neg, thresholds, side='left')
  fpr = np.concatenate(([0.0], fp / s.neg.size))
  tpr = np.concatenate(([0.0], tp / s.pos.size))
  return fpr, tpr


def image_auroc(scores, labels) -> float:
  """Image-level AUROC, equal to sklearn's `roc_auc_score(labels, scores)`.

  scores: (N,) float, higher = more anomalous; labels: (N,) {0, 1} or bool, 1 = anomalous.
  """
  return _auroc(_image_split(scores, labels))


def pixel_auroc(amaps, masks) -> float:
  """Pixel-level AUROC over all pixels of all maps (sklearn's `roc_auc_score`).

  amaps: float array of any shape, e.g. (N, H, W); masks: same shape, {0, 1} or bool.
  Extra memory: one copy of amaps in its dtype and about 20 bytes per defect pixel (plus 1
  byte per pixel when masks is not bool).
  """
  return _auroc(_pixel_split(amaps, masks))


def image_ap(scores, labels) -> float:
  """Image-level average precision (sklearn's `average_precision_score`, no interpolation).

  scores: (N,) float; labels: (N,) {0, 1} or bool.
  """
  return _ap(_image_split(scores, labels))


def pixel_ap(amaps, masks) -> float:
  """Pixel-level average precision over all pixels. amaps, masks: same shape."""
  return _ap(_pixel_split(amaps, masks))


def image_f1_max(scores, labels) -> float:
  """Largest image-level F1 score over all thresholds. scores, labels: (N,)."""
  return _f1_max(_image_split(scores, labels))


def pixel_f1_max(amaps, masks) -> float:
  """Largest pixel-level F1 score over all thresholds. amaps, masks: same shape."""
  return _f1_max(_pixel_split(amaps, masks))


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray]:
  """ROC curve points, as sklearn's `roc_curve(labels, scores, drop_intermediate=False)`.

  scores: float array of any shape (image scores (N,) or maps (N, H, W)); labels: same
  shape, {0, 1} or bool. Returns (fpr, tpr), float64 arrays of length 1 + the number of
  distinct scores: (0, 0), then one point per distinct score, highest threshold first.
  """
  s = _as_scores(scores, 'scores')
  return _roc(_split(s, _as_binary(labels, 'labels', s.shape, 'scores'), 'ROC curve'))


# ----------------------------------------------------------------------------------
# Per-region overlap (MVTec AD definition).


class _Defects(NamedTuple):
  """Defect pixels of a category: scores ascending, and the PRO weight of each."""

  scores: np.ndarray
  # Each defect pixel weighs 1 / (number of regions * size of its region), and the PRO
  # at threshold t is the total weight of the defect pixels scoring >= t:
  # above[i] = weight of scores[i:], float64, length len(scores) + 1 (above[-1] = 0).
  # Summed from the highest score down, so that the low-FPR end, which is what AU-PRO
  # integrates, carries the least rounding.
  above: np.ndarray
  num_regions: int


def _defects(amaps: np.ndarray, defect: np.ndarray) -> _Defects:
  scores, regions = [], []
  num_regions = 0
  # Each image's mask is labelled on its own, so that only defect pixels are stored
  # (no full-size label array).
  for a, m in zip(amaps, defect):
    if not m.any():
      continue
    labels, n = ndimage.label(m, structure=_EIGHT_CONNECTED)
    scores.append(a[m])
    regions.append(labels[m].astype(np.int64) + (num_regions - 1))
    num_regions += n
  if not num_regions:
    raise ValueError(
      'masks contain no defect pixel: AU-PRO needs at least one defect region in the ground truth.'
    )
  scores, regions = np.concatenate(scores), np.concatenate(regions)
  per_region = 1.0 / (num_regions * np.bincount(regions).astype(np.float64))
  order = np.argsort(scores)
  scores = scores[order]
  above = np.zeros(scores.size + 1)
  np.cumsum(per_region[regions[order]][::-1], out=above[-2::-1])
  return _Defects(scores, above, num_regions)


def _fpr_count_limit(fpr_limit: float, n_neg: int) -> int:
  """Largest k with k / n_neg <= fpr_limit, as computed in floating point."""
  k = min(math.floor(fpr_limit * n_neg), n_neg)
  while k < n_neg and (k + 1) / n_neg <= fpr_limit:
    k += 1
  while k > 0 and k / n_neg > fpr_limit:
    k -= 1
  return k


class _NormalTop(NamedTuple):
  """The normal-pixel scores needed for the curve up to an FPR limit.

  top holds, ascending, every normal score above top[0] and some of those equal to it;
  ties_below more normal pixels score exactly top[0]. Every threshold above top[0] has
  FPR <= the limit and top[0] itself is the first beyond it (or top is everything).
  """

  top: np.ndarray
  ties_below: int
  n_neg: int


def _normal_top(neg: np.ndarray, fpr_limit: float, is_sorted: bool) -> _NormalTop:
  n_neg = neg.size
  k = _fpr_count_limit(fpr_limit, n_neg)
  if k >= n_neg:
    if not is_sorted:
      neg.sort()
    return _NormalTop(neg, 0, n_neg)
  cut = n_neg - k - 1  # index of the (k + 1)-th largest score, ascending order
  if is_sorted:
    ties = cut - int(np.searchsorted(neg, neg[cut], side='left'))
    return _NormalTop(neg[cut:], ties, n_neg)
  # O(n) selection, then only the part above the cut is sorted (in place).
  neg.partition(cut)
  top = neg[cut:]
  top.sort()
  # Counted in chunks: a full-size boolean temporary would add 1 byte per pixel.
  ties = sum(
    int(np.count_nonzero(neg[i : min(i + 2**20, cut)] == top[0])) for i in range(0, cut, 2**20)
  )
  return _NormalTop(top, ties, n_neg)


def _pro_points(
  normal: _NormalTop, defects: _Defects, thresholds: np.ndarray, side: str
) -> tuple[np.ndarray, np.ndarray]:
  """(fpr, pro) at thresholds >= normal.top[0]; side 'left' counts scores >= t, 'right' > t."""
  fp = normal.top.size - np.searchsorted(normal.top, thresholds, side=side)
  if side == 'left' and normal.ties_below:
    fp = fp + normal.ties_below * (thresholds <= normal.top[0])
  pro = defects.above[np.searchsorted(defects.scores, thresholds, side=side)]
  return fp / normal.n_neg, np.minimum(pro, 1.0)


def _pro_corners(normal: _NormalTop, defects: _Defects) -> tuple[np.ndarray, np.ndarray]:
  """The exact PRO curve from (0, 0) to its first point beyond the FPR limit, as a
  polyline through its corners only.

  Between two consecutive distinct defect scores only normal pixels enter, so the curve
  is horizontal there; it is enough to evaluate it just above each distinct defect score
  v (counting > v) and at v (>= v), the segment between being the tie step.
  """
  t_min = normal.top[0]
  d = defects.scores
  d = d[np.searchsorted(d, t_min, side='left') :]
  distinct = d[np.concatenate(([True], d[1:] != d[:-1]))][::-1] if d.size else d
  # (0, 0), then (> v, >= v) for each distinct v from the highest, then >= t_min.
  fpr, pro = np.empty(2 * distinct.size + 2), np.empty(2 * distinct.size + 2)
  fpr[0] = pro[0] = 0.0
  fpr[1:-1:2], pro[1:-1:2] = _pro_points(normal, defects, distinct, 'right')
  fpr[2:-1:2], pro[2:-1:2] = _pro_points(normal, defects, distinct, 'left')
  fpr[-1:], pro[-1:] = _pro_points(normal, defects, normal.top[:1], 'left')
  return fpr, pro


def _cut(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> tuple[int, float | None]:
  """(i, y): fpr[:i] <= fpr_limit < fpr[i], and y the PRO linearly interpolated at
  exactly fpr_limit (None when the curve ends at or before the limit)."""
  i = int(np.searchsorted(fpr, fpr_limit, side='right'))
  if i == fpr.size:
    return i, None
  x0, x1, y0, y1 = fpr[i - 1], fpr[i], pro[i - 1], pro[i]
  return i, float(y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0))


def _truncate(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> tuple[np.ndarray, np.ndarray]:
  """The curve up to fpr_limit, ending with a point interpolated at exactly fpr_limit."""
  i, y = _cut(fpr, pro, fpr_limit)
  if y is None:
    return fpr, pro
  return np.append(fpr[:i], fpr_limit), np.append(pro[:i], y)


def _check_fpr_limit(fpr_limit: float) -> float:
  if not 0.0 < fpr_limit <= 1.0:
    raise ValueError(f'fpr_limit must be in (0, 1]; got {fpr_limit!r}.')
  return float(fpr_limit)


def _normal_scores(amaps: np.ndarray, defect: np.ndarray) -> np.ndarray:
  if np.all(defect):
    raise ValueError(
      'masks mark every pixel as defective: AU-PRO needs defect-free '
      'pixels to measure the false-positive rate.'
    )
  return _select(amaps, defect, negate=True)


def _au_pro(normal: _NormalTop, defects: _Defects, fpr_limit: float) -> float:
  fpr, pro = _pro_corners(normal, defects)
  i, y = _cut(fpr, pro, fpr_limit)
  area = np.trapezoid(pro[:i], fpr[:i])
  if y is not None:
    area += 0.5 * (pro[i - 1] + y) * (fpr_limit - fpr[i - 1])
  return float(area / fpr_limit)


def pro_curve(amaps, masks, fpr_limit: float | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The exact per-region-overlap curve, one point per distinct score.

  amaps: (N, H, W) float; masks: (N, H, W) {0, 1} or bool (defect = 1). Regions are the
  8-connected components of each image's mask; PRO(t) is the mean over all regions of the
  category of the fraction of the region scoring >= t; FPR(t) is the fraction of all
  defect-free pixels (of good and defective images) scoring >= t.

  Returns (fpr, pro), float64, FPR non-decreasing: (0, 0) (threshold above every score),
  then one point per distinct score, highest first, up to (1, 1). With fpr_limit, only
  the points with FPR <= fpr_limit are kept and a last point is interpolated linearly
  at exactly fpr_limit; only the scores above the cut are sorted.
  """
  a, defect = _check_maps(amaps, masks)
  limit = 1.0 if fpr_limit is None else _check_fpr_limit(fpr_limit)
  defects = _defects(a, defect)
  normal = _normal_top(_normal_scores(a, defect), limit, is_sorted=False)
  d = defects.scores
  if normal.top.size + normal.ties_below < normal.n_neg:
    # Defect scores below the cut only matter beyond the limit.
    d = d[np.searchsorted(d, normal.top[0], side='left') :]
  thresholds = np.unique(np.concatenate((normal.top, d)))[::-1]
  fpr, pro = _pro_points(normal, defects, thresholds, 'left')
  fpr, pro = np.concatenate(([0.0], fpr)), np.concatenate(([0.0], pro))
  return _truncate(fpr, pro, limit) if fpr_limit is not None else (fpr, pro)


def au_pro(amaps, masks, fpr_limit: float = 0.3) -> float:
  """Normalized area under the PRO curve up to fpr_limit (MVTec AD's AU-PRO).

  amaps: (N, H, W) float, all test images of a category; masks: (N, H, W) {0, 1} or
  bool, defect = 1 (all zeros for good images). The curve is `pro_curve`'s (every
  distinct score a threshold, starting at (0, 0)); its area up to fpr_limit, by the
  trapezoid rule with the PRO linearly interpolated at exactly fpr_limit, is divided by
  fpr_limit, so a perfect map scores 1.

  Only the part of the curve below fpr_limit is computed: the normal-pixel score at
  which the FPR passes the limit is found with `np.partition` (O(n)) and only the scores
  above it are sorted; no argsort of the maps. Counts are integers and PRO sums float64.

  Peak extra memory: one copy of the defect-free pixels' scores in amaps' dtype (about
  the size of amaps), about 60 bytes per defect pixel, and 1 byte per pixel when masks
  is not bool (it is binarized first): 1.17 x the maps for 100 float32 maps of
  1024 x 1024 with 1% defect pixels (scripts/bench_metrics.py).

  Raises ValueError on shape mismatch, NaN or infinite scores, non-binary masks, no
  defect pixel, no defect-free pixel, or fpr_limit outside (0, 1].
  """
  a, defect = _check_maps(amaps, masks)
  limit = _check_fpr_limit(fpr_limit)
  defects = _defects(a, defect)
  normal = _normal_top(_normal_scores(a, defect), limit, is_sorted=False)
  return _au_pro(normal, defects, limit)


# ----------------------------------------------------------------------------------
# RD4AD's AU-PRO.


def _rd4ad_compute_pro(
  amaps: np.ndarray, defect: np.ndarray, num_th: int, where: str
) -> tuple[float, str]:
  """RD4AD's `compute_pro(masks, amaps, num_th)` (hq-deng/RD4AD, test.py), vectorized.

  Returns (value, '') or (nan, why it is undefined), where RD4AD would crash or get NaN.
  """
  # RD4AD's maps are float64; thresholds come from np.arange as in its loop.
  a = amaps.astype(np.float64)
  min_th, max_th = a.min(), a.max()
  delta = (max_th - min_th) / num_th
  if not delta > 0:
    return math.nan, f'{where}: the anomaly map is constant'
  ths = np.arange(min_th, max_th, delta)
  neg = np.sort(a[~defect])
  if neg.size == 0:
    return math.nan, f'{where}: every pixel is a defect pixel'
  # A pixel is positive when its score is > th (RD4AD: binary_amaps[amaps > th] = 1).
  fpr = (neg.size - np.searchsorted(neg, ths, side='right')) / neg.size
  # Per region, the number of its pixels above each threshold: a pixel of score v is
  # above the first k = #(ths < v) thresholds.
  sizes, hists = [], []
  for img, m in zip(a, defect):
    labels, n = ndimage.label(m, structure=_EIGHT_CONNECTED)
    if not n:
      continue
    k = np.searchsorted(ths, img[m], side='left')
    flat = (labels[m].astype(np.int64) - 1) * (ths.size + 1) + k
    hist = np.bincount(flat, minlength=n * (ths.size + 1)).reshape(n, ths.size + 1)
    hists.append(hist)
    sizes.append(hist.sum(axis=1))
  hist = np.concatenate(hists)
  above = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]  # (regions, thresholds)
  pro = np.mean(above / np.concatenate(sizes)[:, None], axis=0)
  keep = fpr < 0.3
  x, y = fpr[keep], pro[keep]
  if x.size < 2:
    return math.nan, f'{where}: fewer than 2 of the thresholds have an FPR below 0.3'
  if not x.max() > 0:
    return math.nan, f'{where}: the FPR is 0 at every threshold below 0.3'
  x = x / x.max()
  # sklearn.metrics.auc: the x are monotone, decreasing here, and the area is positive.
  dx = np.diff(x)
  direction = -1.0 if np.any(dx < 0) else 1.0
  return float(direction * np.trapezoid(y, x)), ''


def _au_pro_rd4ad(
  a: np.ndarray, defect: np.ndarray, num_thresholds: int, per_image: bool
) -> tuple[float, str]:
  if not (isinstance(num_thresholds, (int, np.integer)) and num_thresholds > 0):
    raise ValueError(f'num_thresholds must be a positive int; got {num_thresholds!r}.')
  if not per_image:
    if not defect.any():
      raise ValueError(
        'masks contain no defect pixel: AU-PRO needs at least one defect '
        'region in the ground truth.'
      )
    return _rd4ad_compute_pro(a, defect, int(num_thresholds), 'the category')
  values = []
  for i in range(a.shape[0]):
    if defect[i].any():
      v, why = _rd4ad_compute_pro(
        a[i : i + 1], defect[i : i + 1], int(num_thresholds), f'image {i}'
      )
      if why:
        return v, why
      values.append(v)
  if not values:
    raise ValueError(
      'masks contain no defect pixel: AU-PRO needs at least one defect region in the ground truth.'
    )
  return float(np.mean(values)), ''


def au_pro_rd4ad(amaps, masks, num_thresholds: int = 200, per_image: bool = True) -> float:
  """AU-PRO as RD4AD's code computes it; NOT the MVTec AD definition (see `au_pro`).

  amaps: (N, H, W) float; masks: (N, H, W) {0, 1} or bool.

  RD4AD's `compute_pro` (hq-deng/RD4AD, test.py): thresholds np.arange(min, max, delta)
  with delta = (max - min) / num_thresholds over the maps it is given (about 200); at
  each, a pixel is positive when its score is > threshold; PRO = mean over all regions
  (8-connected components) of those maps of the region's positive fraction; FPR =
  positive fraction of the defect-free pixels; keep the thresholds with FPR < 0.3,
  divide those FPRs by their maximum (so the kept FPR range is stretched to end at 1)
  and take the trapezoid area. RD4AD's `evaluation` calls it once per defective test
  image, with that image's map alone, and reports the mean over those images:
  per_image=True (the default) does that, taking as defective the images whose mask has
  a defect pixel. per_image=False calls it once on the whole category.

  Raises ValueError where RD4AD's code would fail or give NaN: a constant map, fewer
  than two thresholds with FPR < 0.3, an FPR of 0 at all of them, a mask that is all
  defect; and on bad input as `au_pro`.
  """
  a, defect = _check_maps(amaps, masks)
  value, why = _au_pro_rd4ad(a, defect, num_thresholds, per_image)
  if why:
    raise ValueError(f"RD4AD's AU-PRO is undefined: {why}.")
  return value


# ----------------------------------------------------------------------------------
# Everything at once.


def evaluate_all(scores, labels, amaps, masks, fpr_limit: float = 0.3) -> dict[str, float]:
  """All metrics of a category, sorting the pixel scores once.

  scores: (N,) float image scores; labels: (N,) {0, 1} or bool; amaps: (N, H, W) float;
  masks: (N, H, W) {0, 1} or bool. Returns a dict with keys image_auroc, pixel_auroc,
  au_pro, image_ap, pixel_ap, image_f1_max, pixel_f1_max, au_pro_rd4ad (fractions in
  [0, 1]). au_pro_rd4ad is NaN where RD4AD's formula is undefined (e.g. a perfect
  map, with no false positive below FPR 0.3) instead of raising.

  Peak extra memory: as `au_pro`.
  """
  a, defect = _check_maps(amaps, masks)
  limit = _check_fpr_limit(fpr_limit)
  image = _image_split(scores, labels)
  if image.neg.size + image.pos.size != a.shape[0]:
    raise ValueError(
      f'scores and amaps must cover the same images; got '
      f'{image.neg.size + image.pos.size} scores and {a.shape[0]} maps.'
    )
  defects = _defects(a, defect)
  neg = _normal_scores(a, defect)
  neg.sort()
  pixel = _Split(neg, defects.scores)
  rd4ad, _ = _au_pro_rd4ad(a, defect, 200, per_image=True)
  return {
    'image_auroc': _auroc(image),
    'pixel_auroc': _auroc(pixel),
    'au_pro': _au_pro(_normal_top(neg, limit, is_sorted=True), defects, limit),
    'image_ap': _ap(image),
    'pixel_ap': _ap(pixel),
    'image_f1_max': _f1_max(image),
    'pixel_f1_max': _f1_max(pixel),
    'au_pro_rd4ad': rd4ad,
  }


def max_near_border(amaps, band: int) -> float:
  """The share of maps whose maximum lies within `band` pixels of the image's edge.

  amaps: (N, H, W) float, N >= 1. Ties count at the first maximum in row-major order.
  A diagnostic of the image score (the maximum of the map): when most defect-free maps
  peak on the border, image AUROC compares border responses, not defects.
  """
  a = _as_scores(amaps, 'amaps')
  if a.ndim != 3 or not a.shape[0]:
    raise ValueError(f'amaps must be (N, H, W) with N >= 1, got shape {a.shape}')
  n, h, w = a.shape
  y, x = np.unravel_index(np.argmax(a.reshape(n, -1), axis=1), (h, w))
  near = (np.minimum(y, h - 1 - y) < band) | (np.minimum(x, w - 1 - x) < band)
  return float(np.mean(near))
