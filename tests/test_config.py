"""Config validation."""

from __future__ import annotations

import pytest
from model_helpers import (
  small_config,
)

from msrd_jax import config as config_lib

# ------------------------------------------------------------ 8. config validation


def test_base_config_is_valid():
  config_lib.validate(config_lib.base_config())
  for size in (32, 64, 96, 224):
    config_lib.validate(small_config('resnet18', size))


@pytest.mark.parametrize(
  'field,value,needle',
  [
    ('data.image_size', 100, 'data.image_size'),
    ('data.image_size', 16, 'data.image_size'),
    ('data.image_size', 80, 'data.image_size'),  # a multiple of 16, not of 32
    ('model.backbone', 'resnet152', 'model.backbone'),
    ('model.fusion', 'bifpn', 'model.fusion'),
    ('model.memory.mode', 'sparse', 'model.memory.mode'),
    ('model.msff.form', 'weighted', 'model.msff.form'),
    ('model.coord_attention', ('fusion', 'encoder'), 'encoder'),
  ],
)
def test_validate_rejects(field, value, needle):
  config = config_lib.base_config()
  *parents, leaf = field.split('.')
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(config)
  assert isinstance(info.value, ValueError)
  message = str(info.value)
  assert needle in message and str(value if not isinstance(value, tuple) else value[1]) in message


def test_validate_lists_every_problem_at_once():
  config = config_lib.base_config()
  config.data.image_size = 100
  config.model.backbone = 'resnet152'
  config.model.fusion = 'bifpn'
  config.model.memory.mode = 'sparse'
  config.model.coord_attention = ('encoder', 'decoder')
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(config)
  message = str(info.value)
  for needle in (
    'data.image_size',
    '100',
    'model.backbone',
    'resnet152',
    'model.fusion',
    'bifpn',
    'model.memory.mode',
    'sparse',
    'model.coord_attention',
    'encoder',
  ):
    assert needle in message, needle
  assert len(message.strip().splitlines()) == 1 + 5
