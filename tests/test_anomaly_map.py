"""Anomaly maps against numpy/scipy references of the same steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
import pytest
from scipy import ndimage

from msrd_jax import anomaly_map as am


def np_cosine_distance(e, d, eps=1e-8):
  e, d = np.asarray(e, np.float64), np.asarray(d, np.float64)
  ne = np.maximum(np.linalg.norm(e, axis=-1), eps)
  nd = np.maximum(np.linalg.norm(d, axis=-1), eps)
  return 1 - np.sum(e * d, axis=-1) / (ne * nd)


def test_cosine_distance_map_matches_numpy():
  rng = np.random.default_rng(0)
  e = rng.normal(size=(2, 5, 6, 16)).astype(np.float32)
  d = (e + 0.5 * rng.normal(size=e.shape)).astype(np.float32)
  e[0, 0, 0] = 0.0  # zero vector: both norms clamped, distance 1
  got = np.asarray(am.cosine_distance_map(jnp.asarray(e), jnp.asarray(d)))
  assert got.shape == (2, 5, 6) and got.dtype == np.float32
  np.testing.assert_allclose(got, np_cosine_distance(e, d), atol=1e-6)
  assert got[0, 0, 0] == pytest.approx(1.0)
  # bfloat16 features are computed in float32.
  got16 = am.cosine_distance_map(jnp.asarray(e, jnp.bfloat16), jnp.asarray(d, jnp.bfloat16))
  assert got16.dtype == jnp.float32


@pytest.mark.parametrize('shape', [(2, 64, 64), (1, 70, 33), (1, 9, 12)])
def test_gaussian_blur_matches_scipy_everywhere(shape):
  # (1, 9, 12): smaller than the kernel radius (16), scipy reflects repeatedly.
  rng = np.random.default_rng(1)
  maps = rng.random(shape).astype(np.float32)
  got = np.asarray(am.gaussian_blur(jnp.asarray(maps), sigma=4.0))
  for b in range(shape[0]):
    expected = ndimage.gaussian_filter(maps[b].astype(np.float64), sigma=4)
    np.testing.assert_allclose(got[b], expected, atol=1e-5, rtol=0)


def test_gaussian_blur_other_sigma_and_disabled():
  rng = np.random.default_rng(2)
  maps = rng.random((1, 40, 40)).astype(np.float32)
  got = np.asarray(am.gaussian_blur(jnp.asarray(maps), sigma=1.5, truncate=3.0))
  np.testing.assert_allclose(
    got[0], ndimage.gaussian_filter(maps[0].astype(np.float64), 1.5, truncate=3.0), atol=1e-5
  )
  np.testing.assert_array_equal(np.asarray(am.gaussian_blur(jnp.asarray(maps), sigma=0)), maps)


def make_feats(rng, b=2, size=64, levels=((16, 8), (8, 16), (4, 32))):
  teacher, student = [], []
  for stride, c in levels:
    h = size // stride
    t = rng.normal(size=(b, h, h, c)).astype(np.float32)
    teacher.append(t)
    student.append((t + rng.uniform(0.2, 1.0) * rng.normal(size=t.shape)).astype(np.float32))
  return teacher, student


@pytest.mark.parametrize('mode', ['add', 'mul'])
@pytest.mark.parametrize('align_corners', [False, True])
def test_anomaly_map_end_to_end(mode, align_corners):
  rng = np.random.default_rng(3)
  teacher, student = make_feats(rng)
  size = 64
  maps, scores = am.anomaly_map(
    [jnp.asarray(t) for t in teacher],
    [jnp.asarray(s) for s in student],
    out_size=size,
    mode=mode,
    sigma=4.0,
    align_corners=align_corners,
  )
  assert maps.shape == (2, size, size) and maps.dtype == jnp.float32
  assert scores.shape == (2,)
  for b in range(2):
    total = np.zeros((size, size)) if mode == 'add' else np.ones((size, size))
    for t, s in zip(teacher, student):
      a = numpy_reference.bilinear_resize(
        np_cosine_distance(t[b], s[b]), (size, size), align_corners=align_corners
      )
      total = total + a if mode == 'add' else total * a
    expected = ndimage.gaussian_filter(total, sigma=4)
    np.testing.assert_allclose(np.asarray(maps[b]), expected, atol=1e-5)
    assert float(scores[b]) == pytest.approx(expected.max(), abs=1e-5)


def test_anomaly_map_half_pixel_is_jax_image_resize_and_no_blur():
  rng = np.random.default_rng(4)
  teacher, student = make_feats(rng, b=1, levels=((8, 4),))
  maps, scores = am.anomaly_map(teacher, student, out_size=(64, 64), sigma=0.0)
  a = am.cosine_distance_map(jnp.asarray(teacher[0]), jnp.asarray(student[0]))
  expected = jax.image.resize(a, (1, 64, 64), 'bilinear')
  np.testing.assert_allclose(np.asarray(maps), np.asarray(expected), atol=1e-6)
  assert float(scores[0]) == pytest.approx(float(expected.max()))


def test_anomaly_map_bad_input():
  rng = np.random.default_rng(5)
  teacher, student = make_feats(rng, b=1)
  with pytest.raises(ValueError, match='mode'):
    am.anomaly_map(teacher, student, out_size=64, mode='max')
  with pytest.raises(ValueError, match='same number'):
    am.anomaly_map(teacher, student[:2], out_size=64)
  with pytest.raises(ValueError, match='same shape'):
    am.anomaly_map(teacher, student[::-1], out_size=64)
