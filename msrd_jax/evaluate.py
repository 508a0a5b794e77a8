"""Evaluation of a trained run on its category's test set.

    python -m msrd_jax.evaluate --config configs/synthetic.py --workdir workdirs/demo

Same config and overrides as training. Loads the latest checkpoint of DIR, computes the
anomaly maps of every test image on the device (one jitted function), and writes:

    DIR/results.json         {"<category>": {"image_auroc": ..., "pixel_auroc": ...,
                              "au_pro": ..., ...}}   (fractions in [0, 1])
    DIR/results.md           the same as a Markdown table
    DIR/evaluation.json      checkpoint step, test-set counts, image AUROC per defect type,
                             what the stored decision threshold does ('threshold'), where
                             the maps peak ('max_near_border') and how the memory bank
                             is read ('memory': slots read, effective slots per
                             position, what it changes; see memory.usage)
    DIR/test_scores.csv      every test image's score, label and defect type
    DIR/pictures/examples.png  image | ground truth | heatmap overlay, for a sample
    DIR/pictures/curves.png    image and pixel ROC, PRO curve up to FPR 0.3

When the run is calibrated (DIR/calibration.json, see msrd_jax.calibrate), results.json
also has, at the stored thresholds, the false-alarm rate on test/good and the detection
rate on the defective images (image and pixel level), and evaluation.json the
F1-optimal threshold of the test set for comparison.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os

import jax
import ml_collections
import numpy as np
from absl import app, logging
from tqdm import tqdm

from msrd_jax import (
  calibrate,
  cli,
  distributed,
  files,
  inference,
  memory,
  metric_writers,
  metrics,
  visualize,
)
from msrd_jax import config as config_lib
from msrd_jax import data as data_lib


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


@dataclasses.dataclass
class TestScores:
  """Everything scored on a test split: (N, R, R) maps and masks, (N,) scores and labels.

  images: {index: (R, R, 3) image} for the indices asked for (pictures).
  queries: {index: (h, w, D) one-class embedding before the memory} for the indices
    asked for (memory_usage).
  """

  samples: list
  amaps: np.ndarray
  masks: np.ndarray
  scores: np.ndarray
  labels: np.ndarray
  images: dict[int, np.ndarray]
  queries: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)


def score_split(
  run: inference.Run,
  samples: list,
  keep_images: set[int] = frozenset(),
  keep_queries: set[int] = frozenset(),
) -> TestScores:
  """Maps and scores of `samples` (with their masks) under a trained run.

  keep_images, keep_queries: the indices whose images and embeddings before the memory
  (from the same forward pass) to keep. With several processes each scores its own
  contiguous share of `samples`, and every process gets the whole result (the device
  work is split, not repeated).
  """
  if jax.process_count() == 1:
    return _score_local(run, samples, keep_images, keep_queries)
  n = len(samples)
  start, stop = distributed.shard_range(n)
  mine = _score_local(
    run,
    samples[start:stop],
    {i - start for i in keep_images if start <= i < stop},
    {i - start for i in keep_queries if start <= i < stop},
  )
  r = run.resolution
  query_shape = ()
  if keep_queries:
    image = jax.ShapeDtypeStruct(
      (1, run.config.data.image_size, run.config.data.image_size, 3), np.float32
    )
    query_shape = jax.eval_shape(
      lambda x: run.model.apply_eval(run.teacher_vars, run.student_vars, x)[2]['query'], image
    ).shape[1:]
  return TestScores(
    samples,
    distributed.gather_rows(mine.amaps, n),
    distributed.gather_rows(mine.masks, n),
    distributed.gather_rows(mine.scores, n),
    np.array([s.label for s in samples], np.int32),
    _gather_kept(mine.images, keep_images, start, stop, (r, r, 3)),
    _gather_kept(mine.queries, keep_queries, start, stop, query_shape),
  )


def _gather_kept(
  local: dict[int, np.ndarray], wanted: set[int], start: int, stop: int, shape: tuple
) -> dict[int, np.ndarray]:
  """{index: row} of every process, from each process's `local` {index - start: row}.

  Collective. The kept rows of each process are a run of the sorted indices, in
  process order.
  """
  kept = sorted(wanted)
  own = [i for i in kept if start <= i < stop]
  rows = np.zeros((len(own), *shape), np.float32)
  for row, i in enumerate(own):
    rows[row] = local[i - start]
  gathered = np.concatenate(distributed.process_shares(rows, max(len(kept), 1)))
  return dict(zip(kept, gathered, strict=True))


def _score_local(
  run: inference.Run, samples: list, keep_images: set[int], keep_queries: set[int] = frozenset()
) -> TestScores:
  """score_split on this process alone; an empty `samples` gives empty arrays."""
  config = run.config
  size, resolution = config.data.image_size, run.resolution
  n = len(samples)
  out = TestScores(
    samples,
    np.empty((n, resolution, resolution), np.float32),
    np.empty((n, resolution, resolution), np.uint8),
    np.empty((n,), np.float32),
    np.array([s.label for s in samples], np.int32),
    {},
  )
  if not n:  # a process whose share of a small test set is empty
    return out
  loader = inference.eval_loader(
    config, samples, resolution=resolution, mask_resize=config.eval.mask_resize
  )
  row = 0
  bar = tqdm(
    total=n,
    desc=f'evaluate {config.data.category}',
    unit='image',
    dynamic_ncols=True,
    disable=not distributed.is_main_process(),
  )
  predict_fn = inference.make_predict_fn(run.model, config, with_query=bool(keep_queries))
  with bar:
    for batch, maps, scores, *query in inference.predictions(run, loader, predict_fn):
      valid = len(scores)
      out.amaps[row : row + valid] = maps
      out.scores[row : row + valid] = scores
      out.masks[row : row + valid] = batch['mask'][:valid]
      for i in range(valid):
        if row + i in keep_images:  # shown at the maps' resolution
          image = batch['image'][i]
          out.images[row + i] = (
            image if resolution == size else data_lib.resize_image(image, resolution)
          )
        if row + i in keep_queries:
          out.queries[row + i] = np.asarray(query[0][i], np.float32)
      row += valid
      bar.update(valid)
  assert row == n, (row, n)
  return out


def compute_metrics(t: TestScores) -> tuple[dict[str, float], dict[str, float]]:
  """(metrics of the whole split, image AUROC per defect type against the good images)."""
  results = {
    k: float(v) for k, v in metrics.evaluate_all(t.scores, t.labels, t.amaps, t.masks).items()
  }
  per_defect = {}
  for defect in sorted({s.defect_type for s in t.samples} - {'good'}):
    chosen = np.array([s.defect_type in ('good', defect) for s in t.samples])
    if chosen.any() and (t.labels[chosen] == 0).any():
      per_defect[defect] = metrics.image_auroc(t.scores[chosen], t.labels[chosen])
  return results, per_defect


def threshold_results(workdir: str, run: inference.Run, t: TestScores) -> dict | None:
  """calibrate.threshold_report of the run's stored thresholds; None when uncalibrated."""
  if not os.path.isfile(os.path.join(workdir, calibrate.FILE)):
    return None
  try:
    record = calibrate.load(workdir, run.config)
  except calibrate.CalibrationError as e:
    logging.warning('no threshold figures: %s', e)
    return None
  stale = calibrate.stale_warning(record, run)
  if stale:
    logging.warning('%s', stale)
  return calibrate.threshold_report(t.scores, t.labels, t.amaps, t.masks, record)


# The threshold figures that join AUROC & co. in results.json (all fractions).
THRESHOLD_METRICS = (
  'false_alarm_rate',
  'detection_rate',
  'pixel_false_alarm_rate',
  'pixel_detection_rate',
)


# Width of the border band of `max_near_border`: one cell of the teacher's deepest level
# (stride 16), whose border cells see the convolutions' zero padding.
BORDER_STRIDE = 16


def max_near_border(run: inference.Run, t: TestScores) -> dict:
  """Where the image scores come from: the share of maps, of defect-free and of
  defective test images, whose maximum lies within one stride-16 cell of the edge.

  Under a random teacher at 128 px nearly every defect-free map peaks there, so image
  AUROC then compares border responses more than defects.
  """
  band = max(1, round(BORDER_STRIDE * run.resolution / run.config.data.image_size))
  out = {'band_px': band}
  for name, label in (('good', 0), ('defective', 1)):
    chosen = t.labels == label
    out[name] = metrics.max_near_border(t.amaps[chosen], band) if chosen.any() else None
  return out


def memory_rows(run: inference.Run, count: int) -> set[int]:
  """The test images memory_usage reads: one batch (eval.batch_size) spread evenly over
  the `count` of the split, good and defective alike; none without a memory bank."""
  if run.config.model.memory.mode == 'off' or not count:
    return set()
  chosen = np.linspace(0, count - 1, min(count, run.config.eval.batch_size)).round()
  return set(np.unique(chosen.astype(int)).tolist())


def memory_usage(run: inference.Run, queries: dict[int, np.ndarray]) -> dict | None:
  """memory.usage of the trained bank on the embeddings of some test images (their
  `score_split` queries, see memory_rows), plus 'images' (how many) and, in 'residual'
  mode, the learned 'gate'. None when the run has no memory bank.
  """
  m = run.config.model.memory
  if m.mode == 'off' or not queries:
    return None
  query = np.stack([queries[i] for i in sorted(queries)])
  params = run.student_vars['params']['memory']
  embedding, weights = memory.read(
    query, params['memory'], m.temperature, m.shrink, m.mode, params.get('gate')
  )
  out = memory.usage(weights, query, embedding)
  out['images'] = len(query)
  if m.mode == 'residual':
    out['gate'] = float(params['gate'])
  return out


def write_reports(
  workdir: str,
  run: inference.Run,
  t: TestScores,
  results: dict,
  per_defect: dict,
  pictures: bool,
  threshold: dict | None = None,
  memory_reads: dict | None = None,
) -> None:
  """results.json / .md, evaluation.json, test_scores.csv and the pictures of a run.

  threshold: `threshold_results`, for evaluation.json; memory_reads: `memory_usage`.
  """
  config, category = run.config, run.config.data.category
  files.write_json(os.path.join(workdir, 'results.json'), {category: results})
  files.atomic_write(
    os.path.join(workdir, 'results.md'),
    visualize.results_table_markdown({category: results}) + '\n',
  )
  files.write_json(
    os.path.join(workdir, 'evaluation.json'),
    {
      'category': category,
      'checkpoint_step': int(run.meta['data_step']),
      'trained_steps': int(run.meta.get('num_steps', run.meta['data_step'])),
      'test_images': len(t.samples),
      'defective_images': int(t.labels.sum()),
      'image_auroc_per_defect_type': per_defect,
      'max_near_border': max_near_border(run, t),
      'memory': memory_reads,
      'teacher_weights': config.model.teacher_weights,
      'threshold': threshold,
    },
  )
  table = io.StringIO()
  writer = csv.writer(table, lineterminator='\n')
  writer.writerow(['name', 'defect_type', 'label', 'score'])
  writer.writerows(
    [s.name, s.defect_type, s.label, float(t.scores[i])] for i, s in enumerate(t.samples)
  )
  files.atomic_write(os.path.join(workdir, 'test_scores.csv'), table.getvalue())
  if pictures:
    folder = os.path.join(workdir, 'pictures')
    os.makedirs(folder, exist_ok=True)
    idx = np.array(sorted(t.images), dtype=int)
    if len(idx):
      visualize.save_examples(
        os.path.join(folder, 'examples.png'),
        np.stack([t.images[i] for i in idx]),
        t.masks[idx],
        t.amaps[idx],
        [t.samples[i].name for i in idx],
        t.scores[idx],
        t.labels[idx],
        max_rows=len(idx),
      )
    visualize.save_curves(
      os.path.join(folder, 'curves.png'), t.scores, t.labels, t.amaps, t.masks, values=results
    )


def evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  pictures: bool = True,
  teacher_vars: dict | None = None,
) -> dict[str, dict[str, float]]:
  """Evaluates the latest checkpoint of `workdir`; returns {category: metrics}.

  teacher_vars: the config's teacher, if the caller has loaded it already. With
  train.distributed, every process of the job calls this; process 0 writes the files.
  """
  distributed.initialize(config)
  run = inference.load_run(config, workdir, teacher_vars)
  reader, root = config_lib.resolve_data(config)
  samples = data_lib.list_samples(reader, root, config.data.category, 'test')
  labels = np.array([s.label for s in samples], np.int32)
  keep = set(picture_indices(labels, config.eval.num_pictures).tolist()) if pictures else set()
  scored = score_split(run, samples, keep, memory_rows(run, len(samples)))
  results, per_defect = compute_metrics(scored)
  threshold = threshold_results(workdir, run, scored)
  if threshold is not None:
    results.update({k: threshold[k] for k in THRESHOLD_METRICS})
  if distributed.is_main_process():  # every process has the results; one writes them
    reads = memory_usage(run, scored.queries)
    write_reports(workdir, run, scored, results, per_defect, pictures, threshold, reads)
  with metric_writers.MetricWriter(workdir, enabled=distributed.is_main_process()) as writer:
    writer.add_scalars(int(run.meta['data_step']), results, prefix='eval')
  return {config.data.category: results}


def main(argv) -> None:
  def run(config, workdir):
    results = evaluate(config, workdir)
    print(visualize.results_table_markdown(results))
    r = results[config.data.category]
    if 'false_alarm_rate' in r:
      print(
        f'At the stored threshold: {100 * r["false_alarm_rate"]:.1f} % false alarms on '
        f'test/good, {100 * r["detection_rate"]:.1f} % of the defective images detected.'
      )

  cli.run(argv, run)


if __name__ == '__main__':
  cli.define_flags()
  app.run(main, flags_parser=cli.parse_flags)
