"""MSFF and MFF: mappings, normalized fusion, alignment, against numpy."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
import pytest
from model_helpers import (
  ARCHS,
  flat,
  np_bn,
  randomize,
)

from msrd_jax import fusion

# ------------------------------------------------------------------------- 3. MSFF


def test_fusion_weights_fast_normalized():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(3, 3)).astype(np.float32)
  a[0, 1], a[2, 2] = -0.3, -2.0  # make sure some logits are negative
  w = np.asarray(fusion.fusion_weights(jnp.asarray(a)))
  r = np.maximum(a.astype(np.float64), 0)
  s = r.sum(axis=-1)
  np.testing.assert_allclose(w, r / (s[:, None] + 1e-4), rtol=1e-6)
  assert (w >= 0).all()
  assert (w[a < 0] == 0).all()
  np.testing.assert_allclose(w.sum(axis=-1), s / (s + 1e-4), rtol=1e-6)
  # Rows with positive mass sum to 1 - O(1e-4), never above 1.
  assert (w.sum(axis=-1) < 1).all() and (w.sum(axis=-1) > 1 - 1e-3)[s > 0.5].all()


def _features(channels, b=2, h1=16, w1=12, seed=0):
  """[e1, e2, e3] at strides 4, 8, 16 of a (4 h1) x (4 w1) image; non-square."""
  rng = np.random.default_rng(seed)
  return [
    jnp.asarray(rng.normal(size=(b, h1 >> k, w1 >> k, c)), jnp.float32)
    for k, c in enumerate(channels)
  ]


@pytest.mark.parametrize('init_self,init_other', [(1.0, 0.5), (0.7, 0.2)])
def test_msff_fusion_logits_init(init_self, init_other):
  channels = (8, 16, 32)
  msff = fusion.MSFF(channels, init_self, init_other)
  shapes = jax.eval_shape(msff.init, jax.random.key(0), _features(channels))
  assert shapes['params']['fusion_logits'].shape == (3, 3)
  # Only the logits are fetched, so XLA drops the rest of the initialization.
  a = np.asarray(
    jax.jit(lambda k, f: msff.init(k, f)['params']['fusion_logits'])(
      jax.random.key(0), _features(channels, b=1, h1=4, w1=4)
    )
  )
  np.testing.assert_array_equal(np.diag(a), np.full(3, init_self, np.float32))
  np.testing.assert_array_equal(a[~np.eye(3, dtype=bool)], np.full(6, init_other, np.float32))


def test_msff_and_mff_output_shapes_resnet18():
  channels = ARCHS['resnet18'][2]
  feats = [jax.ShapeDtypeStruct(f.shape, f.dtype) for f in _features(channels)]
  for module in (fusion.MSFF(channels), fusion.MFF(channels)):
    variables = jax.eval_shape(module.init, jax.random.key(0), feats)
    out = jax.eval_shape(module.apply, variables, feats)
    assert out.shape == (2, 4, 3, 3 * 256), type(module).__name__
  msff_params = jax.eval_shape(fusion.MSFF(channels).init, jax.random.key(0), feats)['params']
  # All nine mappings; identities have no parameters.
  for i in range(1, 4):
    for j in range(1, 4):
      assert (f'map_{j}_to_{i}' in msff_params) == (i != j), (j, i)
  for i in range(1, 4):
    assert f'attention_{i}' in msff_params


def test_mappings_land_on_target_level():
  channels = (8, 16, 32)
  feats = _features(channels, b=1, h1=16, w1=12)
  for j in range(3):
    for i in range(3):
      mapping = fusion.Mapping(j, i, channels)
      hw = feats[i].shape[1:3]
      variables = jax.eval_shape(
        lambda x, m=mapping, hw=hw: m.init(jax.random.key(0), x, hw), feats[j]
      )
      out = jax.eval_shape(lambda v, x, m=mapping, hw=hw: m.apply(v, x, hw), variables, feats[j])
      assert out.shape == feats[i].shape, (j, i)
      params = flat(variables.get('params', {}))
      if j < i:  # (i - j) 3x3/2 conv-BN-ReLU, C_j -> ... -> C_i
        convs = sorted(p for p in params if p[-1] == 'kernel')
        assert [params[p].shape for p in convs] == [
          (3, 3, channels[k], channels[k + 1]) for k in range(j, i)
        ]
      elif j > i:  # 1x1 conv C_j -> C_i
        assert params[('conv', 'kernel')].shape == (1, 1, channels[j], channels[i])
      else:
        assert not params


def test_upward_mapping_is_conv_bn_then_bilinear():
  channels = (4, 6, 8)
  rng = np.random.default_rng(5)
  x = rng.normal(size=(2, 3, 5, 8)).astype(np.float32)  # level 3
  for target, hw in ((0, (12, 20)), (1, (6, 10))):
    mapping = fusion.Mapping(2, target, channels)
    variables = randomize(mapping.init(jax.random.key(0), jnp.asarray(x), hw), seed=6)
    got = np.asarray(mapping.apply(variables, jnp.asarray(x), hw))
    p = jax.tree_util.tree_map(np.asarray, variables['params'])
    s = jax.tree_util.tree_map(np.asarray, variables['batch_stats'])
    y = np_bn(x.astype(np.float64) @ p['conv']['kernel'][0, 0], s['bn'], p['bn'])
    np.testing.assert_allclose(
      got, numpy_reference.bilinear_resize(y, hw, axes=(1, 2)), rtol=1e-5, atol=1e-5
    )


def test_msff_fuses_with_normalized_weights():
  """G_i = relu(sum_j w_ij T(j->i)(e_j)) with w from the learned logits.

  With the attention off, G_3 is the last C3 channels of the output (Align keeps level 3
  as is) and G_1, G_2 are what Align's first conv of their level receives.
  """
  channels = (4, 6, 8)
  feats = _features(channels, b=1, h1=8, w1=4, seed=7)
  msff = fusion.MSFF(channels, attention=False)
  variables = flax.core.unfreeze(randomize(msff.init(jax.random.key(0), feats), seed=8))
  a = np.array([[1.0, -0.5, 0.25], [0.3, 0.6, 0.0], [2.0, 0.1, 0.7]], np.float32)
  variables['params']['fusion_logits'] = jnp.asarray(a)
  out, state = msff.apply(variables, feats, capture_intermediates=True)
  w = np.maximum(a, 0) / (np.maximum(a, 0).sum(-1, keepdims=True) + 1e-4)
  for i in range(3):
    g_ref = np.zeros(feats[i].shape)
    for j in range(3):
      g_ref += w[i, j] * _mapped(variables, feats, channels, j, i)
    g_ref = np.maximum(g_ref, 0)
    if i == 2:
      np.testing.assert_allclose(np.asarray(out)[..., -channels[2] :], g_ref, rtol=1e-4, atol=1e-5)
    else:
      name = f'level{i + 1}_down1'
      sub = {c: v['align'][name] for c, v in variables.items()}
      want = fusion.ConvBNReLU(channels[i + 1], 2).apply(sub, jnp.asarray(g_ref, jnp.float32))
      got = state['intermediates']['align'][name]['__call__'][0]
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def _mapped(variables, feats, channels, j, i):
  """T(j -> i)(e_j) with the mapping's own variables out of an MSFF's."""
  if i == j:
    return np.asarray(feats[j])
  name = f'map_{j + 1}_to_{i + 1}'
  sub = {c: v[name] for c, v in variables.items() if name in v}
  return np.asarray(fusion.Mapping(j, i, channels).apply(sub, feats[j], feats[i].shape[1:3]))


def test_gated_msff_adds_the_other_levels_through_its_gates():
  """Form 'gated': G_i = relu(e_i + sum_{j != i} g_ij T(j->i)(e_j)); the diagonal of the
  gates is not read."""
  channels = (4, 6, 8)
  feats = _features(channels, b=1, h1=8, w1=4, seed=9)
  msff = fusion.MSFF(channels, attention=False, form='gated')
  variables = flax.core.unfreeze(randomize(msff.init(jax.random.key(0), feats), seed=10))
  assert 'fusion_logits' not in variables['params']
  g = np.array([[5.0, -0.5, 0.25], [0.3, -7.0, 1.5], [2.0, 0.1, 3.0]], np.float32)
  variables['params']['cross_gates'] = jnp.asarray(g)
  out = np.asarray(msff.apply(variables, feats))
  g3 = np.asarray(feats[2], np.float64) + sum(
    g[2, j] * _mapped(variables, feats, channels, j, 2) for j in (0, 1)
  )
  np.testing.assert_allclose(out[..., -channels[2] :], np.maximum(g3, 0), rtol=1e-4, atol=1e-5)


def test_gated_msff_starts_as_rds_mff_and_learns_its_gates():
  """With its gates at their initial zero, gated MSFF is RD's MFF (same alignment
  weights) on non-negative teacher features, and the gates still get a gradient."""
  channels = (4, 6, 8)
  feats = [jnp.abs(f) for f in _features(channels, b=2, h1=8, w1=8, seed=11)]  # post-ReLU
  msff = fusion.MSFF(channels, attention=False, form='gated')
  initial = msff.init(jax.random.key(0), feats)
  np.testing.assert_array_equal(np.asarray(initial['params']['cross_gates']), np.zeros((3, 3)))
  variables = flax.core.unfreeze(randomize(initial, seed=12))  # random mappings and alignment
  variables['params']['cross_gates'] = initial['params']['cross_gates']
  params = variables['params']
  align = {c: v['align'] for c, v in variables.items()}
  np.testing.assert_allclose(
    np.asarray(msff.apply(variables, feats)),
    np.asarray(fusion.MFF(channels).apply(align, feats)),
    rtol=1e-6,
    atol=1e-6,
  )

  def total(p):
    return jnp.sum(msff.apply({**variables, 'params': p}, feats) ** 2)

  grad = np.asarray(jax.grad(total)(params)['cross_gates'])
  off = ~np.eye(3, dtype=bool)
  assert (np.abs(grad[off]) > 0).all()
  assert (grad[~off] == 0).all()  # the diagonal is not read


def test_msff_refuses_an_unknown_form():
  channels = (4, 6, 8)
  with pytest.raises(ValueError, match='weighted'):
    fusion.MSFF(channels, form='weighted').init(jax.random.key(0), _features(channels))
