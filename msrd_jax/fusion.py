"""Multi-scale feature fusion in front of the one-class embedding.

MSFF (the article's enhanced multi-scale mutual-mapping fusion): every teacher level is
mapped onto every other level's resolution and width, the mappings that land on one level
are fused with learned, normalized, unequal weights (BiFPN's fast normalized fusion), each
fused map goes through coordinate attention, and then RD's alignment brings the three
levels to stride 16 for concatenation.

MSFF's 'gated' form (not the article's; README, Ablation study) keeps each level as it is
and adds the other levels' mappings through learned scalar gates that start at
`gate_init` (0: the fusion starts as RD's MFF and has to earn the mixing, as ReZero,
Bachlechner et al. 2020, starts residual branches at zero).

MFF (RD4AD's original): the alignment and concatenation applied to e1, e2, e3 directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from msrd_jax.coord_attention import CoordAttention
from msrd_jax.layers import Layers

FUSION_EPS = 1e-4


def fusion_weights(a: jax.Array) -> jax.Array:
  """w_ij = relu(a_ij) / (sum_k relu(a_ik) + 1e-4); a: (L, L) -> (L, L)."""
  r = nn.relu(a)
  return r / (jnp.sum(r, axis=-1, keepdims=True) + FUSION_EPS)


class ConvBNReLU(nn.Module):
  """3x3 conv (PyTorch padding 1) -> BN -> ReLU."""

  features: int
  stride: int = 1
  layers: Layers = Layers()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = self.layers.conv(self.features, 3, self.stride, 'conv')(x)
    return nn.relu(self.layers.norm(train, 'bn')(x))


class Align(nn.Module):
  """RD's alignment: level k goes through (3 - k) 3x3/2 conv-BN-ReLU to level 3.

  Applied to e1, e2, e3 directly this is RD4AD's MFF (alias below).

  features: [f1, f2, f3] with channels (C1, C2, C3) -> (B, h3, w3, 3 * C3).
  """

  channels: Sequence[int]
  layers: Layers = Layers()

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], train: bool = False) -> jax.Array:
    _, c2, c3 = self.channels
    down = lambda c, name, x: ConvBNReLU(c, 2, self.layers, name=name)(x, train)
    f1 = down(c3, 'level1_down2', down(c2, 'level1_down1', features[0]))
    f2 = down(c3, 'level2_down1', features[1])
    return jnp.concatenate([f1, f2, features[2]], axis=-1)


class Mapping(nn.Module):
  """T(j -> i): teacher level j onto level i's resolution and channels."""

  source: int
  target: int
  channels: Sequence[int]
  layers: Layers = Layers()

  @nn.compact
  def __call__(self, x: jax.Array, target_hw: tuple[int, int], train: bool = False) -> jax.Array:
    if self.source == self.target:
      return x
    if self.source < self.target:
      for k in range(self.source, self.target):
        x = ConvBNReLU(self.channels[k + 1], 2, self.layers, name=f'down{k - self.source + 1}')(
          x, train
        )
      return x
    x = self.layers.conv(self.channels[self.target], 1, 1, 'conv')(x)
    x = self.layers.norm(train, 'bn')(x)
    return jax.image.resize(x, (x.shape[0], *target_hw, x.shape[-1]), 'bilinear')


class MSFF(nn.Module):
  """Enhanced multi-scale mutual-mapping fusion.

  form 'normalized' (design.md): G_i = relu(sum_j w_ij T(j->i)(e_j)), w from the learned
    logits `fusion_logits` (init_self on the diagonal, init_other elsewhere) by
    `fusion_weights`.
  form 'gated': G_i = relu(e_i + sum_{j != i} g_ij T(j->i)(e_j)), g the learned
    `cross_gates` (off-diagonal entries used; all start at gate_init).

  features: [e1, e2, e3] (B, h_k, w_k, C_k) -> (B, h3, w3, 3 * C3).
  """

  channels: Sequence[int]
  init_self: float = 1.0
  init_other: float = 0.5
  attention: bool = True
  form: str = 'normalized'
  gate_init: float = 0.0
  layers: Layers = Layers()

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], train: bool = False) -> jax.Array:
    levels = len(features)
    if self.form == 'normalized':
      a = self.param(
        'fusion_logits',
        lambda _, n: jnp.where(jnp.eye(n, dtype=bool), self.init_self, self.init_other).astype(
          jnp.float32
        ),
        levels,
      )
      w = fusion_weights(a)
    elif self.form == 'gated':
      gates = self.param(
        'cross_gates', lambda _, n: jnp.full((n, n), self.gate_init, jnp.float32), levels
      )
      w = jnp.where(jnp.eye(levels, dtype=bool), 1.0, gates)
    else:
      raise ValueError(f"MSFF form must be 'normalized' or 'gated', got {self.form!r}")
    w = w.astype(self.layers.dtype)
    fused = []
    for i in range(levels):
      hw = features[i].shape[1:3]
      g = sum(
        w[i, j]
        * Mapping(j, i, self.channels, self.layers, name=f'map_{j + 1}_to_{i + 1}')(
          features[j], hw, train
        )
        for j in range(levels)
      )
      g = nn.relu(g)
      if self.attention:
        g = CoordAttention(layers=self.layers, name=f'attention_{i + 1}')(g, train)
      fused.append(g)
    return Align(self.channels, self.layers, name='align')(fused, train)


# RD4AD's multi-scale feature fusion is the alignment and concatenation alone, applied
# to the teacher's e1, e2, e3 directly.
MFF = Align
