"""Reverse-distillation losses between teacher features e_k and student features d_k."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from msrd_jax.anomaly_map import cosine_distance_map


def global_cosine_loss(e: jax.Array, d: jax.Array) -> jax.Array:
  """RD4AD's loss: 1 - cos of each image's whole flattened map, mean over the batch.

  e, d: (B, h, w, C).
  """
  b = e.shape[0]
  return jnp.mean(cosine_distance_map(e.reshape(b, -1), d.reshape(b, -1)))


def pixel_cosine_loss(e: jax.Array, d: jax.Array) -> jax.Array:
  """Mean over images and positions of 1 - cos along channels; e, d: (B, h, w, C)."""
  return jnp.mean(cosine_distance_map(e, d))


def distillation_loss(
  teacher_features: Sequence[jax.Array], student_features: Sequence[jax.Array], kind: str = 'global'
) -> jax.Array:
  """Sum over levels of the per-level loss ('global' or 'pixel')."""
  fn = {'global': global_cosine_loss, 'pixel': pixel_cosine_loss}.get(kind)
  if fn is None:
    raise ValueError(f"train.loss must be 'global' or 'pixel', got {kind!r}")
  return sum(fn(e, d) for e, d in zip(teacher_features, student_features))
