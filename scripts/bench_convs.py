"""Single convolutions of the wide_resnet50_2 training step, in JAX (XLA:CPU) and PyTorch.

    python scripts/bench_convs.py [--batch 8] [--threads 2]

The shapes are the costliest convolutions of `python -m msrd_jax.benchmark profile
--config configs/mvtec.py` at 256 px (plain RD4AD: the teacher's, MFF's strided
convolutions, the OCE's and the decoder's). For each, the forward pass and the forward
plus backward pass (input and kernel gradients) are timed in both frameworks, in one
process, alternating, as the median of several calls after a warm-up. JAX runs
msrd_jax.layers.conv2d (XLA's convolution; the kernel gradient as matrix products),
PyTorch F.conv2d on channels-last tensors with autograd, both in float32.
Needs torch (tests' requirements). Figures are printed, never asserted; compare them
within one run only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from msrd_jax import layers

# (what, input side, C_in, C_out, kernel, stride) at 256 px input.
SHAPES = (
  ('teacher layer1 conv2', 64, 128, 128, 3, 1),
  ('teacher layer2_0 conv2', 64, 256, 256, 3, 2),
  ('MFF level1_down1', 64, 256, 512, 3, 2),
  ('MFF level1_down2', 32, 512, 1024, 3, 2),
  ('OCE layer_0 conv1', 16, 3072, 1024, 3, 2),
  ('OCE conv2', 8, 1024, 1024, 3, 1),
  ('decoder level1 conv2', 64, 128, 128, 3, 1),
  ('decoder level2 conv2', 32, 256, 256, 3, 1),
  ('decoder level3 conv2', 16, 512, 512, 3, 1),
  ('decoder level1 conv1 (1x1)', 64, 256, 128, 1, 1),
  ('decoder level1 conv3 (1x1)', 64, 128, 256, 1, 1),
)


def median_ms(fn, calls: int) -> float:
  fn()
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def compare(batch: int, side: int, cin: int, cout: int, k: int, s: int, calls: int):
  """(GFLOP, shape, JAX forward, torch forward, JAX fwd+bwd, torch fwd+bwd) in ms."""
  import torch
  import torch.nn.functional as F

  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, side, side, cin)).astype(np.float32)
  w = (rng.normal(size=(k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(np.float32)
  out_side = (side + 2 * (k // 2) - k) // s + 1
  g = rng.normal(size=(batch, out_side, out_side, cout)).astype(np.float32)
  gflop = 2 * batch * out_side**2 * k * k * cin * cout / 1e9

  conv = lambda x, w: layers.conv2d(x, w, s, k // 2)
  fwd = jax.jit(conv)
  both = jax.jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g))
  jx, jw, jg = map(jnp.asarray, (x, w, g))
  j_fwd = median_ms(lambda: fwd(jx, jw).block_until_ready(), calls)
  j_both = median_ms(lambda: jax.block_until_ready(both(jx, jw, jg)), calls)

  tx = torch.from_numpy(x).permute(0, 3, 1, 2)  # NCHW view of NHWC memory: channels last
  tw = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)
  tg = torch.from_numpy(g).permute(0, 3, 1, 2)
  with torch.no_grad():
    t_fwd = median_ms(lambda: F.conv2d(tx, tw, stride=s, padding=k // 2), calls)
  txr, twr = tx.clone().requires_grad_(True), tw.clone().requires_grad_(True)

  def torch_both():
    txr.grad = twr.grad = None
    F.conv2d(txr, twr, stride=s, padding=k // 2).backward(tg)

  t_both = median_ms(torch_both, calls)
  shape = f'{side}x{side}x{cin} -> {out_side}x{out_side}x{cout}'
  return gflop, shape, j_fwd, t_fwd, j_both, t_both


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--threads', type=int, default=2, help='torch.set_num_threads')
  parser.add_argument('--calls', type=int, default=5)
  args = parser.parse_args()
  import torch

  torch.set_num_threads(args.threads)
  print(
    f'jax {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch.__version__} '
    f'({torch.get_num_threads()} threads), batch {args.batch}, float32, ms per call'
  )
  header = f'{"convolution":<28} {"shape":<28} {"GFLOP":>6} | {"fwd JAX":>8} {"torch":>8} | '
  header += f'{"fwd+bwd JAX":>11} {"torch":>8} | {"JAX/torch fwd, fwd+bwd":>22}'
  print(header)
  for what, side, cin, cout, k, s in SHAPES:
    figures = compare(args.batch, side, cin, cout, k, s, args.calls)
    gflop, shape, j_fwd, t_fwd, j_both, t_both = figures
    print(
      f'{what:<28} {shape:<28} {gflop:6.1f} | {j_fwd:8.1f} {t_fwd:8.1f} | {j_both:11.1f} '
      f'{t_both:8.1f} | {j_fwd / t_fwd:10.2f} {j_both / t_both:10.2f}',
      flush=True,
    )


if __name__ == '__main__':
  main()
