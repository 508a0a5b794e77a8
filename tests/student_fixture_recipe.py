"""The recipe shared by the student's parity fixtures' generator and the parity test.

scripts/student_reference.py builds PyTorch references of the student's modules, fills
them with weights drawn here, runs them on inputs drawn here and stores only what they
compute (tests/fixtures/student_parity.npz). tests/test_student_parity.py draws the same
weights and inputs again without torch, maps them onto our Flax trees and compares.

Weights and inputs come from numpy's legacy RandomState, whose streams numpy keeps stable
across versions. Each check stores a manifest {torch key: [kind, shape]}; the kind says how
a tensor is drawn and how it maps onto Flax:

  conv          Conv2d weight (O, I, kh, kw), std sqrt(1 / (I kh kw)) -> (kh, kw, I, O)
  deconv        ConvTranspose2d(k=2, s=2) weight (I, O, 2, 2), std sqrt(1 / I): every output
                pixel sees one input pixel, so its fan-in is I -> (2, 2, I, O)
  bn_weight     U(0.5, 1.5)            -> scale
  bn_bias       N(0, 0.1)              -> bias
  running_mean  N(0, 0.1)              -> batch_stats mean
  running_var   U(0.5, 1.5)            -> batch_stats var
  bias          N(0, 0.1)              -> bias (a conv's)
  memory        U(-1/sqrt(D), 1/sqrt(D)) (MemAE's init), (N, D)
  gate          0.7 (not the init 0, so that the residual read is exercised)
  fusion        U(-0.3, 1.5), (L, L): some logits negative, so that relu cuts them
  count         num_batches_tracked, zeros (ignored)
"""

from __future__ import annotations

import math

import numpy as np

WEIGHT_SEED = 4321
INPUT_SEED = 77
TARGET_SEED = 78

# resnet18 / resnet34 and 50-layer teachers' (C1, C2, C3).
BASIC_CHANNELS = (64, 128, 256)
WIDE_CHANNELS = (256, 512, 1024)

# MemAE's read used by the memory checks.
MEMORY = {'slots': 10, 'temperature': 0.05, 'dim': 64}
# beta of the entropy term in the memory checks' loss: large, so that its gradient shows.
MEMORY_ENTROPY_WEIGHT = 0.1
# The whole MSRD student uses design.md's defaults.
STUDENT_MEMORY = {'slots': 50, 'temperature': 0.05}
STUDENT_ENTROPY_WEIGHT = 2e-4

# Every check: its inputs (NHWC shapes, in the order the module takes them) and the torch
# keys whose gradients are stored (conv kernels cut to their first GRAD_SLICE rows).
# Spatial sizes are small but never give a BatchNorm fewer than 4 values per channel in
# train mode (2 values would normalize every channel to exactly +-1).
CHECKS = {
  # RD4AD's de_resnet18: all three stages, 2 deBasicBlocks each, real widths.
  'decoder_basic': {
    'inputs': [(2, 1, 2, 512)],
    'grads': [
      'decoder.layer1.0.conv1.weight',
      'decoder.layer1.0.upsample.0.weight',
      'decoder.layer1.0.upsample.1.weight',
      'decoder.layer2.1.conv2.weight',
      'decoder.layer3.1.bn2.bias',
    ],
  },
  # The same decoder with coordinate attention in every block (place 'decoder').
  'decoder_basic_ca': {
    'inputs': [(2, 1, 1, 512)],
    'grads': [
      'decoder.layer1.0.attention.conv_h.weight',
      'decoder.layer2.1.attention.conv_w.bias',
      'decoder.layer3.0.attention.bn1.weight',
      'decoder.layer3.1.conv1.weight',
    ],
  },
  # de_wide_resnet50_2's first stage (level 3) at its real widths: 2048 -> 1024
  # channels, bottleneck width 512; 2 of its 3 deBottlenecks.
  'decoder_wide_stage': {
    'inputs': [(2, 1, 2, 2048)],
    'grads': [
      'decoder.layer1.0.conv2.weight',
      'decoder.layer1.0.upsample.0.weight',
      'decoder.layer1.0.bn3.weight',
      'decoder.layer1.1.conv2.weight',
      'decoder.layer1.1.bn1.bias',
    ],
  },
  # RD4AD's BN_layer at resnet18 widths: MFF alignment + concatenation + OCE (2 blocks).
  'bn_layer_basic': {
    'inputs': [(2, 16, 8, 64), (2, 8, 4, 128), (2, 4, 2, 256)],
    'grads': [
      'bottleneck.conv1.weight',
      'bottleneck.bn2.weight',
      'bottleneck.conv3.weight',
      'bottleneck.bn_layer.0.downsample.0.weight',
      'bottleneck.bn_layer.1.bn2.bias',
    ],
  },
  # The OCE of wide_resnet50_2 at its real widths (3 * 1024 -> 2048, width 1024);
  # 2 of its 3 Bottlenecks.
  'oce_wide': {
    'inputs': [(2, 4, 2, 3072)],
    'grads': [
      'bn_layer.0.conv1.weight',
      'bn_layer.0.downsample.1.weight',
      'bn_layer.1.conv2.weight',
      'bn_layer.1.bn3.bias',
    ],
  },
  # Hou et al.'s CoordAtt; H != W so that a swapped axis shows; mip = 320 // 32 = 10.
  'coord_attention': {
    'inputs': [(2, 5, 4, 320)],
    'grads': [
      'attention.conv1.weight',
      'attention.bn1.weight',
      'attention.bn1.bias',
      'attention.conv_h.weight',
      'attention.conv_w.bias',
    ],
  },
  'memory_replace': {
    'inputs': [(2, 3, 4, 64)],
    'grads': ['memory.memory'],
  },
  'memory_residual': {
    'inputs': [(2, 3, 4, 64)],
    'grads': ['memory.memory', 'memory.gate'],
  },
  # MSFF at resnet18 widths; odd sizes make the upward resizes non-integer (4 -> 7, ...).
  'msff': {
    'inputs': [(2, 7, 9, 64), (2, 4, 5, 128), (2, 2, 3, 256)],
    'grads': [
      'fusion.fusion_logits',
      'fusion.maps.1_to_3.down.1.0.weight',
      'fusion.maps.3_to_1.conv.weight',
      'fusion.maps.2_to_1.bn.bias',
      'fusion.align.conv1.weight',
    ],
  },
  'msff_ca': {
    'inputs': [(2, 7, 9, 64), (2, 4, 5, 128), (2, 2, 3, 256)],
    'grads': [
      'fusion.fusion_logits',
      'fusion.maps.2_to_3.down.0.1.weight',
      'fusion.attention.0.conv_h.weight',
      'fusion.attention.2.bn1.bias',
    ],
  },
  # The plain-RD student (our Student with fusion='mff', coord_attention=(), memory
  # 'off') against anomalib's OCBE + de_resnet18 (RD4AD's code), resnet18.
  'student_rd': {
    'inputs': [(2, 16, 8, 64), (2, 8, 4, 128), (2, 4, 2, 256)],
    'grads': [
      'bottleneck.conv1.weight',
      'bottleneck.bn3.bias',
      'bottleneck.bn_layer.0.conv1.weight',
      'decoder.layer1.0.upsample.0.weight',
      'decoder.layer3.1.bn2.weight',
    ],
  },
  # The whole MSRD student at design.md's defaults (MSFF, coordinate attention in the
  # fusion and the decoder, memory 'replace'), resnet18, from this script's modules.
  'student_msrd': {
    'inputs': [(2, 16, 8, 64), (2, 8, 4, 128), (2, 4, 2, 256)],
    'grads': [
      'fusion.fusion_logits',
      'fusion.attention.1.conv_w.weight',
      'oce.0.conv1.weight',
      'memory.memory',
      'decoder.layer1.0.attention.bn1.weight',
      'decoder.layer3.0.conv1.weight',
    ],
  },
}
# A ReLU (or ReLU6, or MemAE's shrinkage) input this close to its kink can fall on the
# other side of it in float32, which changes a gradient by a whole term (a value of 2e-7
# in the decoder check flipped its ReLU and moved a gradient by 1%). Of the first
# KINK_DRAWS input draws the generator keeps the one whose train-mode forward stays
# farthest from every kink, and refuses one closer than KINK_MARGIN. (The whole student
# has ~200k ReLU inputs, about one per 1e-6 of distance from the kink.)
KINK_DRAWS = 16
KINK_MARGIN = 5e-6
# Conv kernels' gradients are stored for their first rows only (torch layout, dim 0).
GRAD_SLICE = 4


def check_seed(name: str, base: int) -> int:
  """A seed per check, stable under adding or reordering checks."""
  return base + sum(ord(c) * (i + 1) for i, c in enumerate(name)) % 100_000


def random_state_dict(manifest: dict[str, tuple[str, tuple[int, ...]]], seed: int) -> dict:
  """Weights and BatchNorm statistics for a manifest {key: (kind, shape)} (see above)."""
  rng = np.random.RandomState(seed)
  out = {}
  for key in sorted(manifest):
    kind, shape = manifest[key]
    shape = tuple(shape)
    if kind == 'count':
      out[key] = np.zeros(shape, np.int64)
      continue
    if kind == 'conv':
      x = rng.standard_normal(shape) * math.sqrt(1.0 / math.prod(shape[1:]))
    elif kind == 'deconv':
      x = rng.standard_normal(shape) * math.sqrt(1.0 / shape[0])
    elif kind in ('bn_weight', 'running_var'):
      x = rng.uniform(0.5, 1.5, shape)
    elif kind in ('bn_bias', 'running_mean', 'bias'):
      x = rng.standard_normal(shape) * 0.1
    elif kind == 'memory':
      bound = 1.0 / math.sqrt(shape[1])
      x = rng.uniform(-bound, bound, shape)
    elif kind == 'gate':
      x = np.full(shape, 0.7)
    elif kind == 'fusion':
      x = rng.uniform(-0.3, 1.5, shape)
    else:
      raise ValueError(f'{key}: unknown kind {kind!r}')
    out[key] = x.astype(np.float32)
  return out


def random_inputs(name: str, draw: int = 0) -> list[np.ndarray]:
  """The check's inputs, NHWC float32 N(0, 1).

  draw: the generator picks, of KINK_DRAWS draws, the one whose train-mode forward
  keeps farthest from the ReLUs' kinks (see KINK_MARGIN); the fixture records it.
  """
  rng = np.random.RandomState(check_seed(name, INPUT_SEED) + 7919 * draw)
  return [rng.standard_normal(s).astype(np.float32) for s in CHECKS[name]['inputs']]


def random_targets(name: str, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
  """Stand-ins for the teacher's features in the loss, NHWC float32 N(0, 1)."""
  rng = np.random.RandomState(check_seed(name, TARGET_SEED))
  return [rng.standard_normal(s).astype(np.float32) for s in shapes]
