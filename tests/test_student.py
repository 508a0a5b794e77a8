"""The assembled student: ablation switches and the frozen teacher."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
from model_helpers import (
  flat,
  has_key,
  small_config,
  student_shapes,
)

from msrd_jax import config as config_lib
from msrd_jax import losses

# ------------------------------------------------------------- 5. ablation switches


def _attention_paths(params):
  return [p for p in flat(params) if any('attention' in k for k in p)]


def test_plain_rd4ad_has_no_msrd_parts():
  config = small_config('resnet18', 64)
  config.model.fusion = 'mff'
  config.model.coord_attention = ()
  config.model.memory.mode = 'off'
  config_lib.validate(config)
  msrd, tshapes, variables = student_shapes(config, 64)
  params = variables['params']
  assert not _attention_paths(params)
  assert 'memory' not in params and not has_key(params, 'memory')
  assert not has_key(params, 'fusion_logits')
  assert not any(k.startswith('map_') for p in flat(params) for k in p)
  # Every BN statistic of the plain model lives in fusion (align), oce or decoder.
  assert set(params) == {'fusion', 'oce', 'decoder'}
  images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  e, d, aux = jax.eval_shape(msrd.apply_eval, tshapes, variables, images)
  assert [x.shape for x in d] == [x.shape for x in e]
  assert aux['embedding'].shape == (2, 2, 2, 512)


def test_default_student_has_every_msrd_part():
  config = small_config('resnet18', 64)
  assert config.model.fusion == 'msff'
  assert tuple(config.model.coord_attention) == ('fusion', 'decoder')
  assert config.model.memory.mode == 'replace'
  _, _, variables = student_shapes(config, 64)
  params = variables['params']
  assert params['fusion']['fusion_logits'].shape == (3, 3)
  assert params['memory']['memory'].shape == (50, 512)
  for i in (1, 2, 3):
    assert f'attention_{i}' in params['fusion']
  for name, block in params['decoder'].items():
    assert 'attention' in block, name
  assert 'attention' in variables['batch_stats']['decoder']['level1_0']


def test_attention_only_in_decoder():
  config = small_config('resnet18', 64)
  config.model.coord_attention = ('decoder',)
  _, _, variables = student_shapes(config, 64)
  params = variables['params']
  paths = _attention_paths(params)
  assert paths and all(p[0] == 'decoder' for p in paths)
  assert all('attention' in block for block in params['decoder'].values())
  assert 'fusion_logits' in params['fusion']  # still MSFF, just without attention


def test_attention_only_in_fusion():
  config = small_config('resnet18', 64)
  config.model.coord_attention = ('fusion',)
  _, _, variables = student_shapes(config, 64)
  paths = _attention_paths(variables['params'])
  assert {p[1] for p in paths} == {'attention_1', 'attention_2', 'attention_3'}
  assert all(p[0] == 'fusion' for p in paths)


# ---------------------------------------------------- 7. frozen teacher, no gradient


def he_random(shapes, seed: int):
  """Random variables of the given shapes at a sane scale (He-scaled kernels, BN near
  identity), without running any initializer."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in flat(shapes).items():
    shape = leaf.shape
    if path[-1] == 'kernel':
      v = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    elif path[-1] in ('scale', 'var'):
      v = rng.uniform(0.5, 1.5, shape)
    else:
      v = rng.normal(scale=0.1, size=shape)
    out[path] = jnp.asarray(v, leaf.dtype)
  return flax.traverse_util.unflatten_dict(out)


def test_teacher_gets_no_gradient_and_is_not_a_student_param():
  config = small_config('resnet18', 64)
  msrd, tshapes, sshapes = student_shapes(config, 64)
  teacher_vars, student_vars = he_random(tshapes, 0), he_random(sshapes, 1)
  images = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 64, 64, 3)), jnp.float32)

  def loss(tv, params):
    e, d, aux, _ = msrd.apply_train(tv, params, student_vars['batch_stats'], images)
    return losses.distillation_loss(e, d) + aux['entropy']

  g_teacher = jax.jit(jax.grad(loss))(teacher_vars, student_vars['params'])
  leaves = jax.tree_util.tree_leaves(g_teacher)
  assert len(leaves) == len(jax.tree_util.tree_leaves(tshapes))
  assert all(not np.any(np.asarray(g)) for g in leaves)

  # The same loss does reach the student (here: its last decoder block).
  def block_loss(block):
    params = flax.core.unfreeze(student_vars['params'])
    params['decoder']['level1_1'] = block
    return loss(teacher_vars, params)

  g_block = jax.jit(jax.grad(block_loss))(student_vars['params']['decoder']['level1_1'])
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(g_block))
  assert np.any(np.asarray(g_block['conv1']['kernel']))
  assert np.any(np.asarray(g_block['attention']['conv_h']['kernel']))

  # The teacher's variables are not in the student's tree.
  teacher_top = set(tshapes['params'])
  assert {'conv1', 'bn1', 'layer1_0', 'layer3_0'} <= teacher_top
  assert not teacher_top & set(sshapes['params'])
  assert not set(tshapes['batch_stats']) & set(sshapes['batch_stats'])
  assert not any(k.startswith('layer') for k in sshapes['params'])
