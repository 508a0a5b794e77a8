"""The PyTorch peer of `python -m msrd_jax.benchmark`: anomalib's reverse distillation.

Run in a virtualenv of its own (never the project's):

    python3 -m venv /path/to/torch-venv && . /path/to/torch-venv/bin/activate
    pip install torch==2.14.1 torchvision==0.29.1 anomalib==2.7.0
    python scripts/benchmark_pytorch.py --backbone wide_resnet50_2 --size 256 --batch 8 \
        [--compare msrd_train.json msrd_infer.json]

Measures, with random weights (pre_trained=False) and the same protocol as msrd_jax's
benchmark (warm-up call, `--repeats` windows of `--iters` calls, median and spread):
- the training step: encoder forward, bottleneck + decoder forward, anomalib's RD loss,
  backward, Adam (lr 0.005, betas 0.5 / 0.999) on bottleneck and decoder;
- inference (model.eval(), torch.no_grad()): anomaly maps and scores, at --batch and 1;
- the FLOPs of each, counted by torch.utils.flop_counter (convolutions and matrix
  products, forward and backward, two per multiply-add; elementwise work not counted),
  and the GFLOP/s they reach;
- `--peak`: the GFLOP/s of float32 n x n matrix products (n = 1024, 2048, 4096), the
  highest FLOP/s this machine gives PyTorch (`python -m msrd_jax.benchmark peak` is the
  same for XLA).
--compare takes the JSON files written by `python -m msrd_jax.benchmark ... --json` and
prints both side by side with the ratio, and what a target ratio would need in GFLOP/s
(`--target`, 1.5 by default) beside the fastest matrix product of either framework.
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def timed(fn, iters: int, repeats: int) -> tuple[float, float, float]:
  """(median, fastest, slowest) seconds per call over `repeats` windows."""
  fn()
  windows = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(iters):
      fn()
    windows.append((time.perf_counter() - start) / iters)
  return statistics.median(windows), min(windows), max(windows)


def count_flops(fn) -> int:
  """FLOPs of one call of fn, as torch.utils.flop_counter counts them."""
  from torch.utils.flop_counter import FlopCounterMode

  with FlopCounterMode(display=False) as counter:
    fn()
  return counter.get_total_flops()


PEAK_SIZES = (1024, 2048, 4096)


def matmul_peak(iters: int, repeats: int) -> list[dict]:
  """GFLOP/s of float32 n x n matrix products, one figure per n in PEAK_SIZES."""
  import torch

  out = []
  for n in PEAK_SIZES:
    a, b = torch.randn(n, n), torch.randn(n, n)
    median, lo, hi = timed(lambda a=a, b=b: torch.mm(a, b), iters, repeats)
    flops = 2.0 * n**3
    out.append({'what': 'matmul', 'image_size': n, 'gflops_per_second': flops / median / 1e9})
    print(
      f'torch matmul {n} x {n} float32: {flops / median / 1e9:8.1f} GFLOP/s '
      f'(windows {flops / hi / 1e9:.1f}..{flops / lo / 1e9:.1f})',
      flush=True,
    )
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--backbone', default='wide_resnet50_2')
  parser.add_argument('--size', type=int, default=256)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--iters', type=int, default=3)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads')
  parser.add_argument('--compare', nargs='*', default=[], help='msrd_jax benchmark JSON files')
  parser.add_argument('--json', default=None, help='write the figures to this file')
  parser.add_argument('--peak', action='store_true', help='also time float32 matrix products')
  parser.add_argument(
    '--target', type=float, default=1.5, help='--compare: the GFLOP/s this ratio would need'
  )
  args = parser.parse_args()

  import torch
  from anomalib.models.image.reverse_distillation.loss import ReverseDistillationLoss
  from anomalib.models.image.reverse_distillation.torch_model import ReverseDistillationModel

  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  model = ReverseDistillationModel(
    backbone=args.backbone,
    input_size=(args.size, args.size),
    layers=['layer1', 'layer2', 'layer3'],
    anomaly_map_mode='add',
    pre_trained=False,
  )
  loss_fn = ReverseDistillationLoss()
  optimizer = torch.optim.Adam(
    list(model.decoder.parameters()) + list(model.bottleneck.parameters()),
    lr=0.005,
    betas=(0.5, 0.999),
  )
  images = torch.rand(args.batch, 3, args.size, args.size)

  def train_step():
    model.train()
    optimizer.zero_grad()
    loss = loss_fn(*model(images))
    loss.backward()
    optimizer.step()

  def infer(batch):
    model.eval()
    with torch.no_grad():
      out = model(batch)
    return out.anomaly_map, out.pred_score

  one = images[:1]
  figures = []
  for what, fn, batch in (
    ('train step', train_step, args.batch),
    ('inference', lambda: infer(images), args.batch),
    ('inference', lambda: infer(one), 1),
  ):
    median, lo, hi = timed(fn, args.iters, args.repeats)
    flops = count_flops(fn) / batch
    figures.append(
      {
        'what': what,
        'batch': batch,
        'images_per_second': batch / median,
        'flops_per_image': flops,
        'gflops_per_second': flops * batch / median / 1e9,
      }
    )
    print(
      f'anomalib RD {what} {args.backbone} {args.size}px batch {batch}: '
      f'{batch / median:8.2f} images/s, {1e3 * median / batch:.1f} ms/image '
      f'(windows {batch / hi:.2f}..{batch / lo:.2f}), {flops / 1e9:.1f} GFLOP/image, '
      f'{flops * batch / median / 1e9:.1f} GFLOP/s; torch {torch.__version__}, '
      f'{torch.get_num_threads()} threads',
      flush=True,
    )
  peaks = matmul_peak(args.iters, args.repeats) if args.peak else []
  figures += peaks
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(figures, f, indent=2)
  ours = [m for path in args.compare for m in json.load(open(path))]
  peaks += [dict(m, framework='XLA') for m in ours if m['what'] == 'matmul']
  ours = [m for m in ours if m['what'] != 'matmul']
  if ours:
    print('\n| what | batch | anomalib RD | msrd_jax | ratio |\n|---|---:|---:|---:|---:|')
    for t in figures:
      for m in ours:
        if m['what'] == t['what'] and m['batch'] == t['batch']:
          ratio = m['images_per_second'] / t['images_per_second']
          print(
            f'| {t["what"]} ({m.get("details", "").strip()}) | {t["batch"]} | '
            f'{t["images_per_second"]:.2f} | {m["images_per_second"]:.2f} | {ratio:.2f}x |'
          )
    print(
      f"\n{args.target}x anomalib's images/s at its FLOPs per image (counted above) would "
      'need, in GFLOP/s:'
    )
    for t in figures:
      if t['what'] != 'matmul':
        need = args.target * t['gflops_per_second']
        print(
          f'  {t["what"]} batch {t["batch"]}: {need:.1f} (anomalib: {t["gflops_per_second"]:.1f})'
        )
    for p in peaks:
      print(
        f'  the fastest float32 matmul here, {p.get("framework", "torch")} '
        f'{p["image_size"]} x {p["image_size"]}: {p["gflops_per_second"]:.1f}'
      )


if __name__ == '__main__':
  main()
