"""The recipe shared by the parity fixtures' generator and the parity test.

Weights and images are drawn from numpy's legacy RandomState, whose streams numpy keeps
stable across versions, so only torchvision's outputs need to be stored: the test
regenerates the exact same weights and inputs without torch.
"""

from __future__ import annotations

import math

import numpy as np

# Reduced-depth torchvision configurations: ResNet(block, layers, width_per_group).
# Each exercises a block type; the non-first blocks and the wide Bottleneck are covered.
FIXTURE_CONFIGS = {
  'basic': {'block': 'basic', 'layers': (2, 1, 1, 1), 'width_per_group': 64},
  'bottleneck': {'block': 'bottleneck', 'layers': (1, 2, 1, 1), 'width_per_group': 64},
  'wide': {'block': 'bottleneck', 'layers': (1, 1, 1, 1), 'width_per_group': 128},
}
# (batch, height, width): an even size and an odd one (odd sizes exercise the padding).
FIXTURE_INPUTS = ((2, 64, 64), (1, 50, 50))
WEIGHT_SEED = 1234
IMAGE_SEED = 99


def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int) -> dict:
  """Random weights AND random BatchNorm statistics, so that no BN is an identity.

  Convolutions get std sqrt(1 / fan_in), which keeps activations of order one through
  deep residual stacks, so a relative error measures the arithmetic, not the scale.
  """
  rng = np.random.RandomState(seed)
  out = {}
  for key in sorted(shapes):
    shape = tuple(shapes[key])
    if key.endswith('num_batches_tracked'):
      out[key] = np.zeros(shape, np.int64)
    elif len(shape) == 4:
      fan_in = math.prod(shape[1:])
      out[key] = rng.standard_normal(shape) * math.sqrt(1.0 / fan_in)
    elif key.endswith('running_var'):
      out[key] = rng.uniform(0.5, 1.5, shape)
    elif key.endswith('running_mean'):
      out[key] = rng.standard_normal(shape) * 0.1
    elif key.endswith('weight') and len(shape) == 1:
      out[key] = rng.uniform(0.5, 1.5, shape)
    else:  # biases and fc.weight
      out[key] = rng.standard_normal(shape) * 0.1
    if out[key].dtype == np.float64:
      out[key] = out[key].astype(np.float32)
  return out


def random_images(batch: int, height: int, width: int, seed: int) -> np.ndarray:
  """(B, H, W, 3) float32 RGB in [0, 1]."""
  rng = np.random.RandomState(seed + 1000 * height + width)
  return rng.uniform(0.0, 1.0, (batch, height, width, 3)).astype(np.float32)
