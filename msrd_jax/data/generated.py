"""What the generated benchmarks (`synthetic.py`, `procedural.py`) share.

Each renders its images its own way; this module writes them in the MVTec AD layout,
marks a finished benchmark with a JSON file written last, generates atomically (a
temporary sibling folder renamed at the end, so an interrupted run never leaves a
benchmark that looks complete) and gives both the same command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from msrd_jax.data.errors import DataError

# (split, defect type, index) -> (image (S, S, 3) uint8, mask (S, S) bool or None, normal)
Render = Callable[[str, str, int], tuple[np.ndarray, np.ndarray | None, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """The description of one generated benchmark, as its marker file records it."""

  name: str  # 'synthetic', 'procedural': in messages and the marker's format
  marker: str  # file name of the marker at the root
  version: int
  categories: tuple[str, ...]
  defect_types: tuple[str, ...]
  counts: Mapping[str, int]  # {'train', 'test_good', 'per_defect'}: images per category
  image_size: int

  def marker_content(self, seed: int, categories: Sequence[str]) -> dict:
    return {
      'format': f'msrd_jax {self.name} benchmark',
      'version': self.version,
      'seed': seed,
      'categories': sorted(categories),
      'defect_types': list(self.defect_types),
      'counts': dict(self.counts),
      'image_size': self.image_size,
    }

  def read_marker(self, root: str | os.PathLike) -> dict | None:
    """The marker of a complete benchmark at `root`, or None."""
    try:
      with open(os.path.join(root, self.marker)) as f:
        marker = json.load(f)
    except (OSError, ValueError):
      return None
    return marker if isinstance(marker, dict) else None

  def is_complete(self, marker: dict | None, seed: int, categories: Sequence[str]) -> bool:
    return bool(marker) and (
      marker.get('version') == self.version
      and marker.get('seed') == seed
      and marker.get('counts') == dict(self.counts)
      and set(categories) <= set(marker.get('categories', ()))
    )


def stable_id(name: str) -> int:
  """A number of `name` that is the same in every process and version of Python (the
  seeds of the images are made of them; `hash` of a str is salted per process)."""
  return zlib.crc32(name.encode())


def to_u8(img: np.ndarray) -> np.ndarray:
  """Float image in [0, 1] (clipped) -> uint8, rounded to the nearest level."""
  return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def save_png(array: np.ndarray, path: str):
  Image.fromarray(array).save(path, format='PNG', compress_level=6)


def write_category(
  out_root: str,
  category: str,
  defect_types: Sequence[str],
  counts: Mapping[str, int],
  render: Render,
):
  """Writes one category in the MVTec AD layout under `out_root/category`."""
  base = os.path.join(out_root, category)
  jobs = [('train', 'good', counts['train']), ('test', 'good', counts['test_good'])]
  jobs += [('test', d, counts['per_defect']) for d in defect_types]
  for split, defect, count in jobs:
    folder = os.path.join(base, split, defect)
    os.makedirs(folder, exist_ok=True)
    if defect != 'good':
      os.makedirs(os.path.join(base, 'ground_truth', defect), exist_ok=True)
    for i in range(count):
      image, mask, _ = render(split, defect, i)
      save_png(image, os.path.join(folder, f'{i:03d}.png'))
      if mask is not None:
        mask_path = os.path.join(base, 'ground_truth', defect, f'{i:03d}_mask.png')
        save_png(mask.astype(np.uint8) * 255, mask_path)


def ensure(
  bench: Benchmark,
  root: str | os.PathLike,
  seed: int,
  categories: Sequence[str] | None,
  generate: Callable[[str, str], None],
  progress: Callable[[str], None] | None = None,
) -> str:
  """Generates `bench` into `root` unless a complete one is there.

  A previous benchmark of the same kind at `root` with another version, seed or
  categories is replaced; any other non-empty folder at `root` is refused.

  Args:
    bench: what is generated.
    root: the benchmark root (it will hold one folder per category).
    seed: the benchmark seed (>= 0).
    categories: the categories needed; None means all of them.
    generate: (out_root, category) -> None writes one category (`write_category`).
    progress: called with a line of text after each category.

  Returns:
    `root` as an absolute path, to use as `config.data.root`.
  """
  root = os.path.abspath(os.fspath(root))
  categories = tuple(categories or bench.categories)
  unknown = [c for c in categories if c not in bench.categories]
  if unknown:
    raise DataError(
      f'unknown {bench.name} categories {unknown}; choose from {", ".join(bench.categories)}'
    )
  if seed < 0:
    raise DataError(f'the benchmark seed must be >= 0, got {seed}')
  marker = bench.read_marker(root)
  if bench.is_complete(marker, seed, categories):
    return root
  if os.path.exists(root):
    if not os.path.isdir(root):
      raise DataError(f'{root} exists and is not a folder')
    if marker is None and os.listdir(root):
      raise DataError(
        f'{root} is not empty and holds no {bench.marker}: it is not a {bench.name} '
        'benchmark; refusing to overwrite it. Choose another folder.'
      )
  parent = os.path.dirname(root)
  os.makedirs(parent, exist_ok=True)
  name = os.path.basename(root)
  tmp = tempfile.mkdtemp(prefix=f'.{name}.tmp-', dir=parent)
  trash = None
  try:
    for k, category in enumerate(categories):
      start = time.perf_counter()
      generate(tmp, category)
      if progress:
        progress(
          f'[{k + 1}/{len(categories)}] {category}: generated in '
          f'{time.perf_counter() - start:.1f} s'
        )
    with open(os.path.join(tmp, bench.marker), 'w') as f:
      json.dump(bench.marker_content(seed, categories), f, indent=1)
    if os.path.isdir(root) and os.listdir(root):
      trash = tempfile.mkdtemp(prefix=f'.{name}.old-', dir=parent)
      os.rename(root, os.path.join(trash, name))
    try:
      os.rename(tmp, root)
    except OSError:
      # Another process may have finished first.
      if bench.is_complete(bench.read_marker(root), seed, categories):
        return root
      raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
    if trash:
      shutil.rmtree(trash, ignore_errors=True)
  return root


def main(
  bench: Benchmark,
  ensure_fn: Callable[..., str],
  argv: Sequence[str] | None = None,
) -> int:
  """`python -m msrd_jax.data.<bench.name> OUT_DIR [--seed N] [--categories a,b]`.

  ensure_fn: (out_dir, seed, categories, progress=...) -> root. Exit status 2 with one
  `error:` line when the folder or the flags are refused.
  """
  parser = argparse.ArgumentParser(
    prog=f'python -m msrd_jax.data.{bench.name}',
    description=f'Generate the {bench.name} anomaly-detection benchmark.',
  )
  parser.add_argument('out_dir')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument(
    '--categories',
    default=','.join(bench.categories),
    help=f'comma-separated subset of {",".join(bench.categories)}',
  )
  args = parser.parse_args(argv)
  categories = [c for c in args.categories.split(',') if c]
  start = time.perf_counter()
  try:
    root = ensure_fn(
      args.out_dir, args.seed, categories, progress=lambda line: print(line, file=sys.stderr)
    )
  except DataError as e:
    print(f'error: {e}'.splitlines()[0], file=sys.stderr)
    return 2  # an error in what was given, as every command of the project
  print(
    f'{bench.name} benchmark (seed {args.seed}, categories '
    f'{", ".join(categories)}) ready in {root} ({time.perf_counter() - start:.1f} s)'
  )
  return 0
