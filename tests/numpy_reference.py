"""Independent numpy transcriptions shared by several tests."""

from __future__ import annotations

import numpy as np


def bilinear_resize(
  x: np.ndarray, out_hw: tuple[int, int], axes=(0, 1), align_corners: bool = False
) -> np.ndarray:
  """PyTorch's F.interpolate(mode='bilinear') upsampling, one spatial axis at a time.

  align_corners=False: half-pixel centres (source (i + 0.5) n / out - 0.5, clamped at 0);
  True: corner centres aligned (source i (n - 1) / (out - 1)).
  """
  x = np.asarray(x, np.float64)
  for axis, out in zip(axes, out_hw):
    n = x.shape[axis]
    if align_corners:
      src = np.arange(out) * (n - 1) / max(out - 1, 1)
    else:
      src = np.clip((np.arange(out) + 0.5) * n / out - 0.5, 0, None)
    i0 = np.minimum(np.floor(src).astype(int), n - 1)
    i1 = np.minimum(i0 + 1, n - 1)
    f = (src - i0).reshape(-1, *([1] * (x.ndim - 1)))
    x = np.moveaxis(x, axis, 0)
    x = np.moveaxis(x[i0] * (1 - f) + x[i1] * f, 0, axis)
  return x
