"""Pictures and tables of evaluation results: example maps, curves, a Markdown table.

Figures are drawn with matplotlib's object API (`Figure` + the Agg canvas), never
pyplot, so nothing here changes matplotlib's global backend or state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from msrd_jax import metrics
from msrd_jax.data.folder import MVTEC_OBJECTS, MVTEC_TEXTURES
from msrd_jax.data.images import resize_image

# Two AU-PROs: MVTec AD's definition (exact curve over the whole category) and RD4AD's
# code's (per-image curves on 200 thresholds, averaged), which papers built on RD4AD
# report (metrics.au_pro_rd4ad).
DEFAULT_COLUMNS = (
  ('image_auroc', 'Image AUROC'),
  ('pixel_auroc', 'Pixel AUROC'),
  ('au_pro', 'AU-PRO (MVTec)'),
  ('au_pro_rd4ad', 'AU-PRO (RD4AD code)'),
)


def _display_images(images, n: int, hw: tuple[int, int]) -> np.ndarray:
  """(N, H, W, 3) float in [0, 1] from uint8 or float, RGB or grey, images."""
  x = np.asarray(images)
  if x.ndim == 4 and x.shape[-1] == 1:
    x = x[..., 0]
  if x.ndim == 3:
    x = np.repeat(x[..., None], 3, axis=-1)
  if x.ndim != 4 or x.shape[0] != n or x.shape[1:3] != hw or x.shape[-1] != 3:
    raise ValueError(
      f'images must have shape ({n}, {hw[0]}, {hw[1]}[, 3 or 1]) to match '
      f'the maps; got {np.shape(images)}.'
    )
  if x.dtype == np.uint8:
    return x.astype(np.float32) / 255.0
  return np.clip(x.astype(np.float32), 0.0, 1.0)


def heatmap_overlay(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
  """(H, W, 3) uint8: `amap` (H, W) in the jet colormap at alpha 0.5 over `image`.

  image: (h, w, 3) RGB, uint8 or float in [0, 1], resized to the map if needed;
  vmin / vmax: the score range of the color scale (share it across images).
  """
  image = _display_images(image[None], 1, image.shape[:2])[0]
  if image.shape[:2] != amap.shape:
    image = resize_image(image, amap.shape[0])
  norm = Normalize(vmin=vmin, vmax=vmax, clip=True)
  colored = colormaps['jet'](norm(np.asarray(amap, np.float32)))[..., :3]
  return (255 * (0.5 * image + 0.5 * colored)).round().astype(np.uint8)


def _sample(n: int, max_rows: int) -> np.ndarray:
  if n <= max_rows:
    return np.arange(n)
  return np.unique(np.linspace(0, n - 1, max_rows).round().astype(int))


def save_examples(
  path: str,
  images,
  masks,
  amaps,
  names: Sequence[str],
  scores=None,
  labels=None,
  max_rows: int = 8,
  vmin: float | None = None,
  vmax: float | None = None,
) -> None:
  """A PNG grid of test images: the image, its ground truth, its anomaly-map overlay.

  images: (N, H, W, 3) or (N, H, W) RGB/grey, uint8 or float in [0, 1] (clipped);
  masks: (N, H, W) {0, 1}/bool; amaps: (N, H, W) float; names: N strings; scores: (N,)
  image scores and labels: (N,) 0/1, both optional, shown in the titles.

  One row per image for at most max_rows images, evenly spaced over the N given (pass a
  selection to choose them). The ground truth is drawn as a red fill with a contour over
  the image; the heatmap is the map in the jet colormap at alpha 0.5 over the image,
  with ONE normalization for all rows, vmin / vmax (default: the min and max of the
  shown maps), so that the same color means the same score in every row; a colorbar
  gives the scale.
  """
  amaps = np.asarray(amaps, dtype=np.float32)
  if amaps.ndim != 3:
    raise ValueError(f'amaps must have shape (N, H, W); got {amaps.shape}.')
  n, h, w = amaps.shape
  masks = np.asarray(masks)
  if masks.shape != amaps.shape:
    raise ValueError(f'masks must have the shape of amaps, {amaps.shape}; got {masks.shape}.')
  if len(names) != n:
    raise ValueError(f'need one name per map: {n} maps, {len(names)} names.')
  for what, v in (('scores', scores), ('labels', labels)):
    if v is not None and np.shape(v) != (n,):
      raise ValueError(f'{what} must have shape ({n},); got {np.shape(v)}.')
  images = _display_images(images, n, (h, w))
  rows = _sample(n, max_rows)
  shown = amaps[rows]
  norm = Normalize(
    vmin=float(shown.min()) if vmin is None else vmin,
    vmax=float(shown.max()) if vmax is None else vmax,
  )

  fig = Figure(figsize=(9.6, 3.0 * len(rows)), dpi=100, layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(len(rows), 3, squeeze=False)
  heat = None
  for r, i in enumerate(rows):
    ax_img, ax_gt, ax_map = axes[r]
    title = str(names[i])
    if labels is not None:
      title += ' (defect)' if labels[i] else ' (good)'
    ax_img.imshow(images[i])
    ax_img.set_title(title, fontsize=8)
    m = masks[i] > 0
    ax_gt.imshow(images[i])
    if m.any():
      fill = np.zeros((h, w, 4), np.float32)
      fill[m] = (1.0, 0.0, 0.0, 0.35)
      ax_gt.imshow(fill)
      ax_gt.contour(m.astype(np.float32), levels=[0.5], colors='red', linewidths=1.0)
    ax_gt.set_title('ground truth', fontsize=8)
    ax_map.imshow(images[i])
    heat = ax_map.imshow(amaps[i], cmap='jet', norm=norm, alpha=0.5)
    ax_map.set_title(
      'anomaly map' if scores is None else f'score {float(scores[i]):.4g}', fontsize=8
    )
    for ax in (ax_img, ax_gt, ax_map):
      ax.set_axis_off()
  fig.colorbar(heat, ax=axes[:, 2].tolist(), shrink=0.8, label='anomaly score')
  fig.savefig(path, format='png')


def _thin(x: np.ndarray, y: np.ndarray, n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
  """At most about 3n points of a monotone curve for plotting: evenly spaced in index,
  in x and in y, so that steep and flat parts both keep their shape."""
  if x.size <= 3 * n:
    return x, y
  keep = np.concatenate(
    (
      np.linspace(0, x.size - 1, n).round().astype(np.int64),
      np.searchsorted(x, np.linspace(x[0], x[-1], n)).clip(0, x.size - 1),
      np.searchsorted(y, np.linspace(y[0], y[-1], n)).clip(0, x.size - 1),
    )
  )
  keep = np.unique(keep)
  return x[keep], y[keep]


def save_curves(
  path: str,
  scores,
  labels,
  amaps,
  masks,
  fpr_limit: float = 0.3,
  values: Mapping[str, float] | None = None,
) -> None:
  """A PNG with the image-level ROC, the pixel-level ROC and the PRO curve up to fpr_limit.

  scores: (N,) float; labels: (N,) {0, 1}; amaps: (N, H, W) float; masks: (N, H, W)
  {0, 1}/bool. The curves are metrics.roc_curve and metrics.pro_curve (the exact ones,
  thinned to a few thousand points for drawing); AUROC and AU-PRO are in the legends.
  values: metrics.evaluate_all's result for the same data (at this fpr_limit), if the
  caller has it, so that the areas are not computed a second time.
  """
  values = dict(values or {})
  if 'image_auroc' not in values:
    values['image_auroc'] = metrics.image_auroc(scores, labels)
  if 'pixel_auroc' not in values:
    values['pixel_auroc'] = metrics.pixel_auroc(amaps, masks)
  if 'au_pro' not in values:
    values['au_pro'] = metrics.au_pro(amaps, masks, fpr_limit=fpr_limit)
  fig = Figure(figsize=(13.5, 4.2), dpi=100, layout='constrained')
  FigureCanvasAgg(fig)
  ax_img, ax_pix, ax_pro = fig.subplots(1, 3)
  for ax, (x, y), value, title in (
    (ax_img, metrics.roc_curve(scores, labels), values['image_auroc'], 'image-level ROC'),
    (ax_pix, metrics.roc_curve(amaps, masks), values['pixel_auroc'], 'pixel-level ROC'),
  ):
    ax.plot(*_thin(x, y), lw=1.5, label=f'AUROC = {100 * value:.1f}%')
    ax.plot([0, 1], [0, 1], color='0.6', lw=0.8, ls='--')
    ax.set(
      xlim=(0, 1),
      ylim=(0, 1.01),
      xlabel='false-positive rate',
      ylabel='true-positive rate',
      title=title,
    )
    ax.legend(loc='lower right')
  fpr, pro = metrics.pro_curve(amaps, masks, fpr_limit=fpr_limit)
  ax_pro.plot(
    *_thin(fpr, pro), lw=1.5, label=f'AU-PRO (FPR <= {fpr_limit:g}) = {100 * values["au_pro"]:.1f}%'
  )
  ax_pro.set(
    xlim=(0, fpr_limit),
    ylim=(0, 1.01),
    xlabel='false-positive rate',
    ylabel='per-region overlap',
    title='PRO curve',
  )
  ax_pro.legend(loc='lower right')
  for ax in (ax_img, ax_pix, ax_pro):
    ax.grid(alpha=0.3)
  fig.savefig(path, format='png')


def _row(label: str, values: Sequence[float | None]) -> str:
  cells = ['-' if v is None or math.isnan(v) else f'{100 * v:.1f}' for v in values]
  return '| ' + ' | '.join([label] + cells) + ' |'


def _mean(values: list[float | None]) -> float | None:
  present = [v for v in values if v is not None and not math.isnan(v)]
  return float(np.mean(present)) if present else None


def results_table_markdown(
  results: Mapping[str, Mapping[str, float]],
  categories_order: Sequence[str] | None = None,
  groups: Mapping[str, Sequence[str]] | None = None,
  columns: Sequence[tuple[str, str]] = DEFAULT_COLUMNS,
) -> str:
  """A Markdown table of per-category results, laid out as papers do.

  results: {category: {metric: fraction in [0, 1]}} (e.g. metrics.evaluate_all's dicts).
  Rows: categories_order if given (with any other categories after it, sorted); else
  MVTec AD's categories in the usual order (textures, then objects) followed by any
  other names sorted. columns: (metric key, header) pairs, default image AUROC, pixel
  AUROC, AU-PRO (MVTec AD's definition) and AU-PRO as RD4AD's code computes it. Values
  in percent with one decimal; '-' where missing or NaN.

  Then one 'Mean (group)' row per group ({name: categories}; by default Textures and
  Objects when the results contain MVTec categories of both; {} for none), and a final
  'Mean' row over all categories. Means are over the unrounded values present.
  """
  if categories_order is not None:
    unknown = [c for c in categories_order if c not in results]
    if unknown:
      raise ValueError(f'categories_order names categories without results: {unknown}.')
    order = list(categories_order) + sorted(c for c in results if c not in categories_order)
  else:
    mvtec = MVTEC_TEXTURES + MVTEC_OBJECTS
    order = [c for c in mvtec if c in results] + sorted(c for c in results if c not in mvtec)
  if groups is None:
    groups = {
      'Textures': [c for c in MVTEC_TEXTURES if c in results],
      'Objects': [c for c in MVTEC_OBJECTS if c in results],
    }
    if not all(groups.values()):
      groups = {}
  for name, members in groups.items():
    unknown = [c for c in members if c not in results]
    if unknown:
      raise ValueError(f'group {name!r} names categories without results: {unknown}.')

  def values(category: str) -> list[float | None]:
    return [results[category].get(key) for key, _ in columns]

  def means(members: Sequence[str]) -> list[float | None]:
    return [_mean([values(c)[j] for c in members]) for j in range(len(columns))]

  lines = [
    '| ' + ' | '.join(['Category'] + [header for _, header in columns]) + ' |',
    '|:---|' + '---:|' * len(columns),
  ]
  lines += [_row(c, values(c)) for c in order]
  lines += [_row(f'Mean ({name})', means(members)) for name, members in groups.items()]
  lines.append(_row('Mean', means(order)))
  return '\n'.join(lines) + '\n'
