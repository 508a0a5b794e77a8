"""Finding the images of a folder of new photos (prediction, calibration).

Unlike the data set layout (msrd_jax.data.folder), such a folder is taken as it comes:
it is searched recursively, image files are recognised by their extension (PNG, JPEG,
BMP, TIFF, any case), OS clutter (hidden files, Thumbs.db, desktop.ini) is ignored and
every other file is reported as skipped rather than being an error.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from msrd_jax.data.errors import DataError
from msrd_jax.data.folder import IMAGE_EXTENSIONS, is_ignored_file, is_image_file


@dataclasses.dataclass(frozen=True)
class Found:
  """images: image files, sorted; skipped: other files, sorted; root: the folder searched
  (None when the input is one file), to which output names are relative."""

  images: list[str]
  skipped: list[str]
  root: str | None


def find_images(path: str, exclude: Sequence[str] = ()) -> Found:
  """The image files at `path`: the file itself, or every image file below the folder.

  exclude: folders not to descend into (e.g. the output folder when it lies inside
  the input). Raises DataError when `path` does not exist or holds no image.
  """
  if os.path.isfile(path):
    return Found([path], [], None)
  if not os.path.isdir(path):
    raise DataError(f'{path!r} is neither an image file nor a folder')
  excluded = {os.path.realpath(e) for e in exclude}
  images, skipped = [], []
  for folder, dirs, names in os.walk(path):
    dirs[:] = sorted(
      d
      for d in dirs
      if not is_ignored_file(d) and os.path.realpath(os.path.join(folder, d)) not in excluded
    )
    for name in names:
      if is_ignored_file(name):
        continue
      (images if is_image_file(name) else skipped).append(os.path.join(folder, name))
  if not images:
    others = f' (only {len(skipped)} other files)' if skipped else ''
    raise DataError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) under {path!r}{others}')
  return Found(sorted(images), sorted(skipped), path)
