"""The article's ablation study: each addition on and off, several seeds, one table.

    python -m msrd_jax.ablate --config configs/mvtec.py --workdir workdirs/ablation \
        --config.data.root=/data/mvtec_anomaly_detection \
        --config.model.teacher_weights=teachers/wide_resnet50_2.msgpack \
        --seeds 0,1,2 [--variants rd,msff,msrd] [--categories bottle,carpet]

Every variant sets model.fusion, model.msff.form, model.coord_attention and
model.memory.mode on top of the config (VARIANTS below); everything else (data, steps,
optimizer, evaluation) is the config's, the same for all. For each seed k the config's
`seed` becomes k, which fixes the student's initialization and the order of the training
images, the same for every variant of that seed. The teacher does not follow the seed: a
ported teacher is one file, and a random one (no teacher_weights) is drawn once from
model.teacher_seed, else the config's own seed, and pinned for every run, so that seeds
vary training alone, as they would with ImageNet weights.

Each variant and seed is a `run_all` in DIR/<variant>/seed<k>/ (one folder per
category), so an interrupted study continues where it stopped when run again, and
finished runs are skipped. After each of them DIR/ablation.json and DIR/ablation.md are
rewritten: per variant and category the mean +- standard deviation over seeds; per
variant the mean over categories; and the paired difference of each variant to the
baseline (RD4AD), seed by seed (variant's mean over categories minus the baseline's,
same seed), then mean +- std over seeds. A difference with |mean| <= std is marked
"within noise": it is not a gain (or a loss) these seeds can tell apart from chance.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence

import ml_collections
import numpy as np
from absl import app, flags

from msrd_jax import cli, files, run_all
from msrd_jax import config as config_lib

FLAGS = flags.FLAGS

METRICS = (
  ('image_auroc', 'Image AUROC'),
  ('pixel_auroc', 'Pixel AUROC'),
  ('au_pro', 'AU-PRO (MVTec)'),
  ('au_pro_rd4ad', 'AU-PRO (RD4AD code)'),
)


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of the ablation: the model fields it sets and what it is compared with.

  parent: the variant this one differs from in one thing, when that is not the baseline
    (its difference to the parent isolates that one thing: an addition, a swap or a
    removal).
  """

  name: str
  description: str
  fusion: str
  coord_attention: tuple[str, ...]
  memory: str
  parent: str | None = None
  msff_form: str = 'normalized'


BASELINE = 'rd'
VARIANTS: dict[str, Variant] = {
  v.name: v
  for v in (
    Variant('rd', 'RD4AD: MFF, no coordinate attention, no memory', 'mff', (), 'off'),
    Variant('msff', '+ MSFF', 'msff', (), 'off'),
    Variant('ca_decoder', '+ coordinate attention in the decoder', 'mff', ('decoder',), 'off'),
    Variant(
      'ca_fusion', '+ MSFF with coordinate attention', 'msff', ('fusion',), 'off', parent='msff'
    ),
    Variant('memory', '+ memory bank (replace)', 'mff', (), 'replace'),
    Variant('msrd', 'full MSRD (memory replace)', 'msff', ('fusion', 'decoder'), 'replace'),
    Variant(
      'msrd_residual',
      'full MSRD, memory residual',
      'msff',
      ('fusion', 'decoder'),
      'residual',
      parent='msrd',
    ),
    Variant(
      'msrd_mff',
      'full MSRD without MSFF (RD4AD: MFF; attention in the decoder)',
      'mff',
      ('decoder',),
      'replace',
      parent='msrd',
    ),
    Variant(
      'msrd_decoder_ca',
      'full MSRD, attention in the decoder only (MSFF without its attention)',
      'msff',
      ('decoder',),
      'replace',
      parent='msrd',
    ),
    Variant(
      'msrd_gated',
      "full MSRD, MSFF gated (the other levels' gates start at zero: it starts as MFF)",
      'msff',
      ('fusion', 'decoder'),
      'replace',
      parent='msrd',
      msff_form='gated',
    ),
  )
}


def teacher_seed(config: ml_collections.ConfigDict) -> int:
  """The seed of the (random) teacher shared by every run: model.teacher_seed, else
  the config's seed."""
  seed = config.model.get('teacher_seed')
  return int(config.seed if seed is None else seed)


def variant_config(
  config: ml_collections.ConfigDict, variant: Variant | str, seed: int
) -> ml_collections.ConfigDict:
  """The config of one run: `variant`'s model fields, seed `seed`, the shared teacher."""
  v = VARIANTS[variant] if isinstance(variant, str) else variant
  c = config.copy_and_resolve_references()
  c.model.teacher_seed = teacher_seed(config)
  c.seed = int(seed)
  c.model.fusion = v.fusion
  c.model.coord_attention = tuple(v.coord_attention)
  c.model.memory.mode = v.memory
  c.model.msff.form = v.msff_form
  return c


def _fusion_cell(v: Variant) -> str:
  """model.fusion, with MSFF's form where it is not design.md's."""
  return v.fusion if v.fusion == 'mff' or v.msff_form == 'normalized' else f'msff ({v.msff_form})'


def run_dir(workdir: str, variant: str, seed: int) -> str:
  return os.path.join(workdir, variant, f'seed{seed}')


def ordered_variants(names: Sequence[str] | None) -> list[str]:
  """The variants to run in VARIANTS' order, the baseline always first."""
  if not names:
    return list(VARIANTS)
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    raise config_lib.ConfigError(
      f'unknown ablation variants {unknown}; choose from {", ".join(VARIANTS)}'
    )
  return [n for n in VARIANTS if n in names or n == BASELINE]


# Results: {variant: {seed: {category: {metric: fraction}}}}.
Results = Mapping[str, Mapping[int, Mapping[str, Mapping[str, float]]]]


def _finite(x) -> bool:
  return x is not None and not (isinstance(x, float) and math.isnan(x))


def stats(values: Mapping[int, float]) -> dict:
  """{'mean', 'std', 'n', 'values'} of per-seed values; std is the sample standard
  deviation (ddof 1), None for fewer than two values; NaN values are left out."""
  kept = {int(s): float(v) for s, v in values.items() if _finite(v)}
  x = np.array(list(kept.values()), np.float64)
  return {
    'mean': float(x.mean()) if x.size else None,
    'std': float(x.std(ddof=1)) if x.size >= 2 else None,
    'n': int(x.size),
    'values': {str(s): v for s, v in sorted(kept.items())},
  }


def _difference(per_seed: Mapping[int, float], ref: Mapping[int, float]) -> dict:
  common = sorted(set(per_seed) & set(ref))
  out = stats({s: per_seed[s] - ref[s] for s in common})
  out['within_noise'] = None if out['std'] is None else abs(out['mean']) <= out['std']
  return out


def summarize(
  results: Results,
  categories: Sequence[str],
  metrics: Sequence[str] = tuple(k for k, _ in METRICS),
  baseline: str = BASELINE,
) -> dict:
  """The ablation's figures from the runs' results.

  Returns {'per_category': {variant: {category: {metric: stats}}},
           'mean_over_categories': {variant: {metric: stats}},
           'difference_to_baseline': {variant: {metric: stats + within_noise}},
           'difference_to_parent': {variant: {'parent': name, metric: ...}}}.
  A seed enters a variant's mean over categories only when it has all `categories`,
  and a paired difference only when both variants have that seed.
  """
  per_category, means, per_seed = {}, {}, {}
  for v, by_seed in results.items():
    per_category[v] = {
      c: {
        m: stats({s: r[c].get(m) for s, r in by_seed.items() if c in r and m in r[c]})
        for m in metrics
      }
      for c in categories
    }
    complete = {s: r for s, r in by_seed.items() if all(c in r for c in categories)}
    per_seed[v] = {
      m: {
        s: float(np.mean([r[c].get(m, math.nan) for c in categories])) for s, r in complete.items()
      }
      for m in metrics
    }
    means[v] = {m: stats(per_seed[v][m]) for m in metrics}

  def diff(v: str, ref: str) -> dict:
    return {m: _difference(per_seed[v][m], per_seed[ref][m]) for m in metrics}

  to_baseline = {v: diff(v, baseline) for v in results if v != baseline and baseline in results}
  to_parent = {}
  for v in results:
    parent = VARIANTS[v].parent if v in VARIANTS else None
    if parent is not None and parent in results:
      to_parent[v] = {'parent': parent, **diff(v, parent)}
  return {
    'per_category': per_category,
    'mean_over_categories': means,
    'difference_to_baseline': to_baseline,
    'difference_to_parent': to_parent,
  }


def _cell(s: dict, signed: bool = False) -> str:
  if s['mean'] is None:
    return '-'
  text = f'{100 * s["mean"]:+.1f}' if signed else f'{100 * s["mean"]:.1f}'
  if s['std'] is None:
    return text + (' (1 seed)' if signed else '')
  text += f' ± {100 * s["std"]:.1f}'
  if signed and s.get('within_noise'):
    text += ' (within noise)'
  return text


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numbers=True) -> list[str]:
  align = '---:|' if numbers else ':---|'
  lines = ['| ' + ' | '.join(header) + ' |', '|:---|' + align * (len(header) - 1)]
  return lines + ['| ' + ' | '.join(r) + ' |' for r in rows]


def markdown(
  summary: dict,
  variants: Sequence[str],
  seeds: Sequence[int],
  categories: Sequence[str],
  metrics: Sequence[tuple[str, str]] = METRICS,
  baseline: str = BASELINE,
) -> str:
  """ablation.md: the variants, the means, the paired differences, each category."""
  headers = [h for _, h in metrics]
  out = [
    '# Ablation',
    '',
    f'Seeds {", ".join(map(str, seeds))}; categories {", ".join(categories)}. Percent, '
    'mean ± standard deviation over seeds (sample std); a seed counts once all its '
    'categories are done.',
    '',
  ]
  out += _table(
    ['Variant', 'model.fusion', 'model.coord_attention', 'model.memory.mode', 'what it is'],
    [
      [v, _fusion_cell(VARIANTS[v]), str(VARIANTS[v].coord_attention), VARIANTS[v].memory]
      + [VARIANTS[v].description]
      for v in variants
    ],
    numbers=False,
  )
  means = summary['mean_over_categories']
  out += ['', '## Mean over categories', '']
  out += _table(
    ['Variant'] + headers, [[v] + [_cell(means[v][k]) for k, _ in metrics] for v in variants]
  )
  out += [
    '',
    f'## Difference to {baseline} (paired by seed)',
    '',
    f"For each seed, the variant's mean over categories minus {baseline}'s; then mean ± "
    'std over seeds. "within noise": |mean| <= std, no gain these seeds can tell from '
    'chance.',
    '',
  ]
  diffs = summary['difference_to_baseline']
  out += _table(
    ['Variant'] + headers,
    [[v] + [_cell(diffs[v][k], signed=True) for k, _ in metrics] for v in variants if v in diffs],
  )
  parents = summary['difference_to_parent']
  if any(v in parents for v in variants):
    out += ['', '## Difference to the variant each one extends (paired by seed)', '']
    out += _table(
      ['Variant', 'minus'] + headers,
      [
        [v, parents[v]['parent']] + [_cell(parents[v][k], signed=True) for k, _ in metrics]
        for v in variants
        if v in parents
      ],
    )
  per_category = summary['per_category']
  for key, header in metrics:
    out += ['', f'## {header} per category', '']
    rows = [[c] + [_cell(per_category[v][c][key]) for v in variants] for c in categories]
    rows.append(['Mean'] + [_cell(means[v][key]) for v in variants])
    out += _table(['Category'] + list(variants), rows)
  return '\n'.join(out) + '\n'


def write_tables(
  workdir: str,
  results: Results,
  variants: Sequence[str],
  seeds: Sequence[int],
  categories: Sequence[str],
) -> dict:
  """DIR/ablation.json and DIR/ablation.md from the results so far; returns the summary."""
  summary = summarize(results, categories)
  present = [v for v in variants if v in results]
  payload = {
    'baseline': BASELINE,
    'seeds': list(seeds),
    'categories': list(categories),
    'variants': {v: dataclasses.asdict(VARIANTS[v]) for v in present},
    'results': {v: {str(s): r for s, r in by_seed.items()} for v, by_seed in results.items()},
    **summary,
  }
  files.write_json(os.path.join(workdir, 'ablation.json'), _json_safe(payload))
  files.atomic_write(
    os.path.join(workdir, 'ablation.md'), markdown(summary, present, seeds, categories)
  )
  return summary


def _json_safe(x):
  """NaN -> None (strict JSON), recursively."""
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  if isinstance(x, float) and math.isnan(x):
    return None
  return x


def ablate(
  config: ml_collections.ConfigDict,
  workdir: str,
  seeds: Sequence[int] = (0, 1, 2),
  variants: Sequence[str] | None = None,
  categories: Sequence[str] | None = None,
) -> dict:
  """Trains and evaluates every variant x seed x category (skipping finished ones),
  writes DIR/ablation.{json,md} after each variant and seed, returns the summary."""
  names = ordered_variants(variants)
  seeds = [int(s) for s in seeds]
  if not seeds or len(set(seeds)) != len(seeds):
    raise config_lib.ConfigError(f'--seeds must name distinct seeds, got {seeds}')
  configs = {(v, s): variant_config(config, v, s) for s in seeds for v in names}
  for cfg in configs.values():  # every run's config is checked before anything trains
    config_lib.validate(cfg)
  categories = list(categories or run_all.discover_categories(config))
  results: dict[str, dict[int, dict]] = {}
  total = len(configs)
  for i, ((v, s), cfg) in enumerate(configs.items(), start=1):
    print(f'== ablation {i}/{total}: variant {v}, seed {s}', flush=True)
    results.setdefault(v, {})[s] = run_all.run_all(cfg, run_dir(workdir, v, s), categories)
    summary = write_tables(workdir, results, names, seeds, categories)
  return summary


def main(argv) -> None:
  def run(config, workdir):
    split = lambda text: [x for x in (text or '').split(',') if x]
    try:
      seeds = [int(x) for x in split(FLAGS.seeds)]
    except ValueError:
      raise config_lib.ConfigError(f'--seeds takes integers, got {FLAGS.seeds!r}') from None
    ablate(config, workdir, seeds, split(FLAGS.variants), split(FLAGS.categories))
    with open(os.path.join(workdir, 'ablation.md')) as f:
      print(f.read())

  cli.run(argv, run)


if __name__ == '__main__':
  cli.define_flags('Directory of the study: DIR/<variant>/seed<k>/<category>.')
  flags.DEFINE_string('seeds', '0,1,2', 'Comma-separated seeds (config.seed of each run).')
  flags.DEFINE_string(
    'variants', None, f'Comma-separated variants (default all): {", ".join(VARIANTS)}.'
  )
  flags.DEFINE_string('categories', None, 'Comma-separated categories (default: all).')
  app.run(main)
