"""Times the input pipeline: one epoch of reading, resizing and batching.

  python scripts/bench_data.py [--threads 8] [--category coffee]

Cases (batch 16, TrainLoader with the given threads and prefetch 2):
  * one synthetic category (80 train images of 256x256 PNG) at 256 and 128 px;
  * a folder of 256 PNGs of 1024x1024 (like MVTec AD's), at 256 px. They are
    natural-looking: crops of scikit-image photographs upscaled to 1024 with
    flips and sensor noise (noise-free upscales would compress unrealistically
    well, pure noise unrealistically badly); written with zlib level 1 to keep
    generation short (decoding speed barely depends on the level).
'cold' is the first epoch with an empty decoded-image cache (the OS file cache
is warm, the files having just been written); 'warm' is the next epoch,
served from the in-memory cache.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import tempfile
import time

import numpy as np
import skimage.data
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top
from msrd_jax.data import TrainLoader, list_mvtec, synthetic

BATCH = 16


def time_epochs(samples, image_size, threads) -> tuple[float, float]:
  """Seconds for the first (cold) and second (warm) epoch."""
  loader = TrainLoader(samples, image_size, BATCH, seed=0, num_threads=threads, prefetch=2)
  steps = loader.steps_per_epoch
  times = []
  # A fresh iterator per epoch, so the warm epoch gets no head start from
  # batches prefetched during the cold one; the cache lives in the loader.
  for epoch in range(2):
    start = time.perf_counter()
    with loader.iterate(epoch * steps) as it:
      for _ in range(steps):
        batch = next(it)
    assert batch['image'].shape == (BATCH, image_size, image_size, 3)
    times.append(time.perf_counter() - start)
  return times[0], times[1]


def make_large_folder(root: str, count: int = 256, side: int = 1024, threads: int = 8) -> str:
  """`root/big/train/good/*.png`: `count` natural-looking side x side PNGs."""
  photos = [
    skimage.data.astronaut(),
    skimage.data.coffee(),
    skimage.data.chelsea(),
    skimage.data.rocket(),
    skimage.data.immunohistochemistry(),
  ]
  folder = os.path.join(root, 'big', 'train', 'good')
  os.makedirs(folder, exist_ok=True)

  def write(i):
    rng = np.random.default_rng(i)
    photo = photos[i % len(photos)]
    crop = min(photo.shape[:2]) * 3 // 4
    y = rng.integers(0, photo.shape[0] - crop + 1)
    x = rng.integers(0, photo.shape[1] - crop + 1)
    img = Image.fromarray(photo[y : y + crop, x : x + crop]).resize(
      (side, side), Image.Resampling.BICUBIC
    )
    arr = np.asarray(img).astype(np.int16)
    if rng.random() < 0.5:
      arr = arr[:, ::-1]
    arr = arr + rng.normal(0, 2.0, arr.shape).astype(np.int16)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(
      os.path.join(folder, f'{i:03d}.png'), compress_level=1
    )

  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    list(pool.map(write, range(count)))
  return root


def report(name, count, cold, warm):
  print(
    f'{name:<42} cold {cold:6.2f} s {count / cold:8.1f} img/s   '
    f'warm {warm:6.2f} s {count / warm:8.1f} img/s',
    flush=True,
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--threads', type=int, default=8)
  parser.add_argument('--category', default='coffee', choices=synthetic.CATEGORIES)
  parser.add_argument('--skip-large', action='store_true')
  args = parser.parse_args()
  print(f'{os.cpu_count()} CPUs, {args.threads} decoding threads, batch {BATCH}', flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    root = synthetic.ensure_synthetic(os.path.join(tmp, 'synthetic'), categories=[args.category])
    print(f'generated synthetic {args.category} in {time.perf_counter() - start:.1f} s', flush=True)
    samples = list_mvtec(root, args.category, 'train')
    for size in (256, 128):
      cold, warm = time_epochs(samples, size, args.threads)
      report(
        f'synthetic {args.category} ({len(samples)} x 256^2) -> {size}', len(samples), cold, warm
      )
    if args.skip_large:
      return
    start = time.perf_counter()
    make_large_folder(tmp, threads=args.threads)
    samples = list_mvtec(tmp, 'big', 'train')
    mb = sum(os.path.getsize(s.image_path) for s in samples) / 2**20
    print(
      f'generated {len(samples)} PNGs of 1024^2 ({mb:.0f} MiB) in '
      f'{time.perf_counter() - start:.1f} s',
      flush=True,
    )
    cold, warm = time_epochs(samples, 256, args.threads)
    report(f'folder ({len(samples)} x 1024^2 PNG) -> 256', len(samples), cold, warm)


if __name__ == '__main__':
  main()
