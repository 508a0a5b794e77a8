"""Anomaly maps and scores for new images with a trained run.

    python -m msrd_jax.predict --config configs/mvtec.py --workdir workdirs/bottle \
        --input photos/ --output predictions/

--input is an image file or a folder (searched recursively for PNG/JPEG/BMP/TIFF).
Writes OUTPUT/scores.csv (file, image score, map max location) and, per image,
OUTPUT/<name>_heatmap.png (the map over the image) and, with --save_maps,
OUTPUT/<name>_map.npy (the float32 map at eval.resolution). Scores are comparable only
between images scored by the same run; choose a decision threshold on held-out images.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

import ml_collections
import numpy as np
from absl import app, flags
from PIL import Image
from tqdm import tqdm

from msrd_jax import cli, inference, visualize
from msrd_jax import data as data_lib

FLAGS = flags.FLAGS


def find_images(path: str) -> list[str]:
  """`path` itself if it is a file, else every image file below it, sorted."""
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise FileNotFoundError(f'--input {path!r} is neither an image file nor a folder')
  found = sorted(
    os.path.join(d, f)
    for d, _, files in os.walk(path)
    for f in files
    if data_lib.folder.is_image_file(f) and not data_lib.folder.is_ignored_file(f)
  )
  if not found:
    raise FileNotFoundError(f'no images ({", ".join(data_lib.IMAGE_EXTENSIONS)}) under {path!r}')
  return found


def predict(
  config: ml_collections.ConfigDict,
  workdir: str,
  inputs: Sequence[str],
  output: str,
  root: str | None = None,
  save_maps: bool = False,
) -> list[dict]:
  """Scores every image of `inputs`; returns one record per image.

  Images are read by the evaluation loader (threads, same resizing as training and
  evaluation). Output files are named after each image's path relative to `root`
  (folders joined with '__'), or after its file name when `root` is None.
  """
  run = inference.load_run(config, workdir)
  samples = [data_lib.Sample(p, None, 0, 'unknown', p) for p in inputs]
  loader = data_lib.EvalLoader(
    samples,
    config.data.image_size,
    config.eval.batch_size,
    num_threads=config.data.num_threads,
    prefetch=config.data.prefetch,
  )
  os.makedirs(output, exist_ok=True)
  records, shown = [], []
  bar = tqdm(total=len(samples), desc='predict', unit='image', dynamic_ncols=True)
  with bar:
    for batch, amaps, scores in inference.predictions(run, loader):
      for i in range(len(scores)):
        path = batch['name'][i]
        y, x = np.unravel_index(np.argmax(amaps[i]), amaps[i].shape)
        records.append({'file': path, 'score': float(scores[i]), 'max_y': int(y), 'max_x': int(x)})
        image = (255 * batch['image'][i]).round().astype(np.uint8)  # 4x less memory
        shown.append((path, image, amaps[i]))
      bar.update(len(scores))
  # One color scale for all heatmaps, so that colors compare across images.
  vmin = min(float(m.min()) for _, _, m in shown)
  vmax = max(float(m.max()) for _, _, m in shown)
  for path, image, amap in shown:
    rel = os.path.relpath(path, root) if root else os.path.basename(path)
    stem = os.path.splitext(rel)[0].replace(os.sep, '__')
    Image.fromarray(visualize.heatmap_overlay(image, amap, vmin, vmax)).save(
      os.path.join(output, f'{stem}_heatmap.png')
    )
    if save_maps:
      np.save(os.path.join(output, f'{stem}_map.npy'), amap.astype(np.float32))
  with open(os.path.join(output, 'scores.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=['file', 'score', 'max_y', 'max_x'])
    writer.writeheader()
    writer.writerows(records)
  return records


def main(argv) -> None:
  def run(config, workdir):
    root = FLAGS.input if os.path.isdir(FLAGS.input) else None
    records = predict(
      config, workdir, find_images(FLAGS.input), FLAGS.output, root, FLAGS.save_maps
    )
    print(f'{len(records)} images scored; {os.path.join(FLAGS.output, "scores.csv")}')

  cli.run(argv, run)


if __name__ == '__main__':
  cli.define_flags('Directory of the trained run.')
  flags.DEFINE_string('input', None, 'An image file or a folder of images.')
  flags.DEFINE_string('output', None, 'Folder for scores.csv and the heatmaps.')
  flags.DEFINE_bool('save_maps', False, 'Also write each float32 map as .npy.')
  flags.mark_flags_as_required(['input', 'output'])
  app.run(main, flags_parser=cli.parse_flags)
