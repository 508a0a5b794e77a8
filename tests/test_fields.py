"""Every `model.*` field and `train.loss` reaches training, and, where it shapes the
maps, evaluation.

Each field is changed alone from one base config (the demo's model at test scale), a
run of one step is trained with `train.train` and loaded for evaluation with
`inference.load_run`, as `evaluate` does. Then:

- training: the first step's logged loss differs from the base run's;
- evaluation, for a field that the forward pass reads without changing the parameter
  tree: scoring the same checkpoint with the model built from the base value gives
  other scores, so the evaluation's figures depend on the field itself and not only on
  the parameters it led to;
- for a field that changes the parameter tree (or the teacher), the tree (or the
  teacher) differs from the base run's, which `load_run` can only restore with the
  field's value.

`model.backbone` and `model.teacher_weights` are covered where they are built
(test_teacher.py, test_checkpoint.py, the teacher-file run of conftest.py).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import flax
import jax
import numpy as np
import pytest
from conftest import set_field, tiny_config

from msrd_jax import evaluate, inference, train
from msrd_jax.data import list_samples
from msrd_jax.model import MSRD

pytestmark = pytest.mark.slow

N_SCORED = 6  # test images scored per model

# (field, value, what it reaches): 'forward' = read by the forward pass with the same
# tree; 'tree' = changes the parameter tree; 'teacher'; 'init' or 'loss' = training only.
FIELDS = [
  ('model.fusion', 'mff', 'tree'),
  ('model.coord_attention', ('fusion', 'decoder'), 'tree'),
  ('model.coord_attention', (), 'tree'),
  ('model.msff.init_self', 2.0, 'init'),
  ('model.msff.init_other', 0.1, 'init'),
  ('model.msff.form', 'gated', 'tree'),  # cross_gates in place of fusion_logits
  ('model.memory.mode', 'residual', 'tree'),  # adds the learned gate
  ('model.memory.mode', 'off', 'tree'),
  ('model.memory.slots', 7, 'tree'),
  ('model.memory.temperature', 0.5, 'forward'),
  ('model.memory.shrink', 0.05, 'forward'),
  ('model.memory.entropy_weight', 0.5, 'loss'),
  ('model.oce_blocks', 1, 'tree'),
  ('model.init', 'pytorch', 'init'),
  ('model.teacher_seed', 7, 'teacher'),
  ('train.loss', 'pixel', 'loss'),
]


def _config(root, field=None, value=None, first=()):
  """The base config, with the (field, value) pairs of `first` and then `field` set."""
  c = tiny_config(root, steps=1)
  c.model.coord_attention = ('decoder',)  # so that both places can be switched on alone
  c.train.checkpoint_every_steps = 1
  c.eval.after_training = False
  for f, v in (*first, (field, value)):
    if f is not None:
      set_field(c, f, v)
  return c


def _trained(root, workdir, field=None, value=None, first=()):
  """(config, first logged loss, Run) of a one-step run."""
  config = _config(root, field, value, first)
  train.train(config, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    loss = json.loads(f.readline())['loss']
  return config, loss, inference.load_run(config, workdir)


def _scores(run, samples):
  return evaluate.score_split(run, samples).scores


def _under_base_model(run, base_config):
  """The same checkpoint, scored by the model the base config builds."""
  return dataclasses.replace(run, config=copy.deepcopy(base_config), model=MSRD(base_config))


def _tree(variables):
  return {k: np.shape(v) for k, v in flax.traverse_util.flatten_dict(variables['params']).items()}


@pytest.fixture(scope='module')
def base(synthetic_root, tmp_path_factory):
  config, loss, run = _trained(synthetic_root, str(tmp_path_factory.mktemp('base')))
  samples = list_samples('mvtec', synthetic_root, config.data.category, 'test')[:N_SCORED]
  return config, loss, run, samples


def test_the_base_config_is_what_the_cases_assume(base):
  config, _, run, _ = base
  assert config.model.fusion == 'msff' and config.model.memory.mode == 'replace'
  assert config.train.loss == 'global' and config.model.init == 'kaiming'
  assert 'memory' in run.student_vars['params']  # the memory fields have a memory to act on


def test_gate_init_reaches_training(synthetic_root, tmp_path):
  # model.msff.gate_init is read by the gated form only (the base is 'normalized'), so
  # it is changed from a gated base; it sets where the gates start, nothing else.
  gated = [('model.msff.form', 'gated')]
  _, losses, runs = zip(
    *(
      _trained(synthetic_root, str(tmp_path / str(g)), 'model.msff.gate_init', g, gated)
      for g in (0.0, 0.3)
    )
  )
  assert losses[0] != pytest.approx(losses[1], rel=1e-6, abs=0)
  assert _tree(runs[0].student_vars) == _tree(runs[1].student_vars)


@pytest.mark.parametrize(('field', 'value', 'reach'), FIELDS, ids=lambda x: str(x))
def test_field_reaches_training_and_evaluation(base, synthetic_root, tmp_path, field, value, reach):
  base_config, base_loss, base_run, samples = base
  config, loss, run = _trained(synthetic_root, str(tmp_path), field, value)

  assert loss != pytest.approx(base_loss, rel=1e-6, abs=0), (field, loss, base_loss)

  if reach == 'forward':
    assert _tree(run.student_vars) == _tree(base_run.student_vars)
    # The same checkpoint under the base model: only the field differs.
    got, without = _scores(run, samples), _scores(_under_base_model(run, base_config), samples)
    assert np.abs(got - without).max() > 1e-4 * np.abs(got).max(), field
  elif reach == 'tree':
    assert _tree(run.student_vars) != _tree(base_run.student_vars)
  elif reach == 'teacher':
    leaves = jax.tree_util.tree_leaves(run.teacher_vars)
    base_leaves = jax.tree_util.tree_leaves(base_run.teacher_vars)
    assert any(not np.array_equal(a, b) for a, b in zip(leaves, base_leaves, strict=True))
  else:  # init or loss: training only; the maps are the same function of the parameters
    other = _under_base_model(run, base_config)
    np.testing.assert_allclose(_scores(run, samples), _scores(other, samples), rtol=1e-5)
