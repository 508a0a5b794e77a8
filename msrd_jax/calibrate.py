"""A decision threshold learned without labelled defects.

    python -m msrd_jax.calibrate --workdir DIR [--good FOLDER]

The run scores defect-free images it was not trained on and stores their score
distribution with the run, in DIR/calibration.json; the image threshold is the score
that only a fraction `calibration.false_alarm_rate` of defect-free images exceed, the
pixel threshold likewise on pixel scores (`calibration.pixel_false_alarm_rate`). An
image is anomalous when its score is above the image threshold; predict reports the
score divided by it (1.0 = the threshold), and its heatmaps use the colour scale stored
here, so that a colour means the same score in every image of every folder.

Where the defect-free images come from is `calibration.source`:

  'train'     the training images themselves (the default: training is unchanged).
              A model reconstructs what it was trained on better than anything new,
              so these scores are optimistic and the false-alarm rate on new good
              images will be HIGHER than the nominal one.
  'holdout'   `calibration.holdout_fraction` of train/good, drawn with config.seed and
              kept out of training (changes the training set, hence the checkpoint's
              identity). Honest, at the price of fewer training images.
  'good_dir'  every image below `calibration.good_dir`.
  'none'      no calibration after training.

Training calibrates at its end when the source is not 'none'. This command
recalibrates a trained run without retraining: on --good FOLDER (any folder of
defect-free images, searched recursively), else on the config's source; the config is
the run's config.json, and --config.calibration.false_alarm_rate=0.05 (for instance)
changes the rate.

Rule (split conformal prediction): with n calibration scores sorted s_1 <= ... <= s_n
and rate a, the threshold is s_k with k = ceil((n + 1)(1 - a)). A new defect-free image
exchangeable with the calibration images then exceeds it with probability at most a.
When k > n, n images cannot vouch for a (the smallest rate they can is 1 / (n + 1)):
the threshold is s_n, the largest score, and `limited` says so.

DIR/calibration.json:
  image_threshold, pixel_threshold      the thresholds (score units)
  color_scale                           [vmin, vmax] of the heatmaps: vmin is the mean
                                        pixel score of the calibration images and the
                                        pixel threshold sits in the middle of the scale
  image_scores                          every calibration image's score, sorted
  image_score_quantiles, pixel_score_quantiles   {level: score} for levels 1 - rate
  source ('train', 'holdout' or 'folder'), source_detail, images, checkpoint_step,
  false_alarm_rate, pixel_false_alarm_rate, limited (image threshold), pixel_limited,
  map_settings (the eval.* fields the scores depend on; another value refuses the file)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import ml_collections
import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from msrd_jax import cli, distributed, files, inference
from msrd_jax import config as config_lib
from msrd_jax import data as data_lib
from msrd_jax.data import scan
from msrd_jax.errors import UserError

FILE = 'calibration.json'
FORMAT = 'msrd_jax.calibration/1'
# Rates at which the score distributions are summarized, next to the configured ones.
SUMMARY_RATES = (0.5, 0.1, 0.05, 0.01, 0.005, 0.001, 0.0001)
PIXEL_SUMMARY_RATES = (0.01, 0.005, 0.002, 0.001, 0.0005, 0.0001)
# A fixed mix so that the held-out images do not depend on how the seed is used elsewhere.
_HOLDOUT_STREAM = 0x686F6C64

FLAGS = flags.FLAGS


class CalibrationError(UserError):
  """A run without calibration, or one calibrated under other map settings."""


def split_holdout(samples: Sequence, fraction: float, seed: int) -> tuple[list, list]:
  """(training part, held-out part) of the training samples, both in their order.

  round(fraction * n) samples, at least 1 and at most n - 1, drawn with `seed`.
  """
  n = len(samples)
  if n < 2:
    raise data_lib.DataError(
      f'calibration.source = holdout needs at least 2 training images, got {n}'
    )
  held = min(max(1, round(fraction * n)), n - 1)
  chosen = np.zeros(n, bool)
  chosen[np.random.default_rng([seed, _HOLDOUT_STREAM]).permutation(n)[:held]] = True
  return [s for s, c in zip(samples, chosen) if not c], [s for s, c in zip(samples, chosen) if c]


def source_of(config: ml_collections.ConfigDict) -> str:
  """calibration.source, 'none' for a config without a calibration section."""
  c = config.get('calibration')
  return 'none' if c is None else c.source


def training_samples(config: ml_collections.ConfigDict, samples: Sequence) -> list:
  """The images training uses: all of train/good, less the held-out ones for 'holdout'."""
  if source_of(config) != 'holdout':
    return list(samples)
  return split_holdout(samples, config.calibration.holdout_fraction, config.seed)[0]


def calibration_samples(
  config: ml_collections.ConfigDict, good: str | None = None
) -> tuple[list, str, str]:
  """(samples, source, detail) of the defect-free images to calibrate on.

  good: a folder of defect-free images (overrides calibration.source). source is
  'train', 'holdout' or 'folder'; detail says which images in words.
  """
  source = source_of(config)
  folder = good or (config.calibration.good_dir if source == 'good_dir' else None)
  if folder:
    paths = scan.find_images(folder).images
    return [data_lib.Sample(p, None, 0, 'good', p) for p in paths], 'folder', folder
  if source == 'none':
    raise CalibrationError(
      "calibration.source is 'none': give a folder of defect-free images with --good, "
      "or set --config.calibration.source to 'train' or 'holdout'"
    )
  reader, root = config_lib.resolve_data(config)
  train = data_lib.list_samples(reader, root, config.data.category, 'train')
  if source == 'holdout':
    fraction = config.calibration.holdout_fraction
    held = split_holdout(train, fraction, config.seed)[1]
    return held, 'holdout', f'{len(held)} of train/good ({fraction:g}), kept out of training'
  return train, 'train', 'the training images (optimistic: a higher false-alarm rate on new images)'


def conformal_threshold(sorted_scores: np.ndarray, rate: float, total: int | None = None):
  """(threshold, limited): s_k, k = ceil((n + 1)(1 - rate)), of n scores sorted ascending.

  sorted_scores: the n scores, or only the largest of them when `total` (n) is given
  (pixels: only the tail is kept). limited: k > n, the threshold is the largest score.
  """
  n = len(sorted_scores) if total is None else total
  k = math.ceil((n + 1) * (1.0 - rate) - 1e-9)  # 1e-9: 0.99 * 101 is 99.99000000000001
  limited = k > n
  rank_from_top = 0 if limited else n - k  # 0 = the largest
  return float(sorted_scores[len(sorted_scores) - 1 - rank_from_top]), limited


def _tail_size(total: int, rates: Sequence[float]) -> int:
  """How many of the largest of `total` scores the thresholds at `rates` need."""
  return max(total - min(math.ceil((total + 1) * (1 - r) - 1e-9), total) for r in rates) + 1


class _Tail:
  """The `size` largest values of a stream of arrays, in memory O(size + one array)."""

  def __init__(self, size: int):
    self.size = size
    self.values = np.empty((0,), np.float32)

  def add(self, x: np.ndarray) -> None:
    x = np.asarray(x, np.float32).ravel()
    if x.size > self.size:
      x = np.partition(x, x.size - self.size)[-self.size :]
    merged = np.concatenate([self.values, x])
    if merged.size > self.size:
      merged = np.partition(merged, merged.size - self.size)[-self.size :]
    self.values = merged

  def sorted(self) -> np.ndarray:
    return np.sort(self.values)


def map_settings(config: ml_collections.ConfigDict) -> dict:
  """The fields the scores depend on beyond the checkpoint: their scale and meaning."""
  e = config.eval
  return {
    'image_size': int(config.data.image_size),
    'resolution': int(e.resolution or config.data.image_size),
    'map_mode': str(e.map_mode),
    'sigma': float(e.sigma),
    'align_corners': bool(e.align_corners),
  }


def calibrate(
  run: inference.Run, samples: Sequence, source: str, detail: str = '', progress: bool = True
) -> dict:
  """Scores defect-free `samples` and returns the calibration record (see the module doc).

  source, detail: where the samples come from (see `calibration_samples`).
  Memory: the image scores and the tail of pixel scores the thresholds need, not the maps.
  """
  config = run.config
  c = config.calibration
  if not samples:
    raise CalibrationError(f'no images to calibrate on ({source})')
  r = run.resolution
  loader = inference.eval_loader(config, samples)
  total_pixels = len(samples) * r * r
  pixel_rates = (*PIXEL_SUMMARY_RATES, c.pixel_false_alarm_rate)
  tail = _Tail(_tail_size(total_pixels, pixel_rates))
  image_scores, pixel_sum = [], 0.0
  bar = tqdm(
    total=len(samples), desc='calibrate', unit='image', dynamic_ncols=True, disable=not progress
  )
  with bar:
    for _, maps, scores in inference.predictions(run, loader):
      image_scores.append(scores)
      tail.add(maps)
      pixel_sum += float(np.sum(maps, dtype=np.float64))
      bar.update(len(scores))
  image_scores = np.sort(np.concatenate(image_scores).astype(np.float64))
  pixels = tail.sorted()
  image_threshold, limited = conformal_threshold(image_scores, c.false_alarm_rate)
  pixel_threshold, pixel_limited = conformal_threshold(
    pixels, c.pixel_false_alarm_rate, total_pixels
  )
  if limited:
    logging.warning(
      '%d calibration images cannot vouch for a false-alarm rate of %g (at best 1/(n+1) '
      '= %.3g): the image threshold is their largest score',
      len(image_scores),
      c.false_alarm_rate,
      1 / (len(image_scores) + 1),
    )
  mean = pixel_sum / total_pixels
  # The pixel threshold in the middle of the scale: blue is typical, red well above it.
  vmax = max(2.0 * pixel_threshold - mean, mean + 1e-6)
  return {
    'format': FORMAT,
    'source': source,
    'source_detail': detail,
    'images': len(image_scores),
    'checkpoint_step': int(run.meta['data_step']),
    'false_alarm_rate': float(c.false_alarm_rate),
    'pixel_false_alarm_rate': float(c.pixel_false_alarm_rate),
    'image_threshold': image_threshold,
    'pixel_threshold': pixel_threshold,
    'limited': bool(limited),
    'pixel_limited': bool(pixel_limited),
    'color_scale': [mean, vmax],
    'pixel_score_mean': mean,
    'image_scores': image_scores.tolist(),
    'image_score_quantiles': {
      f'{1 - a:g}': conformal_threshold(image_scores, a)[0]
      for a in sorted({*SUMMARY_RATES, c.false_alarm_rate}, reverse=True)
    },
    'pixel_score_quantiles': {
      f'{1 - a:g}': conformal_threshold(pixels, a, total_pixels)[0]
      for a in sorted(set(pixel_rates), reverse=True)
    },
    'map_settings': map_settings(config),
  }


def calibrate_run(
  config: ml_collections.ConfigDict,
  workdir: str,
  good: str | None = None,
  teacher_vars: dict | None = None,
) -> dict:
  """Calibrates the latest checkpoint of `workdir`; writes and returns DIR/calibration.json.

  good: a folder of defect-free images, instead of the config's calibration.source.
  """
  config_lib.validate(config)
  samples, source, detail = calibration_samples(config, good)  # before loading: fail fast
  run = inference.load_run(config, workdir, teacher_vars)
  record = calibrate(run, samples, source, detail)
  if distributed.is_main_process():
    files.write_json(os.path.join(workdir, FILE), record)
  return record


def load(workdir: str, config: ml_collections.ConfigDict | None = None) -> dict:
  """DIR/calibration.json, checked against `config`'s map settings when given.

  Raises CalibrationError when there is none, or when it was made with other eval.*
  settings (its scores would be on another scale).
  """
  path = os.path.join(workdir, FILE)
  if not os.path.isfile(path):
    raise CalibrationError(
      f'{workdir!r} has no {FILE} (no decision threshold): calibrate it with '
      f'`python -m msrd_jax.calibrate --workdir {workdir} --good FOLDER_OF_GOOD_IMAGES` '
      '(or without --good, on the source of its config)'
    )
  try:
    with open(path) as f:
      record = json.load(f)
  except (OSError, ValueError) as e:
    raise CalibrationError(f'cannot read {path}: {type(e).__name__}: {e}') from None
  if config is not None:
    stored, current = record.get('map_settings', {}), map_settings(config)
    diff = [f'{k}: {stored.get(k)!r} -> {v!r}' for k, v in current.items() if stored.get(k) != v]
    if diff:
      raise CalibrationError(
        f'{path} was made with other map settings ({"; ".join(diff)}), so its '
        'thresholds do not apply; recalibrate with the same --config overrides'
      )
  return record


def stale_warning(record: dict, run: inference.Run) -> str | None:
  """A message when the calibration was made on another checkpoint than the run's."""
  step = int(run.meta['data_step'])
  if record.get('checkpoint_step') == step:
    return None
  return (
    f'the calibration was made at step {record.get("checkpoint_step")} but the checkpoint '
    f'is at step {step}: its thresholds may not fit; recalibrate (python -m msrd_jax.calibrate)'
  )


def f1_optimal_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
  """(threshold, F1) that maximizes image F1 for the rule 'anomalous when score > threshold'.

  The threshold lies halfway between the lowest score flagged and the next lower one.
  """
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels).astype(bool)
  order = np.argsort(-scores, kind='stable')
  s, y = scores[order], labels[order]
  if not y.any():
    return float('nan'), float('nan')
  tp, fp = np.cumsum(y), np.cumsum(~y)
  f1 = 2 * tp / (tp + fp + y.sum())
  cut = np.r_[s[1:] != s[:-1], True]  # only between distinct scores
  best = int(np.flatnonzero(cut)[np.argmax(f1[cut])])
  below = s[best + 1] if best + 1 < len(s) else s[best] - max(1e-6, 1e-6 * abs(s[best]))
  return float((s[best] + below) / 2), float(f1[best])


def threshold_report(
  scores: np.ndarray, labels: np.ndarray, amaps: np.ndarray, masks: np.ndarray, record: dict
) -> dict:
  """What the stored thresholds do on a labelled test set.

  scores, labels: (N,); amaps, masks: (N, R, R). Rates are fractions; a rate over an
  empty class is NaN.
  """
  labels = np.asarray(labels).astype(bool)
  flagged = np.asarray(scores) > record['image_threshold']
  defect = np.asarray(masks).astype(bool)
  above = np.asarray(amaps) > record['pixel_threshold']
  rate = lambda hits, among: float(hits[among].mean()) if among.any() else float('nan')
  f1_threshold, f1 = f1_optimal_threshold(scores, labels)
  tp = int((flagged & labels).sum())
  denominator = flagged.sum() + labels.sum()
  return {
    'calibration_source': record['source'],
    'calibration_images': record['images'],
    'image_threshold': record['image_threshold'],
    'nominal_false_alarm_rate': record['false_alarm_rate'],
    'false_alarm_rate': rate(flagged, ~labels),
    'detection_rate': rate(flagged, labels),
    'f1_at_threshold': float(2 * tp / denominator) if denominator else float('nan'),
    'f1_optimal_threshold': f1_threshold,
    'f1_max': f1,
    'pixel_threshold': record['pixel_threshold'],
    'nominal_pixel_false_alarm_rate': record['pixel_false_alarm_rate'],
    'pixel_false_alarm_rate': rate(above, ~defect),
    'pixel_detection_rate': rate(above, defect),
  }


def main(argv) -> None:
  def run(config, workdir):
    record = calibrate_run(config, workdir, FLAGS.good)
    print(
      f'{record["images"]} images ({record["source"]}): image threshold '
      f'{record["image_threshold"]:.6g} at a false-alarm rate of '
      f'{record["false_alarm_rate"]:g}, pixel threshold {record["pixel_threshold"]:.6g}; '
      f'{os.path.join(workdir, FILE)}'
    )

  cli.run(argv, run)


if __name__ == '__main__':
  cli.define_flags('Directory of the trained run.', config_required=False)
  flags.DEFINE_string(
    'good', None, "A folder of defect-free images (default: the config's calibration.source)."
  )
  app.run(main)
