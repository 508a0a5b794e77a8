"""Decoding and resizing of images and ground-truth masks.

Every image becomes RGB float32 in [0, 1], whatever its file format (PNG, JPEG,
BMP, TIFF), mode (grayscale, RGB, RGBA, palette, ...) and bit depth (8 or 16):

* Grayscale is repeated to three channels; palette images take their palette
  colours.
* An alpha channel is DROPPED, not composited: industrial images that carry
  alpha nearly always have it constant, and compositing would invent a
  background colour the camera never saw. The colour channels are used as
  stored.
* 8-bit samples are divided by 255 and 16-bit samples by 65535 (so 16-bit
  precision survives into float32). 16-bit grayscale PNGs go through PIL (modes
  'I;16' / 'I'); 16-bit COLOUR PNGs (RGB, RGBA, gray+alpha) through imagecodecs'
  libpng decoder, since PIL can only decode them by truncating to 8 bits; TIFFs
  through tifffile. Float TIFFs must already be in [0, 1].
* EXIF orientation is not applied (as in RD4AD's PIL loader); masks carry no
  EXIF, so applying it to images alone could misalign them with their masks.

A file that is missing, truncated or not decodable raises `DataError` naming
it. PIL's `ImageFile.LOAD_TRUNCATED_IMAGES` is left at its default False and
`.load()` is called, so truncation is detected at decode time rather than
filled with zeros.

Resizing follows RD4AD's `transforms.Resize((S, S))` on PIL images: PIL
bilinear with antialiasing, applied per channel in PIL mode 'F' so that no
8-bit rounding happens. RD4AD resizes ground-truth masks the same way (bilinear,
then > 0.5); `resize_mask` offers that and nearest neighbour.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading

import imagecodecs
import numpy as np
import tifffile
from PIL import Image

from msrd_jax.data.errors import DataError

_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
_TIFF_MAGICS = (b'II*\x00', b'MM\x00*', b'II+\x00', b'MM\x00+')
# PNG IHDR colour types that have more than one sample per pixel.
_PNG_COLOUR_TYPES = {2: 'RGB', 4: 'gray+alpha', 6: 'RGBA'}


@dataclasses.dataclass(frozen=True)
class _Decoded:
  """Raw samples of one file before conversion.

  array: (H, W) or (H, W, C) of uint8 / uint16 / int32 / bool / float.
  full_scale: the sample value that means 'white' (255, 65535 or 1).
  lossy: the file went through lossy compression (JPEG), so its zeros are not
    exact.
  """

  array: np.ndarray
  full_scale: float
  lossy: bool


def _is_16bit_colour_png(head: bytes) -> bool:
  return (
    head.startswith(_PNG_SIGNATURE)
    and len(head) >= 26
    and head[24] == 16
    and head[25] in _PNG_COLOUR_TYPES
  )


def _decode_png16(path: str) -> _Decoded:
  """A 16-bit colour PNG, every bit kept (libpng, through imagecodecs)."""
  try:
    with open(path, 'rb') as f:
      arr = imagecodecs.png_decode(f.read())
  except Exception as e:  # imagecodecs raises its own error types for corrupt files
    raise DataError(f'cannot decode image file {path}: {type(e).__name__}: {e}') from e
  if arr.dtype != np.uint16:
    raise DataError(f'{path}: a 16-bit PNG decoded to {arr.dtype} samples')
  return _Decoded(arr, 65535.0, False)


def _decode_pil(path: str, head: bytes) -> _Decoded:
  if _is_16bit_colour_png(head):
    return _decode_png16(path)
  try:
    with Image.open(path) as im:
      im.load()  # decode now, so that truncation raises here
      lossy = im.format in ('JPEG', 'MPO')
      mode = im.mode
      if mode in ('1', 'L', 'LA', 'RGB', 'RGBA'):
        arr = np.asarray(im)
        full_scale = 1.0 if mode == '1' else 255.0
      elif mode.startswith('I;16'):
        arr = np.asarray(im)  # uint16 in native order
        full_scale = 65535.0
      elif mode == 'I':
        # PIL opens 16-bit grayscale PNGs as 'I' in some versions.
        arr = np.asarray(im)
        full_scale = 65535.0
      elif mode == 'F':
        arr = np.asarray(im)
        full_scale = 1.0
      else:  # 'P', 'PA', 'CMYK', 'YCbCr', 'LAB', 'HSV', 'RGBX', 'La', ...
        arr = np.asarray(im.convert('RGB'))
        full_scale = 255.0
  except Exception as e:  # PIL raises many types for corrupt files
    raise DataError(f'cannot decode image file {path}: {type(e).__name__}: {e}') from e
  if mode == 'I' and arr.size and (arr.min() < 0 or arr.max() > 65535):
    raise DataError(
      f'{path} has 32-bit integer samples in [{arr.min()}, {arr.max()}]; '
      'expected 8-bit or 16-bit samples.'
    )
  return _Decoded(arr, full_scale, lossy)


def _decode_tiff(path: str) -> _Decoded:
  try:
    with tifffile.TiffFile(path) as tif:
      series = tif.series[0]
      axes = series.axes
      arr = series.asarray()
      compression = str(tif.pages[0].compression)
  except Exception as e:  # tifffile raises several types for corrupt files
    raise DataError(f'cannot decode TIFF file {path}: {type(e).__name__}: {e}') from e
  if axes in ('SYX', 'CYX') and arr.shape[0] <= 4:
    arr = np.moveaxis(arr, 0, -1)
  elif axes not in ('YX', 'YXS', 'YXC'):
    raise DataError(
      f'{path} is a TIFF with axes {axes!r} and shape {arr.shape}; '
      'expected a single 2-D image (axes YX, YXS or SYX).'
    )
  if arr.dtype == np.uint8:
    full_scale = 255.0
  elif arr.dtype == np.uint16:
    full_scale = 65535.0
  elif arr.dtype == np.bool_:
    full_scale = 1.0
  elif arr.dtype.kind == 'f':
    full_scale = 1.0
  else:
    raise DataError(
      f'{path} is a TIFF with {arr.dtype} samples; expected uint8, uint16, bool or float in [0, 1].'
    )
  return _Decoded(arr, full_scale, 'JPEG' in compression.upper())


def read_head(path: str) -> bytes:
  """The first 32 bytes of an image file (its format's magic); DataError naming the file
  when it is missing, unreadable or empty."""
  try:
    with open(path, 'rb') as f:
      head = f.read(32)
  except FileNotFoundError:
    raise DataError(f'image file {path} does not exist') from None
  except OSError as e:
    raise DataError(f'cannot read image file {path}: {e}') from e
  if not head:
    raise DataError(f'image file {path} is empty')
  return head


def _decode(path: str | os.PathLike) -> tuple[str, _Decoded]:
  path = os.fspath(path)
  head = read_head(path)
  if head[:4] in _TIFF_MAGICS:
    return path, _decode_tiff(path)
  return path, _decode_pil(path, head)


def _colour_channels(arr: np.ndarray, path: str) -> np.ndarray:
  """(H, W) or (H, W, C) -> (H, W, 3), dropping alpha."""
  if arr.ndim == 2:
    arr = arr[..., None]
  if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4):
    raise DataError(
      f'{path} decodes to shape {arr.shape}; expected (H, W) or (H, W, C) with C in 1..4.'
    )
  if arr.shape[-1] <= 2:  # gray or gray+alpha
    return np.repeat(arr[..., :1], 3, axis=-1)
  return arr[..., :3]


def load_image(path: str | os.PathLike) -> np.ndarray:
  """Reads an image file for the model.

  Args:
    path: a PNG, JPEG, BMP or TIFF file (the format is taken from the content,
      not the extension).

  Returns:
    (H, W, 3) float32 in [0, 1].

  Raises:
    DataError: naming the file, if it is missing, truncated, undecodable or of
      an unsupported sample format.
  """
  path, dec = _decode(path)
  arr = _colour_channels(dec.array, path)
  out = arr.astype(np.float32)
  if dec.full_scale != 1.0:
    out /= np.float32(dec.full_scale)
  elif arr.dtype.kind == 'f':
    lo, hi = float(out.min()), float(out.max())
    if lo < -1e-6 or hi > 1 + 1e-6 or not np.isfinite(out).all():
      raise DataError(f'{path} holds float samples in [{lo}, {hi}]; expected values in [0, 1].')
    np.clip(out, 0.0, 1.0, out=out)
  return out


def load_mask(path: str | os.PathLike) -> np.ndarray:
  """Reads a ground-truth mask.

  Binarization: colour channels are reduced by max (alpha dropped). For
  lossless integer files (PNG, BMP, TIFF) a pixel is defective iff its value
  is > 0: this is right for MVTec's 0/255 masks and for VisA's masks, which
  store small nonzero values (1, or one value per defect) that a '> half of
  full scale' rule would wipe out. Lossy files (JPEG) are binarized at > half
  of full scale, since their compression noise makes zeros inexact. Float
  (TIFF) masks are binarized at > 0.5, RD4AD's threshold. A grey mask (more
  than two values, reaching half of full scale: anti-aliased edges, a soft
  map) is binarized at > half of full scale, RD4AD's > 0.5, since > 0 would
  mark nearly all of it defective; a warning names the first such mask of
  each category once.

  Args:
    path: a mask image file.

  Returns:
    (H, W) bool, True on defective pixels.
  """
  path, dec = _decode(path)
  arr = dec.array
  if arr.ndim == 3:
    arr = arr[..., :3].max(axis=-1) if arr.shape[-1] >= 3 else arr[..., 0]
  if arr.ndim != 2:
    raise DataError(f'mask {path} decodes to shape {dec.array.shape}; expected a 2-D image.')
  if arr.dtype.kind == 'f':
    return arr > 0.5
  if dec.lossy:
    return arr > 0.5 * dec.full_scale
  if _is_grey(arr, dec.full_scale):
    return _binarize_grey(path, arr, dec.full_scale)
  return arr > 0


_grey_warned: set[str] = set()
_grey_lock = threading.Lock()


def _is_grey(arr: np.ndarray, full_scale: float) -> bool:
  """More than two values, reaching half of full scale: a grey mask, not a label map.

  VisA's label maps hold small values (1, or one per defect), far below half scale.
  """
  if arr.dtype.kind == 'b' or not arr.size or float(arr.max()) < 0.5 * full_scale:
    return False
  return len(np.unique(arr)) > 2


def _binarize_grey(path: str, arr: np.ndarray, full_scale: float) -> np.ndarray:
  """> half of full scale; warns once per category (the mask folder's parent)."""
  out = arr > 0.5 * full_scale
  key = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  with _grey_lock:
    first = key not in _grey_warned
    _grey_warned.add(key)
  if first:
    levels = len(np.unique(arr))
    print(
      f'warning: the mask {path} is not binary ({levels} grey levels in '
      f'0..{int(full_scale)}): binarized at > {int(full_scale) // 2} (half of full scale, '
      f'as RD4AD), which marks {100 * out.mean():.1f} % of it defective (> 0 would mark '
      f'{100 * (arr > 0).mean():.1f} %); other grey masks of this category are treated '
      'alike without another warning',
      file=sys.stderr,
      flush=True,
    )
  return out


def resize_image(img: np.ndarray, size: int) -> np.ndarray:
  """Resizes like torchvision's `Resize((size, size))` on a PIL image.

  PIL bilinear with antialiasing (the filter support widens when shrinking),
  run per channel in mode 'F' so that 16-bit precision survives; on 8-bit
  input it agrees with PIL's uint8 RGB resize to within 1/255.

  Args:
    img: (H, W, C) float32 in [0, 1].
    size: the output side.

  Returns:
    (size, size, C) float32, a new array.
  """
  img = np.asarray(img, dtype=np.float32)
  if img.ndim != 3:
    raise ValueError(f'resize_image expects (H, W, C), got shape {img.shape}')
  if img.shape[:2] == (size, size):
    return img.copy()
  planes = np.ascontiguousarray(np.moveaxis(img, -1, 0))
  out = np.empty((size, size, img.shape[-1]), np.float32)
  for c, plane in enumerate(planes):
    resized = Image.fromarray(plane).resize((size, size), Image.Resampling.BILINEAR)
    out[..., c] = np.asarray(resized)
  return out


MASK_RESIZES = ('nearest', 'bilinear')


def resize_mask(mask: np.ndarray, size: int, method: str = 'nearest') -> np.ndarray:
  """Resizes a binary mask [eval.mask_resize].

  'nearest': PIL nearest neighbour; every output pixel copies one input pixel.
  'bilinear': RD4AD's ground truth. Its `transforms.Resize((S, S))` resizes the 0/255
  mask as a PIL 'L' image with PIL's bilinear filter (antialiased when shrinking, 8-bit
  result), `ToTensor` divides by 255 and its evaluation keeps `gt > 0.5`: here the mask
  becomes 0/255 'L', is resized the same way and thresholded at > 127 (v / 255 > 0.5).
  On MVTec's 0/255 masks this is RD4AD's mask exactly; thin defects shrink or vanish
  where less than half of a pixel's filter window covers them.

  Args:
    mask: (H, W) bool (or 0/1 integers).
    size: the output side.
    method: 'nearest' or 'bilinear'.

  Returns:
    (size, size) bool.
  """
  mask = np.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f'resize_mask expects (H, W), got shape {mask.shape}')
  if method not in MASK_RESIZES:
    raise ValueError(f'method must be one of {MASK_RESIZES}, got {method!r}')
  u8 = np.where(mask.astype(bool), np.uint8(255), np.uint8(0))
  if u8.shape == (size, size):
    return u8 > 127
  resample = Image.Resampling.NEAREST if method == 'nearest' else Image.Resampling.BILINEAR
  resized = Image.fromarray(u8).resize((size, size), resample)
  return np.asarray(resized) > 127
