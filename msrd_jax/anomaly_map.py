"""Anomaly maps from teacher and student features (design.md section 7).

All functions are pure JAX, batched and jit-compatible; features are NHWC. The map of a
batch is `anomaly_map(teacher_feats, student_feats, out_size)`: per level 1 - cos, resized
to the input size, summed over levels, Gaussian-blurred, and its maximum is the image
score.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# torch.nn.functional.cosine_similarity's default eps.
COSINE_EPS = 1e-8


def cosine_distance_map(e: jax.Array, d: jax.Array, eps: float = COSINE_EPS) -> jax.Array:
  """1 - cosine similarity over channels at every position.

  e, d: (B, h, w, C) teacher and student features (any float dtype; computed in float32
  or wider). Returns (B, h, w) float32 in [0, 2].

  As torch.nn.functional.cosine_similarity (PyTorch >= 1.12, which RD4AD's code calls):
  each norm is clamped separately, cos = <e, d> / (max(|e|, eps) * max(|d|, eps)), so
  a zero vector gives cos 0 and distance 1.
  """
  if e.shape != d.shape:
    raise ValueError(
      f'teacher and student features must have the same shape; got {e.shape} and {d.shape}.'
    )
  dtype = jnp.promote_types(jnp.result_type(e, d), jnp.float32)
  e, d = e.astype(dtype), d.astype(dtype)
  dot = jnp.sum(e * d, axis=-1)
  norm_e = jnp.maximum(jnp.sqrt(jnp.sum(e * e, axis=-1)), eps)
  norm_d = jnp.maximum(jnp.sqrt(jnp.sum(d * d, axis=-1)), eps)
  return (1.0 - dot / (norm_e * norm_d)).astype(jnp.float32)


def _gaussian_kernel(sigma: float, truncate: float) -> np.ndarray:
  # scipy.ndimage.gaussian_filter1d's kernel, in float64 then rounded once.
  radius = int(truncate * float(sigma) + 0.5)
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  phi = np.exp(-0.5 / (float(sigma) ** 2) * x**2)
  return phi / phi.sum()


def _reflect_indices(n: int, radius: int) -> np.ndarray:
  """Indices into an axis of length n for positions -radius .. n - 1 + radius under
  scipy.ndimage's 'reflect' mode (d c b a | a b c d | d c b a), repeated for any radius:
  the extended signal is periodic with period 2n."""
  i = np.arange(-radius, n + radius) % (2 * n)
  return np.where(i < n, i, 2 * n - 1 - i)


def _blur_axis(x: jax.Array, kernel: np.ndarray, axis: int) -> jax.Array:
  n, radius = x.shape[axis], (kernel.size - 1) // 2
  padded = jnp.take(x, jnp.asarray(_reflect_indices(n, radius)), axis=axis)
  # A sum of shifted slices rather than a convolution or a matmul: exact float32
  # multiply-adds on every backend (GPU convolutions and matmuls may run in TF32).
  out = jnp.zeros_like(x)
  for k, w in enumerate(kernel):
    out = out + jnp.asarray(w, x.dtype) * jax.lax.slice_in_dim(padded, k, k + n, axis=axis)
  return out


@functools.partial(jax.jit, static_argnames=('sigma', 'truncate'))
def gaussian_blur(maps: jax.Array, sigma: float = 4.0, truncate: float = 4.0) -> jax.Array:
  """Gaussian blur of a batch of maps, as scipy.ndimage.gaussian_filter on each map.

  maps: (B, H, W) float. Returns (B, H, W), maps' dtype (float32 for integer input).
  sigma, truncate: Python floats (static; jitted). Same kernel as scipy: radius
  int(truncate * sigma + 0.5), weights exp(-x^2 / (2 sigma^2)) normalized to sum 1,
  applied separably along H then W. Border rule: scipy's default mode 'reflect', the
  edge sample repeated (d c b a | a b c d | d c b a, numpy pad's 'symmetric'), extended
  periodically (period 2n) when the map is smaller than the radius, so any size works
  and the result agrees with scipy everywhere, borders included (to float32 rounding:
  scipy accumulates in float64). sigma <= 0 returns the maps unchanged.
  """
  if maps.ndim != 3:
    raise ValueError(f'maps must have shape (B, H, W); got {maps.shape}.')
  if not jnp.issubdtype(maps.dtype, jnp.floating):
    maps = maps.astype(jnp.float32)
  if sigma <= 0:
    return maps
  kernel = _gaussian_kernel(sigma, truncate)
  return _blur_axis(_blur_axis(maps, kernel, 1), kernel, 2)


def _resize_align_corners(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """Bilinear resize of (B, h, w) as torch's F.interpolate(align_corners=True)."""
  for axis, n_out in ((1, out_hw[0]), (2, out_hw[1])):
    n_in = x.shape[axis]
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    src = np.arange(n_out, dtype=np.float64) * scale
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    shape = [1, 1, 1]
    shape[axis] = n_out
    frac = jnp.asarray((src - i0).reshape(shape), x.dtype)
    x = (
      jnp.take(x, jnp.asarray(i0), axis=axis) * (1 - frac)
      + jnp.take(x, jnp.asarray(i1), axis=axis) * frac
    )
  return x


def _resize(x: jax.Array, out_hw: tuple[int, int], align_corners: bool) -> jax.Array:
  if x.shape[1:] == out_hw:
    return x
  if align_corners:
    return _resize_align_corners(x, out_hw)
  # Half-pixel centres. Upsampling, as here, involves no antialiasing and equals
  # torch's F.interpolate(mode='bilinear', align_corners=False); precision HIGHEST keeps
  # the interpolation matmul out of TF32 on GPUs.
  return jax.image.resize(
    x, (x.shape[0], *out_hw), method='bilinear', precision=jax.lax.Precision.HIGHEST
  )


@functools.partial(
  jax.jit, static_argnames=('out_size', 'mode', 'sigma', 'truncate', 'align_corners')
)
def anomaly_map(
  teacher_feats: Sequence[jax.Array],
  student_feats: Sequence[jax.Array],
  out_size: int | tuple[int, int],
  mode: str = 'add',
  sigma: float = 4.0,
  truncate: float = 4.0,
  align_corners: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Anomaly maps and image scores of a batch (design.md section 7), jitted.

  teacher_feats, student_feats: sequences of K arrays, level k of shape
  (B, h_k, w_k, C_k), the same shapes in both. out_size: S or (H, W), the input image
  size (static). mode: 'add' sums the per-level maps, 'mul' multiplies them [eval.map_mode].
  sigma: Gaussian blur, truncate 4 as scipy's gaussian_filter [eval.sigma]; <= 0 disables.

  Returns (maps, scores): maps (B, H, W) float32, scores (B,) float32 = max of each map.

  Resizing: align_corners=False (the default) resizes with half-pixel centres
  (jax.image.resize 'bilinear', i.e. torch's align_corners=False). RD4AD's code uses
  F.interpolate(mode='bilinear', align_corners=True), which maps the corner pixel centres
  onto each other (source position i (h - 1) / (H - 1)); the two differ by up to a
  fraction of a feature cell near the borders. align_corners=True reproduces RD4AD.
  """
  if mode not in ('add', 'mul'):
    raise ValueError(f"mode must be 'add' or 'mul'; got {mode!r}.")
  teacher_feats, student_feats = list(teacher_feats), list(student_feats)
  if not teacher_feats or len(teacher_feats) != len(student_feats):
    raise ValueError(
      f'need the same number (>= 1) of teacher and student levels; got '
      f'{len(teacher_feats)} and {len(student_feats)}.'
    )
  out_hw = (int(out_size),) * 2 if np.ndim(out_size) == 0 else tuple(map(int, out_size))
  if len(out_hw) != 2:
    raise ValueError(f'out_size must be an int or (H, W); got {out_size!r}.')
  total = None
  for e, d in zip(teacher_feats, student_feats):
    a = _resize(cosine_distance_map(e, d), out_hw, align_corners)
    if total is None:
      total = a
    else:
      total = total + a if mode == 'add' else total * a
  maps = gaussian_blur(total, sigma=sigma, truncate=truncate)
  return maps, jnp.max(maps, axis=(1, 2))
