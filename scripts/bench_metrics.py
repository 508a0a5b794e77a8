"""Timings and peak memory of msrd_jax.metrics on a realistic category, on ONE CPU core.

  python scripts/bench_metrics.py [--repeats 5] [--skip-rd4ad-loop] [--skip-memory]

Data: 100 test maps of 256 x 256 (float32), smooth noise, half of the images with 1-3
blob-shaped defects whose maps are raised, as a trained model's maps look. Times are the
median of --repeats runs (the slow references run once). The process is pinned to one
core and BLAS/OpenMP thread pools are set to 1 thread before numpy is imported, so the
figures are per core. Peak memory: tracemalloc (numpy reports its buffers to it) during
au_pro on 100 maps of 1024 x 1024, beyond the inputs.
"""

from __future__ import annotations

import os

for _var in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'):
  os.environ[_var] = '1'

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from msrd_jax import metrics  # noqa: E402


def make_category(rng, n=100, size=256):
  amaps = np.empty((n, size, size), np.float32)
  masks = np.zeros((n, size, size), bool)
  yy, xx = np.mgrid[:size, :size]
  for i in range(n):
    amaps[i] = (
      ndimage.gaussian_filter(rng.random((size // 4, size // 4)), 2).repeat(4, 0).repeat(4, 1)
    )
    if i % 2:
      for _ in range(rng.integers(1, 4)):
        cy, cx = rng.integers(size // 8, size - size // 8, 2)
        ry, rx = rng.integers(size // 64, size // 10, 2)
        masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
  amaps += 0.25 * ndimage.gaussian_filter(masks.astype(np.float32), (0, size / 64, size / 64))
  amaps = ndimage.gaussian_filter(amaps, (0, size / 64, size / 64))
  return amaps, masks


def naive_au_pro(amaps, masks, limit=0.3):
  """The direct exact algorithm (as MVTec's reference code): argsort all pixels, cumsum."""
  labels = np.zeros(masks.shape, np.int64)
  n_regions = 0
  for i, m in enumerate(masks):
    lab, n = ndimage.label(m, structure=np.ones((3, 3)))
    labels[i] = np.where(lab > 0, lab + n_regions, 0)
    n_regions += n
  flat_scores, flat_labels = amaps.ravel(), labels.ravel()
  sizes = np.bincount(flat_labels)
  n_ok = sizes[0]
  fpr_inc = np.where(flat_labels == 0, 1.0 / n_ok, 0.0)
  pro_inc = np.where(flat_labels > 0, 1.0 / (n_regions * sizes[flat_labels]), 0.0)
  order = np.argsort(flat_scores)[::-1]
  s = flat_scores[order]
  fpr, pro = np.cumsum(fpr_inc[order]), np.cumsum(pro_inc[order])
  keep = np.append(np.diff(s) != 0, True)
  fpr, pro = np.r_[0.0, fpr[keep]], np.r_[0.0, pro[keep]]
  i = np.searchsorted(fpr, limit, side='right')
  y = pro[i - 1] + (pro[i] - pro[i - 1]) * (limit - fpr[i - 1]) / (fpr[i] - fpr[i - 1])
  return np.trapezoid(np.r_[pro[:i], y], np.r_[fpr[:i], limit]) / limit


def rd4ad_loop(amaps, masks, num_th=200):
  """hq-deng/RD4AD test.py: compute_pro per defective image (skimage regionprops loop)."""
  from skimage import measure

  values = []
  for a, m in zip(amaps.astype(np.float64), masks.astype(int)):
    if not m.any():
      continue
    binary = np.zeros_like(a, dtype=bool)
    delta = (a.max() - a.min()) / num_th
    rows = []
    regions = measure.regionprops(measure.label(m))
    for th in np.arange(a.min(), a.max(), delta):
      binary[a <= th] = 0
      binary[a > th] = 1
      pros = [binary[r.coords[:, 0], r.coords[:, 1]].sum() / r.area for r in regions]
      inverse = 1 - m
      rows.append((np.mean(pros), np.logical_and(inverse, binary).sum() / inverse.sum()))
    pro, fpr = np.array(rows).T
    keep = fpr < 0.3
    fpr, pro = fpr[keep], pro[keep]
    fpr = fpr / fpr.max()
    values.append(-np.trapezoid(pro, fpr))
  return float(np.mean(values))


def timed(fn, repeats):
  times, value = [], None
  for _ in range(repeats):
    t = time.perf_counter()
    value = fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times), value


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--skip-rd4ad-loop', action='store_true')
  parser.add_argument('--skip-memory', action='store_true')
  args = parser.parse_args()
  if hasattr(os, 'sched_setaffinity'):
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
  print(f'numpy {np.__version__}; pinned to 1 core; thread pools set to 1 thread')

  amaps, masks = make_category(np.random.default_rng(0))
  scores, labels = amaps.max(axis=(1, 2)), masks.any(axis=(1, 2))
  print(
    f'category: {amaps.shape} {amaps.dtype}, defect pixels {masks.mean():.2%}, '
    f'{int(labels.sum())} defective images'
  )
  rows = [
    ('au_pro', lambda: metrics.au_pro(amaps, masks), args.repeats),
    ('pixel_auroc', lambda: metrics.pixel_auroc(amaps, masks), args.repeats),
    ('au_pro_rd4ad (vectorized)', lambda: metrics.au_pro_rd4ad(amaps, masks), args.repeats),
    (
      'evaluate_all (8 metrics)',
      lambda: metrics.evaluate_all(scores, labels, amaps, masks)['au_pro'],
      args.repeats,
    ),
    ('naive exact AU-PRO (full argsort)', lambda: naive_au_pro(amaps, masks), 3),
  ]
  if not args.skip_rd4ad_loop:
    rows.append(("RD4AD's per-image 200-threshold loop", lambda: rd4ad_loop(amaps, masks), 1))
  print(f'{"":40s} {"seconds":>8s}  value')
  for name, fn, repeats in rows:
    seconds, value = timed(fn, repeats)
    print(f'{name:40s} {seconds:8.3f}  {value:.10f}')

  if not args.skip_memory:
    big_maps, big_masks = make_category(np.random.default_rng(1), n=100, size=1024)
    inputs = big_maps.nbytes + big_masks.nbytes
    tracemalloc.start()
    t = time.perf_counter()
    value = metrics.au_pro(big_maps, big_masks)
    seconds = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(
      f'au_pro on {big_maps.shape} float32 ({big_maps.nbytes / 2**20:.0f} MiB maps, '
      f'{inputs / 2**20:.0f} MiB inputs, {big_masks.mean():.2%} defect pixels): '
      f'{seconds:.2f} s, peak extra memory {peak / 2**20:.0f} MiB = '
      f'{peak / big_maps.nbytes:.2f} x the maps (value {value:.6f})'
    )
    big_scores, big_labels = big_maps.max(axis=(1, 2)), big_masks.any(axis=(1, 2))
    tracemalloc.start()
    t = time.perf_counter()
    metrics.evaluate_all(big_scores, big_labels, big_maps, big_masks)
    seconds = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(
      f'evaluate_all on the same: {seconds:.2f} s, peak extra memory '
      f'{peak / 2**20:.0f} MiB = {peak / big_maps.nbytes:.2f} x the maps'
    )


if __name__ == '__main__':
  main()
