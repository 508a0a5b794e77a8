"""The ablation runner: its variants, its table's arithmetic, a tiny study end to end."""

from __future__ import annotations

import json
import math
import os
import re
import shlex

import numpy as np
import pytest
from conftest import ROOT, cli, config_file, tiny_config
from data_fixtures import make_mvtec_tree

from msrd_jax import ablate, run_config, train
from msrd_jax import config as config_lib

# ------------------------------------------------------------------------ variants


def test_variants_set_the_right_fields():
  base = config_lib.base_config()
  base.seed = 7
  expected = {
    'rd': ('mff', (), 'off'),
    'msff': ('msff', (), 'off'),
    'ca_decoder': ('mff', ('decoder',), 'off'),
    'ca_fusion': ('msff', ('fusion',), 'off'),
    'memory': ('mff', (), 'replace'),
    'msrd': ('msff', ('fusion', 'decoder'), 'replace'),
    'msrd_residual': ('msff', ('fusion', 'decoder'), 'residual'),
    'msrd_mff': ('mff', ('decoder',), 'replace'),
    'msrd_decoder_ca': ('msff', ('decoder',), 'replace'),
    'msrd_gated': ('msff', ('fusion', 'decoder'), 'replace'),
  }
  forms = {'msrd_gated': 'gated'}  # every other variant: design.md's 'normalized'
  base.model.msff.form = 'gated'  # a variant sets the form; it does not inherit it
  assert list(ablate.VARIANTS) == list(expected)
  for name, (fusion, attention, memory) in expected.items():
    for seed in (0, 3):
      c = ablate.variant_config(base, name, seed)
      config_lib.validate(c)  # no variant puts attention on RD's MFF
      assert (c.model.fusion, tuple(c.model.coord_attention), c.model.memory.mode) == (
        fusion,
        attention,
        memory,
      )
      assert c.model.msff.form == forms.get(name, 'normalized')
      assert c.seed == seed
      # The random teacher is the config's (seed 7) for every variant and seed.
      assert c.model.teacher_seed == 7
      # Everything else is the config's.
      assert c.train.to_dict() == base.train.to_dict() and c.data.to_dict() == base.data.to_dict()
  # The config itself is untouched.
  assert base.model.fusion == 'msff' and base.seed == 7 and base.model.msff.form == 'gated'
  base.model.teacher_seed = 2
  assert ablate.variant_config(base, 'rd', 0).model.teacher_seed == 2


def test_the_readmes_flags_for_the_method_without_msff_train_msrd_mff(tmp_path):
  # The README tells users how to train the full method without MSFF from the command
  # line; those flags, given to `train` as a user would, must set what the ablation's
  # msrd_mff variant measures.
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
    found = re.search(r'without MSFF is `([^`]+)`', f.read())
  assert found, 'README.md has lost the flags for the method without MSFF'
  flags = shlex.split(found.group(1))
  # configs/mvtec.py's docstring repeats them; both must say the same.
  with open(os.path.join(ROOT, 'configs', 'mvtec.py'), encoding='utf-8') as f:
    assert found.group(1) in f.read()
  root = make_mvtec_tree(tmp_path / 'data', n_train=4, size=(96, 96))
  workdir = tmp_path / 'run'
  out = cli(
    'msrd_jax.train',
    '--config=configs/mvtec.py:widget',
    f'--workdir={workdir}',
    *flags,
    f'--config.data.root={os.path.dirname(root)}',
    '--config.model.backbone=resnet18',
    '--config.model.oce_blocks=1',
    '--config.data.image_size=96',
    '--config.train.batch_size=4',
    '--config.train.steps=1',
    '--config.eval.after_training=False',
    '--config.calibration.source=none',
  )
  assert out.returncode == 0, out.stderr[-3000:]
  model = run_config.load(str(workdir)).model
  want = ablate.variant_config(config_lib.base_config(), 'msrd_mff', 0).model
  assert (model.fusion, tuple(model.coord_attention), model.memory.mode) == (
    want.fusion,
    tuple(want.coord_attention),
    want.memory.mode,
  )


def test_variant_selection_keeps_the_baseline_first_and_refuses_unknown_names():
  assert ablate.ordered_variants(None) == list(ablate.VARIANTS)
  assert ablate.ordered_variants(['msrd', 'msff']) == ['rd', 'msff', 'msrd']
  with pytest.raises(config_lib.ConfigError, match='bifpn'):
    ablate.ordered_variants(['bifpn'])


# ------------------------------------------------------------------- table arithmetic


def _made_up_results():
  # {variant: {seed: {category: {metric: value}}}}, written out by hand.
  image = {
    'rd': {0: (0.80, 0.60), 1: (0.90, 0.70), 2: (0.70, 0.70)},  # means .70 .80 .70
    'msff': {0: (0.85, 0.65), 1: (0.90, 0.80), 2: (0.70, 0.80)},  # means .75 .85 .75
  }
  pixel = {
    'rd': {0: (0.5, 0.5), 1: (0.5, 0.5), 2: (0.5, 0.5)},
    'msff': {0: (0.6, 0.6), 1: (0.3, 0.5), 2: (0.5, 0.56)},  # means .60 .40 .53
  }
  return {
    v: {
      s: {
        c: {'image_auroc': image[v][s][i], 'pixel_auroc': pixel[v][s][i]}
        for i, c in enumerate(('a', 'b'))
      }
      for s in (0, 1, 2)
    }
    for v in ('rd', 'msff')
  }


def test_table_arithmetic_against_a_hand_computation():
  metrics = ('image_auroc', 'pixel_auroc')
  summary = ablate.summarize(_made_up_results(), ['a', 'b'], metrics)
  approx = lambda x: pytest.approx(x, abs=1e-12)

  # Per category: msff on 'a', image AUROC .85, .90, .70.
  cell = summary['per_category']['msff']['a']['image_auroc']
  assert cell['mean'] == approx((0.85 + 0.90 + 0.70) / 3)
  # Deviations from 0.81667: 1/30, 5/60, -7/60; squares sum to 78/3600, over 3 - 1.
  assert cell['std'] == approx(math.sqrt(78 / 3600 / 2))  # 0.104083
  assert cell['n'] == 3

  # Mean over categories: rd's per-seed means .70, .80, .70.
  rd = summary['mean_over_categories']['rd']['image_auroc']
  assert rd['mean'] == approx(0.7333333333333333)
  assert rd['std'] == approx(math.sqrt((2 * (1 / 30) ** 2 + (2 / 30) ** 2) / 2))  # 0.057735
  assert rd['values'] == {'0': approx(0.70), '1': approx(0.80), '2': approx(0.70)}

  # Paired differences: image AUROC +.05 on every seed: a gain, no noise.
  d = summary['difference_to_baseline']['msff']['image_auroc']
  assert d['mean'] == approx(0.05) and d['std'] == approx(0.0) and d['within_noise'] is False
  # Pixel AUROC: +.10, -.10, +.03 -> mean .01, std sqrt((.09^2 + .11^2 + .02^2) / 2) = .1015.
  d = summary['difference_to_baseline']['msff']['pixel_auroc']
  assert d['mean'] == approx(0.01)
  assert d['std'] == approx(math.sqrt((0.09**2 + 0.11**2 + 0.02**2) / 2))
  assert d['within_noise'] is True
  assert 'rd' not in summary['difference_to_baseline']

  # Pairing by seed: rd's own spread over seeds (std 5.8 points) cancels out of the
  # image AUROC difference, whose std is 0.
  md = ablate.markdown(
    summary,
    ['rd', 'msff'],
    [0, 1, 2],
    ['a', 'b'],
    [
      ('image_auroc', 'Image AUROC'),
      ('pixel_auroc', 'Pixel AUROC'),
    ],
  )
  assert '| msff | +5.0 ± 0.0 | +1.0 ± 10.1 (within noise) |' in md
  assert '| rd | 73.3 ± 5.8 | 50.0 ± 0.0 |' in md
  assert '| a | 80.0 ± 10.0 | 81.7 ± 10.4 |' in md  # image AUROC per category


def test_table_uses_complete_seeds_only_and_marks_single_seeds():
  results = _made_up_results()
  del results['msff'][2]['b']  # seed 2 of msff stopped before category b
  summary = ablate.summarize(results, ['a', 'b'], ('image_auroc',))
  means = summary['mean_over_categories']['msff']['image_auroc']
  assert means['n'] == 2 and means['mean'] == pytest.approx(0.80)
  d = summary['difference_to_baseline']['msff']['image_auroc']
  assert sorted(d['values']) == ['0', '1'] and d['mean'] == pytest.approx(0.05)
  # Category a still has its three seeds.
  assert summary['per_category']['msff']['a']['image_auroc']['n'] == 3

  one = {v: {0: r[0]} for v, r in _made_up_results().items()}
  summary = ablate.summarize(one, ['a', 'b'], ('image_auroc',))
  d = summary['difference_to_baseline']['msff']['image_auroc']
  assert d['std'] is None and d['within_noise'] is None
  md = ablate.markdown(summary, ['rd', 'msff'], [0], ['a', 'b'], [('image_auroc', 'I')])
  assert '| msff | +5.0 (1 seed) |' in md


def test_difference_to_the_parent_variant():
  results = _made_up_results()
  results['ca_fusion'] = {
    s: {c: {k: v + 0.02 for k, v in m.items()} for c, m in r.items()}
    for s, r in results['msff'].items()
  }
  summary = ablate.summarize(results, ['a', 'b'], ('image_auroc',))
  parent = summary['difference_to_parent']['ca_fusion']
  assert parent['parent'] == 'msff'
  assert parent['image_auroc']['mean'] == pytest.approx(0.02)
  assert set(summary['difference_to_parent']) == {'ca_fusion'}


def test_the_table_names_msffs_form_where_it_is_not_design_mds():
  results = _made_up_results()
  results['msrd'] = results['msff']
  results['msrd_gated'] = results['msff']
  summary = ablate.summarize(results, ['a', 'b'], ('image_auroc',))
  md = ablate.markdown(
    summary, ['rd', 'msrd', 'msrd_gated'], [0, 1, 2], ['a', 'b'], [('image_auroc', 'I')]
  )
  rows = {
    line.split('|')[1].strip(): line.split('|')[2].strip()
    for line in md.splitlines()
    if line.startswith('| ') and line.count('|') == 6
  }
  assert rows['rd'] == 'mff' and rows['msrd'] == 'msff' and rows['msrd_gated'] == 'msff (gated)'
  assert summary['difference_to_parent']['msrd_gated']['parent'] == 'msrd'


# -------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_tiny_ablation_runs_each_variant_and_seed_once_then_resumes(tmp_path, monkeypatch):
  # 2 variants x 2 seeds x 1 category of 8 training and 5 test images, 2 steps each.
  make_mvtec_tree(tmp_path / 'data', 'brick', n_train=8, size=(40, 30))
  config = tiny_config(str(tmp_path / 'data'), steps=2)
  config.eval.num_pictures = 0
  tmp_path = tmp_path / 'study'
  summary = ablate.ablate(
    config, str(tmp_path), seeds=[0, 1], variants=['memory'], categories=['brick']
  )
  for v in ('rd', 'memory'):
    for s in (0, 1):
      run = tmp_path / v / f'seed{s}'
      stored = json.loads((run / 'brick' / 'config.json').read_text())
      assert stored['seed'] == s and stored['model']['teacher_seed'] == 0
      assert stored['model']['memory']['mode'] == ('off' if v == 'rd' else 'replace')
      assert json.loads((run / 'results.json').read_text())['brick']['image_auroc'] >= 0
  table = json.loads((tmp_path / 'ablation.json').read_text())
  assert table['seeds'] == [0, 1] and sorted(table['variants']) == ['memory', 'rd']
  d = table['difference_to_baseline']['memory']['image_auroc']
  assert d['n'] == 2
  per_seed = table['mean_over_categories']
  expected = [
    table['results']['memory'][str(s)]['brick']['image_auroc']
    - table['results']['rd'][str(s)]['brick']['image_auroc']
    for s in (0, 1)
  ]
  assert d['mean'] == pytest.approx(np.mean(expected))
  assert per_seed['rd']['image_auroc']['n'] == 2
  md = (tmp_path / 'ablation.md').read_text()
  assert '## Difference to rd (paired by seed)' in md and '| memory |' in md

  # Again: every run is finished, nothing is trained or evaluated, the same table.
  def fail(*args, **kwargs):
    raise AssertionError('a finished run was run again')

  monkeypatch.setattr(train, 'train_and_evaluate', fail)
  again = ablate.ablate(
    config, str(tmp_path), seeds=[0, 1], variants=['memory'], categories=['brick']
  )
  assert json.dumps(again, sort_keys=True) == json.dumps(summary, sort_keys=True)


def test_command_refuses_an_unknown_variant_in_one_line(tmp_path):
  out = cli(
    'msrd_jax.ablate',
    '--config',
    'configs/synthetic.py',
    '--workdir',
    str(tmp_path),
    '--variants',
    'msrd,bifpn',
  )
  assert out.returncode == 2, out.stderr[-2000:]
  assert 'bifpn' in out.stderr and 'Traceback' not in out.stderr
  assert not any(tmp_path.iterdir())  # nothing trained, nothing written


def test_configs_mvtec_trains_what_msrd_gated_measures():
  # configs/mvtec.py's model was chosen from the ablation's msrd_gated rows; it must be
  # that variant, so that the README's figures describe what the config trains.
  config = config_file('mvtec')
  want = ablate.variant_config(config, 'msrd_gated', config.seed).model
  assert config.model.to_dict() == {**want.to_dict(), 'teacher_seed': None}
