"""The all-categories command: one run per category, resumable, one table."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_config

from msrd_jax import run_all, train


@pytest.mark.slow
def test_run_all_trains_each_category_once_and_writes_one_table(
  synthetic_root, tmp_path, monkeypatch
):
  config = tiny_config(synthetic_root, steps=2)
  config.eval.num_pictures = 2
  results = run_all.run_all(config, str(tmp_path), ['brick', 'grass'])
  assert sorted(results) == ['brick', 'grass']
  table = (tmp_path / 'results.md').read_text()
  assert '| brick |' in table and '| grass |' in table
  mean_row = [line for line in table.splitlines() if line.startswith('| Mean |')][0]
  expected = np.mean([results[c]['image_auroc'] for c in results]) * 100
  assert f'{expected:.1f}' in mean_row
  for c in ('brick', 'grass'):
    assert (tmp_path / c / 'pictures' / 'examples.png').exists()

  # Run again: everything is done, nothing is trained or evaluated.
  def fail(*args, **kwargs):
    raise AssertionError('a finished category was run again')

  monkeypatch.setattr(train, 'train_and_evaluate', fail)
  assert run_all.run_all(config, str(tmp_path), ['brick', 'grass']) == results


def test_run_all_discovers_the_categories_of_a_root(synthetic_root):
  config = tiny_config(synthetic_root)
  assert run_all.discover_categories(config) == ['brick', 'grass']
