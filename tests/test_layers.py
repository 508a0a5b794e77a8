"""The layers against flax.linen's and XLA's own convolution, values and gradients."""

from __future__ import annotations

import shutil
import subprocess

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from msrd_jax import layers
from msrd_jax.errors import UserError


def _reference(x, kernel, stride, padding):
  """The convolution as XLA differentiates it, with no custom gradient."""
  return lax.conv_general_dilated(
    x,
    kernel,
    (stride, stride),
    ((padding, padding),) * 2,
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )


@pytest.mark.parametrize(
  'size,stride,hw',
  [
    (1, 1, (8, 8)),
    (3, 1, (9, 7)),
    (3, 2, (9, 7)),
    (3, 2, (8, 8)),
    (7, 2, (13, 11)),
    (1, 2, (7, 9)),
    (1, 2, (8, 8)),
    (1, 3, (10, 7)),
  ],
)
@pytest.mark.parametrize('kernel_grad_by', ['taps', 'xla', None])
def test_conv2d_values_and_gradients_match_xla(size, stride, hw, kernel_grad_by):
  rng = np.random.default_rng(size * 10 + stride)
  x = jnp.asarray(rng.normal(size=(2, *hw, 5)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(size, size, 5, 6)), jnp.float32)
  pad = size // 2
  want, want_vjp = jax.vjp(lambda x, k: _reference(x, k, stride, pad), x, k)
  conv = lambda x, k: layers.conv2d(x, k, stride, pad, kernel_grad_by, patches=False)
  got, got_vjp = jax.vjp(conv, x, k)
  if size > 1:  # XLA's own forward
    np.testing.assert_array_equal(got, want)
  else:  # a matrix product: the same sums in another order
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
  g = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
  for a, b in zip(got_vjp(g), want_vjp(g)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


@pytest.mark.parametrize(
  'size,stride,hw,channels',
  [
    (3, 1, (8, 8), (5, 6)),
    (3, 2, (9, 7), (5, 6)),
    (3, 2, (16, 16), (64, 32)),
    (5, 3, (11, 13), (3, 4)),
  ],
)
def test_conv2d_as_a_product_over_shifted_copies_matches_xla(size, stride, hw, channels):
  rng = np.random.default_rng(size * 10 + stride)
  c, o = channels
  x = jnp.asarray(rng.normal(size=(2, *hw, c)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(size, size, c, o)), jnp.float32)
  pad = size // 2
  want, want_vjp = jax.vjp(lambda x, k: _reference(x, k, stride, pad), x, k)
  got, got_vjp = jax.vjp(lambda x, k: layers.conv2d(x, k, stride, pad, patches=True), x, k)
  tol = lambda a: dict(rtol=1e-5, atol=1e-5 * float(jnp.abs(a).max()))
  np.testing.assert_allclose(got, want, **tol(want))
  g = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
  for a, b in zip(got_vjp(g), want_vjp(g)):
    np.testing.assert_allclose(a, b, **tol(b))


@pytest.mark.parametrize(
  'backend,out,want',
  [
    ('cpu', (8, 8), True),
    ('cpu', (4, 16), True),
    ('cpu', (9, 8), False),
    ('cpu', (16, 16), False),
    ('gpu', (4, 4), False),
  ],
)
def test_small_outputs_use_the_product_on_the_cpu_only(monkeypatch, backend, out, want):
  monkeypatch.delenv(layers.PATCHES_ENV, raising=False)
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  assert layers.use_patches(*out) == want
  # and conv2d follows it: no convolution is left in the traced program
  x, k = jnp.ones((1, 2 * out[0], 2 * out[1], 3)), jnp.ones((3, 3, 3, 4))
  jaxpr = str(jax.make_jaxpr(lambda x, k: layers.conv2d(x, k, 2, 1))(x, k))
  assert ('conv_general_dilated' not in jaxpr) == want


@pytest.mark.parametrize('forced,want', [('on', True), ('off', False)])
def test_the_environment_forces_the_product(monkeypatch, forced, want):
  monkeypatch.setenv(layers.PATCHES_ENV, forced)
  for backend, out in [('cpu', (4, 4)), ('cpu', (64, 64)), ('gpu', (4, 4))]:
    monkeypatch.setattr(jax, 'default_backend', lambda b=backend: b)
    assert layers.use_patches(*out) == want


def test_a_bad_product_environment_value_is_a_user_error(monkeypatch):
  monkeypatch.setenv(layers.PATCHES_ENV, 'yes')
  with pytest.raises(UserError, match=layers.PATCHES_ENV):
    layers.use_patches(4, 4)


@pytest.mark.parametrize(
  'backend,avx512,vendor,stride,want',
  [
    ('cpu', True, 'AuthenticAMD', 1, 'xla'),
    ('cpu', True, 'AuthenticAMD', 2, 'taps'),
    ('cpu', False, 'AuthenticAMD', 1, 'taps'),
    ('cpu', True, 'GenuineIntel', 1, 'taps'),
    ('cpu', True, '', 1, 'taps'),
    ('gpu', True, 'AuthenticAMD', 1, 'taps'),
  ],
)
def test_kernel_grad_method_follows_the_measurements(
  monkeypatch, backend, avx512, vendor, stride, want
):
  monkeypatch.delenv(layers.KERNEL_GRAD_ENV, raising=False)
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  monkeypatch.setattr(layers, '_host_has_avx512', lambda: avx512)
  monkeypatch.setattr(layers, '_host_cpu_vendor', lambda: vendor)
  assert layers.kernel_grad_method(stride) == want


def test_the_cpu_vendor_is_the_one_lscpu_reports():
  """The vendor the rule reads is the one util-linux's lscpu names."""
  lscpu = shutil.which('lscpu')
  if lscpu is None:
    pytest.skip('no lscpu')
  out = subprocess.run([lscpu], capture_output=True, text=True, env={'LC_ALL': 'C'}).stdout
  want = [
    line.split(':', 1)[1].strip() for line in out.splitlines() if line.startswith('Vendor ID')
  ]
  if not want:
    pytest.skip('lscpu names no vendor')
  assert layers._host_cpu_vendor() == want[0]


@pytest.mark.parametrize('forced', ['taps', 'xla'])
def test_the_environment_forces_the_kernel_gradient_method(monkeypatch, forced):
  monkeypatch.setenv(layers.KERNEL_GRAD_ENV, forced)
  for backend, avx512, stride in [('cpu', True, 1), ('cpu', False, 2), ('gpu', False, 1)]:
    monkeypatch.setattr(jax, 'default_backend', lambda b=backend: b)
    monkeypatch.setattr(layers, '_host_has_avx512', lambda a=avx512: a)
    monkeypatch.setattr(layers, '_host_cpu_vendor', lambda: 'AuthenticAMD')
    assert layers.kernel_grad_method(stride) == forced


def test_a_bad_kernel_gradient_environment_value_is_a_user_error(monkeypatch):
  monkeypatch.setenv(layers.KERNEL_GRAD_ENV, 'fast')
  with pytest.raises(UserError, match=layers.KERNEL_GRAD_ENV):
    layers.kernel_grad_method(1)


def test_conv2d_rejects_an_unknown_kernel_gradient_method():
  x, k = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2))
  with pytest.raises(ValueError, match='kernel_grad_by'):
    layers.conv2d(x, k, 1, 1, 'fast')
  with pytest.raises(ValueError, match='kernel_grad_by'):  # a 1x1 kernel too
    layers.conv2d(x, k[:1, :1], 1, 0, 'fast')


def test_conv_module_is_flax_conv_with_pytorch_padding():
  # 10 x 9 outputs: XLA's convolution (smaller ones are a matrix product, tested above)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 20, 18, 4)), jnp.float32)
  ours = layers.conv(8, 3, 2)
  variables = ours.init(jax.random.key(0), x)
  flax_conv = nn.Conv(8, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=False)
  # Same parameter tree, same initializer stream, same values.
  flax_vars = flax_conv.init(jax.random.key(0), x)
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(flax_vars)
  assert variables['params']['kernel'].shape == (3, 3, 4, 8)
  np.testing.assert_array_equal(ours.apply(variables, x), flax_conv.apply(variables, x))


def test_conv_init_is_torchvisions_kaiming_normal_fan_out():
  kernel = layers.conv(256, 3).init(jax.random.key(1), jnp.zeros((1, 8, 8, 64)))['params']['kernel']
  # kaiming_normal_(mode='fan_out', nonlinearity='relu'): std = sqrt(2 / (out * k * k)).
  np.testing.assert_allclose(float(jnp.std(kernel)), np.sqrt(2.0 / (256 * 9)), rtol=0.03)


def test_bfloat16_conv_computes_in_bfloat16_and_keeps_float32_parameters():
  x = jnp.ones((1, 6, 6, 3), jnp.float32)
  module = layers.conv(4, 3, dtype=jnp.bfloat16)
  variables = module.init(jax.random.key(0), x)
  assert variables['params']['kernel'].dtype == jnp.float32
  assert module.apply(variables, x).dtype == jnp.bfloat16
  grad = jax.grad(lambda v: module.apply(v, x).astype(jnp.float32).sum())(variables)
  assert grad['params']['kernel'].dtype == jnp.float32
