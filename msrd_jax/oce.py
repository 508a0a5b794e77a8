"""The one-class embedding (OCE) block of reverse distillation.

One ResNet stage of the teacher's own block type squeezes the fused (B, h3, w3, 3 * C3)
features into the compact (B, h4, w4, 512 * expansion) embedding at stride 32 that the
student decodes: 3 Bottlenecks for 50/101-layer teachers, 2 BasicBlocks for 18/34.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from msrd_jax import teacher
from msrd_jax.layers import Layers


def default_blocks(arch: teacher.Arch) -> int:
  return 2 if teacher.arch_spec(arch).block == 'basic' else 3


class OCE(nn.Module):
  """(B, h3, w3, 3 * C3) -> (B, h3 / 2, w3 / 2, 512 * expansion)."""

  arch: teacher.Arch
  blocks: int | None = None  # None: default_blocks(arch)
  layers: Layers = Layers()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    spec = teacher.arch_spec(self.arch)
    blocks = default_blocks(self.arch) if self.blocks is None else self.blocks
    # in_channels=0 forces the 1x1/2 conv + BN shortcut on the first block.
    for block in teacher.make_stage(spec, 'layer', 512, blocks, 2, 0, self.layers):
      x = block(x, train)
    return x
