"""The memory bank (MemAE addressing, hard shrinkage, modes) against numpy."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT
from model_helpers import (
  flat,
  small_config,
  student_shapes,
)

from msrd_jax import config as config_lib
from msrd_jax import memory

# -------------------------------------------------------------------- 2. memory bank


def np_read_weights(z, m, tau, lam):
  z, m = np.asarray(z, np.float64), np.asarray(m, np.float64)
  cos = (z @ m.T) / (np.linalg.norm(z, axis=-1)[:, None] * np.linalg.norm(m, axis=-1))
  s = cos / tau
  w = np.exp(s - s.max(axis=-1, keepdims=True))
  w = w / w.sum(axis=-1, keepdims=True)
  if lam > 0:
    w = np.maximum(w - lam, 0) * w / (np.abs(w - lam) + 1e-12)
    w = w / (w.sum(axis=-1, keepdims=True) + 1e-12)
  return w


def np_entropy(w):
  w = np.asarray(w, np.float64)
  return np.mean(-np.sum(w * np.log(w + 1e-12), axis=-1))


def _queries_and_memory(p=64, n=50, d=16, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(p, d)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32))


# lam <= 1/N: the largest softmax weight is >= 1/N, so no row is shrunk to all zeros.
@pytest.mark.parametrize('tau,lam', [(0.05, 1 / 50), (0.05, 0.0), (0.5, 1 / 50), (1.0, 0.01)])
def test_read_weights_match_numpy_and_are_convex(tau, lam):
  z, m = _queries_and_memory()
  w = np.asarray(memory.read_weights(jnp.asarray(z), jnp.asarray(m), tau, lam))
  assert w.shape == (64, 50)
  assert (w >= 0).all()
  np.testing.assert_allclose(w.sum(axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(w, np_read_weights(z, m, tau, lam), atol=1e-5)


def test_shrinkage_makes_weights_sparse():
  z, m = _queries_and_memory()
  sparse = np.asarray(memory.read_weights(jnp.asarray(z), jnp.asarray(m), 0.05, 1 / 50))
  dense = np.asarray(memory.read_weights(jnp.asarray(z), jnp.asarray(m), 0.05, 0.0))
  assert (dense > 0).all()
  # Most slots of every query are exactly zero, yet every query reads something.
  assert (sparse == 0).mean() > 0.5
  assert ((sparse > 0).sum(axis=-1) >= 1).all()
  # Shrinkage zeroes exactly the slots whose softmax weight is below lambda.
  np.testing.assert_array_equal(sparse == 0, dense <= 1 / 50)


def test_read_weights_keep_summing_to_one_when_nothing_survives_shrinkage():
  # An all-zero query has cosine 0 with every slot: the softmax is exactly uniform and
  # hard shrinkage at 1/N would zero the whole row; it must still read a convex mix.
  _, m = _queries_and_memory()
  w = np.asarray(memory.read_weights(jnp.zeros((2, 16)), jnp.asarray(m), 0.05, 1 / 50))
  np.testing.assert_allclose(w.sum(axis=-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(w, 1 / 50, atol=1e-7)


def _shrink_grad(w, lam, grad):
  """d/dw of sum(hard_shrink(w)) at each w, in float32."""
  f = lambda x: jnp.sum(memory.hard_shrink(x, lam, grad))
  return np.asarray(jax.grad(f)(jnp.asarray(w, jnp.float32)))


def test_hard_shrink_values_are_memae_formula_for_both_gradients():
  rng = np.random.default_rng(4)
  w = rng.uniform(0, 0.05, size=1000).astype(np.float32)
  lam = 1 / 50
  d = w.astype(np.float64) - lam
  want = np.maximum(d, 0) * w / (np.abs(d) + memory.SHRINK_EPS)  # MemAE, in float64
  for grad in ('exact', 'masked'):
    got = np.asarray(memory.hard_shrink(jnp.asarray(w), lam, grad))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    assert (got[w < lam] == 0).all()
  with pytest.raises(ValueError, match='masked'):
    memory.hard_shrink(jnp.asarray(w), lam, 'approximate')


def test_exact_shrink_gradient_is_the_formulas_derivative_and_spikes_at_the_threshold():
  lam = np.float32(1 / 50)
  eps = memory.SHRINK_EPS
  # Away from the threshold: the analytic derivative d/(d+eps) + w eps/(d+eps)^2 above
  # lambda, 0 below, for 'exact'; the mask (1 above, 0 below) for 'masked'.
  w = np.array([0.001, 0.015, 0.025, 0.04, 0.3], np.float32)
  d = w.astype(np.float64) - lam
  analytic = np.where(d > 0, d / (d + eps) + w * eps / (d + eps) ** 2, 0.0)
  np.testing.assert_allclose(_shrink_grad(w, lam, 'exact'), analytic, rtol=1e-5)
  np.testing.assert_allclose(_shrink_grad(w, lam, 'masked'), (d > 0).astype(np.float32), rtol=1e-6)
  # One float32 step above lambda, w eps / (d + eps)^2 is thousands: the exact gradient
  # is a spike that rounding decides; the masked one is the mask, d/(d+eps), about 1.
  w_next = np.nextafter(lam, np.float32(1))
  d1 = np.float64(w_next) - np.float64(lam)
  spike = _shrink_grad(np.array([w_next]), lam, 'exact')[0]
  np.testing.assert_allclose(spike, d1 / (d1 + eps) + w_next * eps / (d1 + eps) ** 2, rtol=1e-3)
  assert spike > 1000
  masked = _shrink_grad(np.array([w_next]), lam, 'masked')
  np.testing.assert_allclose(masked, d1 / (d1 + eps), rtol=1e-6)


def test_shrink_grad_reaches_the_student_and_is_validated(monkeypatch):
  from msrd_jax.model import student_from_config

  seen = []
  read = memory.read

  def recording_read(*args, **kwargs):
    seen.append(args[6] if len(args) > 6 else kwargs.get('shrink_grad', 'exact'))
    return read(*args, **kwargs)

  monkeypatch.setattr(memory, 'read', recording_read)
  c = small_config()
  for grad in ('masked', 'exact'):
    c.model.memory.shrink_grad = grad
    assert student_from_config(c).memory_shrink_grad == grad
    seen.clear()
    student_shapes(c, 64)  # traces the memory bank, as training's init does
    assert seen and set(seen) == {grad}
  c.model.memory.shrink_grad = 'approximate'
  with pytest.raises(config_lib.ConfigError, match='model.memory.shrink_grad'):
    config_lib.validate(c)


def test_validate_bounds_the_shrink_threshold():
  c = config_lib.base_config()
  c.model.memory.shrink = 1.5
  with pytest.raises(config_lib.ConfigError, match='model.memory.shrink'):
    config_lib.validate(c)


def test_entropy_matches_numpy():
  z, m = _queries_and_memory(seed=3)
  for tau, lam in [(0.05, 1 / 50), (0.5, 0.0)]:
    w = np_read_weights(z, m, tau, lam).astype(np.float32)
    got = float(memory.entropy(jnp.asarray(w)))
    np.testing.assert_allclose(got, np_entropy(w), rtol=1e-5)
  # One-hot rows have zero entropy, uniform rows log(N).
  assert abs(float(memory.entropy(jnp.eye(5)))) < 1e-6
  np.testing.assert_allclose(float(memory.entropy(jnp.full((3, 8), 1 / 8))), np.log(8), rtol=1e-6)


def _bank_input(seed=0):
  return np.random.default_rng(seed).normal(size=(2, 3, 4, 16)).astype(np.float32)


def test_memory_replace_reads_w_times_m():
  z = _bank_input()
  bank = memory.MemoryBank(slots=10, temperature=0.1, mode='replace')
  variables = bank.init(jax.random.key(0), jnp.asarray(z))
  assert set(flat(variables)) == {('params', 'memory')}
  mem = np.asarray(variables['params']['memory'])
  assert mem.shape == (10, 16)
  out, ent, w = bank.apply(variables, jnp.asarray(z))
  w_ref = np_read_weights(z.reshape(-1, 16), mem, 0.1, 1 / 10)  # shrink None -> 1/N
  np.testing.assert_allclose(np.asarray(w).reshape(-1, 10), w_ref, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out), (w_ref @ mem).reshape(z.shape), atol=1e-5)
  np.testing.assert_allclose(float(ent), np_entropy(w_ref), rtol=1e-4, atol=1e-6)


def test_memory_residual_starts_as_identity_and_uses_gate():
  z = _bank_input(1)
  bank = memory.MemoryBank(slots=10, temperature=0.1, shrink=0.0, mode='residual')
  variables = bank.init(jax.random.key(0), jnp.asarray(z))
  params = flax.core.unfreeze(variables['params'])
  assert set(params) == {'memory', 'gate'}
  assert np.shape(params['gate']) == () and float(params['gate']) == 0.0
  out, _, _ = bank.apply(variables, jnp.asarray(z))
  np.testing.assert_array_equal(np.asarray(out), z)
  params['gate'] = jnp.asarray(0.5, jnp.float32)
  out, _, _ = bank.apply({'params': params}, jnp.asarray(z))
  mem = np.asarray(params['memory'])
  w_ref = np_read_weights(z.reshape(-1, 16), mem, 0.1, 0.0)
  np.testing.assert_allclose(np.asarray(out), z + 0.5 * (w_ref @ mem).reshape(z.shape), atol=1e-5)


def test_memory_off_is_identity_without_params():
  z = _bank_input(2)
  bank = memory.MemoryBank(mode='off')
  variables = bank.init(jax.random.key(0), jnp.asarray(z))
  assert not jax.tree_util.tree_leaves(variables)
  out, ent, _ = bank.apply(variables, jnp.asarray(z))
  np.testing.assert_array_equal(np.asarray(out), z)
  assert float(ent) == 0.0


def test_memory_unknown_mode_raises():
  with pytest.raises(ValueError, match='memory mode'):
    memory.MemoryBank(mode='sideways').init(jax.random.key(0), jnp.zeros((1, 2, 2, 4)))


def test_usage_counts_collapsed_and_spread_reads():
  """memory.usage against reads whose figures are known by construction."""
  n = 8
  query = np.random.default_rng(0).normal(size=(2, 3, 3, 4))
  # Every position reads exactly one slot, and only slots 1 and 5 are ever read.
  onehot = np.zeros((2, 3, 3, n))
  onehot[..., 1] = 1.0
  onehot[0, 0, :, :] = np.eye(n)[5]
  u = memory.usage(onehot, query, query)
  assert u == {
    'slots': n,
    'slots_read': 2,
    'effective_slots': pytest.approx(1.0),
    'relative_change': 0.0,
  }
  # Evenly spread reads: exp(entropy) is N at every position; the embedding doubled
  # changes it by its own norm.
  even = np.full((2, 3, 3, n), 1.0 / n)
  u = memory.usage(even, query, 2 * query)
  assert u['effective_slots'] == pytest.approx(n)
  assert u['relative_change'] == pytest.approx(1.0)
  # Two slots read half and half: exp(log 2) = 2 effective slots.
  half = np.zeros((1, n))
  half[0, [2, 3]] = 0.5
  assert memory.usage(half, query[0, 0, :1], -query[0, 0, :1])['effective_slots'] == (
    pytest.approx(2.0)
  )


@pytest.mark.slow
def test_shrink_grad_spikes_script_runs_as_its_docstring_says(synthetic_root, tmp_path):
  # scripts/shrink_grad_spikes.py, as the README runs it, shrunk to a few steps: it
  # compares the two gradients at every step and writes nothing.
  before = set(os.listdir(tmp_path))
  done = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, 'scripts', 'shrink_grad_spikes.py'),
      '--config=' + os.path.join(ROOT, 'configs', 'mvtec.py'),
      f'--config.data.root={synthetic_root}',
      '--config.data.category=brick',
      '--config.model.backbone=resnet18',
      '--config.data.image_size=96',
      '--config.train.batch_size=8',
      '--config.data.num_threads=2',
      '--steps=3',
    ],
    cwd=tmp_path,
    env=dict(os.environ, PYTHONPATH=ROOT),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'brick, seed 0, training with the exact gradient' in done.stdout
  assert re.search(r'step\s+0: +\d\.\d\de[+-]\d\d / +\d\.\d\de[+-]\d\d', done.stdout), done.stdout
  summary = re.search(r'3 steps: median (\S+), above 1 %: (\d+)', done.stdout)
  assert summary and float(summary.group(1)) >= 0, done.stdout
  assert set(os.listdir(tmp_path)) == before
