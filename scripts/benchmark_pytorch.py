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
- inference (model.eval(), torch.no_grad()): anomaly maps and scores, at --batch and 1.
--compare takes the JSON files written by `python -m msrd_jax.benchmark ... --json` and
prints both side by side with the ratio. Figures are printed, never asserted.
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
    figures.append({'what': what, 'batch': batch, 'images_per_second': batch / median})
    print(
      f'anomalib RD {what} {args.backbone} {args.size}px batch {batch}: '
      f'{batch / median:8.2f} images/s, {1e3 * median / batch:.1f} ms/image '
      f'(windows {batch / hi:.2f}..{batch / lo:.2f}); torch {torch.__version__}, '
      f'{torch.get_num_threads()} threads',
      flush=True,
    )
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(figures, f, indent=2)
  ours = [m for path in args.compare for m in json.load(open(path))]
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


if __name__ == '__main__':
  main()
