"""Coordinate attention (Hou, Zhou & Feng, CVPR 2021).

Direction-aware attention that keeps position: the input is average-pooled along each
spatial axis separately, the two pooled strips share a 1x1 conv + BN + h-swish, and two
1x1 convs with a sigmoid turn them into a per-row and a per-column gate.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from msrd_jax.layers import Layers


def h_swish(x: jax.Array) -> jax.Array:
  """x * relu6(x + 3) / 6 (MobileNetV3's hard swish)."""
  return x * jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


def mip_channels(channels: int, reduction: int = 32) -> int:
  """Width of the shared bottleneck: max(8, C // reduction), as in the paper's code."""
  return max(8, channels // reduction)


class CoordAttention(nn.Module):
  """Y = X * a_h * a_w for X of shape (B, H, W, C); same shape out.

  a_h: (B, H, 1, C) from the W-pooled strip, a_w: (B, 1, W, C) from the H-pooled strip.
  The BatchNorm uses batch statistics when `train` (synchronized across
  `layers.bn_axis_name`). The 1x1 convs are initialized as `layers.init` says
  (PyTorch's nn.Conv2d default with 'pytorch', as the paper's code leaves them).
  """

  reduction: int = 32
  layers: Layers = Layers()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    _, h, w, c = x.shape
    mip = mip_channels(c, self.reduction)
    pooled_h = jnp.mean(x, axis=2, keepdims=True)  # (B, H, 1, C): pooled over W
    pooled_w = jnp.mean(x, axis=1, keepdims=True)  # (B, 1, W, C): pooled over H
    # Both strips go through the shared layers as one (B, H + W, 1, C) tensor.
    y = jnp.concatenate([pooled_h, jnp.swapaxes(pooled_w, 1, 2)], axis=1)
    # No bias: the BatchNorm right after removes it, and a parameter whose gradient is
    # zero would only drift on rounding noise under Adam.
    y = self.layers.plain_conv1x1(mip, c, use_bias=False, name='conv1')(y)
    y = h_swish(self.layers.norm(train, 'bn1')(y))
    y_h, y_w = y[:, :h], jnp.swapaxes(y[:, h:], 1, 2)
    a_h = nn.sigmoid(self.layers.plain_conv1x1(c, mip, name='conv_h')(y_h))
    a_w = nn.sigmoid(self.layers.plain_conv1x1(c, mip, name='conv_w')(y_w))
    return x * a_h * a_w
