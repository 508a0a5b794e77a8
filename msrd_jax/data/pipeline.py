"""Input pipeline: deterministic training stream and padded evaluation batches.

Decoding and resizing run on a thread pool (PIL, numpy and zlib release the
GIL for most of that work); each iterator owns its pool, fills batches
`prefetch` batches ahead, and stops its threads when closed (`close()`, a
`with` block, or garbage collection). An exception raised while loading a file
reaches the consumer as a `DataError` naming the file.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from msrd_jax.data.errors import DataError
from msrd_jax.data.folder import Sample
from msrd_jax.data.images import MASK_RESIZES, load_image, load_mask, resize_image, resize_mask

_THREAD_PREFIX = 'msrd_data'


def _image_path(sample: Sample | str | os.PathLike) -> str:
  return sample.image_path if isinstance(sample, Sample) else os.fspath(sample)


def _reraise_with_path(path: str, e: Exception) -> DataError:
  if isinstance(e, DataError):
    return e
  err = DataError(f'while loading {path}: {type(e).__name__}: {e}')
  err.__cause__ = e
  return err


class _PrefetchIterator:
  """Yields batches built by a thread pool, a few batches ahead.

  plan: an iterator of batch specs (possibly infinite).
  start(spec) -> (buffers, row_jobs): allocates the batch and lists the
    zero-argument callables that fill its rows (each writes its own row).
  finish(spec, buffers) -> the batch to yield.
  """

  def __init__(
    self,
    plan: Iterator[Any],
    start: Callable[[Any], tuple[Any, list[Callable[[], None]]]],
    finish: Callable[[Any, Any], Any],
    num_threads: int,
    prefetch: int,
  ):
    self._plan = plan
    self._start = start
    self._finish = finish
    self._ahead = prefetch + 1
    self._pending: collections.deque = collections.deque()
    self._pool = concurrent.futures.ThreadPoolExecutor(
      max_workers=num_threads, thread_name_prefix=_THREAD_PREFIX
    )
    self._closed = False
    self._exhausted = False

  def _fill(self):
    while not self._exhausted and len(self._pending) < self._ahead:
      try:
        spec = next(self._plan)
      except StopIteration:
        self._exhausted = True
        return
      buffers, jobs = self._start(spec)
      futures = [self._pool.submit(job) for job in jobs]
      self._pending.append((spec, buffers, futures))

  def __iter__(self):
    return self

  def __next__(self):
    if self._closed:
      raise StopIteration
    try:
      self._fill()
      if not self._pending:
        self.close()
        raise StopIteration
      spec, buffers, futures = self._pending.popleft()
      for f in futures:
        f.result()  # re-raises a worker's exception here, in the consumer
      self._fill()  # keep the pool busy while the consumer works
    except BaseException:
      self.close()
      raise
    return self._finish(spec, buffers)

  def close(self, wait: bool = True):
    """Cancels queued work and stops the threads; idempotent."""
    if self._closed:
      return
    self._closed = True
    for _, _, futures in self._pending:
      for f in futures:
        f.cancel()
    self._pending.clear()
    # Never join from a pool thread (a __del__ may run there).
    wait = wait and not threading.current_thread().name.startswith(_THREAD_PREFIX)
    self._pool.shutdown(wait=wait, cancel_futures=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    try:
      self.close(wait=False)
    except Exception:  # interpreter shutdown
      pass


def _check_threads(num_threads: int, prefetch: int):
  if num_threads < 1:
    raise DataError(f'num_threads must be >= 1, got {num_threads}')
  if prefetch < 0:
    raise DataError(f'prefetch must be >= 0, got {prefetch}')


class TrainLoader:
  """An infinite, deterministic, resumable stream of training batches.

  The stream of images is the concatenation of per-epoch permutations of the
  samples, the permutation of epoch e being
  `np.random.default_rng([seed, e]).permutation(N)`. Global step k takes
  stream elements [k*B, (k+1)*B): batches run across epoch boundaries, so no
  image is dropped, no batch is partial, and `iterate(start_step=k)` resumes
  exactly. Process p of P takes the contiguous slice
  [p*B/P, (p+1)*B/P) of each global batch; its rows are then split across its
  devices by `shard_batch`.

  Decoded, resized images are cached in memory, up to `cache_bytes`: the first
  images loaded stay cached and later ones are decoded every time, which for
  a random order gives a hit rate of cache_bytes / data-set size (an LRU would
  thrash to ~0 when the data set does not fit).
  """

  def __init__(
    self,
    samples: Sequence[Sample | str],
    image_size: int,
    global_batch_size: int,
    seed: int,
    num_local_devices: int = 1,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 8,
    prefetch: int = 2,
    cache_bytes: int = 4 * 2**30,
  ):
    """Args:
    samples: the training images (Samples or paths), in a fixed order that
      every process shares.
    image_size: the side S of the square output images.
    global_batch_size: B, summed over all processes and devices.
    seed: the seed of the epoch permutations.
    num_local_devices: devices of this process; B must divide by
      process_count * num_local_devices.
    process_index, process_count: this process and the number of processes.
    num_threads: decoding threads.
    prefetch: batches prepared ahead of the one being consumed.
    cache_bytes: memory for decoded, resized images.
    """
    self._paths = [_image_path(s) for s in samples]
    if not self._paths:
      raise DataError('TrainLoader got no training samples')
    if image_size < 1:
      raise DataError(f'image_size must be >= 1, got {image_size}')
    if process_count < 1 or not 0 <= process_index < process_count:
      raise DataError(f'process_index {process_index} is not in [0, process_count={process_count})')
    if num_local_devices < 1:
      raise DataError(f'num_local_devices must be >= 1, got {num_local_devices}')
    shards = process_count * num_local_devices
    if global_batch_size < 1 or global_batch_size % shards:
      raise DataError(
        f'the global batch size {global_batch_size} must be a positive '
        f'multiple of process_count * num_local_devices = {process_count} '
        f'* {num_local_devices} = {shards}'
      )
    _check_threads(num_threads, prefetch)
    self.image_size = int(image_size)
    self.global_batch_size = int(global_batch_size)
    self.local_batch_size = self.global_batch_size // process_count
    self.seed = int(seed)
    self.process_index = process_index
    self.process_count = process_count
    self.num_threads = num_threads
    self.prefetch = prefetch
    image_bytes = self.image_size**2 * 3 * 4
    self._cache_capacity = max(0, int(cache_bytes) // image_bytes)
    self._cache: dict[int, np.ndarray] = {}
    self._cache_lock = threading.Lock()

  @property
  def num_samples(self) -> int:
    """N, the number of training images."""
    return len(self._paths)

  @property
  def steps_per_epoch(self) -> int:
    """ceil(N / B): after e * steps_per_epoch steps every image has been seen
    at least e times (batches run across epoch boundaries)."""
    return math.ceil(self.num_samples / self.global_batch_size)

  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

  def batch_indices(self, step: int) -> np.ndarray:
    """(B_local,) int64: indices into `samples` of this process's rows at
    global step `step`."""
    if step < 0:
      raise DataError(f'step must be >= 0, got {step}')
    n = self.num_samples
    first = step * self.global_batch_size + (self.process_index * self.local_batch_size)
    positions = np.arange(first, first + self.local_batch_size)
    epochs, offsets = np.divmod(positions, n)
    out = np.empty_like(positions)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self._permutation(int(e))[offsets[sel]]
    return out

  def _load(self, index: int) -> np.ndarray:
    """(S, S, 3) float32 in [0, 1], from the cache or the file."""
    img = self._cache.get(index)
    if img is not None:
      return img
    path = self._paths[index]
    try:
      img = resize_image(load_image(path), self.image_size)
    except Exception as e:
      raise _reraise_with_path(path, e) from e
    with self._cache_lock:
      if len(self._cache) < self._cache_capacity:
        img.setflags(write=False)  # shared by later batches: never alias
        self._cache[index] = img
    return img

  def iterate(self, start_step: int = 0) -> _PrefetchIterator:
    """Batches from global step `start_step` on, forever.

    Returns:
      A closeable iterator (also a context manager) of dicts
      {'image': (B_local, S, S, 3) float32 in [0, 1], 'step': int}, where
      B_local = global_batch_size / process_count.
    """
    if start_step < 0:
      raise DataError(f'start_step must be >= 0, got {start_step}')
    s = self.image_size

    def plan():
      step = start_step
      while True:
        yield step, self.batch_indices(step)
        step += 1

    def start(spec):
      _, indices = spec
      out = np.empty((len(indices), s, s, 3), np.float32)

      def job(row, index):
        def run():
          out[row] = self._load(index)

        return run

      return out, [job(r, int(i)) for r, i in enumerate(indices)]

    def finish(spec, out):
      return {'image': out, 'step': spec[0]}

    return _PrefetchIterator(plan(), start, finish, self.num_threads, self.prefetch)

  def __iter__(self):
    return self.iterate(0)


class EvalLoader:
  """The test set in order, in fixed-size batches for a jitted consumer.

  Every batch has exactly `batch_size` rows; the rows after the last sample
  are zeros with valid=False.
  """

  def __init__(
    self,
    samples: Sequence[Sample],
    image_size: int,
    batch_size: int,
    resolution: int | None = None,
    num_threads: int = 8,
    prefetch: int = 2,
    on_error: str = 'raise',
    mask_resize: str = 'nearest',
  ):
    """Args:
    samples: the test samples (from `list_samples`).
    image_size: the side S of the images.
    batch_size: rows per batch.
    resolution: the side R of the masks; None means image_size.
    num_threads: decoding threads.
    prefetch: batches prepared ahead.
    on_error: 'raise': a file that cannot be loaded stops the iteration with a
      DataError naming it; 'record': its row stays zero and its message goes to
      the batch's 'error' slot, so that one bad file among many new images does
      not stop the others (prediction).
    mask_resize: how masks reach R x R, 'nearest' or 'bilinear' (then > 0.5, RD4AD's
      way); see `resize_mask` [eval.mask_resize].
    """
    self.samples = list(samples)
    if not self.samples:
      raise DataError('EvalLoader got no test samples')
    if batch_size < 1:
      raise DataError(f'batch_size must be >= 1, got {batch_size}')
    _check_threads(num_threads, prefetch)
    if on_error not in ('raise', 'record'):
      raise DataError(f"on_error must be 'raise' or 'record', got {on_error!r}")
    self.on_error = on_error
    self.image_size = int(image_size)
    self.batch_size = int(batch_size)
    self.resolution = int(resolution or image_size)
    if mask_resize not in MASK_RESIZES:
      raise DataError(f'mask_resize must be one of {MASK_RESIZES}, got {mask_resize!r}')
    self.mask_resize = mask_resize
    self.num_threads = num_threads
    self.prefetch = prefetch

  @property
  def num_samples(self) -> int:
    return len(self.samples)

  def __len__(self) -> int:
    """The number of batches, ceil(num_samples / batch_size)."""
    return math.ceil(len(self.samples) / self.batch_size)

  def _load_row(
    self, sample: Sample, images: np.ndarray, masks: np.ndarray, errors: list, row: int
  ):
    path = sample.image_path
    try:
      img = load_image(path)
      if sample.mask_path is not None:
        path = sample.mask_path
        mask = load_mask(path)
        if mask.shape != img.shape[:2]:
          raise DataError(
            f'the mask {sample.mask_path} is {mask.shape[1]}x{mask.shape[0]}'
            f' (WxH) but its image {sample.image_path} is '
            f'{img.shape[1]}x{img.shape[0]}'
          )
        masks[row] = resize_mask(mask, self.resolution, self.mask_resize)
      path = sample.image_path
      images[row] = resize_image(img, self.image_size)
    except Exception as e:
      error = _reraise_with_path(path, e)
      if self.on_error == 'raise':
        raise error from e
      images[row] = 0.0  # a partly written row must not look like an image
      masks[row] = 0
      errors[row] = str(error)

  def __iter__(self) -> _PrefetchIterator:
    """A closeable iterator of dicts:

    'image': (b, S, S, 3) float32 in [0, 1]
    'mask': (b, R, R) uint8 in {0, 1}, all zero for good images
    'label': (b,) int32, 1 = defective
    'defect_type', 'name': lists of b str ('' on padding rows)
    'valid': (b,) bool, False on padding rows
    'error': list of b, None or (on_error='record') the message of a file that
      could not be loaded; its row is zeros but stays valid, so that the valid
      rows are always the first ones
    with b = batch_size.
    """
    b, s, r = self.batch_size, self.image_size, self.resolution

    def plan():
      for first in range(0, len(self.samples), b):
        yield self.samples[first : first + b]

    def start(chunk):
      images = np.zeros((b, s, s, 3), np.float32)
      masks = np.zeros((b, r, r), np.uint8)
      errors = [None] * b

      def job(row, sample):
        return lambda: self._load_row(sample, images, masks, errors, row)

      return (images, masks, errors), [job(i, x) for i, x in enumerate(chunk)]

    def finish(chunk, buffers):
      images, masks, errors = buffers
      n = len(chunk)
      pad = [''] * (b - n)
      label = np.zeros((b,), np.int32)
      label[:n] = [x.label for x in chunk]
      return {
        'image': images,
        'mask': masks,
        'label': label,
        'defect_type': [x.defect_type for x in chunk] + pad,
        'name': [x.name for x in chunk] + pad,
        'valid': np.arange(b) < n,
        'error': errors,
      }

    return _PrefetchIterator(plan(), start, finish, self.num_threads, self.prefetch)


def shard_batch(array: Any, num_devices: int) -> Any:
  """Splits the leading axis for `jax.pmap`.

  Args:
    array: (B, ...) array (numpy or jax).
    num_devices: D, which must divide B.

  Returns:
    (D, B / D, ...), a reshape (no copy for numpy).
  """
  b = array.shape[0]
  if num_devices < 1 or b % num_devices:
    raise DataError(f'a batch of {b} rows cannot be split evenly across {num_devices} devices')
  return array.reshape((num_devices, b // num_devices) + tuple(array.shape[1:]))
