"""Trains and evaluates every category of a data set, then writes one table.

    python -m msrd_jax.run_all --config configs/mvtec.py --workdir workdirs/mvtec \
        --config.data.root=/data/mvtec_anomaly_detection \
        --config.model.teacher_weights=teachers/wide_resnet50_2.msgpack

Each category runs in DIR/<category> with the same config (data.category replaced).
A category whose results.json exists is skipped, one whose training stopped resumes
from its checkpoint, so an interrupted command continues where it stopped when run
again. At the end DIR/results.json holds {category: metrics} and DIR/results.md the
table in the layout papers use (MVTec AD's textures, then objects, group means and the
mean row). --categories restricts the run (comma-separated).
"""

from __future__ import annotations

import json
import os

import ml_collections
from absl import app, flags

from msrd_jax import cli, distributed, files, visualize
from msrd_jax import config as config_lib
from msrd_jax import data as data_lib
from msrd_jax import train as train_lib

FLAGS = flags.FLAGS


def discover_categories(config: ml_collections.ConfigDict) -> list[str]:
  """The categories of config.data: the synthetic ones, VisA's objects or the folders
  of the MVTec-layout root that contain train/ (MVTec AD's own in the paper's order)."""
  reader, root = config_lib.resolve_data(config)
  if config.data.dataset == 'synthetic':
    from msrd_jax.data.synthetic import CATEGORIES  # pylint: disable=g-import-not-at-top

    return list(CATEGORIES)
  if reader == 'visa':
    from msrd_jax.data.visa import visa_categories  # pylint: disable=g-import-not-at-top

    return visa_categories(root)
  found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d, 'train')))
  if not found:
    raise data_lib.DataError(
      f'no category folders (<category>/train/) under {root!r}; expected the MVTec '
      'AD layout <root>/<category>/train/good, test/<defect>, ground_truth/<defect>'
    )
  order = data_lib.MVTEC_TEXTURES + data_lib.MVTEC_OBJECTS
  return [c for c in order if c in found] + [c for c in found if c not in order]


def category_config(config: ml_collections.ConfigDict, category: str) -> ml_collections.ConfigDict:
  c = config.copy_and_resolve_references()
  c.data.category = category
  return c


def run_all(
  config: ml_collections.ConfigDict, workdir: str, categories: list[str] | None = None
) -> dict[str, dict[str, float]]:
  """Trains and evaluates each category (skipping finished ones); returns all results."""

  config_lib.validate(config)
  categories = categories or discover_categories(config)
  results = {}
  for i, category in enumerate(categories, start=1):
    cfg = category_config(config, category)
    cat_dir = os.path.join(workdir, category)
    done = os.path.join(cat_dir, 'results.json')
    if os.path.isfile(done):
      with open(done) as f:
        stored = json.load(f)
      if category in stored:
        print(f'[{i}/{len(categories)}] {category}: done, skipped', flush=True)
        results[category] = stored[category]
        continue
    print(f'[{i}/{len(categories)}] {category}', flush=True)
    results.update(train_lib.train_and_evaluate(cfg, cat_dir, evaluate_after=True))
    _write(workdir, results)  # a partial table after each category
  _write(workdir, results)
  return results


def _write(workdir: str, results: dict) -> None:
  if not distributed.is_main_process():  # every process has the results; one writes them
    return
  files.write_json(os.path.join(workdir, 'results.json'), results)
  files.atomic_write(
    os.path.join(workdir, 'results.md'), visualize.results_table_markdown(results) + '\n'
  )


def main(argv) -> None:
  def run(config, workdir):
    categories = [c for c in FLAGS.categories.split(',') if c] if FLAGS.categories else None
    print(visualize.results_table_markdown(run_all(config, workdir, categories)))

  cli.run(argv, run)


if __name__ == '__main__':
  cli.define_flags('Directory of the whole run: one sub-folder per category.')
  flags.DEFINE_string('categories', None, 'Comma-separated categories (default: all).')
  app.run(main)
