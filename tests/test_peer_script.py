"""scripts/anomalib_rd_peer.py's steps that run in the project's virtualenv, through its
command line: what `export` writes is what the project's loaders give a run, and `score`
scores maps with the project's metrics. (Its `train` step needs anomalib, which the
project never installs.)"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import data_fixtures
import jax
import numpy as np
import pytest
from conftest import ROOT

from msrd_jax import data as data_lib
from msrd_jax import metrics, port, teacher

SCRIPT = os.path.join(ROOT, 'scripts', 'anomalib_rd_peer.py')


def _script(*args: str) -> subprocess.CompletedProcess:
  done = subprocess.run(
    [sys.executable, SCRIPT, *args],
    env=dict(os.environ, PYTHONPATH=ROOT),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr[-2000:]
  return done


def _noisy_tree(root) -> str:
  """An MVTec-layout category whose images are noise, so that resizing shows."""
  base = data_fixtures.make_mvtec_tree(root, 'widget', n_train=5, size=(41, 29))
  rng = np.random.default_rng(0)
  for path in glob.glob(os.path.join(base, '*', '*', '*.png')):
    if 'ground_truth' not in path:
      data_fixtures.write_image(path, rng.integers(0, 256, (29, 41, 3), np.uint8))
  return base


def test_export_writes_what_the_loaders_give_and_the_runs_teacher(tmp_path):
  _noisy_tree(tmp_path / 'data')
  out = tmp_path / 'peer'
  _script(
    'export',
    f'--root={tmp_path / "data"}',
    f'--out={out}',
    '--size=24',
    '--teacher-seed=3',
  )
  exported = np.load(out / 'widget.npz')
  test = data_lib.list_samples('mvtec', str(tmp_path / 'data'), 'widget', 'test')
  loader = data_lib.EvalLoader(test, 24, len(test), num_threads=1, mask_resize='bilinear')
  batch = next(iter(loader))
  np.testing.assert_array_equal(exported['test'], batch['image'])
  np.testing.assert_array_equal(exported['masks'], batch['mask'].astype(bool))
  assert exported['masks'].any()
  np.testing.assert_array_equal(exported['labels'], [s.label for s in test])
  train = data_lib.list_samples('mvtec', str(tmp_path / 'data'), 'widget', 'train')
  loader = data_lib.EvalLoader(train, 24, len(train), num_threads=1)
  np.testing.assert_array_equal(exported['train'], next(iter(loader))['image'])
  # The teacher in torch layout ports back to the runs' random teacher of that seed.
  state = dict(np.load(out / 'teacher.npz'))
  assert state['conv1.weight'].shape == (64, 3, 7, 7)
  back = port.convert_state_dict('resnet18', state)
  expected = teacher.init_teacher('resnet18', seed=3, warn=False)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, expected)
  check = np.load(out / 'teacher_check.npz')
  features = teacher.ResNet('resnet18').apply(expected, check['images'])
  for level, shape in enumerate(((2, 6, 6, 64), (2, 3, 3, 128), (2, 2, 2, 256))):
    np.testing.assert_array_equal(check[f'features{level}'], features[level])
    assert features[level].shape == shape
  assert json.loads((out / 'export.json').read_text())['categories'] == ['widget']


def test_score_uses_the_project_metrics_and_compares(tmp_path):
  _noisy_tree(tmp_path / 'data')
  out = tmp_path / 'peer'
  _script('export', f'--root={tmp_path / "data"}', f'--out={out}', '--size=24')
  truth = np.load(out / 'widget.npz')
  masks = truth['masks'].astype(np.float32)
  rng = np.random.default_rng(1)
  noisy = rng.random(masks.shape, dtype=np.float32)
  # What `train` writes: a perfect seed, a seed of noise.
  for seed, maps in ((0, masks + 0.01 * noisy), (1, noisy)):
    os.makedirs(out / 'anomalib_rd' / f'seed{seed}')
    np.savez(
      out / 'anomalib_rd' / f'seed{seed}' / 'widget.npz', amaps=maps, scores=maps.max((1, 2))
    )
  ours = tmp_path / 'ours' / 'seed0'
  os.makedirs(ours)
  (ours / 'results.json').write_text(
    json.dumps(
      {'widget': {'image_auroc': 0.5, 'pixel_auroc': 0.25, 'au_pro': 0.75, 'au_pro_rd4ad': 1}}
    )
  )
  done = _script('score', str(out), f'--compare={tmp_path / "ours"}')
  perfect = json.loads((out / 'anomalib_rd' / 'seed0' / 'results.json').read_text())['widget']
  assert perfect['image_auroc'] == perfect['pixel_auroc'] == 1.0
  assert perfect['au_pro'] == pytest.approx(1.0)
  chance = json.loads((out / 'anomalib_rd' / 'seed1' / 'results.json').read_text())['widget']
  assert chance['pixel_auroc'] == metrics.pixel_auroc(noisy, masks)
  mean = 100 * (1 + chance['image_auroc']) / 2
  assert f'anomalib RD: seeds [0, 1]: {mean:.1f} +- ' in done.stdout, done.stdout
  assert 'seeds [0]: 50.0 / 25.0 / 75.0 / 100.0' in done.stdout, done.stdout
  # Each seed's mean; RD4AD's AU-PRO is NaN on a perfect map (no false positive), shown '-'.
  assert '  seed 0: 100.0 / 100.0 / 100.0 / -\n' in done.stdout, done.stdout
  assert f'  seed 1: {100 * chance["image_auroc"]:.1f} / ' in done.stdout, done.stdout


def _pytorch_record(peer, category: str, epochs: int = 3, batch: int = 4) -> dict:
  """What `train --record` writes, made without anomalib: RD4AD's student as
  scripts/student_reference.py transcribes it (anomalib's key names), trained with RD4AD's
  loss and anomalib's Adam on the exported teacher's features, in float32 as anomalib
  trains. The teacher is frozen, so its features stand in for the images."""
  torch = pytest.importorskip('torch')
  sys.path.insert(0, os.path.join(ROOT, 'scripts'))
  import student_reference  # pylint: disable=g-import-not-at-top

  arrays = np.load(peer / f'{category}.npz')
  teacher_vars = port.convert_state_dict('resnet18', dict(np.load(peer / 'teacher.npz')))

  def features(images):
    out = teacher.ResNet('resnet18').apply(teacher_vars, images)
    return [torch.from_numpy(np.asarray(f).transpose(0, 3, 1, 2).copy()) for f in out]

  torch.manual_seed(0)
  model = student_reference.OwnRD()
  state = lambda: {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}  # noqa: E731
  init = state()
  optimizer = torch.optim.Adam(model.parameters(), lr=0.005, betas=(0.5, 0.99))
  train, orders, losses = features(arrays['train']), [], []
  model.train()
  for _ in range(epochs):
    order = torch.randperm(len(arrays['train']))
    orders.append(order.numpy())
    for i in range(0, len(order), batch):
      e = [f[order[i : i + batch]] for f in train]
      d, _ = model(e)
      loss = sum(
        torch.mean(1 - torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)))
        for a, b in zip(e, d)
      )
      optimizer.zero_grad()
      loss.backward()
      optimizer.step()
      losses.append(loss.item())
  model.eval()
  test = features(arrays['test'])
  with torch.no_grad():
    decoded = [t.numpy().transpose(0, 2, 3, 1) for t in model(test)[0]]
  os.makedirs(peer / 'anomalib_rd' / 'seed0')
  np.savez(
    peer / 'anomalib_rd' / 'seed0' / f'{category}.record.npz',
    orders=np.stack(orders),
    losses=np.array(losses),
    batch=batch,
    lr=0.005,
    betas=np.array([0.5, 0.99]),
    **{f'init/{k}': v for k, v in init.items()},
    **{f'trained/{k}': v for k, v in state().items()},
  )
  return {
    'losses': np.array(losses),
    'test_features': [t.numpy().transpose(0, 2, 3, 1) for t in test],
    'decoded': decoded,
  }


@pytest.mark.slow  # about 45 s: two training steps and the maps compile
def test_replay_trains_as_pytorch_from_its_initial_weights(tmp_path):
  """`replay` ports the recorded initial student, trains the project's plain RD on the
  recorded batches (the last one of an epoch smaller) and scores both students with the
  project's maps: its losses must follow PyTorch's step by step, and its maps of the
  PyTorch-trained student must be those of PyTorch's own forward (BatchNorm running
  statistics included)."""
  from msrd_jax import anomaly_map  # pylint: disable=g-import-not-at-top

  _noisy_tree(tmp_path / 'data')
  peer = tmp_path / 'peer'
  _script('export', f'--root={tmp_path / "data"}', f'--out={peer}', '--size=64')
  torch_run = _pytorch_record(peer, 'widget')
  done = _script('replay', str(peer), '--seeds=0')
  assert 'widget seed 0: 6 steps' in done.stdout, done.stdout
  losses = json.loads((peer / 'replay' / 'project' / 'seed0' / 'losses.json').read_text())
  ours, theirs = np.array(losses['widget']['project']), torch_run['losses']
  np.testing.assert_array_equal(losses['widget']['anomalib'], theirs)
  assert len(ours) == 3 * 2  # 5 images in batches of 4: 4, then 1
  np.testing.assert_allclose(ours[:2], theirs[:2], rtol=1e-4)
  np.testing.assert_allclose(ours, theirs, rtol=2e-2)
  # configs/mvtec.py's maps (align_corners, sigma 4) of PyTorch's decoded features.
  maps, scores = anomaly_map.anomaly_map(
    torch_run['test_features'], torch_run['decoded'], 64, align_corners=True
  )
  truth = np.load(peer / 'widget.npz')
  want = metrics.evaluate_all(np.asarray(scores), truth['labels'], np.asarray(maps), truth['masks'])
  got = json.loads((peer / 'replay' / 'anomalib_weights' / 'seed0' / 'results.json').read_text())
  for metric in ('image_auroc', 'pixel_auroc', 'au_pro'):
    assert got['widget'][metric] == pytest.approx(want[metric], abs=1e-3), metric
  project = json.loads((peer / 'replay' / 'project' / 'seed0' / 'results.json').read_text())
  assert 0 <= project['widget']['pixel_auroc'] <= 1
