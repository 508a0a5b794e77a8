"""Evaluation of a trained run on its category's test set.

    python -m msrd_jax.evaluate --config configs/synthetic.py --workdir workdirs/demo

Same config and overrides as training. Loads the latest checkpoint of DIR, computes the
anomaly maps of every test image on the device (one jitted function), and writes:

    DIR/results.json         {"<category>": {"image_auroc": ..., "pixel_auroc": ...,
                              "au_pro": ..., ...}}   (fractions in [0, 1])
    DIR/results.md           the same as a Markdown table
    DIR/evaluation.json      checkpoint step, test-set counts, image AUROC per defect type
    DIR/test_scores.csv      every test image's score, label and defect type
    DIR/pictures/examples.png  image | ground truth | heatmap overlay, for a sample
    DIR/pictures/curves.png    image and pixel ROC, PRO curve up to FPR 0.3
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from msrd_jax import anomaly_map as anomaly_map_lib
from msrd_jax import checkpoint, metrics, visualize
from msrd_jax import config as config_lib
from msrd_jax import data as data_lib
from msrd_jax import teacher as teacher_lib
from msrd_jax import train as train_lib
from msrd_jax.model import MSRD


def make_predict_fn(model: MSRD, config: ml_collections.ConfigDict) -> Callable:
  """A jitted (teacher_vars, student_vars, images) -> (maps (B, R, R), scores (B,)).

  images: (B, S, S, 3) float32 in [0, 1]; R = eval.resolution (default S).
  """
  resolution = config.eval.resolution or config.data.image_size
  e = config.eval

  @jax.jit
  def predict(teacher_vars, student_vars, images):
    feats, decoded, _ = model.apply_eval(teacher_vars, student_vars, images)
    return anomaly_map_lib.anomaly_map(
      feats,
      decoded,
      resolution,
      mode=e.map_mode,
      sigma=float(e.sigma),
      align_corners=bool(e.align_corners),
    )

  return predict


def load_run(
  config: ml_collections.ConfigDict, workdir: str, teacher_vars: dict | None = None
) -> tuple[MSRD, dict, dict, dict]:
  """(model, teacher_vars, student_vars, meta) of the latest checkpoint in `workdir`.

  teacher_vars: the config's teacher if already loaded (else it is loaded here). Only
  the student's parameters and BN statistics are read, not the optimizer state.
  Raises FileNotFoundError when there is no checkpoint, CheckpointMismatch when it was
  made with another config or another teacher.
  """
  config_lib.validate(config)
  if teacher_vars is None:
    teacher_vars = train_lib.load_teacher_variables(config)
  model = MSRD(config)
  template = train_lib.state_template(model, train_lib.make_optimizer(config), teacher_vars, config)
  template = {'params': template.params, 'batch_stats': template.batch_stats}
  with checkpoint.Workdir(workdir, create=False) as wd:
    if wd.latest_step() is None:
      raise FileNotFoundError(f'no checkpoint in {wd.checkpoint_dir!r}: train first')
    wd.check_compatible(config, teacher_lib.fingerprint(teacher_vars))
    student_vars, meta = wd.restore(template, partial=True)
  return model, teacher_vars, student_vars, meta


def picture_indices(labels: np.ndarray, count: int) -> np.ndarray:
  """Up to `count` test images, evenly spread, defective ones first (sorted order)."""
  defective = np.flatnonzero(labels == 1)
  good = np.flatnonzero(labels == 0)
  n_bad = min(len(defective), max(count - max(count // 4, 1), 0), count)
  n_good = min(len(good), count - n_bad)
  pick = lambda idx, n: (
    idx[np.unique(np.linspace(0, len(idx) - 1, n).round().astype(int))] if n > 0 else idx[:0]
  )
  return np.sort(np.concatenate([pick(defective, n_bad), pick(good, n_good)]))


def evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  pictures: bool = True,
  teacher_vars: dict | None = None,
) -> dict[str, dict[str, float]]:
  """Evaluates the latest checkpoint of `workdir`; returns {category: metrics}.

  teacher_vars: the config's teacher, if the caller has loaded it already.
  """
  model, teacher_vars, student_vars, meta = load_run(config, workdir, teacher_vars)
  reader, root = config_lib.resolve_data(config)
  category = config.data.category
  samples = data_lib.list_samples(reader, root, category, 'test')
  size = config.data.image_size
  resolution = config.eval.resolution or size
  loader = data_lib.EvalLoader(
    samples,
    size,
    config.eval.batch_size,
    resolution,
    num_threads=config.data.num_threads,
    prefetch=config.data.prefetch,
  )
  predict = make_predict_fn(model, config)
  teacher_vars = jax.device_put(teacher_vars)
  student_vars = jax.device_put(student_vars)

  n = len(samples)
  labels = np.array([s.label for s in samples], np.int32)
  keep = set(picture_indices(labels, config.eval.num_pictures).tolist()) if pictures else set()
  amaps = np.empty((n, resolution, resolution), np.float32)
  masks = np.empty((n, resolution, resolution), np.uint8)
  scores = np.empty((n,), np.float32)
  kept_images = {}
  row = 0
  for batch in tqdm(loader, desc=f'evaluate {category}', unit='batch', dynamic_ncols=True):
    maps, batch_scores = jax.device_get(predict(teacher_vars, student_vars, batch['image']))
    valid = int(np.sum(batch['valid']))
    amaps[row : row + valid] = maps[:valid]
    scores[row : row + valid] = batch_scores[:valid]
    masks[row : row + valid] = batch['mask'][:valid]
    for i in range(valid):
      if row + i in keep:  # shown at the maps' resolution
        kept_images[row + i] = (
          batch['image'][i]
          if resolution == size
          else data_lib.resize_image(batch['image'][i], resolution)
        )
    row += valid
  assert row == n, (row, n)

  results = metrics.evaluate_all(scores, labels, amaps, masks)
  results = {k: float(v) for k, v in results.items()}
  per_defect = {}
  for defect in sorted({s.defect_type for s in samples} - {'good'}):
    chosen = np.array([s.defect_type in ('good', defect) for s in samples])
    if chosen.any() and (labels[chosen] == 0).any():
      per_defect[defect] = metrics.image_auroc(scores[chosen], labels[chosen])

  os.makedirs(workdir, exist_ok=True)
  _write_json(os.path.join(workdir, 'results.json'), {category: results})
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(visualize.results_table_markdown({category: results}) + '\n')
  _write_json(
    os.path.join(workdir, 'evaluation.json'),
    {
      'category': category,
      'checkpoint_step': int(meta['data_step']),
      'trained_steps': int(meta.get('num_steps', meta['data_step'])),
      'test_images': n,
      'defective_images': int(labels.sum()),
      'image_auroc_per_defect_type': per_defect,
      'teacher_weights': config.model.teacher_weights,
    },
  )
  with open(os.path.join(workdir, 'test_scores.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['name', 'defect_type', 'label', 'score'])
    writer.writerows(
      [s.name, s.defect_type, s.label, float(scores[i])] for i, s in enumerate(samples)
    )
  if pictures:
    folder = os.path.join(workdir, 'pictures')
    os.makedirs(folder, exist_ok=True)
    idx = np.array(sorted(kept_images))
    if len(idx):
      visualize.save_examples(
        os.path.join(folder, 'examples.png'),
        np.stack([kept_images[i] for i in idx]),
        masks[idx],
        amaps[idx],
        [samples[i].name for i in idx],
        scores[idx],
        labels[idx],
        max_rows=len(idx),
      )
    visualize.save_curves(
      os.path.join(folder, 'curves.png'), scores, labels, amaps, masks, values=results
    )
  return {category: results}


def _write_json(path: str, payload: dict) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def main(argv) -> None:
  from msrd_jax import cli  # pylint: disable=g-import-not-at-top

  def run(config, workdir):
    results = evaluate(config, workdir)
    print(visualize.results_table_markdown(results))

  cli.run(argv, run)


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top

  from msrd_jax import cli  # pylint: disable=g-import-not-at-top

  cli.define_flags()
  app.run(main)
