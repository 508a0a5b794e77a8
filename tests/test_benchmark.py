"""The benchmark's parameter counts against torchvision's manifests."""

from __future__ import annotations

import json
import math
import os

import pytest

from msrd_jax import benchmark
from msrd_jax import config as config_lib

MANIFESTS = os.path.join(os.path.dirname(__file__), 'fixtures', 'manifests')


@pytest.mark.parametrize('arch', ['resnet18', 'wide_resnet50_2'])
def test_parameter_counts(arch):
  config = config_lib.base_config()
  config.model.backbone = arch
  counts = benchmark.parameter_counts(config)
  with open(os.path.join(MANIFESTS, f'{arch}.json')) as f:
    keys = json.load(f)['keys']
  # torchvision's trainable tensors up to layer3 (no running statistics, layer4, fc).
  expected = sum(
    math.prod(shape)
    for key, shape in keys.items()
    if not key.startswith(('layer4.', 'fc.'))
    and not key.endswith(('running_mean', 'running_var', 'num_batches_tracked'))
  )
  assert counts['teacher (frozen)'] == expected
  parts = ('fusion', 'oce', 'memory', 'decoder')
  assert counts['student total (trained)'] == sum(counts[p] for p in parts)
  assert counts['memory'] == 50 * 512 * (1 if arch == 'resnet18' else 4)
