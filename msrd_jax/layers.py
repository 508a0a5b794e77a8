"""The layers every network of the project is built from, with PyTorch's semantics.

`conv` and `batch_norm` make the bias-free, explicitly padded convolution and the
BatchNorm (PyTorch's eps and momentum, two-pass variance) that torchvision's ResNet and
RD4AD's modules use. `Layers` holds what is the same for every such layer of one network
(compute dtype, the device axis of synchronized BatchNorm), so that modules take one
field instead of repeating three, and receive `train` in `__call__`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

BN_EPS = 1e-5
# PyTorch's BatchNorm momentum 0.1 weighs the new batch; Flax's weighs the old average.
BN_MOMENTUM = 0.9

# torchvision's init for convolutions: kaiming_normal_(mode='fan_out', nonlinearity='relu').
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def conv(
  features: int, kernel: int, stride: int = 1, name: str | None = None, dtype: Any = jnp.float32
) -> nn.Conv:
  """A bias-free convolution with PyTorch's explicit symmetric padding kernel // 2.

  Flax's 'SAME' pads asymmetrically for stride 2, which shifts every feature map by a
  pixel against torchvision's; explicit padding reproduces PyTorch exactly.
  """
  p = kernel // 2
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((p, p), (p, p)),
    use_bias=False,
    kernel_init=conv_init,
    dtype=dtype,
    name=name,
  )


def batch_norm(
  train: bool, name: str | None = None, dtype: Any = jnp.float32, axis_name: str | None = None
) -> nn.BatchNorm:
  """BatchNorm with PyTorch's eps and momentum; batch statistics only when training.

  The variance is computed in two passes, as PyTorch does: Flax's default one-pass
  E[x^2] - E[x]^2 loses most digits on post-ReLU features.
  """
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=BN_MOMENTUM,
    epsilon=BN_EPS,
    dtype=dtype,
    axis_name=axis_name,
    name=name,
    use_fast_variance=False,
  )


@dataclasses.dataclass(frozen=True)
class Layers:
  """How the convolutions and BatchNorms of one network are built.

  dtype: the compute dtype (parameters stay float32).
  bn_axis_name: the mapped device axis over which training-mode BatchNorm averages its
    statistics (pmap's axis name), or None on one device.
  """

  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  def conv(self, features: int, kernel: int, stride: int = 1, name: str | None = None) -> nn.Conv:
    return conv(features, kernel, stride, name, self.dtype)

  def norm(self, train: bool, name: str | None = None) -> nn.BatchNorm:
    return batch_norm(train, name, self.dtype, self.bn_axis_name)
