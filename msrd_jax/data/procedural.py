"""A second anomaly-detection benchmark, generated procedurally.

Nothing is photographed or downloaded: every image is computed with numpy and
scipy, so that conclusions drawn on the photograph-based benchmark
(`synthetic.py`) can be checked on data of another origin. Normal images of
each category are draws from one distribution (random per-image parameters,
illumination and contrast jitter, sensor noise, a per-category palette):

* weave: woven fabric, interlaced warp and weft threads with over/under
  alternation, random phase, thread-width jitter and a slight rotation;
* marble: veins from sin(x f + turbulence), the turbulence a sum of octaves of
  smooth noise;
* tiles: Voronoi cells of a jittered grid separated by grout lines, each tile
  with its own shade and fine noise;
* wood: growth rings around an off-image centre, perturbed by smooth noise,
  with grain streaks;
* washer: an aligned metal ring with radial and specular shading;
* gear: an aligned 12-tooth gear with a keyed central hole.

The two objects sit on a plain noisy background, with a few pixels of
translation and a few degrees of rotation between images.

Four defect kinds, unlike the scratch/stain/misplaced/color ones of
`synthetic.py`:

* hole: an elliptic puncture showing a dark ground, with a lighter rim;
* warp: a local geometric distortion (a smooth displacement field inside a
  blob: push, swirl or bulge), so the structure bends there;
* specks: a cluster of dozens of small (1-4 px) dark or bright particles;
* worn: an abraded patch, blurred, with less contrast and slightly brighter.

On textures a defect centre falls anywhere MARGIN px away from the border; on
objects it falls on the object (a hole wholly on the object's body).

Masks: the defect is rendered from the normal image; the per-pixel change is
the maximum over RGB of |defect - normal| in grey levels; the mask is the set
of pixels changed by >= MIN_CHANGE inside the defect's support, closed, with
holes filled, kept inside the support and rid of components under
MIN_COMPONENT px. The saved image is the defect on the mask and the normal
image elsewhere. Guarantees, for every defective image:

* outside its mask it equals its normal image byte for byte;
* its mask has >= MIN_AREA px (MIN_WARP_AREA for warps), and every
  connected part >= MIN_COMPONENT px;
* >= MIN_STRONG_FRACTION of its mask pixels change by >= MIN_CHANGE levels
  (the rest are closed-over gaps, e.g. between specks).

A draw that misses these (a warp over flat ground, a hole too small) is
replaced by the next draw of the same random stream.

The output follows the MVTec AD layout (`folder.py`): 256x256 RGB PNGs and
0/255 masks `<stem>_mask.png`, with per category NUM_TRAIN train/good,
NUM_TEST_GOOD test/good and NUM_PER_DEFECT images per defect kind. Every image
is a function of (seed, category, split, defect kind, index) only, so a
category generated alone has the same bytes as when generated with others.

  python -m msrd_jax.data.procedural OUT_DIR [--seed N] [--categories a,b]

It is a folder in the MVTec layout like any other; train on it with the demo config,
e.g. `python -m msrd_jax.ablate --config configs/synthetic.py --config.data.root=OUT_DIR
--workdir DIR` or `python -m msrd_jax.run_all` with the same flags.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

from msrd_jax.data import generated
from msrd_jax.data.errors import DataError

VERSION = 1
MARKER = 'PROCEDURAL_BENCHMARK.json'
IMAGE_SIZE = 256
TEXTURE_CATEGORIES = ('weave', 'marble', 'tiles', 'wood')
OBJECT_CATEGORIES = ('washer', 'gear')
CATEGORIES = TEXTURE_CATEGORIES + OBJECT_CATEGORIES
DEFECT_TYPES = ('hole', 'specks', 'warp', 'worn')
NUM_TRAIN = 80
NUM_TEST_GOOD = 20
NUM_PER_DEFECT = 8
MIN_CHANGE = 12  # grey levels, max over RGB channels
MIN_STRONG_FRACTION = 0.5  # of mask pixels changed by >= MIN_CHANGE
MIN_AREA = 40  # px per mask
MIN_WARP_AREA = 120  # px per warp mask: a warp that bends next to nothing is drawn again
MIN_COMPONENT = 16  # px per connected part of a mask
MARGIN = 32  # px between a texture defect centre and the border
MAX_DRAWS = 64  # defect draws before giving up (never reached in practice)

# Dark, middle and light colours of the ramp each category's grey levels map to.
_PALETTES = {
  'warp': ((0.03, 0.05, 0.12), (0.15, 0.25, 0.47), (0.55, 0.66, 0.86)),
  'weft': ((0.12, 0.11, 0.09), (0.55, 0.53, 0.48), (0.93, 0.91, 0.85)),
  'marble': ((0.16, 0.2, 0.18), (0.58, 0.61, 0.57), (0.96, 0.95, 0.91)),
  'tiles': ((0.2, 0.19, 0.18), (0.6, 0.31, 0.19), (0.93, 0.64, 0.46)),
  'wood': ((0.26, 0.13, 0.05), (0.6, 0.37, 0.18), (0.9, 0.72, 0.47)),
  'washer': ((0.07, 0.08, 0.1), (0.47, 0.49, 0.53), (0.95, 0.96, 0.98)),
  'gear': ((0.16, 0.11, 0.03), (0.6, 0.45, 0.18), (0.98, 0.86, 0.52)),
}
# Plain backgrounds of the objects.
_BACKGROUNDS = {'washer': (0.2, 0.23, 0.21), 'gear': (0.5, 0.52, 0.56)}
# Closing radius of each defect's mask: specks are merged into their cluster.
_CLOSING = {'hole': 1, 'specks': 2, 'warp': 2, 'worn': 1}


def _rng(seed: int, category: str, split: str, defect_type: str, index: int):
  names = [generated.stable_id(n) for n in (category, split, defect_type)]
  key = [seed, *names, index]
  return np.random.default_rng(key)


@functools.cache
def _grid() -> tuple[np.ndarray, np.ndarray]:
  """(S, S) float32 row and column coordinates, origin at the image centre."""
  v, u = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
  c = (IMAGE_SIZE - 1) / 2
  return v - c, u - c


@functools.cache
def _disk(radius: int) -> np.ndarray:
  y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
  return x * x + y * y <= radius * radius + radius


def _ramp(gray: np.ndarray, palette) -> np.ndarray:
  """(H, W) -> (H, W, 3), piecewise linear through the palette's dark (0),
  middle (0.5) and light (1) colours, clipped at both ends."""
  stops = np.asarray(palette, np.float32)
  return np.stack([np.interp(gray, (0, 0.5, 1), stops[:, c]) for c in range(3)], axis=-1).astype(
    np.float32
  )


@functools.lru_cache(maxsize=64)
def _spline_taps(cells: float) -> tuple[int, np.ndarray, np.ndarray]:
  """The cubic B-spline that samples a coarse grid of n knots, `cells` knot
  spacings across the image: n, and for each of the S output positions its 4
  knot indices (4, S) and weights (4, S)."""
  n = int(math.ceil(cells)) + 4
  t = (np.arange(IMAGE_SIZE) + 0.5) * cells / IMAGE_SIZE + 1.5
  base = np.floor(t).astype(np.int64)
  f = (t - base).astype(np.float32)
  weights = np.stack(
    [(1 - f) ** 3, 3 * f**3 - 6 * f**2 + 4, -3 * f**3 + 3 * f**2 + 3 * f + 1, f**3]
  )
  return n, base + np.arange(-1, 3)[:, None], weights / 6


def _smooth_noise(rng: np.random.Generator, cells: float) -> np.ndarray:
  """(S, S) float32 smooth random field of unit std with about `cells`
  features across the image: a cubic B-spline through a coarse random grid,
  applied separably (not as matrix products: multithreaded BLAS is slow on a
  busy machine)."""
  n, taps, weights = _spline_taps(float(cells))
  coarse = rng.standard_normal((n, n), dtype=np.float32)
  rows = sum(weights[k][:, None] * coarse[taps[k]] for k in range(4))  # (S, n)
  field = sum(weights[k][None, :] * rows[:, taps[k]] for k in range(4))  # (S, S)
  return (field - field.mean()) / (field.std() + 1e-6)


def _fractal(rng: np.random.Generator, cells: float, octaves: int, absolute: bool = False):
  """Sum of octaves of smooth noise, amplitudes halving as detail doubles;
  `absolute` sums |noise| (turbulence)."""
  total = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
  for k in range(octaves):
    layer = _smooth_noise(rng, cells * 2**k)
    total += (np.abs(layer) if absolute else layer) * 0.5**k
  return total


def _fine_noise(rng: np.random.Generator, sigma) -> np.ndarray:
  """(S, S) float32 blurred white noise of unit std (sigma per axis)."""
  noise = rng.standard_normal((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
  noise = ndimage.gaussian_filter(noise, sigma)
  return (noise / (noise.std() + 1e-6)).astype(np.float32)


def _rotated(theta: float) -> tuple[np.ndarray, np.ndarray]:
  """Image coordinates rotated by theta radians about the centre: (y, x)."""
  v, u = _grid()
  cos, sin = math.cos(theta), math.sin(theta)
  return sin * u + cos * v, cos * u - sin * v


# Textures: grey-level images in about [0, 1], coloured afterwards.


def _weave(rng: np.random.Generator) -> np.ndarray:
  """Plain weave: in cell (i, j) the warp thread (vertical) is on top when
  i + j is even, the weft thread (horizontal) otherwise. (S, S, 3) float."""
  y, x = _rotated(math.radians(rng.uniform(-3, 3)))
  period = rng.uniform(9.5, 11.5)
  gx = x / period + rng.random()
  gy = y / period + rng.random()
  i, j = np.floor(gx).astype(np.int64), np.floor(gy).astype(np.int64)
  fx, fy = gx - i, gy - j
  threads = 64
  i, j = i % threads, j % threads
  # Per-thread width (fraction of the period) and brightness.
  warp_w, weft_w = rng.uniform(0.72, 0.95, (2, threads))
  warp_b, weft_b = 1 + rng.normal(0, 0.06, (2, threads))

  def profile(f, width):
    t = np.clip((f - 0.5) / (width / 2), -1, 1)
    return np.sqrt(1 - t * t)  # round cross-section

  # The top thread bulges in the middle of its cell and dips where it goes under.
  warp = profile(fx, warp_w[i]) * (0.55 + 0.45 * np.sin(np.pi * fy)) * warp_b[i]
  weft = profile(fy, weft_w[j]) * (0.55 + 0.45 * np.sin(np.pi * fx)) * weft_b[j]
  warp = warp * (1 + 0.12 * _fine_noise(rng, (3.0, 0.6)))  # fibres along the threads
  weft = weft * (1 + 0.12 * _fine_noise(rng, (0.6, 3.0)))
  warp_on_top = (i + j) % 2 == 0
  top = np.where(warp_on_top, warp, weft)
  under = np.where(warp_on_top, weft, warp) * 0.5
  shows_warp = np.where(top > 0.05, warp_on_top, ~warp_on_top)
  gray = 0.08 + 0.85 * np.where(top > 0.05, top, under)
  gray = _jitter_gray(ndimage.gaussian_filter(gray, 0.6), rng)
  colour = np.where(
    shows_warp[..., None], _ramp(gray, _PALETTES['warp']), _ramp(gray, _PALETTES['weft'])
  )
  return ndimage.gaussian_filter(colour, (0.5, 0.5, 0))


def _marble(rng: np.random.Generator) -> np.ndarray:
  """A few veins sweeping across (zero crossings of sin(x f + turbulence)),
  of varying width with a soft halo, over cloudy ground and faint threads."""
  y, x = _rotated(rng.uniform(0, math.pi))
  turbulence = _fractal(rng, 2.0, 5, absolute=True)
  phase = x * rng.uniform(0.03, 0.045) + rng.uniform(2.0, 3.0) * turbulence
  s = np.sin(phase + rng.uniform(0, 2 * math.pi))
  # Distance in px to the nearest zero crossing, so that veins keep their width.
  gy, gx = np.gradient(s)
  dist = np.abs(s) / (np.hypot(gy, gx) + 1e-3)
  width = 1.6 * np.clip(1 + 0.6 * _smooth_noise(rng, 4), 0.4, 2.5)
  veins = np.exp(-((dist / width) ** 2)) + 0.25 * np.exp(-((dist / (6 * width)) ** 2))
  threads = _fractal(rng, 3, 3)
  gy, gx = np.gradient(threads)
  threads = np.exp(-((threads / (np.hypot(gy, gx) + 1e-3) / 0.8) ** 2))
  threads *= np.clip(_smooth_noise(rng, 3), 0, 1)
  clouds = _fractal(rng, 3, 4)
  gray = 0.8 + 0.05 * clouds - 0.5 * veins - 0.15 * threads
  return _ramp(_jitter_gray(gray, rng), _PALETTES['marble'])


def _tiles(rng: np.random.Generator) -> np.ndarray:
  """Voronoi cells of a jittered grid (flagstones) with grout between."""
  s = IMAGE_SIZE
  cell = rng.uniform(30, 38)
  offset = rng.random(2) * cell
  n = int(s // cell) + 4
  # Seed of grid cell (a, b) (a, b >= 0 from 1 cell above/left of the image).
  jitter = rng.uniform(-0.32, 0.32, (n, n, 2))
  a_idx, b_idx = np.meshgrid(np.arange(n), np.arange(n), indexing='ij')
  seeds_y = (a_idx - 1 + 0.5 + jitter[..., 0]) * cell - offset[0]
  seeds_x = (b_idx - 1 + 0.5 + jitter[..., 1]) * cell - offset[1]
  v, u = _grid()
  v, u = v + (s - 1) / 2, u + (s - 1) / 2
  ci = np.floor((v + offset[0]) / cell).astype(np.int64) + 1
  cj = np.floor((u + offset[1]) / cell).astype(np.int64) + 1
  d1 = np.full(v.shape, np.inf, np.float32)
  d2 = np.full(v.shape, np.inf, np.float32)
  nearest = np.zeros(v.shape, np.int64)
  for da in (-1, 0, 1):
    for db in (-1, 0, 1):
      a, b = np.clip(ci + da, 0, n - 1), np.clip(cj + db, 0, n - 1)
      d = np.hypot(v - seeds_y[a, b], u - seeds_x[a, b])
      closer = d < d1
      d2 = np.where(closer, d1, np.minimum(d2, d))
      nearest = np.where(closer, a * n + b, nearest)
      d1 = np.where(closer, d, d1)
  edge = (d2 - d1) / 2  # about the distance to the nearest cell border
  grout_half = rng.uniform(1.2, 2.0)
  tile = np.clip(edge - grout_half + 0.5, 0, 1)
  bevel = np.clip((edge - grout_half) / 5, 0, 1)
  shades = rng.normal(0.66, 0.05, n * n)
  tile_gray = shades[nearest] - 0.12 * (1 - bevel) + 0.035 * _fine_noise(rng, 0.8)
  tile_gray += 0.03 * _smooth_noise(rng, 6)
  grout_gray = 0.22 + 0.04 * _fine_noise(rng, 1.0)
  gray = grout_gray + (tile_gray - grout_gray) * tile
  return _ramp(_jitter_gray(gray, rng), _PALETTES['tiles'])


def _wood(rng: np.random.Generator) -> np.ndarray:
  """A flat-sawn board: growth rings around a centre above or below the
  image, stretched along the grain (vertical), so that they show as nested
  arches flanked by long lines."""
  v, u = _grid()
  cy, cx = rng.choice((-1.0, 1.0)) * rng.uniform(150, 320), rng.uniform(-50, 50)
  stretch = rng.uniform(0.25, 0.4)  # the cut's angle to the trunk axis
  r = np.hypot(stretch * (v - cy), u - cx)
  r = r + rng.uniform(2, 4) * _smooth_noise(rng, 2) + 0.8 * _smooth_noise(rng, 6)
  spacing = rng.uniform(7, 12)
  t = (r / spacing) % 1.0
  # Earlywood light, darkening through the year, a sharp latewood edge.
  rings = t**2.5 * np.clip((1 - t) * 10, 0, 1)
  # Grain streaks: fine lines along the rings, plus pores elongated along them.
  lines = ndimage.gaussian_filter1d(rng.standard_normal(1200), 0.8)
  lines = np.interp(r, np.arange(lines.size), lines / lines.std())
  streaks = _fine_noise(rng, (10.0, 0.7))
  figure = _smooth_noise(rng, 2.5)
  gray = 0.72 - 0.34 * rings + 0.03 * lines + 0.04 * streaks + 0.05 * figure
  return _ramp(_jitter_gray(gray, rng), _PALETTES['wood'])


def _jitter_gray(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Contrast and brightness jitter and a gentle illumination gradient."""
  v, u = _grid()
  mean = gray.mean()
  angle = rng.uniform(0, 2 * math.pi)
  ramp = (math.cos(angle) * u + math.sin(angle) * v) / IMAGE_SIZE
  return (gray - mean) * rng.uniform(0.9, 1.1) + mean + rng.uniform(-0.04, 0.04) + 0.06 * ramp


# Objects: (S, S, 3) colour images and the object's (S, S) coverage in [0, 1].


def _pose(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
  """Object-frame radius, angle and (y, x) of every pixel, for a pose of a
  few px of translation and a few degrees of rotation, and that rotation."""
  v, u = _grid()
  dy, dx = rng.uniform(-3, 3, 2)
  theta = math.radians(rng.uniform(-3, 3))
  cos, sin = math.cos(theta), math.sin(theta)
  y, x = v - dy, u - dx
  oy, ox = cos * y - sin * x, sin * y + cos * x
  return np.hypot(oy, ox), np.arctan2(oy, ox), np.stack([oy, ox]), theta


def _coverage(inside: np.ndarray) -> np.ndarray:
  """Anti-aliased coverage of a hard-edged shape."""
  return np.clip(ndimage.gaussian_filter(inside.astype(np.float32), 0.7), 0, 1)


def _washer(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  r, phi, (oy, ox), theta = _pose(rng)
  r_in, r_out = 38.0, 90.0
  # A small notch in the outer edge shows the rotation.
  notch = (np.abs(oy) < 4) & (ox > r_out - 7)
  body = (r >= r_in) & (r <= r_out) & ~notch
  alpha = _coverage(body)
  t = np.clip((r - r_in) / (r_out - r_in), 0, 1)
  light = math.radians(-135 + rng.uniform(-6, 6))
  facing = np.cos(phi + theta - light)  # the light is fixed in the image frame
  slope = np.cos(np.pi * t)  # the ring's cross-section is rounded
  diffuse = 0.52 + 0.2 * slope * facing
  specular = np.exp(-(((t - 0.3) / 0.1) ** 2)) * ((1 + facing) / 2) ** 6
  turning = 0.025 * np.sin(2 * np.pi * r / 1.7)  # concentric machining marks
  edge = np.clip(np.minimum(r - r_in, r_out - r) / 3, 0, 1)
  gray = (diffuse + 0.4 * specular + turning) * (0.8 + 0.2 * edge)
  obj = _ramp(gray, _PALETTES['washer'])
  return obj, alpha


def _gear(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  r, phi, (oy, ox), _ = _pose(rng)
  teeth, r_root, height, r_hole = 12, 72.0, 14.0, 22.0
  q = np.abs((teeth * phi / (2 * np.pi)) % 1.0 - 0.5) * 2  # 1 at a tooth centre
  tooth = np.clip((q - 0.4) / 0.3, 0, 1)  # trapezoidal teeth
  keyway = (np.abs(oy) < 4) & (ox > 0) & (ox < r_hole + 6)
  body = (r <= r_root + height * tooth) & (r >= r_hole) & ~keyway
  alpha = _coverage(body)
  edge_dist = ndimage.distance_transform_edt(body)
  bevel = np.clip(edge_dist / 4, 0, 1)
  hub = np.exp(-(((r - 33) / 5) ** 2))  # a raised ring around the hole
  face = 0.6 + 0.08 * (ox - oy) / 100 + 0.02 * np.sin(2 * np.pi * r / 2.3)
  gray = face * (0.7 + 0.3 * bevel) + 0.18 * hub
  gray += 0.03 * _smooth_noise(rng, 5)
  obj = _ramp(gray, _PALETTES['gear'])
  return obj, alpha


_OBJECTS = {'washer': _washer, 'gear': _gear}
_TEXTURES = {'weave': _weave, 'marble': _marble, 'tiles': _tiles, 'wood': _wood}


def _normal(category: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """A normal image (S, S, 3) uint8 and the object's coverage (S, S) in
  [0, 1] (all ones for textures)."""
  s = IMAGE_SIZE
  if category in _TEXTURES:
    img = _TEXTURES[category](rng)
    img = img * (1 + rng.normal(0, 0.02, 3)).astype(np.float32)
    alpha = np.ones((s, s), np.float32)
  else:
    obj, alpha = _OBJECTS[category](rng)
    background = np.asarray(_BACKGROUNDS[category], np.float32)
    background = background * (1 + 0.03 * _smooth_noise(rng, 3))[..., None]
    img = background + (obj - background) * alpha[..., None]
    # Illumination: a global gain, a gentle gradient, a colour temperature.
    v, u = _grid()
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (math.cos(angle) * u + math.sin(angle) * v) / s
    img = img * (rng.uniform(0.92, 1.08) + rng.uniform(0, 0.08) * ramp)[..., None]
    img = img * (1 + rng.normal(0, 0.015, 3)).astype(np.float32)
  sigma = rng.uniform(1.2, 2.2) / 255
  img = img + sigma * rng.standard_normal(img.shape, dtype=np.float32)  # sensor noise
  return generated.to_u8(img), alpha


# Defects: each returns the defect image (S, S, 3) float and its support (S, S)
# bool, the region outside which it leaves the image as it is.


class _Placement:
  """Where defect centres may fall in one image."""

  def __init__(self, category: str, alpha: np.ndarray):
    self.alpha = alpha
    self.is_object = category in _OBJECTS
    self._depth = None

  def centre(
    self, rng: np.random.Generator, clearance: float = 0.0, max_depth: float = np.inf
  ) -> np.ndarray:
    """(y, x): MARGIN px from the border for textures; on the object for
    objects, at least `clearance` and at most `max_depth` px inside it."""
    if not self.is_object:
      return rng.uniform(MARGIN, IMAGE_SIZE - MARGIN, 2)
    if self._depth is None:
      self._depth = ndimage.distance_transform_edt(self.alpha > 0.5)
    depth = self._depth
    candidates = np.flatnonzero((depth >= max(clearance, 2.0)) & (depth <= max_depth))
    k = candidates[rng.integers(candidates.size)]
    return np.array(divmod(int(k), IMAGE_SIZE), np.float64) + rng.uniform(-0.5, 0.5, 2)


def _offsets(centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  v, u = _grid()
  c = (IMAGE_SIZE - 1) / 2
  return v + c - centre[0], u + c - centre[1]


def _blob_radius(rng: np.random.Generator, dy: np.ndarray, dx: np.ndarray, radius: float):
  """Distance from the centre relative to an irregular boundary: <= 1 inside
  a blob of about `radius` px."""
  angle = np.arctan2(dy, dx)
  boundary = np.ones_like(angle)
  for k in range(2, 6):
    boundary += rng.uniform(0, 0.2) / (k / 2) * np.cos(k * angle + rng.uniform(0, 2 * math.pi))
  return np.hypot(dy, dx) / (radius * boundary)


def _hole(
  img: np.ndarray, rng: np.random.Generator, place: _Placement
) -> tuple[np.ndarray, np.ndarray]:
  a = rng.uniform(5, 12)
  b = a * rng.uniform(0.6, 1.0)
  rim_width = rng.uniform(1.2, 2.2)
  dy, dx = _offsets(place.centre(rng, a + rim_width + 3))
  angle = rng.uniform(0, math.pi)
  cos, sin = math.cos(angle), math.sin(angle)
  p, q = cos * dx + sin * dy, -sin * dx + cos * dy
  rho = np.sqrt((p / a) ** 2 + (q / b) ** 2)
  dist = (rho - 1) * math.sqrt(a * b)  # about the signed distance to the edge
  inside = np.clip(0.5 - dist, 0, 1)[..., None]
  rim = (np.clip(rim_width + 0.5 - dist, 0, 1) * np.clip(dist + 0.5, 0, 1))[..., None]
  dark = rng.uniform(0.03, 0.1) + 0.06 * np.clip(rho, 0, 1)[..., None]  # shadowed wall
  dark = dark + rng.normal(0, 2 / 255, img.shape)
  lighter = img + (1 - img) * rng.uniform(0.3, 0.5)
  out = img * (1 - rim) + lighter * rim
  out = out * (1 - inside) + dark * inside
  return out, dist < rim_width + 1.5


def _warp(
  img: np.ndarray, rng: np.random.Generator, place: _Placement
) -> tuple[np.ndarray, np.ndarray]:
  radius = rng.uniform(14, 26)
  centre = place.centre(rng, max_depth=radius / 2)  # objects: bend their outline
  dy, dx = _offsets(centre)
  rho = _blob_radius(rng, dy, dx, radius)
  support = rho < 1
  weight = (1 - rho[support] ** 2) ** 2  # smooth, 0 at the blob's edge
  sy, sx = dy[support], dx[support]
  kind = rng.integers(3)
  if kind == 0:  # push: the structure shifts along one direction
    amount = rng.uniform(6, 11) * weight
    direction = rng.uniform(0, 2 * math.pi)
    src_y, src_x = sy - amount * math.sin(direction), sx - amount * math.cos(direction)
  elif kind == 1:  # swirl: it turns about the centre
    turn = rng.uniform(0.7, 1.3) * rng.choice((-1, 1)) * weight
    cos, sin = np.cos(turn), np.sin(turn)
    src_y, src_x = cos * sy - sin * sx, sin * sy + cos * sx
  else:  # bulge or pinch: it swells or shrinks radially
    gain = 1 - rng.uniform(0.35, 0.55) * rng.choice((-1, 1)) * weight
    src_y, src_x = sy * gain, sx * gain
  coords = np.stack([src_y + centre[0], src_x + centre[1]])
  out = img.copy()
  for c in range(3):
    out[support, c] = ndimage.map_coordinates(img[..., c], coords, order=1, mode='reflect')
  return out, support


def _specks(
  img: np.ndarray, rng: np.random.Generator, place: _Placement
) -> tuple[np.ndarray, np.ndarray]:
  radius = rng.uniform(8, 16)
  centre = place.centre(rng)
  dy, dx = _offsets(centre)
  support = _blob_radius(rng, dy, dx, radius) <= 1
  count = int(rng.integers(24, 72))
  ys, xs = np.nonzero(support)
  pick = rng.integers(ys.size, size=count)
  py, px = ys[pick] + rng.uniform(-0.5, 0.5, count), xs[pick] + rng.uniform(-0.5, 0.5, count)
  sizes = rng.uniform(0.5, 2.0, count)  # radius: 1-4 px dots
  dark_share = rng.choice((0.1, 0.5, 0.9))
  is_dark = rng.random(count) < dark_share
  grey = np.where(is_dark, rng.uniform(0.02, 0.16, count), rng.uniform(0.84, 1.0, count))
  tint = 1 + rng.normal(0, 0.06, (count, 3))
  colours = np.clip(grey[:, None] * tint, 0, 1)
  # Rasterize in the blob's bounding box, dilated by the largest dot.
  support = ndimage.binary_dilation(support, _disk(3))
  y0, y1 = max(int(py.min()) - 3, 0), min(int(py.max()) + 4, IMAGE_SIZE)
  x0, x1 = max(int(px.min()) - 3, 0), min(int(px.max()) + 4, IMAGE_SIZE)
  yy, xx = np.mgrid[y0:y1, x0:x1]
  dist = np.hypot(yy[..., None] - py, xx[..., None] - px)  # (h, w, count)
  cover = np.clip(sizes + 0.5 - dist, 0, 1)
  top = cover.argmax(axis=-1)
  alpha = np.take_along_axis(cover, top[..., None], -1)
  out = img.copy()
  patch = out[y0:y1, x0:x1]
  out[y0:y1, x0:x1] = patch * (1 - alpha) + colours[top] * alpha
  return out, support


def _worn(
  img: np.ndarray, rng: np.random.Generator, place: _Placement
) -> tuple[np.ndarray, np.ndarray]:
  radius = rng.uniform(13, 26)
  dy, dx = _offsets(place.centre(rng))
  blob = _blob_radius(rng, dy, dx, radius) <= 1
  weight = ndimage.gaussian_filter(blob.astype(np.float32), 2.5) * place.alpha
  support = weight > 0.02
  blurred = ndimage.gaussian_filter(img, (rng.uniform(1.5, 3.0),) * 2 + (0,))
  local_mean = ndimage.gaussian_filter(img, (8, 8, 0))
  faded = local_mean + (blurred - local_mean) * rng.uniform(0.3, 0.55)
  grey = faded.mean(axis=-1, keepdims=True)
  faded = faded + (grey - faded) * 0.25 + rng.uniform(0.06, 0.1)
  w = weight[..., None]
  return img * (1 - w) + faded * w, support


_DEFECTS = {'hole': _hole, 'specks': _specks, 'warp': _warp, 'worn': _worn}


def _clean_mask(change: np.ndarray, support: np.ndarray, closing: int) -> np.ndarray:
  """Pixels changed by >= MIN_CHANGE in the support, closed, holes filled,
  kept in the support, without parts under MIN_COMPONENT px."""
  strong = (change >= MIN_CHANGE) & support
  mask = ndimage.binary_closing(strong, _disk(closing)) | strong
  mask = ndimage.binary_fill_holes(mask) & support
  labels, count = ndimage.label(mask)
  if not count:
    return mask
  sizes = np.bincount(labels.ravel())
  keep = sizes >= MIN_COMPONENT
  keep[0] = False
  return keep[labels]


def render_sample(
  category: str, split: str, defect_type: str, index: int, seed: int
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
  """Renders one benchmark image.

  Args:
    category: one of CATEGORIES.
    split: 'train' or 'test'.
    defect_type: 'good' or one of DEFECT_TYPES (test only).
    index: the image number within (split, defect_type).
    seed: the benchmark seed (>= 0).

  Returns:
    image (S, S, 3) uint8, mask (S, S) bool or None for good images, and the
    normal image (S, S, 3) uint8 the defect was made on (the image itself for
    good ones). See the module docstring for what masks guarantee.
  """
  if category not in CATEGORIES:
    raise DataError(
      f'unknown procedural category {category!r}; choose from {", ".join(CATEGORIES)}'
    )
  if split not in ('train', 'test'):
    raise DataError(f'split must be train or test, got {split!r}')
  if defect_type != 'good' and (defect_type not in DEFECT_TYPES or split != 'test'):
    raise DataError(f'no {defect_type!r} images in the {split!r} split')
  if seed < 0:
    raise DataError(f'the benchmark seed must be >= 0, got {seed}')
  rng = _rng(seed, category, split, defect_type, index)
  normal, alpha = _normal(category, rng)
  if defect_type == 'good':
    return normal, None, normal
  place = _Placement(category, alpha)
  base = normal.astype(np.float32) / 255
  wide = normal.astype(np.int16)
  for _ in range(MAX_DRAWS):
    defect, support = _DEFECTS[defect_type](base, rng, place)
    defect = generated.to_u8(defect)
    change = np.abs(defect.astype(np.int16) - wide).max(axis=-1)
    mask = _clean_mask(change, support, _CLOSING[defect_type])
    area = int(mask.sum())
    if (
      area >= (MIN_WARP_AREA if defect_type == 'warp' else MIN_AREA)
      and (change[mask] >= MIN_CHANGE).mean() >= MIN_STRONG_FRACTION
    ):
      return np.where(mask[..., None], defect, normal), mask, normal
  raise DataError(f'no visible {defect_type} defect in {MAX_DRAWS} draws for {category}/{index}')


def _benchmark() -> generated.Benchmark:
  """This benchmark as its marker records it (the counts read at call time)."""
  counts = {'train': NUM_TRAIN, 'test_good': NUM_TEST_GOOD, 'per_defect': NUM_PER_DEFECT}
  return generated.Benchmark(
    'procedural', MARKER, VERSION, CATEGORIES, DEFECT_TYPES, counts, IMAGE_SIZE
  )


def generate_category(out_root: str, category: str, seed: int):
  """Writes one category in the MVTec AD layout under `out_root/category`."""
  bench = _benchmark()
  render = functools.partial(render_sample, category, seed=seed)
  generated.write_category(out_root, category, DEFECT_TYPES, bench.counts, render)


def read_marker(root: str | os.PathLike) -> dict | None:
  """The marker of a complete benchmark at `root`, or None."""
  return _benchmark().read_marker(root)


def ensure_procedural(
  root: str | os.PathLike,
  seed: int = 0,
  categories: Sequence[str] | None = None,
  progress: Callable[[str], None] | None = None,
) -> str:
  """The procedural benchmark of `seed` in `root` (absolute), generated unless complete.

  `generated.ensure` says how: atomically, its marker written last, another version or
  seed replaced, a foreign non-empty folder refused (DataError). categories: None for
  all of CATEGORIES; progress: called with a line after each category.
  """
  return generated.ensure(
    _benchmark(),
    root,
    seed,
    categories,
    lambda out, category: generate_category(out, category, seed),
    progress,
  )


def main(argv: Sequence[str] | None = None) -> int:
  return generated.main(_benchmark(), ensure_procedural, argv)


if __name__ == '__main__':
  sys.exit(main())
