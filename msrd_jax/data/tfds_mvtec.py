"""A TensorFlow Datasets builder for MVTec AD, usable without TensorFlow.

One BuilderConfig per category ('mvtec_ad/bottle', ...). MANUAL download: the
manual_dir holds either the official archive `mvtec_anomaly_detection.tar.xz`
or the extracted folder (`<manual_dir>/<category>/train/...`, possibly under a
`mvtec_anomaly_detection/` folder). The listing is `folder.list_mvtec`, so
the layout rules and errors are those of the folder loader.

Features: image (H, W, 3) uint8 PNG; mask (H, W, 1) uint8 PNG with 0/255 like
the original masks (all zero for good images); label ClassLabel good/defective;
defect_type and file_name (the path inside the category, e.g.
'test/crack/000.png') as text. Splits: train, test.

TensorFlow finding (tensorflow-datasets 4.9.10, no tensorflow installed):

* `tfds.features.Image` fed a numpy array encodes it with `tf.image.encode_png`
  and fails with "No module named 'tensorflow'"; fed a PIL image (or a path or
  PNG bytes) it encodes with PIL and needs no TensorFlow. So examples are
  given as PIL images.
* Writing with `file_format='array_record'` and reading back with
  `builder.as_data_source()` (or `tfds.data_source(...)`) works without
  TensorFlow; data sources decode images with PIL (or OpenCV if installed).
  The default tfrecord format and `as_dataset()` (tf.data) need TensorFlow.
* TFDS 4.9.10 fails on a builder defined in a package when the backport
  importlib_resources is not installed (it needs it only for an isinstance
  check); `MvtecAd.code_path` is overridden so that it is not needed.
* TFDS's own extractor has no .tar.xz support and uses tf.io.gfile, so the
  archive is read with Python's `tarfile`, extracting only the requested
  category into `<data_dir>/downloads/`.
Hence images stay PNG-encoded (compact, standard TFDS features) and TensorFlow
is never required. Tried with: `MvtecAd(config=..., data_dir=...,
file_format='array_record').download_and_prepare(download_config=
tfds.download.DownloadConfig(manual_dir=...))` then `as_data_source()` on a
tiny generated tree (see tests/test_data_tfds.py).

Importing this module registers the 'mvtec_ad' builder with TFDS. `prepare`
checks the manual_dir first (TFDS itself raises a bare AssertionError for an
empty one) and skips it once the category is built.

  builder = prepare('bottle', data_dir='~/tensorflow_datasets',
                    manual_dir='~/Downloads')
  test = builder.as_data_source(split='test')
  example = test[0]  # {'image': uint8 (H, W, 3), 'mask': ..., 'label': 1, ...}
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from msrd_jax.data.errors import DataError
from msrd_jax.data.folder import MVTEC_CATEGORIES, list_mvtec
from msrd_jax.data.images import load_image, load_mask

ARCHIVE_NAME = 'mvtec_anomaly_detection.tar.xz'
_FILE_FORMAT = 'array_record'


def _find_extracted(folder: str, category: str) -> str | None:
  """The root holding `<category>/train` under `folder`, if any."""
  for root in (folder, os.path.join(folder, 'mvtec_anomaly_detection')):
    if os.path.isdir(os.path.join(root, category, 'train')):
      return root
  return None


def _extract_category(archive: str, category: str, dest: str) -> str:
  """Extracts `<category>/` of the archive into `dest` (atomic); returns the
  root that holds it. Reuses an earlier complete extraction."""
  done = os.path.join(dest, category + '.complete')
  target = os.path.join(dest, category)
  if os.path.exists(done) and os.path.isdir(target):
    return dest
  os.makedirs(dest, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{category}.tmp-', dir=dest)
  try:
    found = False
    try:
      with tarfile.open(archive, 'r:*') as tar:
        for member in tar:
          parts = [p for p in member.name.split('/') if p not in ('', '.')]
          if parts[:1] == ['mvtec_anomaly_detection']:
            parts = parts[1:]
          if not parts or parts[0] != category:
            continue
          found = True
          member.name = '/'.join(parts)
          tar.extract(member, tmp, filter='data')
    except (OSError, tarfile.TarError, EOFError) as e:
      raise DataError(f'cannot read the MVTec AD archive {archive}: {e}') from e
    if not found:
      raise DataError(f'the archive {archive} has no {category}/ folder')
    shutil.rmtree(target, ignore_errors=True)
    os.rename(os.path.join(tmp, category), target)
    with open(done, 'w') as f:
      f.write(archive + '\n')
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return dest


def check_manual_dir(manual_dir: str | os.PathLike, category: str) -> tuple[str | None, str | None]:
  """(extracted root, None) or (None, archive path) for a category; a
  DataError saying what to put there otherwise (TFDS would raise a bare
  AssertionError for an empty manual_dir)."""
  manual = os.path.expanduser(os.fspath(manual_dir))
  root = _find_extracted(manual, category) if os.path.isdir(manual) else None
  if root:
    return root, None
  archive = os.path.join(manual, ARCHIVE_NAME)
  if os.path.isfile(archive):
    return None, archive
  raise DataError(
    f'the manual_dir {manual} holds neither {ARCHIVE_NAME} nor an extracted '
    f'{category}/ folder.\n{MvtecAd.MANUAL_DOWNLOAD_INSTRUCTIONS}'
  )


class MvtecAd(tfds.core.GeneratorBasedBuilder):
  """MVTec AD, one config per category, built from a manual download."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(name=c, description=f'MVTec AD {c}') for c in MVTEC_CATEGORIES
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
  Download MVTec AD (free registration) from
  https://www.mvtec.com/company/research/datasets/mvtec-ad
  and put in the manual_dir either the archive {ARCHIVE_NAME}
  or its extracted content (the category folders bottle/, cable/, ... each
  with train/, test/ and ground_truth/).
  """

  # TFDS 4.9.10 locates a packaged builder's code with an isinstance check
  # against importlib_resources, which it only requires on Python < 3.9, so
  # the default fails with ModuleNotFoundError here; this file is the answer.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=(
        'MVTec AD: industrial images for unsupervised anomaly '
        'detection; train holds good images only, test good and '
        'defective ones with pixel masks.'
      ),
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(
            shape=(None, None, 3), dtype=np.uint8, encoding_format='png'
          ),
          'mask': tfds.features.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format='png'),
          'label': tfds.features.ClassLabel(names=['good', 'defective']),
          'defect_type': tfds.features.Text(),
          'file_name': tfds.features.Text(),
        }
      ),
      supervised_keys=('image', 'label'),
      homepage='https://www.mvtec.com/company/research/datasets/mvtec-ad',
      citation=(
        '@article{bergmann2021mvtec, title={The MVTec Anomaly '
        'Detection Dataset}, author={Bergmann, Paul and Batzner, '
        'Kilian and Fauser, Michael and Sattlegger, David and '
        'Steger, Carsten}, journal={IJCV}, year={2021}}'
      ),
    )

  def _data_root(self, dl_manager) -> str:
    category = self.builder_config.name
    manual = os.fspath(dl_manager.manual_dir)
    root, archive = check_manual_dir(manual, category)
    if root:
      return root
    dest = os.path.join(os.fspath(dl_manager.download_dir), 'mvtec_ad')
    return _extract_category(archive, category, dest)

  def _split_generators(self, dl_manager):
    root = self._data_root(dl_manager)
    category = self.builder_config.name
    return {
      split: self._generate_examples(list_mvtec(root, category, split))
      for split in ('train', 'test')
    }

  def _generate_examples(self, samples):
    for s in samples:
      image = np.round(load_image(s.image_path) * 255).astype(np.uint8)
      if s.mask_path is None:
        mask = np.zeros(image.shape[:2], np.uint8)
      else:
        mask = load_mask(s.mask_path).astype(np.uint8) * 255
        if mask.shape != image.shape[:2]:
          raise DataError(
            f'the mask {s.mask_path} is {mask.shape} but its '
            f'image {s.image_path} is {image.shape[:2]}'
          )
      # PIL images, not arrays: TFDS encodes arrays with TensorFlow.
      yield (
        s.name,
        {
          'image': Image.fromarray(image),
          'mask': Image.fromarray(mask),
          'label': s.label,
          'defect_type': s.defect_type,
          'file_name': s.name,
        },
      )


def prepare(category: str, data_dir: str | os.PathLike, manual_dir: str | os.PathLike) -> MvtecAd:
  """Builds (once) the array_record files of one category and returns the
  builder; read them with `builder.as_data_source(split='train'|'test')`."""
  if category not in MVTEC_CATEGORIES:
    raise DataError(
      f'unknown MVTec AD category {category!r}; choose from {", ".join(MVTEC_CATEGORIES)}'
    )
  builder = MvtecAd(
    config=category, data_dir=os.path.expanduser(os.fspath(data_dir)), file_format=_FILE_FORMAT
  )
  if not builder.is_prepared():
    manual_dir = os.path.expanduser(os.fspath(manual_dir))
    check_manual_dir(manual_dir, category)
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
  return builder
