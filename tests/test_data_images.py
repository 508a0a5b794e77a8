"""Decoding, binarization and resizing of images and masks."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from data_fixtures import write_image, write_png_16bit_rgb
from PIL import Image

from msrd_jax.data import DataError, checks, load_image, load_mask, resize_image, resize_mask


def _rng_u8(shape, seed=0):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_rgb_png_exact(tmp_path):
  a = _rng_u8((7, 9, 3))
  img = load_image(write_image(tmp_path / 'a.png', a))
  assert img.dtype == np.float32 and img.shape == (7, 9, 3)
  np.testing.assert_array_equal(img, a.astype(np.float32) / np.float32(255))


def test_bmp_exact_and_uppercase_extension(tmp_path):
  a = _rng_u8((5, 6, 3))
  img = load_image(write_image(tmp_path / 'A.BMP', a, format='BMP'))
  np.testing.assert_array_equal(img, a / np.float32(255))


def test_grayscale_repeated(tmp_path):
  g = _rng_u8((5, 6))
  img = load_image(write_image(tmp_path / 'g.png', g))
  assert img.shape == (5, 6, 3)
  for c in range(3):
    np.testing.assert_array_equal(img[..., c], g / np.float32(255))


def test_rgba_alpha_dropped(tmp_path):
  a = _rng_u8((5, 6, 4))
  a[..., 3] = 0  # fully transparent: colours must still come through
  img = load_image(write_image(tmp_path / 'a.png', a))
  np.testing.assert_array_equal(img, a[..., :3] / np.float32(255))


def test_gray_alpha(tmp_path):
  la = _rng_u8((5, 6, 2))
  path = tmp_path / 'la.png'
  Image.fromarray(la, mode='LA').save(path)
  img = load_image(path)
  np.testing.assert_array_equal(img[..., 1], la[..., 0] / np.float32(255))


def test_palette(tmp_path):
  idx = np.array([[0, 1], [2, 1]], np.uint8)
  im = Image.fromarray(idx, mode='P')
  palette = [10, 20, 30, 200, 100, 0, 255, 255, 255] + [0] * (256 * 3 - 9)
  im.putpalette(palette)
  im.save(tmp_path / 'p.png')
  img = load_image(tmp_path / 'p.png')
  colours = np.array(palette[:9], np.float32).reshape(3, 3) / 255
  np.testing.assert_allclose(img, colours[idx], rtol=0, atol=1e-7)


def test_bilevel(tmp_path):
  b = np.array([[True, False], [False, True]])
  Image.fromarray(b).save(tmp_path / 'b.png')
  img = load_image(tmp_path / 'b.png')
  np.testing.assert_array_equal(img[..., 0], b.astype(np.float32))


def test_16bit_gray_png_exact(tmp_path):
  a = np.array([[0, 1, 32768, 65535]], np.uint16)
  path = write_image(tmp_path / 'g16.png', a)
  assert Image.open(path).mode.startswith('I')
  img = load_image(path)
  assert img[0, 3, 0] == 1.0 and img[0, 0, 0] == 0.0
  assert img[0, 2, 0] == np.float32(32768) / np.float32(65535)
  assert img[0, 1, 0] == np.float32(1) / np.float32(65535)  # below 8-bit


def test_16bit_tiff_exact(tmp_path):
  rgb = np.array([[[0, 32768, 65535], [1, 2, 3]]], np.uint16)
  tifffile.imwrite(tmp_path / 'c.tif', rgb)
  img = load_image(tmp_path / 'c.tif')
  np.testing.assert_array_equal(img, rgb.astype(np.float32) / np.float32(65535))
  gray = np.array([[0, 32768, 65535]], np.uint16)
  tifffile.imwrite(tmp_path / 'g.TIFF', gray)
  np.testing.assert_array_equal(
    load_image(tmp_path / 'g.TIFF')[..., 2], gray.astype(np.float32) / np.float32(65535)
  )


def test_planar_and_8bit_and_float_tiff(tmp_path):
  planar = np.arange(2 * 3 * 3, dtype=np.uint16).reshape(3, 2, 3) * 1000
  tifffile.imwrite(tmp_path / 'p.tif', planar, planarconfig='separate', photometric='rgb')
  np.testing.assert_array_equal(
    load_image(tmp_path / 'p.tif'),
    np.moveaxis(planar, 0, -1).astype(np.float32) / np.float32(65535),
  )
  u8 = _rng_u8((4, 5, 3))
  tifffile.imwrite(tmp_path / 'u8.tif', u8)
  np.testing.assert_array_equal(load_image(tmp_path / 'u8.tif'), u8 / np.float32(255))
  f = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
  tifffile.imwrite(tmp_path / 'f.tif', f)
  np.testing.assert_array_equal(load_image(tmp_path / 'f.tif')[..., 0], f)
  tifffile.imwrite(tmp_path / 'bad_f.tif', f * 300)
  with pytest.raises(DataError, match='bad_f.tif.*expected values in'):
    load_image(tmp_path / 'bad_f.tif')


@pytest.mark.parametrize('channels', [3, 4, 2])
def test_16bit_colour_png_exact(tmp_path, channels):
  """Every bit kept (PIL would truncate to 8); alpha dropped, gray repeated."""
  a = np.random.default_rng(channels).integers(0, 65536, (5, 7, channels)).astype(np.uint16)
  a[0, 0, 0], a[0, 1, 0] = 1, 65535  # below 8-bit precision, full scale
  img = load_image(write_png_16bit_rgb(tmp_path / 'c16.png', a))
  colour = a[..., :3] if channels >= 3 else np.repeat(a[..., :1], 3, axis=-1)
  np.testing.assert_array_equal(img, colour.astype(np.float32) / np.float32(65535))
  assert checks.image_size(str(tmp_path / 'c16.png')) == (7, 5)


def test_jpeg(tmp_path):
  a = np.full((8, 8, 3), 128, np.uint8)
  img = load_image(write_image(tmp_path / 'a.jpeg', a, quality=95))
  assert img.shape == (8, 8, 3)
  np.testing.assert_allclose(img, 128 / 255, atol=3 / 255)


@pytest.mark.parametrize('content', [b'', b'not an image at all' * 10])
def test_undecodable_names_file(tmp_path, content):
  path = tmp_path / 'broken.png'
  path.write_bytes(content)
  with pytest.raises(DataError, match='broken.png'):
    load_image(path)


def test_truncated_names_file(tmp_path):
  a = _rng_u8((64, 64, 3))
  full = write_image(tmp_path / 'full.png', a)
  data = open(full, 'rb').read()
  (tmp_path / 'cut.png').write_bytes(data[: len(data) // 2])
  with pytest.raises(DataError, match='cut.png.*truncated'):
    load_image(tmp_path / 'cut.png')
  jpg = write_image(tmp_path / 'full.jpg', a)
  data = open(jpg, 'rb').read()
  (tmp_path / 'cut.jpg').write_bytes(data[: len(data) // 2])
  with pytest.raises(DataError, match='cut.jpg'):
    load_image(tmp_path / 'cut.jpg')


def test_missing_file(tmp_path):
  with pytest.raises(DataError, match='nope.png does not exist'):
    load_image(tmp_path / 'nope.png')
  with pytest.raises(DataError, match='nope_mask.png does not exist'):
    load_mask(tmp_path / 'nope_mask.png')


def test_mask_binarization_rules(tmp_path):
  truth = np.zeros((6, 8), bool)
  truth[1:4, 2:6] = True
  # MVTec 0/255, VisA 0/1 and per-defect labels all give the same mask.
  for name, values in [('mvtec', 255), ('visa', 1), ('labels', None)]:
    m = truth.astype(np.uint8) * (values or 1)
    if values is None:
      m[1, 2] = 2
      m[3, 5] = 7
    got = load_mask(write_image(tmp_path / f'{name}.png', m))
    assert got.dtype == np.bool_ and got.shape == (6, 8)
    np.testing.assert_array_equal(got, truth, err_msg=name)
  # A 16-bit mask, an RGB mask (any channel), a float TIFF (> 0.5).
  np.testing.assert_array_equal(
    load_mask(write_image(tmp_path / 'm16.png', truth.astype(np.uint16) * 65535)), truth
  )
  rgb = np.zeros((6, 8, 3), np.uint8)
  rgb[truth, 0] = 255
  np.testing.assert_array_equal(load_mask(write_image(tmp_path / 'rgb.png', rgb)), truth)
  soft = truth * np.float32(0.9) + np.float32(0.3) * ~truth
  tifffile.imwrite(tmp_path / 'soft.tif', soft.astype(np.float32))
  np.testing.assert_array_equal(load_mask(tmp_path / 'soft.tif'), truth)


def test_jpeg_mask_thresholded_at_half(tmp_path):
  truth = np.zeros((32, 32), bool)
  truth[8:24, 8:24] = True
  path = write_image(tmp_path / 'm.jpg', truth.astype(np.uint8) * 255, quality=70)
  raw = np.asarray(Image.open(path))
  assert ((raw > 0) & ~truth).any()  # compression noise outside the mask
  np.testing.assert_array_equal(load_mask(path), truth)


def test_resize_matches_pil_uint8_within_one_level():
  a = _rng_u8((97, 131, 3), seed=1)
  for size in (40, 256):
    ref = np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.BILINEAR))
    got = resize_image(a / np.float32(255), size)
    assert got.shape == (size, size, 3) and got.dtype == np.float32
    assert np.abs(got * 255 - ref).max() <= 1.0


def test_resize_keeps_16bit_precision():
  value = np.float32(12400) / np.float32(65535)  # 48.25 / 255
  img = np.full((50, 70, 3), value, np.float32)
  got = resize_image(img, 16)
  np.testing.assert_allclose(got, value, rtol=1e-6)
  assert np.abs(got * 255 - 48.25).max() < 1e-3  # an 8-bit path gives 48


def test_resize_antialiases_like_pil():
  # A 1-px checkerboard shrunk 4x: antialiasing averages it to ~0.5, plain
  # bilinear sampling would keep extreme values.
  board = (np.indices((64, 64)).sum(0) % 2).astype(np.float32)
  got = resize_image(np.repeat(board[..., None], 3, -1), 16)
  assert np.abs(got - 0.5).max() < 0.1


def test_resize_same_size_is_a_copy():
  a = np.random.default_rng(0).random((8, 8, 3), np.float32)
  got = resize_image(a, 8)
  np.testing.assert_array_equal(got, a)
  assert got is not a


def test_resize_mask_nearest():
  m = np.zeros((10, 10), bool)
  m[2:5, 3:9] = True
  got = resize_mask(m, 20)
  assert got.dtype == np.bool_ and got.shape == (20, 20)
  ref = (
    np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((20, 20), Image.Resampling.NEAREST))
    > 0
  )
  np.testing.assert_array_equal(got, ref)
  np.testing.assert_array_equal(resize_mask(m, 10), m)
  assert resize_mask(m, 5).sum() > 0
