"""Plain RD side by side with anomalib's reverse distillation: same teacher, same images.

Three steps in two virtualenvs; the middle one never imports msrd_jax (or JAX):

    # 1. the project's virtualenv: a benchmark's images at the run's size and the teacher
    #    a run used (random, from its seed, or a ported file), as numpy files
    python scripts/anomalib_rd_peer.py export --root workdirs/procedural_benchmark \\
        --out workdirs/peer_procedural --arch resnet18 --size 128 --teacher-seed 0
    # 2. a virtualenv of its own with torch==2.14.1 torchvision==0.29.1 anomalib==2.7.0:
    python scripts/anomalib_rd_peer.py train workdirs/peer_procedural --seeds 0,1,2
    # 3. the project's virtualenv: score anomalib's maps with msrd_jax.metrics, and
    #    compare with the project's runs (an ablation's `rd`, or any run_all folder
    #    holding seed<k>/results.json)
    python scripts/anomalib_rd_peer.py score workdirs/peer_procedural \\
        --compare workdirs/ablation_procedural_mvtec/rd

export: every category of --root (or --categories) in the MVTec layout; the training
images and the test images resized as the project's loaders resize them (RGB in [0, 1]),
the test masks resized with --mask-resize (RD4AD's 'bilinear' by default, as
`configs/mvtec.py`), the labels; the teacher in torch layout (`port.to_state_dict`), and
its features of two noise images, which `train` checks anomalib's encoder against.
The export keeps every training image: use it with runs whose calibration does not hold
any out (`calibration.source=train`, the default).

train: anomalib's `ReverseDistillation` (`pre_trained=False`, its pre-processor at
the exported size, its anomaly maps in 'add' mode) with the exported teacher loaded into
its encoder (checked first: its features of the exported check images must be the
project's teacher's to 1e-4 of the largest; the difference is printed). Trained as its
`training_step` does (the model's loss on a batch of pre-processed images) with the
optimizer of its `configure_optimizers` (Adam, lr 0.005, betas 0.5 / 0.99, on
bottleneck and decoder): --epochs passes over the shuffled training images in batches
of --batch, the last one smaller. Seed k seeds torch. Then the test set's anomaly maps
and scores (the maps' maximum, anomalib's `pred_score`) go to
OUT/anomalib_rd/seed<k>/<category>.npz; finished ones are skipped, so an interrupted
run resumes.

score: image AUROC, pixel AUROC and both AU-PROs with `msrd_jax.metrics`, written as
OUT/anomalib_rd/seed<k>/results.json in run_all's format; prints the mean over the
categories +- the standard deviation over seeds, then each seed's mean and each
category's, and the same for --compare.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import numpy as np

PEER = 'anomalib_rd'


def _categories(root: str, wanted: str | None) -> list[str]:
  if wanted:
    return wanted.split(',')
  return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


def export(args) -> None:
  # pylint: disable=g-import-not-at-top
  from msrd_jax import data as data_lib
  from msrd_jax import files, port
  from msrd_jax import teacher as teacher_lib

  os.makedirs(args.out, exist_ok=True)
  if args.teacher_weights:
    variables = teacher_lib.load_teacher(args.arch, args.teacher_weights)
  else:
    variables = teacher_lib.init_teacher(args.arch, seed=args.teacher_seed, warn=False)
  np.savez(os.path.join(args.out, 'teacher.npz'), **port.to_state_dict(args.arch, variables))
  size = args.size
  check = np.random.default_rng(0).random((2, size, size, 3), dtype=np.float32)
  features = teacher_lib.ResNet(args.arch).apply(variables, check)
  np.savez(
    os.path.join(args.out, 'teacher_check.npz'),
    images=check,
    **{f'features{i}': np.asarray(f) for i, f in enumerate(features)},
  )

  def load(samples, **options) -> dict:
    # The project's evaluation loader, all samples in one batch: the very arrays a run
    # is trained on and evaluated with.
    loader = data_lib.EvalLoader(samples, size, len(samples), num_threads=2, **options)
    return next(iter(loader))

  categories = _categories(args.root, args.categories)
  for category in categories:
    train = data_lib.list_samples('mvtec', args.root, category, 'train')
    test = data_lib.list_samples('mvtec', args.root, category, 'test')
    test_batch = load(test, mask_resize=args.mask_resize)
    np.savez(
      os.path.join(args.out, f'{category}.npz'),
      train=load(train)['image'],
      test=test_batch['image'],
      masks=test_batch['mask'].astype(bool),
      labels=np.array([s.label for s in test], np.int32),
    )
    print(f'{category}: {len(train)} training, {len(test)} test images', flush=True)
  files.write_json(
    os.path.join(args.out, 'export.json'), {**vars(args), 'categories': categories, 'func': None}
  )


def _to_torch(pre, images: np.ndarray):
  """(N, H, W, 3) in [0, 1] -> anomalib's pre-processed (N, 3, H, W) tensor."""
  import torch  # pylint: disable=g-import-not-at-top

  return pre.transform(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))))


def _module(exported: dict, teacher: dict):
  """(anomalib's ReverseDistillation at the exported size with the exported teacher in
  its encoder, its pre-processor)."""
  from anomalib.models import ReverseDistillation  # pylint: disable=g-import-not-at-top

  size = exported['size']
  pre = ReverseDistillation.configure_pre_processor(image_size=(size, size))
  module = ReverseDistillation(
    backbone=exported['arch'],
    pre_trained=False,
    pre_processor=pre,
    evaluator=False,
    visualizer=False,
  )
  missing, unexpected = module.model.encoder.feature_extractor.load_state_dict(
    teacher, strict=False
  )
  not_teacher = ('layer4.', 'fc.')
  if unexpected or any(
    not k.startswith(not_teacher) and not k.endswith('num_batches_tracked') for k in missing
  ):
    sys.exit(f"the exported teacher does not fit anomalib's encoder: {missing=} {unexpected=}")
  return module, pre


def _check_teacher(exported: dict, teacher: dict, check: dict) -> None:
  """Exits unless anomalib's encoder gives the project's teacher features (to 1e-4 of
  the largest) on the exported check images; prints how close they are."""
  import torch  # pylint: disable=g-import-not-at-top

  module, pre = _module(exported, teacher)
  module.model.eval()
  with torch.no_grad():
    features = list(module.model.encoder(_to_torch(pre, check['images'])).values())
  worst = 0.0
  for level, ours in enumerate(features):
    expected = check[f'features{level}']
    ours = ours.numpy().transpose(0, 2, 3, 1)
    if ours.shape != expected.shape:
      sys.exit(f'teacher level {level}: anomalib {ours.shape}, the project {expected.shape}')
    worst = max(worst, float(np.abs(ours - expected).max() / np.abs(expected).max()))
  print(f"anomalib's encoder against the project's teacher: {worst:.1e} of the largest feature")
  if worst > 1e-4:
    sys.exit("the teacher in anomalib differs from the project's; is teacher.npz from this export?")


def train(args) -> None:
  import torch  # pylint: disable=g-import-not-at-top

  with open(os.path.join(args.dir, 'export.json')) as f:
    exported = json.load(f)
  if args.threads:
    torch.set_num_threads(args.threads)
  teacher = {
    k: torch.from_numpy(v) for k, v in np.load(os.path.join(args.dir, 'teacher.npz')).items()
  }
  _check_teacher(exported, teacher, np.load(os.path.join(args.dir, 'teacher_check.npz')))
  for seed in [int(s) for s in args.seeds.split(',')]:
    out_dir = os.path.join(args.dir, PEER, f'seed{seed}')
    os.makedirs(out_dir, exist_ok=True)
    for category in args.categories.split(',') if args.categories else exported['categories']:
      out = os.path.join(out_dir, f'{category}.npz')
      if os.path.exists(out):
        print(f'{category} seed {seed}: done before, skipped', flush=True)
        continue
      torch.manual_seed(seed)
      module, pre = _module(exported, teacher)
      arrays = np.load(os.path.join(args.dir, f'{category}.npz'))

      x_train, x_test = _to_torch(pre, arrays['train']), _to_torch(pre, arrays['test'])
      optimizer = module.configure_optimizers()
      module.model.train()
      start, steps = time.perf_counter(), 0
      for _ in range(args.epochs):
        order = torch.randperm(len(x_train))
        for i in range(0, len(x_train), args.batch):
          loss = module.loss(*module.model(x_train[order[i : i + args.batch]]))
          optimizer.zero_grad()
          loss.backward()
          optimizer.step()
          steps += 1
      module.model.eval()
      maps, scores = [], []
      with torch.no_grad():
        for i in range(0, len(x_test), 16):
          result = module.model(x_test[i : i + 16])
          maps.append(result.anomaly_map[:, 0].numpy())
          scores.append(result.pred_score.reshape(-1).numpy())
      np.savez(out + '.tmp.npz', amaps=np.concatenate(maps), scores=np.concatenate(scores))
      os.replace(out + '.tmp.npz', out)
      print(
        f'{category} seed {seed}: {steps} steps in {time.perf_counter() - start:.0f} s, '
        f'last loss {loss.item():.4f}',
        flush=True,
      )


def _read_runs(folder: str) -> dict[int, dict]:
  """{seed: {category: metrics}} of a folder of seed<k>/results.json."""
  runs = {}
  for path in glob.glob(os.path.join(folder, 'seed*', 'results.json')):
    with open(path) as f:
      runs[int(os.path.basename(os.path.dirname(path))[4:])] = json.load(f)
  return runs


def score(args) -> None:
  from msrd_jax import ablate, files, metrics  # pylint: disable=g-import-not-at-top

  with open(os.path.join(args.dir, 'export.json')) as f:
    categories = json.load(f)['categories']
  peer_dir = os.path.join(args.dir, PEER)
  for seed_dir in sorted(glob.glob(os.path.join(peer_dir, 'seed*'))):
    results = {}
    for category in categories:
      path = os.path.join(seed_dir, f'{category}.npz')
      if os.path.exists(path):
        truth, maps = np.load(os.path.join(args.dir, f'{category}.npz')), np.load(path)
        results[category] = metrics.evaluate_all(
          maps['scores'], truth['labels'], maps['amaps'], truth['masks']
        )
    files.write_json(os.path.join(seed_dir, 'results.json'), results)
  runs = {'anomalib RD': _read_runs(peer_dir)}
  if args.compare:
    runs[args.compare] = _read_runs(args.compare)
  # The ablation's figures: a seed enters the mean once it has every category.
  summary = ablate.summarize(runs, categories)
  names = [h for _, h in ablate.METRICS]
  print(f'mean over {len(categories)} categories +- std over seeds, percent: ' + ' / '.join(names))
  for name in runs:
    means = summary['mean_over_categories'][name]
    print(
      f'{name}: seeds {[int(k) for k in means["image_auroc"]["values"]]}: '
      + ' / '.join(_cell(means[m]) for m, _ in ablate.METRICS)
    )
    # A metric that is NaN on some seed leaves that seed out of its values.
    for seed in sorted({int(s) for m, _ in ablate.METRICS for s in means[m]['values']}):
      values = [means[m]['values'].get(str(seed)) for m, _ in ablate.METRICS]
      print(f'  seed {seed}: ' + ' / '.join('-' if v is None else f'{100 * v:.1f}' for v in values))
    for category in categories:
      per = summary['per_category'][name][category]
      cells = [_cell(per[m], spread=False) for m, _ in ablate.METRICS]
      print(f'  {category}: ' + ('not run' if per['image_auroc']['n'] == 0 else ' / '.join(cells)))


def _cell(s: dict, spread: bool = True) -> str:
  """'mean +- std' in percent from ablate.stats; '-' without values."""
  if s['mean'] is None:
    return '-'
  std = f' +- {100 * s["std"]:.1f}' if spread and s['std'] is not None else ''
  return f'{100 * s["mean"]:.1f}{std}'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  sub = parser.add_subparsers(required=True)
  p = sub.add_parser('export', help='the project virtualenv: images, masks and the teacher')
  p.add_argument('--root', required=True, help='a benchmark in the MVTec layout')
  p.add_argument('--out', required=True)
  p.add_argument('--categories', help='comma-separated; default: every folder of --root')
  p.add_argument('--arch', default='resnet18')
  p.add_argument('--size', type=int, default=128, help='data.image_size of the runs')
  p.add_argument('--teacher-seed', type=int, default=0, help='the random teacher of the runs')
  p.add_argument('--teacher-weights', help='a ported teacher file instead of a random one')
  p.add_argument('--mask-resize', default='bilinear', choices=('nearest', 'bilinear'))
  p.set_defaults(func=export)
  p = sub.add_parser('train', help='the anomalib virtualenv: train and write the maps')
  p.add_argument('dir')
  p.add_argument('--seeds', default='0')
  p.add_argument('--categories', help='comma-separated; default: every exported one')
  p.add_argument('--epochs', type=int, default=40)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--threads', type=int, default=0, help="torch threads; 0: torch's default")
  p.set_defaults(func=train)
  p = sub.add_parser('score', help='the project virtualenv: metrics, and the comparison')
  p.add_argument('dir')
  p.add_argument('--compare', help="a folder with seed<k>/results.json, e.g. an ablation's rd")
  p.set_defaults(func=score)
  args = parser.parse_args()
  args.func(args)


if __name__ == '__main__':
  main()
