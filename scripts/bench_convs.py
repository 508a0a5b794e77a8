"""Single convolutions of the wide_resnet50_2 training step, in JAX (XLA:CPU) and PyTorch.

    python scripts/bench_convs.py [--batch 8] [--threads 2] [--shapes model|sweep]

The shapes are the costliest convolutions of `python -m msrd_jax.benchmark profile
--config configs/mvtec.py` at 256 px (plain RD4AD: the teacher's, MFF's strided
convolutions, the OCE's and the decoder's); `--shapes sweep` times a grid of 3x3
kernels with small outputs instead. For each, the forward pass and the forward
plus backward pass (input and kernel gradients) are timed in both frameworks, in one
process, alternating, as the median of several calls after a warm-up. JAX runs
msrd_jax.layers.conv2d twice: as XLA's convolution (`patches=False`; the kernel gradient
as `kernel_grad_method` chooses) and as one matrix product over the input's shifted
copies (`patches=True`), which conv2d uses on XLA:CPU for outputs of at most 8 x 8
positions (`layers.use_patches`). PyTorch F.conv2d on channels-last tensors with
autograd. All in float32.
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
  ('OCE layer_0 conv1 (1x1)', 16, 3072, 1024, 1, 1),
  ('OCE layer_0 conv2', 16, 1024, 1024, 3, 2),
  ('OCE conv2', 8, 1024, 1024, 3, 1),
  ('decoder level1 conv2', 64, 128, 128, 3, 1),
  ('decoder level2 conv2', 32, 256, 256, 3, 1),
  ('decoder level3 conv2', 16, 512, 512, 3, 1),
  ('decoder level1 conv1 (1x1)', 64, 256, 128, 1, 1),
  ('decoder level1 conv3 (1x1)', 64, 128, 256, 1, 1),
)


# `--shapes sweep`: 3x3 kernels at outputs of 4 x 4 to 16 x 16 positions, stride 1 and 2,
# the grid on which layers.use_patches was chosen.
SWEEP = tuple(
  (f'sweep {out}x{out} s{s}', out * s, cin, cout, 3, s)
  for out in (4, 8, 16)
  for cin, cout in ((256, 256), (512, 512), (1024, 1024), (2048, 512))
  for s in (1, 2)
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
  """(GFLOP, shape, then forward and forward + backward, each as JAX's convolution,
  JAX's patches product, torch) in ms."""
  import torch
  import torch.nn.functional as F

  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, side, side, cin)).astype(np.float32)
  w = (rng.normal(size=(k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(np.float32)
  out_side = (side + 2 * (k // 2) - k) // s + 1
  g = rng.normal(size=(batch, out_side, out_side, cout)).astype(np.float32)
  gflop = 2 * batch * out_side**2 * k * k * cin * cout / 1e9

  jx, jw, jg = map(jnp.asarray, (x, w, g))
  jax_ms = []
  for patches in (False, True) if k > 1 else (False,):  # a 1x1 kernel is a product anyway
    conv = lambda x, w, p=patches: layers.conv2d(x, w, s, k // 2, patches=p)
    fwd = jax.jit(conv)
    both = jax.jit(lambda x, w, g, c=conv: jax.vjp(c, x, w)[1](g))
    jax_ms.append(median_ms(lambda f=fwd: f(jx, jw).block_until_ready(), calls))
    jax_ms.append(median_ms(lambda b=both: jax.block_until_ready(b(jx, jw, jg)), calls))
  j_fwd, j_both, p_fwd, p_both = jax_ms + [float('nan')] * (4 - len(jax_ms))

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
  return gflop, shape, (j_fwd, p_fwd, t_fwd), (j_both, p_both, t_both)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--threads', type=int, default=2, help='torch.set_num_threads')
  parser.add_argument('--calls', type=int, default=5)
  parser.add_argument(
    '--shapes', choices=('model', 'sweep'), default='model', help="the step's or the grid's"
  )
  args = parser.parse_args()
  import torch

  torch.set_num_threads(args.threads)
  print(
    f'jax {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch.__version__} '
    f'({torch.get_num_threads()} threads), batch {args.batch}, float32, ms per call'
  )
  print("JAX: XLA's convolution; patches: the matrix product over shifted copies")
  three = f'{"JAX":>7} {"patches":>7} {"torch":>7}'
  header = f'{"convolution":<28} {"shape":<28} {"GFLOP":>6} | fwd {three} | fwd+bwd {three} | '
  header += 'JAX/torch fwd, fwd+bwd'
  print(header)
  for what, side, cin, cout, k, s in SHAPES if args.shapes == 'model' else SWEEP:
    gflop, shape, fwd, both = compare(args.batch, side, cin, cout, k, s, args.calls)
    row = lambda ms: ' '.join(f'{t:7.1f}' for t in ms)
    print(
      f'{what:<28} {shape:<28} {gflop:6.1f} | fwd {row(fwd)} | fwd+bwd {row(both)} | '
      f'{fwd[0] / fwd[2]:10.2f} {both[0] / both[2]:10.2f}',
      flush=True,
    )


if __name__ == '__main__':
  main()
