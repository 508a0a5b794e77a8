"""The all-categories command: one run per category, resumable, one table."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import cli, tiny_config

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


def _memory_mappings() -> int:
  with open('/proc/self/maps') as f:
    return sum(1 for _ in f)


@pytest.mark.skipif(not os.path.exists('/proc/self/maps'), reason='reads /proc (Linux)')
def test_categories_run_one_after_another_do_not_pile_up_compiled_programs(
  synthetic_root, tmp_path
):
  # Each kept program holds thousands of memory mappings; the kernel allows 65530 per
  # process, so a process that kept them all died after about 30 categories (an
  # ablation of a data set runs hundreds). Released after each, the count stays flat.
  config = tiny_config(synthetic_root, steps=1)
  config.eval.num_pictures = 0
  counts = []
  for i in range(2):
    run_all.run_all(config, str(tmp_path / f'run{i}'), ['brick'])
    counts.append(_memory_mappings())
  # Kept, each category adds about 2000 at this scale; the first may also load libraries.
  assert counts[1] - counts[0] < 300, counts


def _steps_logged(workdir) -> list[int]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line)['step'] for line in f if line.strip()]


@pytest.mark.slow
def test_the_command_resumes_an_unfinished_category_and_runs_only_those_asked(
  synthetic_root, tmp_path
):
  common = [
    '--config=configs/synthetic.py',
    '--config.data.dataset=mvtec',
    f'--config.data.root={synthetic_root}',
    '--config.data.image_size=96',
    '--config.train.checkpoint_every_steps=2',
    '--config.train.log_every_steps=1',
    '--config.eval.num_pictures=2',
    '--config.calibration.source=none',
  ]

  def command(module: str, workdir, steps: int, *extra: str):
    done = cli(module, *common, f'--workdir={workdir}', f'--config.train.steps={steps}', *extra)
    assert done.returncode == 0, done.stderr[-3000:]

  # brick was started and stopped after its checkpoint of step 2 (no evaluation yet).
  brick = tmp_path / 'brick'
  command('msrd_jax.train', brick, 2, '--config.eval.after_training=False')
  assert not os.path.exists(brick / 'results.json')
  step2 = os.path.getmtime(brick / 'checkpoints' / '2')
  command('msrd_jax.run_all', tmp_path, 4, '--categories=brick,grass')
  # brick resumed at step 2: its checkpoint of step 2 untouched, each step logged once.
  assert os.path.getmtime(brick / 'checkpoints' / '2') == step2
  assert _steps_logged(brick) == [1, 2, 3, 4]
  assert _steps_logged(tmp_path / 'grass') == [1, 2, 3, 4]
  with open(tmp_path / 'results.json') as f:
    assert sorted(json.load(f)) == ['brick', 'grass']
  # Only the categories asked for: the root has no others here, so ask for one.
  command('msrd_jax.run_all', tmp_path / 'one', 2, '--categories=grass')
  assert sorted(os.listdir(tmp_path / 'one')) == sorted(['grass', 'results.json', 'results.md']), (
    os.listdir(tmp_path / 'one')
  )
