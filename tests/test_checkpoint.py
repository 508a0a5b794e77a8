"""A work directory refuses a config that would not fit its checkpoint, and names why."""

from __future__ import annotations

import copy

import pytest
from conftest import cli, mtimes, set_field
from flax.traverse_util import flatten_dict

from msrd_jax import checkpoint, teacher
from msrd_jax import config as config_lib


def _changed(value):
  """Another value of the same kind (validity does not matter: identity is compared first)."""
  if isinstance(value, bool):
    return not value
  if isinstance(value, int):
    return value + 1
  if isinstance(value, float):
    return value * 2 + 1
  if isinstance(value, str):
    return value + '_other'
  if isinstance(value, tuple | list):
    return tuple(value) + ('other',) if value else ('other',)
  if value is None:
    return 1
  raise TypeError(type(value))


def _identity_leaves(config) -> list[str]:
  return sorted(checkpoint.identity(config))


@pytest.fixture(scope='module')
def saved_run(run_with_teacher_file):
  """(config, workdir, teacher fingerprint) of a trained run."""
  config, workdir, weights = run_with_teacher_file
  fingerprint = teacher.fingerprint(teacher.load_teacher('resnet18', weights))
  return config, workdir, fingerprint


def test_every_identity_field_is_compared_and_named(saved_run):
  config, workdir, fingerprint = saved_run
  leaves = _identity_leaves(config)
  # Every model field is identity (they shape the parameters), but not the teacher's
  # path and not how training differentiates the memory's shrinkage.
  not_identity = {'model.teacher_weights', 'model.memory.shrink_grad'}
  model_fields = {f'model.{k}' for k in flatten_dict(config.model.to_dict(), sep='.')}
  assert model_fields - not_identity <= set(leaves)
  assert not not_identity & set(leaves)
  with checkpoint.Workdir(workdir, create=False) as wd:
    wd.check_compatible(config, fingerprint)  # the run's own config fits
    for grad in ('masked', 'exact'):  # the forward is the same: either loads the run
      other = copy.deepcopy(config)
      other.model.memory.shrink_grad = grad
      wd.check_compatible(other, fingerprint)
    for field in leaves:
      other = copy.deepcopy(config)
      old = checkpoint._get(other, field)
      set_field(other, field, _changed(old))
      with pytest.raises(checkpoint.CheckpointMismatch) as e:
        wd.check_compatible(other, fingerprint)
      listed = str(e.value).split('Differences:\n')[1].splitlines()
      assert len(listed) == 1 and listed[0].strip().startswith(f'{field}: '), (field, listed)
    # Fields that leave the parameters and the data stream alone may change.
    other = copy.deepcopy(config)
    other.train.steps, other.train.learning_rate = 99, 0.1
    other.eval.batch_size, other.train.log_every_steps = 3, 7
    wd.check_compatible(other, fingerprint)
    # Another teacher: named by its fingerprint, not by its path.
    with pytest.raises(checkpoint.CheckpointMismatch, match='another teacher'):
      wd.check_compatible(config, fingerprint * 1.5 + 1)


def test_the_train_command_lists_every_difference_and_touches_nothing(saved_run):
  config, workdir, _ = saved_run
  before = mtimes(workdir)
  result = cli(
    'msrd_jax.train',
    f'--config=configs/mvtec.py:{config.data.category}',
    f'--workdir={workdir}',
    f'--config.data.root={config.data.root}',
    f'--config.model.teacher_weights={config.model.teacher_weights}',
    '--config.model.backbone=resnet18',
    '--config.data.image_size=64',
    '--config.train.batch_size=4',
    '--config.model.memory.mode=off',
  )
  assert result.returncode == 2, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  assert f'{workdir!r} holds a checkpoint' in result.stderr
  for field in ('data.image_size', 'train.batch_size', 'model.memory.mode'):
    assert f'  {field}: checkpoint has' in result.stderr, (field, result.stderr)
  assert mtimes(workdir) == before


def test_a_checkpoint_older_than_a_field_loads_with_the_fields_earlier_behaviour():
  # A checkpoint written before an identity field existed lacks it in its meta; it was
  # made with the behaviour that the field's ADDED_FIELDS value selects.
  current = {'model.fusion': 'msff', **checkpoint.ADDED_FIELDS}
  old = {'model.fusion': 'msff'}
  assert checkpoint.differences(old, current) == []
  for field in checkpoint.ADDED_FIELDS:
    other = {**current, field: _changed(current[field])}
    listed = checkpoint.differences(old, other)
    assert len(listed) == 1 and listed[0].startswith(f'{field}: '), listed
  # Each of them is a field of the config, at the value that keeps the earlier behaviour
  # in base_config.
  base = checkpoint.identity(config_lib.base_config())
  assert {k: base[k] for k in checkpoint.ADDED_FIELDS} == checkpoint.ADDED_FIELDS
