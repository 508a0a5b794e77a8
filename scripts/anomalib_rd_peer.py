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

and, to tell the implementations apart from their random draws, the project's RD from
anomalib's very initial weights on anomalib's very batches:

    python scripts/anomalib_rd_peer.py train workdirs/peer_procedural --seeds 0 --record
    python scripts/anomalib_rd_peer.py replay workdirs/peer_procedural --seeds 0

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
run resumes. --record also writes <category>.record.npz: the student's initial and
trained state_dicts (bottleneck and decoder), each epoch's permutation, each step's
loss, the batch size and Adam's lr and betas (about 130 MB for resnet18); recording
draws no random numbers, so the run is the same with or without it.

replay (the project's virtualenv): for each recorded category, `configs/mvtec.py`'s
plain RD (the ablation's `rd`) with the record's lr, betas and batch size, its initial
weights ported from the record (`port.convert_rd_student`), trained on the recorded
batches in their order with the project's training step. Prints the mean loss of each
tenth of the steps for both and their relative difference at the first steps; scores
the project's student and anomalib's trained one, both with the project's maps and
metrics, into OUT/replay/{project,anomalib_weights}/seed<k>/results.json (folders that
`score --compare` reads; categories replayed before are kept) and writes both loss
curves to OUT/replay/project/seed<k>/losses.json.

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
REPLAY = 'replay'
CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'configs', 'mvtec.py')


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
      record = os.path.join(out_dir, f'{category}.record.npz')
      if os.path.exists(out) and (os.path.exists(record) or not args.record):
        print(f'{category} seed {seed}: done before, skipped', flush=True)
        continue
      torch.manual_seed(seed)
      module, pre = _module(exported, teacher)
      arrays = np.load(os.path.join(args.dir, f'{category}.npz'))

      x_train, x_test = _to_torch(pre, arrays['train']), _to_torch(pre, arrays['test'])
      optimizer = module.configure_optimizers()
      init = _student_state(module.model)
      module.model.train()
      start, orders, losses = time.perf_counter(), [], []
      for _ in range(args.epochs):
        order = torch.randperm(len(x_train))
        orders.append(order.numpy())
        for i in range(0, len(x_train), args.batch):
          loss = module.loss(*module.model(x_train[order[i : i + args.batch]]))
          optimizer.zero_grad()
          loss.backward()
          optimizer.step()
          losses.append(loss.item())
      steps = len(losses)
      if args.record:
        group = optimizer.param_groups[0]
        _save(
          record,
          orders=np.stack(orders),
          losses=np.array(losses),
          batch=args.batch,
          lr=group['lr'],
          betas=np.array(group['betas']),
          **{f'init/{k}': v for k, v in init.items()},
          **{f'trained/{k}': v for k, v in _student_state(module.model).items()},
        )
      module.model.eval()
      maps, scores = [], []
      with torch.no_grad():
        for i in range(0, len(x_test), 16):
          result = module.model(x_test[i : i + 16])
          maps.append(result.anomaly_map[:, 0].numpy())
          scores.append(result.pred_score.reshape(-1).numpy())
      _save(out, amaps=np.concatenate(maps), scores=np.concatenate(scores))
      print(
        f'{category} seed {seed}: {steps} steps in {time.perf_counter() - start:.0f} s, '
        f'last loss {loss.item():.4f}',
        flush=True,
      )


def _student_state(model) -> dict[str, np.ndarray]:
  """anomalib's student (bottleneck and decoder) as a state_dict of numpy copies."""
  return {
    f'{name}.{k}': v.detach().numpy().copy()
    for name in ('bottleneck', 'decoder')
    for k, v in getattr(model, name).state_dict().items()
  }


def _save(path: str, **arrays) -> None:
  """np.savez through a temporary file, so that an interrupted run leaves no half file."""
  np.savez(path + '.tmp.npz', **arrays)
  os.replace(path + '.tmp.npz', path)


def replay(args) -> None:
  """The project's plain RD from anomalib's initial weights on anomalib's batches."""
  # pylint: disable=g-import-not-at-top
  import importlib.util

  import jax
  import jax.numpy as jnp

  from msrd_jax import ablate, metrics, port
  from msrd_jax import train as train_lib
  from msrd_jax.inference import make_predict_fn
  from msrd_jax.model import MSRD

  with open(os.path.join(args.dir, 'export.json')) as f:
    exported = json.load(f)
  spec = importlib.util.spec_from_file_location('mvtec', CONFIG)
  mvtec = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mvtec)
  teacher_vars = port.convert_state_dict(
    exported['arch'], dict(np.load(os.path.join(args.dir, 'teacher.npz')))
  )
  setups = {}

  def setup(lr: float, b1: float, b2: float):
    """(config, model, template, tx, jitted step, predict) of one optimizer setting,
    built and compiled once for all the records that share it."""
    if (lr, b1, b2) not in setups:
      # configs/mvtec.py's plain RD, with anomalib's optimizer and the export's sizes.
      config = mvtec.get_config()
      config.model.backbone = exported['arch']
      config.data.image_size = exported['size']
      config.train.learning_rate, config.train.b1, config.train.b2 = lr, b1, b2
      config = ablate.variant_config(config, ablate.BASELINE, config.seed)
      model = MSRD(config)
      tx = train_lib.make_optimizer(config)
      setups[lr, b1, b2] = (
        config,
        model.abstract_variables(exported['size']),
        tx,
        jax.jit(train_lib.make_train_step(model, tx, config, axis_name=None)),
        make_predict_fn(model, config),
      )
    return setups[lr, b1, b2]

  for seed in [int(s) for s in args.seeds.split(',')]:
    peer_dir = os.path.join(args.dir, PEER, f'seed{seed}')
    for category in args.categories.split(',') if args.categories else exported['categories']:
      path = os.path.join(peer_dir, f'{category}.record.npz')
      if not os.path.exists(path):
        print(f'{category} seed {seed}: no {path} (train --record), skipped', flush=True)
        continue
      record, arrays = np.load(path), np.load(os.path.join(args.dir, f'{category}.npz'))
      config, template, tx, step, predict = setup(
        float(record['lr']), *(float(b) for b in record['betas'])
      )

      def student(prefix: str, record=record, template=template) -> dict:
        n = len(prefix)
        state = {k[n:]: record[k] for k in record.files if k.startswith(prefix)}
        return port.convert_rd_student(state, template)

      init = student('init/')
      state = train_lib.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=init['params'],
        batch_stats=init['batch_stats'],
        opt_state=tx.init(init['params']),
      )
      batch, ours = int(record['batch']), []
      start = time.perf_counter()
      for order in record['orders']:
        for i in range(0, len(order), batch):
          state, m = step(state, teacher_vars, jnp.asarray(arrays['train'][order[i : i + batch]]))
          ours.append(float(m['loss']))
      theirs, ours = record['losses'], np.array(ours)
      print(f'{category} seed {seed}: {len(ours)} steps in {time.perf_counter() - start:.0f} s')
      print('  loss, mean of each tenth of the steps: project / anomalib')
      print('  ' + ', '.join(f'{a:.4f}/{b:.4f}' for a, b in _tenths(ours, theirs)))
      first = [f'{abs(a - b) / abs(b):.0e}' for a, b in zip(ours[:4], theirs[:4])]
      print(f'  relative difference at steps 0-3: {", ".join(first)}')
      folder = os.path.join(args.dir, REPLAY, '{}', f'seed{seed}')
      _merge_json(
        os.path.join(folder.format('project'), 'losses.json'),
        {category: {'project': ours.tolist(), 'anomalib': theirs.tolist()}},
      )
      trained = {'params': state.params, 'batch_stats': state.batch_stats}
      for name, variables in (
        ('project', trained),
        ('anomalib_weights', student('trained/')),
      ):
        maps, scores = [], []
        for i in range(0, len(arrays['test']), config.eval.batch_size):
          m, s = predict(teacher_vars, variables, arrays['test'][i : i + config.eval.batch_size])
          maps.append(np.asarray(m))
          scores.append(np.asarray(s))
        result = metrics.evaluate_all(
          np.concatenate(scores), arrays['labels'], np.concatenate(maps), arrays['masks']
        )
        # Folders of seed<k>/results.json, as `score --compare` reads them, with the
        # categories replayed before.
        _merge_json(os.path.join(folder.format(name), 'results.json'), {category: result})
        cells = ' / '.join(f'{100 * result[m]:.1f}' for m, _ in ablate.METRICS)
        print(f'  {name}: {cells}', flush=True)


def _merge_json(path: str, payload: dict) -> None:
  """Writes `payload` into the JSON object at `path`, keeping its other keys."""
  from msrd_jax import files  # pylint: disable=g-import-not-at-top

  if os.path.exists(path):
    with open(path) as f:
      payload = {**json.load(f), **payload}
  files.write_json(path, payload)


def _tenths(ours: np.ndarray, theirs: np.ndarray):
  for part_a, part_b in zip(np.array_split(ours, 10), np.array_split(theirs, 10)):
    yield float(part_a.mean()), float(part_b.mean())


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
  p.add_argument(
    '--record',
    action='store_true',
    help='also write <category>.record.npz: initial and trained student, batch order, losses',
  )
  p.set_defaults(func=train)
  p = sub.add_parser(
    'replay', help="the project virtualenv: the project's RD from anomalib's init and batches"
  )
  p.add_argument('dir')
  p.add_argument('--seeds', default='0')
  p.add_argument('--categories', help='comma-separated; default: every exported one')
  p.set_defaults(func=replay)
  p = sub.add_parser('score', help='the project virtualenv: metrics, and the comparison')
  p.add_argument('dir')
  p.add_argument('--compare', help="a folder with seed<k>/results.json, e.g. an ablation's rd")
  p.set_defaults(func=score)
  args = parser.parse_args()
  args.func(args)


if __name__ == '__main__':
  main()
