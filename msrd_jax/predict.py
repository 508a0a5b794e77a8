"""Scores, decisions and heatmaps for new images with a trained, calibrated run.

    python -m msrd_jax.predict --workdir runs/widget --input photos/ --output predictions/

The config is the run's own (DIR/config.json); `--config.eval.batch_size=4` and other
overrides that leave the model alone are accepted, one that changes it is refused. The
decision threshold and the heatmaps' colour scale come from DIR/calibration.json
(msrd_jax.calibrate), so a heatmap's colours mean the same scores whatever else is in
the folder. --input is an image file or a folder, searched recursively for PNG, JPEG,
BMP and TIFF files (other files are listed as skipped). Images are decoded on threads,
scored in jitted batches and written as they come, so memory does not grow with the
number of images. A file that cannot be read is reported and the others are scored.

OUTPUT/predictions.csv   one row per image file, in sorted order:
    file              path relative to --input
    status            ok | error
    score             the image score (max of the anomaly map)
    normalized_score  score / image threshold: above 1.0 is anomalous
    decision          normal | anomalous
    defect_fraction   fraction of the map's pixels above the pixel threshold
    max_y, max_x      where the map peaks (map pixels, eval.resolution)
    error             why the file could not be scored
OUTPUT/summary.json      counts, thresholds and colour scale used, failed and skipped files,
                         seconds and images per second (loading and compilation included)
OUTPUT/heatmaps/<file>.png   the map over the image (jet, the run's fixed colour scale)
OUTPUT/masks/<file>.png      with --save_masks: pixels above the pixel threshold (255)
OUTPUT/maps/<file>.npy       with --save_maps: the float32 map

Output names follow the input's sub-folders, with the extension replaced by .png/.npy
(kept as part of the name when two inputs differ only by it). Maps, masks and heatmaps
are at eval.resolution (default the model's input size), not the photo's size.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import os
import sys
import time

import ml_collections
import numpy as np
from absl import app, flags, logging
from PIL import Image
from tqdm import tqdm

from msrd_jax import calibrate, cli, files, inference, visualize
from msrd_jax import data as data_lib
from msrd_jax.data import scan
from msrd_jax.errors import UserError

FLAGS = flags.FLAGS

COLUMNS = (
  'file',
  'status',
  'score',
  'normalized_score',
  'decision',
  'defect_fraction',
  'max_y',
  'max_x',
  'error',
)


class NothingScored(UserError):
  """Not one input image could be read."""


def find_images(path: str) -> list[str]:
  """`path` itself if it is a file, else every image file below it, sorted."""
  return scan.find_images(path).images


def output_stems(found: scan.Found) -> dict[str, str]:
  """{image path: output path without extension, relative to the output folder}.

  The input's relative path less its extension; the extension stays in the name of
  images that would otherwise share one (x.png and x.jpg give x.png and x.jpg).
  """
  rel = {
    p: os.path.relpath(p, found.root) if found.root else os.path.basename(p) for p in found.images
  }
  stems = {p: os.path.splitext(r)[0] for p, r in rel.items()}
  taken = collections.Counter(s.lower() for s in stems.values())  # case-insensitive disks
  return {p: (rel[p] if taken[s.lower()] > 1 else s) for p, s in stems.items()}


class _Writers:
  """Writes pictures on a few threads, at most `limit` in flight (bounded memory)."""

  def __init__(self, threads: int):
    self.pool = concurrent.futures.ThreadPoolExecutor(max(1, threads), 'msrd_predict_out')
    self.limit = 4 * max(1, threads)
    self.pending: collections.deque = collections.deque()

  def submit(self, fn, *args) -> None:
    while len(self.pending) >= self.limit:
      self.pending.popleft().result()  # re-raises a failed write here
    self.pending.append(self.pool.submit(fn, *args))

  def close(self) -> None:
    try:
      while self.pending:
        self.pending.popleft().result()
    finally:
      self.pool.shutdown(wait=True, cancel_futures=True)


def _write_pictures(
  output: str,
  stem: str,
  image: np.ndarray,
  amap: np.ndarray,
  record: dict,
  save_masks: bool,
  save_maps: bool,
) -> None:
  vmin, vmax = record['color_scale']
  path = os.path.join(output, 'heatmaps', stem + '.png')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(visualize.heatmap_overlay(image, amap, vmin, vmax)).save(path)
  if save_masks:
    path = os.path.join(output, 'masks', stem + '.png')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mask = np.where(amap > record['pixel_threshold'], np.uint8(255), np.uint8(0))
    Image.fromarray(mask).save(path)
  if save_maps:
    path = os.path.join(output, 'maps', stem + '.npy')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path, np.asarray(amap, np.float32))


def predict(
  config: ml_collections.ConfigDict,
  workdir: str,
  input_path: str,
  output: str,
  save_masks: bool = False,
  save_maps: bool = False,
  progress: bool = True,
) -> dict:
  """Scores every image at `input_path` with the run in `workdir`; returns the summary.

  Writes OUTPUT/predictions.csv, summary.json and the pictures (see the module doc).
  Fails before loading the model when the input holds no image or the run is not
  trained or not calibrated; raises NothingScored when no image could be read.
  """
  start = time.perf_counter()
  found = scan.find_images(input_path, exclude=[output])
  inference.require_checkpoint(workdir)
  record = calibrate.load(workdir, config)
  run = inference.load_run(config, workdir)
  warnings = [w for w in [calibrate.stale_warning(record, run)] if w]
  for w in warnings:
    logging.warning('%s', w)
  stems = output_stems(found)
  rel = {p: (os.path.relpath(p, found.root) if found.root else os.path.basename(p)) for p in stems}
  samples = [data_lib.Sample(p, None, 0, 'unknown', p) for p in found.images]
  loader = inference.eval_loader(config, samples, on_error='record')
  threshold, pixel_threshold = record['image_threshold'], record['pixel_threshold']
  os.makedirs(output, exist_ok=True)
  table_path = os.path.join(output, 'predictions.csv')
  counts = collections.Counter()
  failed = []
  writers = _Writers(config.data.num_threads)
  bar = tqdm(
    total=len(samples), desc='predict', unit='image', dynamic_ncols=True, disable=not progress
  )
  try:
    with open(table_path + '.tmp', 'w', newline='') as table, bar:
      writer = csv.DictWriter(table, fieldnames=COLUMNS)
      writer.writeheader()
      for batch, maps, scores in inference.predictions(run, loader):
        for i, score in enumerate(scores):
          path, error = batch['name'][i], batch['error'][i]
          if error is not None:
            failed.append({'file': rel[path], 'error': error})
            writer.writerow({'file': rel[path], 'status': 'error', 'error': error})
            counts['failed'] += 1
            continue
          amap = maps[i]
          anomalous = bool(score > threshold)
          counts['anomalous' if anomalous else 'normal'] += 1
          y, x = np.unravel_index(np.argmax(amap), amap.shape)
          writer.writerow(
            {
              'file': rel[path],
              'status': 'ok',
              'score': float(score),
              'normalized_score': float(score) / threshold,
              'decision': 'anomalous' if anomalous else 'normal',
              'defect_fraction': float(np.mean(amap > pixel_threshold)),
              'max_y': int(y),
              'max_x': int(x),
            }
          )
          writers.submit(
            _write_pictures,
            output,
            stems[path],
            batch['image'][i],
            amap,
            record,
            save_masks,
            save_maps,
          )
        bar.update(len(scores))
        bar.set_postfix(anomalous=counts['anomalous'], failed=counts['failed'])
  finally:
    writers.close()
  os.replace(table_path + '.tmp', table_path)
  seconds = time.perf_counter() - start
  scored = counts['normal'] + counts['anomalous']
  summary = {
    'workdir': workdir,
    'input': input_path,
    'images': len(samples),
    'scored': scored,
    'normal': counts['normal'],
    'anomalous': counts['anomalous'],
    'failed': failed,
    'skipped': [os.path.relpath(p, found.root) for p in found.skipped],
    'image_threshold': threshold,
    'pixel_threshold': pixel_threshold,
    'color_scale': record['color_scale'],
    'calibration': {
      k: record[k]
      for k in (
        'source',
        'images',
        'false_alarm_rate',
        'pixel_false_alarm_rate',
        'limited',
        'checkpoint_step',
      )
    },
    'checkpoint_step': int(run.meta['data_step']),
    'warnings': warnings,
    'seconds': round(seconds, 3),
    'images_per_second': round(len(samples) / seconds, 3),
  }
  files.write_json(os.path.join(output, 'summary.json'), summary)
  if not scored:
    raise NothingScored(
      f'none of the {len(samples)} images could be read (see {table_path}); first: '
      f'{failed[0]["error"]}'
    )
  return summary


def main(argv) -> None:
  def run(config, workdir):
    s = predict(config, workdir, FLAGS.input, FLAGS.output, FLAGS.save_masks, FLAGS.save_maps)
    print(
      f'{s["scored"]} images scored: {s["anomalous"]} anomalous, {s["normal"]} normal '
      f'(threshold {s["image_threshold"]:.6g}); {os.path.join(FLAGS.output, "predictions.csv")}'
    )
    if s['failed']:
      print(
        f'{len(s["failed"])} files could not be read, listed in '
        f'{os.path.join(FLAGS.output, "summary.json")}; first: {s["failed"][0]["error"]}',
        file=sys.stderr,
      )

  cli.run(argv, run)


if __name__ == '__main__':
  cli.define_flags('Directory of the trained run.', config_required=False)
  flags.DEFINE_string('input', None, 'An image file or a folder of images.')
  flags.DEFINE_string('output', None, 'Folder for predictions.csv, summary.json and pictures.')
  flags.DEFINE_bool('save_masks', False, 'Also write each binary defect mask as PNG.')
  flags.DEFINE_bool('save_maps', False, 'Also write each float32 map as .npy.')
  flags.mark_flags_as_required(['input', 'output'])
  app.run(main, flags_parser=cli.parse_flags)
