"""Reverse-distillation losses against numpy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from msrd_jax import losses

# ------------------------------------------------------------------------ 6. losses


def np_cos_distance(e, d, axis):
  e, d = np.asarray(e, np.float64), np.asarray(d, np.float64)
  return 1 - (e * d).sum(axis) / (np.linalg.norm(e, axis=axis) * np.linalg.norm(d, axis=axis))


def _pairs(seed=0):
  rng = np.random.default_rng(seed)
  shapes = [(3, 8, 6, 4), (3, 4, 3, 8), (3, 2, 2, 16)]
  e = [rng.normal(size=s).astype(np.float32) for s in shapes]
  # Correlated student features so the cosines are far from 0 and differ per image.
  d = [(x + rng.normal(scale=0.5 + i, size=x.shape)).astype(np.float32) for i, x in enumerate(e)]
  return e, d


def test_global_cosine_loss_matches_numpy():
  e, d = _pairs()
  for x, y in zip(e, d):
    want = np.mean(np_cos_distance(x.reshape(3, -1), y.reshape(3, -1), axis=-1))
    got = float(losses.global_cosine_loss(jnp.asarray(x), jnp.asarray(y)))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Differs from the per-position loss on the same data.
    assert abs(got - np.mean(np_cos_distance(x, y, axis=-1))) > 1e-3


def test_pixel_cosine_loss_matches_numpy():
  e, d = _pairs(1)
  for x, y in zip(e, d):
    want = np.mean(np_cos_distance(x, y, axis=-1))
    got = float(losses.pixel_cosine_loss(jnp.asarray(x), jnp.asarray(y)))
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize('kind', ['global', 'pixel'])
def test_distillation_loss_sums_levels(kind):
  e, d = _pairs(2)
  if kind == 'global':
    want = sum(
      np.mean(np_cos_distance(x.reshape(3, -1), y.reshape(3, -1), axis=-1)) for x, y in zip(e, d)
    )
  else:
    want = sum(np.mean(np_cos_distance(x, y, axis=-1)) for x, y in zip(e, d))
  got = float(
    losses.distillation_loss([jnp.asarray(x) for x in e], [jnp.asarray(y) for y in d], kind)
  )
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Identical features give zero loss; opposite ones 2 per level.
  same = float(losses.distillation_loss(e, e, kind))
  assert abs(same) < 1e-5
  np.testing.assert_allclose(
    float(losses.distillation_loss(e, [-x for x in e], kind)), 6.0, rtol=1e-5
  )


def test_distillation_loss_rejects_unknown_kind():
  e, d = _pairs()
  with pytest.raises(ValueError, match='cosine|global|pixel'):
    losses.distillation_loss(e, d, 'l2')
