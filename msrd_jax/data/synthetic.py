"""An embedded synthetic anomaly-detection benchmark, built offline.

The normal images come from real photographs that ship inside scikit-image
(no download): three textures (brick, grass, gravel: random 256x256 crops of
the 512x512 photographs, flips/rotations, brightness/contrast/tint jitter and
sensor noise, colourized with a per-category palette) and two aligned objects
(coffee: a cup on its saucer; coins: a tray of coins; small translation,
rotation, scale and illumination jitter, as for MVTec AD objects).

Four defect types of different nature are painted on test images, each with
an exact mask:

* scratch: a thin (2-4 px) curved line, lighter or darker than its ground;
* stain: an irregular blob, darkened, tinted and blurred (texture change);
* misplaced: a region replaced by structure that does not belong there (for
  textures, another texture with matched brightness; for objects, a patch of
  the same image from elsewhere, rotated);
* color: an irregular blob whose hue is shifted and saturation raised.

The mask is exactly the set of changed pixels: outside it the defective image
equals the normal image it was made from, byte for byte, and inside it every
pixel changes by at least MIN_CHANGE grey levels in some channel (pixels that a
defect happens to leave nearly unchanged are pushed by ENFORCED_CHANGE levels).

The output follows the MVTec AD layout (`folder.py`), 256x256 RGB PNGs and
0/255 masks `<stem>_mask.png`, with per category NUM_TRAIN train/good,
NUM_TEST_GOOD test/good and NUM_PER_DEFECT images per defect type. Everything
is a function of (seed, category, split, defect type, index), so the same seed
gives the same bytes whatever categories are generated together.

  python -m msrd_jax.data.synthetic OUT_DIR [--seed N] [--categories a,b]
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Sequence

import numpy as np
import skimage.color
import skimage.data
from scipy import ndimage

from msrd_jax.data import generated
from msrd_jax.data.errors import DataError

VERSION = 1
MARKER = 'SYNTHETIC_BENCHMARK.json'
IMAGE_SIZE = 256
TEXTURE_CATEGORIES = ('brick', 'grass', 'gravel')
OBJECT_CATEGORIES = ('coffee', 'coins')
CATEGORIES = TEXTURE_CATEGORIES + OBJECT_CATEGORIES
DEFECT_TYPES = ('color', 'misplaced', 'scratch', 'stain')
NUM_TRAIN = 80
NUM_TEST_GOOD = 20
NUM_PER_DEFECT = 8
MIN_CHANGE = 10  # grey levels, max over channels, at every mask pixel
ENFORCED_CHANGE = 16

# Dark and light ends of the colour ramp of each grayscale source.
_PALETTES = {
  'brick': ((0.22, 0.07, 0.04), (0.98, 0.62, 0.45)),
  'grass': ((0.04, 0.12, 0.02), (0.72, 0.92, 0.42)),
  'gravel': ((0.10, 0.09, 0.09), (0.92, 0.88, 0.80)),
  'coins': ((0.03, 0.03, 0.04), (0.97, 0.93, 0.84)),
}
# Brick courses are horizontal in every normal image; the others are isotropic.
_ROTATIONS = {'brick': (0, 2), 'grass': (0, 1, 2, 3), 'gravel': (0, 1, 2, 3)}
# Where defect centres may fall, in output pixels: on the object for objects.
_DEFECT_BOX = {'coffee': (56, 200), 'coins': (36, 220)}
_SPLIT_CODES = {'train': 0, 'test': 1}


class Sources:
  """The scikit-image photographs, loaded once per generation (no globals)."""

  def __init__(self):
    self._cache: dict[str, np.ndarray] = {}

  def gray(self, name: str) -> np.ndarray:
    """(512, 512) float32 in [0, 1] texture photograph."""
    if name not in self._cache:
      self._cache[name] = getattr(skimage.data, name)().astype(np.float32) / 255
    return self._cache[name]

  def object(self, name: str) -> np.ndarray:
    """(L, L, 3) float32 square crop of an object photograph, pre-blurred
    for the downscale to IMAGE_SIZE."""
    key = 'object:' + name
    if key not in self._cache:
      if name == 'coffee':
        src = skimage.data.coffee()[:, 75:475].astype(np.float32) / 255
      elif name == 'coins':
        gray = skimage.data.coins()[:, 40:343].astype(np.float32) / 255
        src = _colourize(gray, _PALETTES['coins'])
      else:
        raise DataError(f'unknown synthetic object {name!r}')
      sigma = 0.45 * src.shape[0] / IMAGE_SIZE
      src = ndimage.gaussian_filter(src, (sigma, sigma, 0))
      self._cache[key] = src.astype(np.float32)
    return self._cache[key]


def _colourize(gray: np.ndarray, palette, gains=(1.0, 1.0, 1.0)) -> np.ndarray:
  """(H, W) in [0, 1] -> (H, W, 3) along a dark-to-light colour ramp."""
  lo = np.asarray(palette[0], np.float32)
  hi = np.asarray(palette[1], np.float32) * np.asarray(gains, np.float32)
  return lo + (hi - lo) * gray[..., None]


def _texture(category: str, rng: np.random.Generator, sources: Sources) -> np.ndarray:
  """A normal texture image, (S, S, 3) uint8."""
  src = sources.gray(category)
  s = IMAGE_SIZE
  y, x = rng.integers(0, src.shape[0] - s + 1), rng.integers(0, src.shape[1] - s + 1)
  crop = src[y : y + s, x : x + s]
  crop = np.rot90(crop, rng.choice(_ROTATIONS[category]))
  if rng.random() < 0.5:
    crop = crop[:, ::-1]
  mean = crop.mean()
  crop = (crop - mean) * rng.uniform(0.88, 1.12) + mean + rng.uniform(-0.04, 0.04)
  img = _colourize(crop, _PALETTES[category], 1 + rng.normal(0, 0.02, 3))
  img = img + rng.normal(0, 1.5 / 255, img.shape)
  return generated.to_u8(img)


def _object(category: str, rng: np.random.Generator, sources: Sources) -> np.ndarray:
  """A normal, roughly aligned object image, (S, S, 3) uint8."""
  src = sources.object(category)
  s = IMAGE_SIZE
  length = src.shape[0]
  theta = math.radians(rng.uniform(-2.5, 2.5))
  scale = length / s * rng.uniform(0.985, 1.015)
  shift = rng.uniform(-3, 3, 2) * length / s
  v, u = np.mgrid[0:s, 0:s].astype(np.float32) - (s - 1) / 2
  cos, sin = math.cos(theta), math.sin(theta)
  sy = (sin * u + cos * v) * scale + (length - 1) / 2 + shift[0]
  sx = (cos * u - sin * v) * scale + (length - 1) / 2 + shift[1]
  img = np.stack(
    [ndimage.map_coordinates(src[..., c], (sy, sx), order=1, mode='reflect') for c in range(3)],
    axis=-1,
  )
  # Illumination: a global gain, a gentle gradient, a colour temperature.
  angle = rng.uniform(0, 2 * math.pi)
  ramp = (math.cos(angle) * u + math.sin(angle) * v) / s
  img = img * (rng.uniform(0.9, 1.1) + rng.uniform(0, 0.08) * ramp)[..., None]
  img = img * (1 + rng.normal(0, 0.015, 3)) + rng.normal(0, 1.5 / 255, img.shape)
  return generated.to_u8(img)


def _normal(category: str, rng: np.random.Generator, sources: Sources) -> np.ndarray:
  if category in TEXTURE_CATEGORIES:
    return _texture(category, rng, sources)
  return _object(category, rng, sources)


def _defect_centre(category: str, rng: np.random.Generator, margin: float) -> np.ndarray:
  lo, hi = _DEFECT_BOX.get(category, (margin, IMAGE_SIZE - margin))
  lo, hi = max(lo, margin), min(hi, IMAGE_SIZE - margin)
  return rng.uniform(lo, hi, 2)


def _blob(rng: np.random.Generator, centre: np.ndarray, radius: float) -> np.ndarray:
  """(S, S) bool irregular blob: a disc with a random smooth boundary."""
  v, u = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
  dy, dx = v - centre[0], u - centre[1]
  angle = np.arctan2(dy, dx)
  boundary = np.ones_like(angle)
  for k in range(2, 6):
    boundary += rng.uniform(0, 0.22) / (k / 2) * np.cos(k * angle + rng.uniform(0, 2 * math.pi))
  return np.hypot(dy, dx) <= radius * boundary


def _edge_weight(mask: np.ndarray, floor: float, width: float) -> np.ndarray:
  """(S, S, 1) blending weight: `floor` at the mask edge rising to 1 inside,
  so defects look soft while still changing every mask pixel."""
  inside = ndimage.distance_transform_edt(mask)
  return np.clip(inside / width, floor, 1.0)[..., None]


def _scratch(img, rng, centre, category, sources):
  del category, sources
  length = rng.uniform(45, 110)
  angle = rng.uniform(0, math.pi)
  direction = np.array([math.sin(angle), math.cos(angle)])
  normal = np.array([direction[1], -direction[0]])
  p0 = centre - direction * length / 2
  p3 = centre + direction * length / 2
  p1 = p0 + direction * length / 3 + normal * rng.uniform(-0.35, 0.35) * length
  p2 = p0 + 2 * direction * length / 3 + normal * rng.uniform(-0.35, 0.35) * length
  t = np.linspace(0, 1, 600)[:, None]
  points = (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3
  points = np.round(points).astype(int)
  points = points[((points >= 0) & (points < IMAGE_SIZE)).all(axis=1)]
  line = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
  line[points[:, 0], points[:, 1]] = True
  half_width = rng.uniform(0.8, 1.6)
  mask = ndimage.distance_transform_edt(~line) <= half_width
  local = img[mask].mean()
  target = rng.uniform(0.85, 0.97) if local < 0.55 else rng.uniform(0.05, 0.18)
  alpha = rng.uniform(0.55, 0.85)
  return img * (1 - alpha) + target * alpha, mask


def _stain(img, rng, centre, category, sources):
  del category, sources
  mask = _blob(rng, centre, rng.uniform(8, 20))
  blurred = ndimage.gaussian_filter(img, (2.5, 2.5, 0))
  gain = rng.uniform(0.45, 0.7)
  tint = np.array([0.35, 0.22, 0.10], np.float32) * rng.uniform(0.3, 0.7)
  stained = blurred * gain + (1 - gain) * tint
  weight = _edge_weight(mask, 0.4, 3.0)
  return img * (1 - weight) + stained * weight, mask


def _region(rng, centre) -> np.ndarray:
  """(S, S) bool rotated rectangle of 24-46 px sides."""
  h, w = rng.uniform(24, 46, 2)
  angle = rng.uniform(0, math.pi)
  v, u = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
  dy, dx = v - centre[0], u - centre[1]
  a = math.cos(angle) * dx + math.sin(angle) * dy
  b = -math.sin(angle) * dx + math.cos(angle) * dy
  return (np.abs(a) <= w / 2) & (np.abs(b) <= h / 2)


def _misplaced(img, rng, centre, category, sources):
  s = IMAGE_SIZE
  if rng.random() < 0.5:
    mask = _region(rng, centre)
  else:
    mask = _blob(rng, centre, rng.uniform(14, 24))
  if category in TEXTURE_CATEGORIES:
    # Foreign structure in this category's colours.
    other = rng.choice([t for t in TEXTURE_CATEGORIES if t != category])
    src = sources.gray(other)
    # Zoomed in, so that its structure differs in scale as well as in kind.
    side = s // 2
    y, x = rng.integers(0, src.shape[0] - side + 1, 2)
    patch = ndimage.zoom(src[y : y + side, x : x + side], s / side, order=1)
    patch = np.rot90(patch, rng.integers(4))
    patch = _colourize(patch, _PALETTES[category])
    # Same mean colour as the ground it replaces: the change is structural.
    patch = patch - patch[mask].mean(0) + img[mask].mean(0)
    return patch, mask
  # Objects: a patch from elsewhere on the image, rotated.
  patch = np.rot90(img, rng.integers(1, 4))
  angle = rng.uniform(0, 2 * math.pi)
  distance = rng.uniform(60, 100)
  shift = np.round(distance * np.array([math.sin(angle), math.cos(angle)]))
  shift = shift.astype(int)
  patch = np.roll(patch, tuple(shift), axis=(0, 1))
  return patch, mask


def _color(img, rng, centre, category, sources):
  del category, sources
  mask = _blob(rng, centre, rng.uniform(10, 22))
  hsv = skimage.color.rgb2hsv(np.clip(img, 0, 1))
  hsv[..., 0] = (hsv[..., 0] + rng.uniform(0.15, 0.4) * rng.choice((-1, 1))) % 1.0
  hsv[..., 1] = np.clip(hsv[..., 1] * 1.2 + 0.15, 0, 1)
  shifted = skimage.color.hsv2rgb(hsv)
  weight = _edge_weight(mask, 0.5, 3.0)
  return img * (1 - weight) + shifted * weight, mask


_DEFECTS = {
  'color': _color,
  'misplaced': _misplaced,
  'scratch': _scratch,
  'stain': _stain,
}


def _paint(normal: np.ndarray, defect: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Writes `defect` into `normal` on `mask` only, then makes every mask pixel
  differ by >= MIN_CHANGE levels. (S, S, 3) uint8."""
  out = np.where(mask[..., None], generated.to_u8(defect), normal)
  change = np.abs(out.astype(np.int16) - normal).max(axis=-1)
  weak = mask & (change < MIN_CHANGE)
  if weak.any():
    base = normal[weak].astype(np.int16)
    out[weak] = np.where(base < 128, base + ENFORCED_CHANGE, base - ENFORCED_CHANGE).astype(
      np.uint8
    )
  return out


def render_sample(
  category: str, split: str, defect_type: str, index: int, seed: int, sources: Sources | None = None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
  """Renders one benchmark image.

  Args:
    category: one of CATEGORIES.
    split: 'train' or 'test'.
    defect_type: 'good' or one of DEFECT_TYPES (test only).
    index: the image number within (split, defect_type).
    seed: the benchmark seed.
    sources: photographs already loaded, to share across calls.

  Returns:
    image (S, S, 3) uint8, mask (S, S) bool or None for good images, and the
    normal image (S, S, 3) uint8 the defect was painted on (the image itself
    for good ones).
  """
  if category not in CATEGORIES:
    raise DataError(f'unknown synthetic category {category!r}; choose from {", ".join(CATEGORIES)}')
  if defect_type != 'good' and (defect_type not in DEFECT_TYPES or split != 'test'):
    raise DataError(f'no {defect_type!r} images in the {split!r} split')
  sources = sources or Sources()
  code = 0 if defect_type == 'good' else 1 + DEFECT_TYPES.index(defect_type)
  key = [seed, generated.stable_id(category), _SPLIT_CODES[split], code, index]
  rng = np.random.default_rng(key)
  normal = _normal(category, rng, sources)
  if defect_type == 'good':
    return normal, None, normal
  img = normal.astype(np.float32) / 255
  while True:  # a defect clipped away at the border is drawn again
    centre = _defect_centre(category, rng, margin=40)
    defect, mask = _DEFECTS[defect_type](img, rng, centre, category, sources)
    if mask.sum() >= 20:
      break
  return _paint(normal, defect, mask), mask, normal


def _benchmark() -> generated.Benchmark:
  """This benchmark as its marker records it (the counts read at call time)."""
  counts = {'train': NUM_TRAIN, 'test_good': NUM_TEST_GOOD, 'per_defect': NUM_PER_DEFECT}
  return generated.Benchmark(
    'synthetic', MARKER, VERSION, CATEGORIES, DEFECT_TYPES, counts, IMAGE_SIZE
  )


def generate_category(out_root: str, category: str, seed: int, sources: Sources | None = None):
  """Writes one category in the MVTec AD layout under `out_root/category`."""
  sources = sources or Sources()
  bench = _benchmark()

  def render(split, defect, index):
    return render_sample(category, split, defect, index, seed, sources)

  generated.write_category(out_root, category, DEFECT_TYPES, bench.counts, render)


def read_marker(root: str | os.PathLike) -> dict | None:
  """The marker of a complete benchmark at `root`, or None."""
  return _benchmark().read_marker(root)


def ensure_synthetic(
  root: str | os.PathLike,
  seed: int = 0,
  categories: Sequence[str] | None = None,
  progress: Callable[[str], None] | None = None,
) -> str:
  """The synthetic benchmark of `seed` in `root` (absolute), generated unless complete.

  `generated.ensure` says how: atomically, its marker written last, another version or
  seed replaced, a foreign non-empty folder refused (DataError). categories: None for
  all of CATEGORIES; progress: called with a line after each category.
  """
  sources = Sources()  # the photographs, loaded once for all categories
  return generated.ensure(
    _benchmark(),
    root,
    seed,
    categories,
    lambda out, category: generate_category(out, category, seed, sources),
    progress,
  )


def main(argv: Sequence[str] | None = None) -> int:
  return generated.main(_benchmark(), ensure_synthetic, argv)


if __name__ == '__main__':
  sys.exit(main())
