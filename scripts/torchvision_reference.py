"""Reference outputs from real torchvision for the teacher's parity checks.

Needs torch and torchvision (a scratch environment; neither is a project dependency):

  python scripts/torchvision_reference.py manifests   # tests/fixtures/manifests/*.json
  python scripts/torchvision_reference.py fixtures    # tests/fixtures/teacher_parity.npz
  python scripts/torchvision_reference.py parity      # full-size parity table (also
                                                      # needs msrd_jax's requirements)
  python scripts/torchvision_reference.py speed       # torchvision's teacher forward,
                                                      # images/s (compare with
                                                      # `python -m msrd_jax.benchmark teacher`)

`fixtures` builds reduced-depth torchvision ResNets (tests/teacher_fixture_recipe.py),
loads random weights and random BatchNorm statistics into them and stores their layer1..3
outputs; the test regenerates the same weights without torch, ports them and compares.
`parity` does the same for the five full architectures at 256, 224 and 250 pixels,
through a real .pth file and `python -m msrd_jax.port`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, 'tests'))
sys.path.insert(0, ROOT)

import teacher_fixture_recipe as recipe  # noqa: E402  (needs the path above)

ARCHS = ('resnet18', 'resnet34', 'resnet50', 'wide_resnet50_2', 'wide_resnet101_2')


def _torch():
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top

  torch.set_grad_enabled(False)
  return torch, torchvision


def _randomize(model, seed):
  torch, _ = _torch()
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  state = recipe.random_state_dict(shapes, seed)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
  return model.eval(), state


def _features(model, images: np.ndarray) -> list[np.ndarray]:
  """layer1..3 outputs as NHWC float32 for NHWC images in [0, 1]."""
  torch, _ = _torch()
  mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
  std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
  x = (torch.from_numpy(images).permute(0, 3, 1, 2) - mean) / std
  x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
  out = []
  for layer in (model.layer1, model.layer2, model.layer3):
    x = layer(x)
    out.append(x.permute(0, 2, 3, 1).contiguous().numpy())
  return out


def manifests(out_dir: str) -> None:
  torch, torchvision = _torch()
  os.makedirs(out_dir, exist_ok=True)
  for arch in ARCHS:
    model = getattr(torchvision.models, arch)(weights=None)
    keys = {k: list(v.shape) for k, v in model.state_dict().items()}
    path = os.path.join(out_dir, f'{arch}.json')
    with open(path, 'w') as f:
      json.dump({'torchvision': torchvision.__version__, 'arch': arch, 'keys': keys}, f, indent=0)
    print(f'{path}: {len(keys)} keys')


def fixtures(path: str) -> None:
  torch, torchvision = _torch()
  from torchvision.models import resnet as tvr  # pylint: disable=g-import-not-at-top

  arrays = {'torchvision_version': np.array(torchvision.__version__)}
  for name, cfg in recipe.FIXTURE_CONFIGS.items():
    block = tvr.BasicBlock if cfg['block'] == 'basic' else tvr.Bottleneck
    model = tvr.ResNet(block, list(cfg['layers']), width_per_group=cfg['width_per_group'])
    _, state = _randomize(model, recipe.WEIGHT_SEED)
    arrays[f'{name}/manifest'] = np.array(json.dumps({k: list(v.shape) for k, v in state.items()}))
    for b, h, w in recipe.FIXTURE_INPUTS:
      images = recipe.random_images(b, h, w, recipe.IMAGE_SEED)
      for level, feat in enumerate(_features(model, images), start=1):
        arrays[f'{name}/{h}x{w}/e{level}'] = feat.astype(np.float32)
  np.savez_compressed(path, **arrays)
  print(f'{path}: {os.path.getsize(path) / 2**20:.2f} MiB')


def parity() -> None:
  torch, torchvision = _torch()
  from msrd_jax import port, teacher  # pylint: disable=g-import-not-at-top

  print(f'torch {torch.__version__}, torchvision {torchvision.__version__}')
  print('| arch | input | e1 | e2 | e3 |  (max|jax - torch| / max|torch|)')
  print('|---|---|---|---|---|')
  worst = 0.0
  with tempfile.TemporaryDirectory() as tmp:
    for arch in ARCHS:
      model, state = _randomize(getattr(torchvision.models, arch)(weights=None), recipe.WEIGHT_SEED)
      pth = os.path.join(tmp, f'{arch}.pth')
      torch.save(model.state_dict(), pth)
      out = os.path.join(tmp, f'{arch}.msgpack')
      assert port.main(['--arch', arch, '--input', pth, '--output', out]) == 0
      variables = teacher.load_teacher(arch, out)
      for size in (256, 224, 250):
        images = recipe.random_images(2, size, size, recipe.IMAGE_SEED)
        ref = _features(model, images)
        got = teacher._forward(variables, images, arch)  # pylint: disable=protected-access
        errs = [float(np.abs(np.asarray(g) - r).max() / np.abs(r).max()) for g, r in zip(got, ref)]
        worst = max(worst, *errs)
        print(
          f'| {arch} | {size}x{size} | ' + ' | '.join(f'{e:.2e}' for e in errs) + ' |', flush=True
        )
  print(f'worst: {worst:.2e}')


def speed(size: int = 256, batch: int = 8, iters: int = 3, repeats: int = 3) -> None:
  """torchvision's layer1..3 forward on this machine, as msrd_jax.benchmark measures."""
  import statistics  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top

  torch, torchvision = _torch()
  print(
    f'torch {torch.__version__}, {torch.get_num_threads()} threads, '
    f'device {"cuda" if torch.cuda.is_available() else "cpu"} (CPU used)'
  )
  images = recipe.random_images(batch, size, size, recipe.IMAGE_SEED)
  for arch in ARCHS:
    model = getattr(torchvision.models, arch)(weights=None).eval()
    _features(model, images)  # warm-up
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      for _ in range(iters):
        _features(model, images)
      times.append((time.perf_counter() - start) / iters)
    print(
      f'torchvision {arch:>16} {size}x{size} batch {batch}: '
      f'{batch / statistics.median(times):8.1f} images/s',
      flush=True,
    )


def main() -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('what', choices=('manifests', 'fixtures', 'parity', 'speed'))
  args = parser.parse_args()
  if args.what == 'manifests':
    manifests(os.path.join(ROOT, 'tests', 'fixtures', 'manifests'))
  elif args.what == 'fixtures':
    fixtures(os.path.join(ROOT, 'tests', 'fixtures', 'teacher_parity.npz'))
  elif args.what == 'parity':
    parity()
  else:
    speed()


if __name__ == '__main__':
  main()
