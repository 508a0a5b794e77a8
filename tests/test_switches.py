"""Every ablation switch changes the computation exactly where it should, and nowhere else.

The student variants share one set of random variables (each variant takes the part of
it that its tree has), so that a difference between two variants' outputs can only come
from the switch. The parameter trees themselves are checked in test_student.py.
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from model_helpers import small_config

from msrd_jax import config as config_lib
from msrd_jax import losses, train
from msrd_jax import model as model_lib
from msrd_jax.layers import Layers
from msrd_jax.memory import MemoryBank
from msrd_jax.model import Student

# resnet18 features of a 32 x 32 image: e1 at 8 x 8.
_FEATURE_SHAPES = ((2, 8, 8, 64), (2, 4, 4, 128), (2, 2, 2, 256))
_DEFAULT_LOGITS = np.where(np.eye(3, dtype=bool), 1.0, 0.5)


def _features(seed: int = 0) -> list[jax.Array]:
  """Teacher-like features: non-negative, as ReLU outputs are."""
  rng = np.random.default_rng(seed)
  return [jnp.asarray(np.abs(rng.normal(size=s)), jnp.float32) for s in _FEATURE_SHAPES]


def _student(**kw) -> Student:
  return Student('resnet18', **kw)


def _flat(tree) -> dict:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


@functools.cache
def _superset() -> dict:
  """Random variables of the student with every part (MSFF, attention in both places,
  a residual memory), at a sane scale; gate 0.5 and the default fusion logits."""
  shapes = jax.eval_shape(_student(memory_mode='residual').init, jax.random.key(0), _features())
  rng = np.random.default_rng(1)
  out = {}
  for path, leaf in _flat(shapes).items():
    shape = leaf.shape
    if path[-1] == 'kernel':
      v = rng.normal(size=shape) * np.sqrt(1.0 / np.prod(shape[:-1]))
    elif path[-1] in ('scale', 'var'):
      v = rng.uniform(0.5, 1.5, shape)
    elif path[-1] == 'memory':
      v = rng.uniform(-1, 1, shape) / np.sqrt(shape[-1])
    elif path[-1] == 'gate':
      v = np.full(shape, 0.5)
    elif path[-1] == 'fusion_logits':
      v = _DEFAULT_LOGITS
    else:
      v = rng.normal(scale=0.1, size=shape)
    out[path] = np.asarray(v, np.float32)
  return out


def _variables(student: Student, **overrides) -> dict:
  """The superset's values for `student`'s tree. MFF's alignment is MSFF's `align`."""
  shapes = _flat(jax.eval_shape(student.init, jax.random.key(0), _features()))
  full = _superset()
  out = {}
  for path in shapes:
    source = path
    if student.fusion == 'mff' and path[1] == 'fusion':
      source = (path[0], 'fusion', 'align', *path[2:])
    out[path] = jnp.asarray(overrides.get(path[-1], full[source]))
    assert out[path].shape == shapes[path].shape, path
  return flax.traverse_util.unflatten_dict(out)


def _run(fusion='msff', attention=('fusion', 'decoder'), memory_mode='replace', **overrides):
  """(decoded [d1, d2, d3], embedding, entropy) as numpy, in eval mode."""
  student = _student(fusion=fusion, attention=attention, memory_mode=memory_mode)
  # Eager: the variants share most operations, which compile once each; a jit per
  # variant would compile every variant whole.
  decoded, aux = student.apply(_variables(student, **overrides), _features(), train=False)
  return [np.asarray(d) for d in decoded], np.asarray(aux['embedding']), float(aux['entropy'])


def _same(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _differ(a, b, at_least: float = 1e-3) -> bool:
  """Every level differs by more than rounding (relative to its scale)."""
  return all(np.abs(x - y).max() > at_least * np.abs(y).max() for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------- model.fusion


def test_msff_reduces_exactly_to_mff_when_it_keeps_each_level_alone():
  """With each level fused only with itself (weight 1, the others cut by relu), no
  attention and non-negative features, MSFF is RD's MFF: the switch adds exactly the
  mutual mappings and their weights, nothing else."""
  plain = dict(attention=(), memory_mode='off')
  mff = _run(fusion='mff', **plain)
  alone = np.where(np.eye(3, dtype=bool), 1e4, -1.0).astype(np.float32)  # w_ii = 1 in f32
  msff_alone = _run(fusion='msff', **plain, fusion_logits=alone)
  assert _same(msff_alone[0], mff[0]) and np.array_equal(msff_alone[1], mff[1])
  msff = _run(fusion='msff', **plain)
  assert _differ(msff[0], mff[0]) and _differ([msff[1]], [mff[1]])


# ------------------------------------------------------------ model.coord_attention


def test_attention_changes_exactly_the_parts_after_its_place():
  runs = {
    places: _run(attention=places, memory_mode='off')
    for places in ((), ('fusion',), ('decoder',), ('fusion', 'decoder'))
  }
  none, fusion, decoder, both = runs.values()
  # 'decoder' sits after the embedding: the embedding is untouched, every output moves.
  assert np.array_equal(decoder[1], none[1]) and _differ(decoder[0], none[0])
  assert np.array_equal(both[1], fusion[1]) and _differ(both[0], fusion[0])
  # 'fusion' sits before the embedding: both move.
  assert _differ([fusion[1]], [none[1]]) and _differ(fusion[0], none[0])
  assert _differ(both[0], decoder[0])


def test_fusion_attention_belongs_to_msff():
  """design.md places 'fusion' attention on MSFF's fused maps; RD's MFF has none."""
  with_place = _run(fusion='mff', attention=('fusion',), memory_mode='off')
  without = _run(fusion='mff', attention=(), memory_mode='off')
  assert _same(with_place[0], without[0])


# --------------------------------------------------------------- model.memory.mode


def test_memory_modes():
  off = _run(memory_mode='off')
  replace = _run(memory_mode='replace')
  residual = _run(memory_mode='residual')  # gate 0.5
  gate0 = _run(memory_mode='residual', gate=np.float32(0.0))
  # A closed gate is 'off', bit for bit.
  assert _same(gate0[0], off[0]) and np.array_equal(gate0[1], off[1])
  assert off[2] == 0.0 and replace[2] > 0.0 and residual[2] > 0.0
  # 'replace' decodes MemAE's read of the embedding that 'off' decodes ...
  memory = _superset()[('params', 'memory', 'memory')]
  bank = MemoryBank(50, _student().memory_temperature, None, 'replace')  # the student's
  read, _ = bank.apply({'params': {'memory': memory}}, off[1])[:2]
  np.testing.assert_allclose(replace[1], read, rtol=1e-6, atol=1e-7)
  # ... and 'residual' adds it to that embedding, scaled by the gate.
  np.testing.assert_allclose(residual[1], off[1] + 0.5 * replace[1], rtol=1e-6, atol=1e-6)
  assert _differ(replace[0], off[0]) and _differ(residual[0], off[0])
  assert _differ(residual[0], replace[0])


# --------------------------------------------------- train.loss and the entropy term


class _StubModel:
  """Stands in for MSRD in make_train_step: the student's output is params['d']."""

  def __init__(self):
    rng = np.random.default_rng(0)
    self.e = [jnp.asarray(rng.normal(size=(2, 4, 3, 5)), jnp.float32) for _ in range(3)]

  def apply_train(self, teacher_vars, params, batch_stats, images):
    return self.e, params['d'], {'entropy': params['entropy']}, batch_stats


@pytest.mark.parametrize('mode', ['replace', 'off'])
def test_train_step_uses_the_configured_loss_and_entropy_term(mode):
  model = _StubModel()
  rng = np.random.default_rng(1)
  params = {
    'd': [jnp.asarray(rng.normal(size=e.shape), jnp.float32) for e in model.e],
    'entropy': jnp.float32(1.5),
  }
  got = {}
  for kind in ('global', 'pixel'):
    config = small_config()
    config.train.loss = kind
    config.model.memory.mode = mode
    tx = optax.sgd(1.0)
    state = train.TrainState(
      step=jnp.int32(0), params=params, batch_stats={}, opt_state=tx.init(params)
    )
    step = train.make_train_step(model, tx, config, axis_name=None)
    _, metrics = step(state, None, None)
    distill = losses.distillation_loss(model.e, params['d'], kind)
    np.testing.assert_allclose(metrics['distill_loss'], distill, rtol=1e-6)
    beta = config.model.memory.entropy_weight if mode != 'off' else 0.0
    np.testing.assert_allclose(metrics['loss'], distill + beta * 1.5, rtol=1e-6)
    got[kind] = float(metrics['distill_loss'])
  assert abs(got['global'] - got['pixel']) > 1e-3


# ---------------------------------------------------------------------- train.dtype


def test_bfloat16_config_computes_in_bfloat16_with_float32_parameters():
  """Fails if train.dtype were ignored: the student's activations are bfloat16, and its
  outputs differ from float32's by bfloat16's rounding, not float32's."""
  outs = {}
  for dtype in ('float32', 'bfloat16'):
    config = small_config('resnet18', 32)
    config.train.dtype = dtype
    config_lib.validate(config)
    msrd = model_lib.MSRD(config)
    assert msrd.student.layers == Layers(jnp.dtype(dtype), None)
    assert msrd.teacher.dtype == jnp.dtype(dtype)
    variables = _variables(msrd.student)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))
    (decoded, aux), inter = msrd.student.apply(
      variables, _features(), train=False, capture_intermediates=True, mutable=['intermediates']
    )
    conv_out = inter['intermediates']['decoder']['level1_1']['conv2']['__call__'][0]
    assert conv_out.dtype == jnp.dtype(dtype)
    assert all(d.dtype == jnp.dtype(dtype) for d in decoded)
    outs[dtype] = [np.asarray(d, np.float32) for d in decoded]
  for lo, hi in zip(outs['bfloat16'], outs['float32'], strict=True):
    err = np.abs(lo - hi).max() / np.abs(hi).max()
    assert 1e-4 < err < 5e-2, err
