"""Coordinate attention (Hou et al., CVPR 2021) against a numpy transcription."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_helpers import (
  np_bn,
  np_sigmoid,
  randomize,
)

from msrd_jax import coord_attention

# ------------------------------------------------------------ 1. coordinate attention


def np_coord_attention(x, p, s):
  x = np.asarray(x, np.float64)
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
  s = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), s)
  _, h, _, _ = x.shape
  pooled_h = x.mean(axis=2)  # (B, H, C): average over W
  pooled_w = x.mean(axis=1)  # (B, W, C): average over H
  y = np.concatenate([pooled_h, pooled_w], axis=1)  # (B, H + W, C)
  # The paper's conv1 has a bias; the BN right after absorbs it, so ours has none.
  y = y @ p['conv1']['kernel'][0, 0]
  pre = np_bn(y, s['bn1'], p['bn1'])
  y = pre * np.clip(pre + 3.0, 0.0, 6.0) / 6.0
  y_h, y_w = y[:, :h], y[:, h:]
  a_h = np_sigmoid(y_h @ p['conv_h']['kernel'][0, 0] + p['conv_h']['bias'])
  a_w = np_sigmoid(y_w @ p['conv_w']['kernel'][0, 0] + p['conv_w']['bias'])
  return x * a_h[:, :, None, :] * a_w[:, None, :, :], pre


def test_coord_attention_matches_numpy_formula():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, 7, 16)), jnp.float32)  # H != W
  module = coord_attention.CoordAttention()
  variables = randomize(module.init(jax.random.key(0), x), seed=1)
  got = np.asarray(module.apply(variables, x))
  want, pre_activation = np_coord_attention(x, variables['params'], variables['batch_stats'])
  # The randomized BN is far from an identity and h-swish sees all three pieces.
  assert (pre_activation < -3).any() and (pre_activation > 3).any()
  assert (np.abs(pre_activation) < 3).any()
  assert got.shape == x.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_coord_attention_eval_mode_uses_running_statistics():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 4, 6, 8)), jnp.float32)
  module = coord_attention.CoordAttention()
  variables = randomize(module.init(jax.random.key(0), x), seed=3)
  shifted = flax.core.unfreeze(variables)
  shifted['batch_stats']['bn1']['mean'] = shifted['batch_stats']['bn1']['mean'] + 1.0
  assert not np.allclose(module.apply(variables, x), module.apply(shifted, x))


@pytest.mark.parametrize('channels,mip', [(64, 8), (1024, 32), (16, 8), (512, 16)])
def test_coord_attention_mip_channels(channels, mip):
  assert coord_attention.mip_channels(channels) == mip
  module = coord_attention.CoordAttention()
  shapes = jax.eval_shape(
    module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 3, 5, channels), jnp.float32)
  )
  p = shapes['params']
  assert p['conv1']['kernel'].shape == (1, 1, channels, mip)
  assert 'bias' not in p['conv1']  # redundant before BN
  assert p['conv_h']['kernel'].shape == (1, 1, mip, channels)
  assert p['conv_w']['kernel'].shape == (1, 1, mip, channels)
  assert p['conv_h']['bias'].shape == (channels,)
  assert shapes['batch_stats']['bn1']['mean'].shape == (mip,)
