"""A run's work directory: its config, its Orbax checkpoints and what makes them match.

    DIR/config.json          the resolved config of the run (written once it is safe)
    DIR/checkpoints/<step>/  Orbax: 'state' (step, params, batch_stats, opt_state, rng)
                             and 'meta' (data position, identity, teacher fingerprint)

A checkpoint can only continue under a config with the same *identity*: the fields
that shape the parameters or the data stream. Anything else (epochs, learning rate,
logging) may change between a run and its resumption.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from msrd_jax import files
from msrd_jax.errors import UserError

# Fields a checkpoint depends on: parameter shapes, the teacher, the data stream.
IDENTITY_FIELDS = (
  'seed',
  'model',
  'data.dataset',
  'data.category',
  'data.image_size',
  'data.synthetic_seed',
  'train.batch_size',
  'train.dtype',
)


class CheckpointMismatch(UserError):
  """A work directory holds a checkpoint of another, incompatible run."""


def _get(config: ml_collections.ConfigDict, dotted: str):
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node


def _jsonable(value: Any) -> Any:
  return json.loads(json.dumps(value, default=list))


# The teacher is identified by its weights' fingerprint, not by where its file lies.
NOT_IDENTITY = ('model.teacher_weights',)


def identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The identity fields of a config, flattened to 'a.b.c' -> JSON value."""
  out = {}
  for name in IDENTITY_FIELDS:
    value = _jsonable(_get(config, name))
    if isinstance(value, dict):
      flat = flax.traverse_util.flatten_dict(value, sep='.')
      out.update({f'{name}.{k}': v for k, v in flat.items()})
    else:
      out[name] = value
  return {k: v for k, v in out.items() if k not in NOT_IDENTITY}


def differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
  keys = sorted(set(stored) | set(current))
  return [
    f'{k}: checkpoint has {stored.get(k, "<absent>")!r}, config has {current.get(k, "<absent>")!r}'
    for k in keys
    if stored.get(k) != current.get(k)
  ]


class Workdir:
  """Checkpoints and config of one run. Use as a context manager or call close()."""

  def __init__(self, path: str, keep: int = 2, create: bool = True):
    self.path = os.path.abspath(path)
    self.checkpoint_dir = os.path.join(self.path, 'checkpoints')
    if create:
      os.makedirs(self.path, exist_ok=True)
    elif not os.path.isdir(self.checkpoint_dir):
      raise FileNotFoundError(
        f'no checkpoint in {self.path!r}: train first with '
        '`python -m msrd_jax.train --config ... --workdir '
        f'{path}`'
      )
    self.manager = ocp.CheckpointManager(
      self.checkpoint_dir,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=create,
        # Half-written steps of a killed run are removed when training restarts.
        cleanup_tmp_directories=create,
        # With several processes Orbax synchronizes them with device collectives, some
        # from its background threads; run there, they can interleave with the
        # training step's collectives in a different order on each process and
        # deadlock. Saving in the foreground keeps every collective in program order.
        enable_async_checkpointing=jax.process_count() == 1,
      ),
      item_names=('state', 'meta'),
    )

  def __enter__(self) -> Workdir:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  @property
  def config_path(self) -> str:
    return os.path.join(self.path, 'config.json')

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def check_compatible(
    self, config: ml_collections.ConfigDict, teacher_fingerprint: float | None = None
  ) -> None:
    """Refuses a config (or teacher) that differs from the latest checkpoint's."""
    step = self.latest_step()
    if step is None:
      return
    meta = self.restore_meta(step)
    problems = differences(meta['identity'], identity(config))
    stored = meta.get('teacher_fingerprint')
    if (
      teacher_fingerprint is not None
      and stored is not None
      and not np.isclose(stored, teacher_fingerprint, rtol=1e-6)
    ):
      problems.append(
        f'the teacher: checkpoint trained with another teacher (weights '
        f'fingerprint {stored:.6g}, this config gives '
        f'{teacher_fingerprint:.6g}); check model.teacher_weights'
      )
    if problems:
      raise CheckpointMismatch(
        f'{self.path!r} holds a checkpoint (step {step}) of a run with another '
        'config; it is left untouched. Use another --workdir, or the config it was '
        'made with. Differences:\n  ' + '\n  '.join(problems)
      )

  def write_config(self, config: ml_collections.ConfigDict) -> None:
    files.atomic_write(self.config_path, config.to_json_best_effort(indent=2, sort_keys=True))

  def save(self, step: int, state: dict, meta: dict) -> None:
    """Saves host copies of `state` (a pytree of arrays) and `meta` (JSON) at `step`.

    The write finishes in the background; Orbax publishes a step only once it is
    complete, so a crash during a save leaves the previous checkpoint as the latest.
    """
    state = jax.tree_util.tree_map(np.asarray, jax.device_get(state))
    self.manager.save(
      step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta))
    )

  def restore_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def restore(
    self, target: dict, step: int | None = None, partial: bool = False
  ) -> tuple[dict, dict]:
    """(state shaped like `target`, meta) of `step` (default: the latest).

    target: a pytree of arrays or ShapeDtypeStructs. partial: `target` names only some
    top-level entries of the saved state (evaluation reads params and batch_stats and
    leaves the optimizer state on disk).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.checkpoint_dir!r}')
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    state_args = ocp.args.PyTreeRestore(
      abstract,
      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=partial,
    )
    try:
      restored = self.manager.restore(
        step, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore())
      )
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointMismatch(
        f'the checkpoint at step {step} in {self.checkpoint_dir!r} does not fit the '
        f'model of this config ({type(e).__name__}: {str(e)[:500]})'
      ) from None
    return restored['state'], restored['meta']
