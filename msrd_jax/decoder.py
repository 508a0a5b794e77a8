"""The student: RD4AD's de-ResNet decoder, mirror of the teacher's layer3..layer1.

From the embedding at stride 32 it rebuilds features with the teacher's shapes at strides
16, 8 and 4. The first block of each stage upsamples by 2 with a 2x2/2 transposed conv in
place of its strided conv, and its shortcut is a 2x2/2 transposed conv + BN. Coordinate
attention may sit on every block's residual branch just before the addition (where
SE-ResNet puts SE).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from msrd_jax import teacher
from msrd_jax.coord_attention import CoordAttention


class Deconv2x2(nn.Module):
  """2x2 transposed convolution with stride 2 and no bias: (B, h, w, C) -> (B, 2h, 2w, F).

  With kernel 2 and stride 2 the output windows do not overlap, so
  out[2i + a, 2j + b] = x[i, j] @ kernel[a, b], exactly PyTorch's
  ConvTranspose2d(C, F, 2, stride=2) with kernel[a, b, c, f] = weight[c, f, a, b].
  Written as one matrix product and a pixel shuffle, its gradients are plain matrix
  products too; XLA's generic transposed convolution is several times slower to
  differentiate on CPU.
  """

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    kernel = self.param('kernel', teacher.conv_init, (2, 2, c, self.features))
    y = jnp.einsum('bhwc,xycf->bhxwyf', x.astype(self.dtype), kernel.astype(self.dtype))
    return y.reshape(b, 2 * h, 2 * w, self.features)


def deconv(features: int, name: str, dtype: Any) -> Deconv2x2:
  return Deconv2x2(features, dtype=dtype, name=name)


class DecoderBlock(nn.Module):
  """A BasicBlock or Bottleneck whose strided conv becomes a 2x2/2 transposed conv."""

  block: str  # 'basic' or 'bottleneck'
  planes: int
  upsample: bool = False
  width_per_group: int = 64
  attention: bool = False
  train: bool = False
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    bn = functools.partial(
      teacher.batch_norm, self.train, dtype=self.dtype, axis_name=self.bn_axis_name
    )
    if self.block == 'basic':
      out_channels = self.planes
      y = (
        deconv(self.planes, 'conv1', self.dtype)
        if self.upsample
        else teacher.conv(self.planes, 3, 1, 'conv1', self.dtype)
      )(x)
      y = nn.relu(bn(name='bn1')(y))
      y = bn(name='bn2')(teacher.conv(self.planes, 3, 1, 'conv2', self.dtype)(y))
    else:
      out_channels = self.planes * 4
      width = self.planes * self.width_per_group // 64
      y = nn.relu(bn(name='bn1')(teacher.conv(width, 1, 1, 'conv1', self.dtype)(x)))
      y = (
        deconv(width, 'conv2', self.dtype)
        if self.upsample
        else teacher.conv(width, 3, 1, 'conv2', self.dtype)
      )(y)
      y = nn.relu(bn(name='bn2')(y))
      y = bn(name='bn3')(teacher.conv(out_channels, 1, 1, 'conv3', self.dtype)(y))
    if self.attention:
      y = CoordAttention(
        self.train, dtype=self.dtype, bn_axis_name=self.bn_axis_name, name='attention'
      )(y)
    if self.upsample:
      x = bn(name='upsample_1')(deconv(out_channels, 'upsample_0', self.dtype)(x))
    return nn.relu(y + x)


class Decoder(nn.Module):
  """Embedding (B, h4, w4, 512 * expansion) -> [d1, d2, d3] shaped like [e1, e2, e3]."""

  arch: teacher.Arch
  attention: bool = True
  train: bool = False
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, z: jax.Array) -> list[jax.Array]:
    spec = teacher.arch_spec(self.arch)
    outputs = []
    x = z
    # RD4AD's de_resnet: its layer1 (level 3) has layers[0] blocks, and so on.
    for stage, (planes, blocks) in enumerate(zip((256, 128, 64), spec.layers[:3])):
      level = 3 - stage
      for i in range(blocks):
        x = DecoderBlock(
          spec.block,
          planes,
          upsample=i == 0,
          width_per_group=spec.width_per_group,
          attention=self.attention,
          train=self.train,
          dtype=self.dtype,
          bn_axis_name=self.bn_axis_name,
          name=f'level{level}_{i}',
        )(x)
      outputs.append(x)
    return outputs[::-1]
