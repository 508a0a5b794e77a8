"""Listing of data sets in the MVTec AD folder layout.

The layout (also used by MPDD, BTAD and users' own data; any folder name works
as a category)::

  <root>/<category>/train/good/*.png           normal training images
  <root>/<category>/test/good/*.png            normal test images
  <root>/<category>/test/<defect>/*.png        defective test images
  <root>/<category>/ground_truth/<defect>/<stem>_mask.png

File rules, chosen so that nothing is skipped without the user knowing:

* Image extensions png, jpg, jpeg, bmp, tif, tiff are accepted in any case.
* Hidden files (names starting with '.', e.g. .DS_Store, ._000.png from macOS)
  and the OS thumbnail files Thumbs.db / desktop.ini are ignored.
* Any other file or a sub-folder inside an image folder is an error naming
  it: a stray file there is much more likely a mistake (a wrongly exported
  image, a misplaced folder) than something to ignore.
* The normal class folder is 'good' (MVTec AD, MPDD); BTAD's 'ok' is accepted
  when train/ has no 'good'. Its name is kept as the defect type.
* The mask of test/<defect>/<stem>.<ext> is ground_truth/<defect>/
  <stem>_mask.<ext2> (MVTec AD, MPDD) or, failing that,
  ground_truth/<defect>/<stem>.<ext2> (BTAD), with ext2 any image extension.
  A defective test image without a mask is an error naming both paths.
"""

from __future__ import annotations

import dataclasses
import os

from msrd_jax.data.errors import DataError

MVTEC_TEXTURES = ('carpet', 'grid', 'leather', 'tile', 'wood')
MVTEC_OBJECTS = (
  'bottle',
  'cable',
  'capsule',
  'hazelnut',
  'metal_nut',
  'pill',
  'screw',
  'toothbrush',
  'transistor',
  'zipper',
)
MVTEC_CATEGORIES = tuple(sorted(MVTEC_TEXTURES + MVTEC_OBJECTS))

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')
SPLITS = ('train', 'test')
_GOOD_NAMES = ('good', 'ok')
_IGNORED_FILES = ('thumbs.db', 'desktop.ini')

EXPECTED_TREE = """\
  <root>/<category>/train/good/<name>.png
  <root>/<category>/test/good/<name>.png
  <root>/<category>/test/<defect>/<name>.png
  <root>/<category>/ground_truth/<defect>/<name>_mask.png"""


@dataclasses.dataclass(frozen=True)
class Sample:
  """One image of a data set.

  image_path: the image file.
  mask_path: its ground-truth mask file, None for good images.
  label: 0 = good, 1 = defective.
  defect_type: 'good' or the defect folder name (e.g. 'crack').
  name: the path relative to the category folder, with '/' separators (e.g.
    'test/crack/000.png'); unique within a category.
  """

  image_path: str
  mask_path: str | None
  label: int
  defect_type: str
  name: str


def is_ignored_file(name: str) -> bool:
  """Whether a directory entry is OS clutter that listings skip."""
  return name.startswith('.') or name.lower() in _IGNORED_FILES


def is_image_file(name: str) -> bool:
  return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _visible_entries(folder: str) -> list[str]:
  return sorted(e for e in os.listdir(folder) if not is_ignored_file(e))


def _describe(folder: str, depth: int = 2, limit: int = 12) -> str:
  """A short indented listing of what a folder holds, for error messages."""
  lines = []

  def walk(path, indent, level):
    try:
      entries = _visible_entries(path)
    except OSError:
      return
    for i, e in enumerate(entries):
      if i == limit:
        lines.append(f'{indent}... ({len(entries) - limit} more)')
        break
      full = os.path.join(path, e)
      is_dir = os.path.isdir(full)
      lines.append(f'{indent}{e}{"/" if is_dir else ""}')
      if is_dir and level < depth:
        walk(full, indent + '  ', level + 1)

  walk(folder, '  ', 1)
  return '\n'.join(lines) if lines else '  (empty)'


def _layout_error(category_dir: str, problem: str) -> DataError:
  return DataError(
    f'{category_dir} is not in the MVTec AD folder layout: {problem}.\n'
    f'Expected:\n{EXPECTED_TREE}\nFound in {category_dir}:\n'
    f'{_describe(category_dir)}'
  )


def _list_images(folder: str) -> list[str]:
  """The image file names of an image folder; errors on anything else."""
  names = []
  for e in _visible_entries(folder):
    full = os.path.join(folder, e)
    if os.path.isdir(full):
      raise DataError(
        f'{full} is a folder inside the image folder {folder}; image folders '
        'must hold only image files.'
      )
    if not is_image_file(e):
      raise DataError(
        f'{full} is not an image file (accepted extensions: '
        f'{", ".join(IMAGE_EXTENSIONS)}, any case); remove it or move it '
        f'out of {folder}.'
      )
    names.append(e)
  return names


def find_category_dir(root: str | os.PathLike, category: str) -> str:
  """`<root>/<category>` after checking both exist, with helpful errors."""
  root = os.path.abspath(os.fspath(root))
  if not os.path.isdir(root):
    raise DataError(f'data root {root} does not exist or is not a folder')
  category_dir = os.path.join(root, category)
  if not os.path.isdir(category_dir):
    found = [e for e in _visible_entries(root) if os.path.isdir(os.path.join(root, e))]
    hint = ''
    if {'train', 'test'} & set(found):
      hint = (
        f'\n{root} looks like a category folder itself; pass its parent '
        f'as the root and {os.path.basename(root)!r} as the category.'
      )
    raise DataError(
      f'category folder {category_dir} does not exist. Categories found '
      f'under {root}: {", ".join(found) if found else "(none)"}.{hint}'
    )
  return category_dir


def _good_name(category_dir: str) -> str:
  train = os.path.join(category_dir, 'train')
  if not os.path.isdir(train):
    raise _layout_error(category_dir, f'there is no folder {train}')
  for name in _GOOD_NAMES:
    if os.path.isdir(os.path.join(train, name)):
      return name
  raise _layout_error(category_dir, f'there is no folder {os.path.join(train, "good")}')


def _find_mask(gt_dir: str, gt_files: dict[str, list[str]], stem: str, image_path: str) -> str:
  """The mask file of one defective image (see the module docstring)."""
  for key in (stem + '_mask', stem):
    candidates = gt_files.get(key, [])
    if len(candidates) > 1:
      raise DataError(
        f'the image {image_path} has several candidate masks: '
        f'{", ".join(os.path.join(gt_dir, c) for c in candidates)}'
      )
    if candidates:
      return os.path.join(gt_dir, candidates[0])
  raise DataError(
    f'the defective test image {image_path} has no mask; expected '
    f'{os.path.join(gt_dir, stem + "_mask.png")}'
  )


def list_mvtec(root: str | os.PathLike, category: str, split: str) -> list[Sample]:
  """Lists one split of one category in the MVTec AD folder layout.

  Args:
    root: the folder that holds the category folders.
    category: a category folder name (any name, not only MVTec's 15).
    split: 'train' (good images only) or 'test'.

  Returns:
    The samples sorted by (defect_type, file name); absolute paths.

  Raises:
    DataError: with the folder concerned, when the layout is not followed.
  """
  if split not in SPLITS:
    raise DataError(f'split must be one of {SPLITS}, got {split!r}')
  category_dir = find_category_dir(root, category)
  good = _good_name(category_dir)
  samples = []
  if split == 'train':
    folder = os.path.join(category_dir, 'train', good)
    for name in _list_images(folder):
      samples.append(Sample(os.path.join(folder, name), None, 0, good, f'train/{good}/{name}'))
    if not samples:
      raise DataError(
        f'the training folder {folder} holds no images (accepted '
        f'extensions: {", ".join(IMAGE_EXTENSIONS)}).'
      )
    return samples

  test_dir = os.path.join(category_dir, 'test')
  if not os.path.isdir(test_dir):
    raise _layout_error(category_dir, f'there is no folder {test_dir}')
  defect_types = []
  for e in _visible_entries(test_dir):
    if not os.path.isdir(os.path.join(test_dir, e)):
      raise _layout_error(
        category_dir,
        f'{os.path.join(test_dir, e)} is a file; test images '
        'go in test/<defect type>/ folders (test/good/ for normal ones)',
      )
    defect_types.append(e)
  if not defect_types:
    raise _layout_error(category_dir, f'{test_dir} has no defect-type folders')
  for defect in defect_types:
    folder = os.path.join(test_dir, defect)
    names = _list_images(folder)
    if not names:
      raise DataError(f'the test folder {folder} holds no images')
    if defect == good:
      samples.extend(
        Sample(os.path.join(folder, n), None, 0, defect, f'test/{defect}/{n}') for n in names
      )
      continue
    gt_dir = os.path.join(category_dir, 'ground_truth', defect)
    if not os.path.isdir(gt_dir):
      raise _layout_error(category_dir, f'the defect type {defect!r} has no mask folder {gt_dir}')
    gt_files: dict[str, list[str]] = {}
    for g in _visible_entries(gt_dir):
      if is_image_file(g):
        gt_files.setdefault(os.path.splitext(g)[0], []).append(g)
    for n in names:
      image_path = os.path.join(folder, n)
      mask_path = _find_mask(gt_dir, gt_files, os.path.splitext(n)[0], image_path)
      samples.append(Sample(image_path, mask_path, 1, defect, f'test/{defect}/{n}'))
  samples.sort(key=lambda s: (s.defect_type, os.path.basename(s.image_path), s.name))
  return samples
