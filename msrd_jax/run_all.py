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

A category that fails (bad data, a damaged checkpoint, a crash) is reported when it
happens and the others still run; the command then ends by listing the failed ones and
exits with status 2. Ctrl-C or SIGTERM stops the whole command (the category being
trained saves its step first).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import traceback

import jax
import ml_collections
from absl import app, flags

from msrd_jax import cli, distributed, files, visualize
from msrd_jax import config as config_lib
from msrd_jax import data as data_lib
from msrd_jax import train as train_lib
from msrd_jax.errors import UserError

FLAGS = flags.FLAGS


class CategoriesFailed(UserError):
  """Some categories of a run_all failed; the others were run."""

  def __init__(self, message: str, failures: dict[str, str], results: dict):
    super().__init__(message)
    self.failures = failures
    self.results = results


def discover_categories(config: ml_collections.ConfigDict) -> list[str]:
  """The categories of config.data: the synthetic ones, VisA's objects or the folders
  of the MVTec-layout root that contain train/ (MVTec AD's own in the paper's order)."""
  reader, root = config_lib.resolve_data(config)
  if config.data.dataset == 'synthetic':
    from msrd_jax.data import synthetic  # pylint: disable=g-import-not-at-top

    if synthetic.read_marker(root) is not None:  # else one's own folder (resolve_data)
      return list(synthetic.CATEGORIES)
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
  """Trains and evaluates each category (skipping finished ones); returns all results.

  Raises:
    CategoriesFailed: after all categories were tried, naming those that failed (the
      results of the others are written).
  """

  config_lib.validate(config)
  categories = categories or discover_categories(config)
  results = {}
  failures: dict[str, str] = {}
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
    failure = _run_category(cfg, cat_dir, results)
    if failure is not None:
      failures[category] = failure
      print(f'[{i}/{len(categories)}] {category}: FAILED: {failure}', file=sys.stderr, flush=True)
      continue
    _write(workdir, results)  # a partial table after each category
  _write(workdir, results)
  if failures:
    others = (
      f' The results of the others are in {os.path.join(workdir, "results.md")}.'
      if len(failures) < len(categories)
      else ''
    )
    raise CategoriesFailed(
      f'{len(failures)} of {len(categories)} categories failed: '
      + '; '.join(f'{c}: {m.rstrip(".")}' for c, m in failures.items())
      + '.'
      + others,
      failures,
      results,
    )
  return results


def _run_category(config: ml_collections.ConfigDict, workdir: str, results: dict) -> str | None:
  """Trains and evaluates one category into `results`; what went wrong, or None.

  A user error is one line; any other error also prints its traceback, for a bug
  report. Interrupts are not caught: they stop the whole command.
  """
  try:
    results.update(train_lib.train_and_evaluate(config, workdir, evaluate_after=True))
  except UserError as e:
    return ' '.join(str(e).split())
  except FileNotFoundError as e:
    return str(e)
  except Exception as e:  # a crash in one category must not cost the others
    traceback.print_exc()
    return f'{type(e).__name__}: {e} (traceback above)'
  finally:
    _release_compiled()
  return None


def _release_compiled() -> None:
  """Frees the programs compiled for the category just run.

  Every category builds its model and steps anew, and JAX keeps every compiled program
  for as long as the process lives; on the CPU one category's programs hold about two
  thousand memory mappings of machine code. One process running many categories (a data
  set, an ablation) would reach the kernel's limit on mappings (vm.max_map_count, 65530
  by default) after about 30 trainings and die with "LLVM compilation error: Cannot
  allocate memory". The next category compiles its own programs again anyway (from the
  persistent cache if on).
  """
  jax.clear_caches()
  gc.collect()


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
    try:
      results = run_all(config, workdir, categories)
    except CategoriesFailed as e:
      if e.results:
        print(visualize.results_table_markdown(e.results))
      raise
    print(visualize.results_table_markdown(results))

  cli.run(argv, run)


if __name__ == '__main__':
  cli.define_flags('Directory of the whole run: one sub-folder per category.')
  flags.DEFINE_string('categories', None, 'Comma-separated categories (default: all).')
  app.run(main, flags_parser=cli.parse_flags)
