"""Cheap checks of every file a command will read, made before any work starts.

Finding after hours of training that a test image has no mask or that a file is cut
short wastes the hours. Listing a split (msrd_jax.data.folder) already finds missing
masks and stray files; `check_files` then reads what is cheap to read:

* every image's header (format, size, bit depth) through PIL or tifffile, without
  decoding the pixels. PNGs are read to their end and every chunk's CRC is checked,
  which finds truncated files and flipped bytes for the price of a read, not a decode;
* every mask in full (masks are few and compress well): it must decode, and have the
  size of its image. A grey mask is reported by `load_mask` (once per category).

What a header cannot show (say, a JPEG whose compressed data is damaged) is still
found when the file is decoded, and reported as a DataError naming it.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence

import tifffile
from PIL import Image

from msrd_jax.data import images
from msrd_jax.data.errors import DataError
from msrd_jax.data.folder import Sample


def image_size(path: str) -> tuple[int, int]:
  """(width, height) of an image file from its header; PNGs also have their CRCs checked.

  Raises:
    DataError: naming the file, when it is missing, empty, cut short or damaged.
  """
  head = images.read_head(path)
  try:
    if head[:4] in images._TIFF_MAGICS:
      with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        return int(page.imagewidth), int(page.imagelength)
    with Image.open(path) as im:
      size = im.size
      if im.format == 'PNG':
        im.verify()  # reads every chunk to IEND and checks its CRC; no decompression
    return size
  except DataError:
    raise
  except Exception as e:  # PIL and tifffile raise many types for damaged files
    raise DataError(f'cannot read image file {path}: {type(e).__name__}: {e}') from e


def _check(sample: Sample) -> str | None:
  try:
    width, height = image_size(sample.image_path)
    if sample.mask_path is not None:
      mask = images.load_mask(sample.mask_path)
      if mask.shape != (height, width):
        return (
          f'the mask {sample.mask_path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its '
          f'image {sample.image_path} is {width}x{height}'
        )
  except DataError as e:
    return str(e)
  return None


def check_files(samples: Sequence[Sample], num_threads: int = 8) -> None:
  """Checks the files of `samples` (see the module docstring), all of them.

  Raises:
    DataError: naming the first file with a problem, and how many others have one.
  """
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    problems = [p for p in pool.map(_check, samples) if p is not None]
  if problems:
    more = (
      f' ({len(problems) - 1} more file(s) of this split have problems too)'
      if len(problems) > 1
      else ''
    )
    raise DataError(problems[0] + more)
