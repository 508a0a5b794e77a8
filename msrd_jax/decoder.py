"""The student: RD4AD's de-ResNet decoder, mirror of the teacher's layer3..layer1.

From the embedding at stride 32 it rebuilds features with the teacher's shapes at strides
16, 8 and 4. The first block of each stage upsamples by 2 with a 2x2/2 transposed conv in
place of its strided conv, and its shortcut is a 2x2/2 transposed conv + BN. Coordinate
attention may sit on every block's residual branch just before the addition (where
SE-ResNet puts SE).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from msrd_jax import teacher
from msrd_jax.coord_attention import CoordAttention
from msrd_jax.layers import Layers, conv_init


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
  # Kernel init: Layers.transposed_init ('kaiming' normal, fan_out; or PyTorch's default).
  kernel_init: Callable = conv_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    kernel = self.param('kernel', self.kernel_init, (2, 2, c, self.features))
    y = jnp.einsum('bhwc,xycf->bhxwyf', x.astype(self.dtype), kernel.astype(self.dtype))
    return y.reshape(b, 2 * h, 2 * w, self.features)


class DecoderBlock(nn.Module):
  """A BasicBlock or Bottleneck whose strided conv becomes a 2x2/2 transposed conv."""

  block: str  # 'basic' or 'bottleneck'
  planes: int
  upsample: bool = False
  width_per_group: int = 64
  attention: bool = False
  layers: Layers = Layers()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv, norm = self.layers.conv, functools.partial(self.layers.norm, train)
    deconv = functools.partial(
      Deconv2x2, dtype=self.layers.dtype, kernel_init=self.layers.transposed_init
    )
    if self.block == 'basic':
      out_channels = self.planes
      first = (
        deconv(self.planes, name='conv1') if self.upsample else conv(self.planes, 3, 1, 'conv1')
      )
      y = nn.relu(norm('bn1')(first(x)))
      y = norm('bn2')(conv(self.planes, 3, 1, 'conv2')(y))
    else:
      out_channels = self.planes * 4
      width = self.planes * self.width_per_group // 64
      y = nn.relu(norm('bn1')(conv(width, 1, 1, 'conv1')(x)))
      second = deconv(width, name='conv2') if self.upsample else conv(width, 3, 1, 'conv2')
      y = nn.relu(norm('bn2')(second(y)))
      y = norm('bn3')(conv(out_channels, 1, 1, 'conv3')(y))
    if self.attention:
      y = CoordAttention(layers=self.layers, name='attention')(y, train)
    if self.upsample:
      x = norm('upsample_1')(deconv(out_channels, name='upsample_0')(x))
    return nn.relu(y + x)


class Decoder(nn.Module):
  """Embedding (B, h4, w4, 512 * expansion) -> [d1, d2, d3] shaped like [e1, e2, e3]."""

  arch: teacher.Arch
  attention: bool = True
  layers: Layers = Layers()

  @nn.compact
  def __call__(self, z: jax.Array, train: bool = False) -> list[jax.Array]:
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
          layers=self.layers,
          name=f'level{level}_{i}',
        )(x, train)
      outputs.append(x)
    return outputs[::-1]
