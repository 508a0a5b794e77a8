"""Kernel gradient of a convolution: XLA's own against msrd_jax.layers' matrix products.

    python scripts/bench_conv_grad.py [--batch 4]

At the student's shapes, times the kernel gradient as XLA differentiates
lax.conv_general_dilated and as msrd_jax.layers.kernel_grad computes it (one matrix
product per kernel tap), interleaved in one run, and checks that both agree. Figures are
printed, never asserted; compare them within one run only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from msrd_jax import layers

SHAPES = (  # (H, C_in, C_out, kernel, stride): decoder and fusion convs of wide_resnet50_2
  (32, 512, 512, 3, 1),
  (64, 256, 256, 3, 1),
  (32, 1024, 256, 1, 1),
  (32, 256, 512, 3, 2),
)


def _xla_conv(x, k, stride):
  p = k.shape[0] // 2
  return lax.conv_general_dilated(
    x, k, (stride, stride), ((p, p), (p, p)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


def _time(fn, *args, repeats=3) -> float:
  jax.block_until_ready(fn(*args))
  windows = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    windows.append(time.perf_counter() - start)
  return statistics.median(windows)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--batch', type=int, default=4)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  for h, c, o, size, stride in SHAPES:
    x = jnp.asarray(rng.random((args.batch, h, h, c)), jnp.float32)
    k = jnp.asarray(rng.random((size, size, c, o)) * 0.01, jnp.float32)
    g = jnp.asarray(rng.random((args.batch, h // stride, h // stride, o)), jnp.float32)
    xla = jax.jit(lambda k, x, g, s=stride: jax.vjp(lambda k: _xla_conv(x, k, s), k)[1](g)[0])
    ours = jax.jit(lambda x, g, n=size, s=stride: layers.kernel_grad(x, g, n, s, n // 2))
    a, b = xla(k, x, g), ours(x, g)
    err = float(jnp.abs(a - b).max() / jnp.abs(a).max())
    t_xla, t_ours = _time(xla, k, x, g), _time(ours, x, g)
    print(
      f'{h}x{h} {c}->{o} {size}x{size}/{stride} batch {args.batch}: XLA {1e3 * t_xla:8.1f} ms, '
      f'per-tap products {1e3 * t_ours:8.1f} ms, {t_xla / t_ours:4.1f}x; max rel. diff {err:.1e}',
      flush=True,
    )


if __name__ == '__main__':
  main()
