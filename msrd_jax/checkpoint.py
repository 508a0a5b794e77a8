"""A run's work directory: its config, its Orbax checkpoints and what makes them match.

    DIR/config.json          the resolved config of the run (written once it is safe)
    DIR/checkpoints/<step>/  Orbax: 'state' (step, params, batch_stats, opt_state, rng)
                             and 'meta' (data position, identity, teacher fingerprint,
                             SHA-256 checksums of the state and of the meta itself)
    DIR/damaged_checkpoints/ steps found damaged, moved out of the way (kept to inspect)

A checkpoint can only continue under a config with the same *identity*: the fields
that shape the parameters or the data stream. Anything else (epochs, learning rate,
logging) may change between a run and its resumption.

Every step proves its integrity: its meta holds a SHA-256 of each top-level entry of
the state (over the arrays' bytes, in a fixed order) and a SHA-256 of the meta itself.
A restore checks both. When the newest step is damaged (flipped bytes, a truncated
file, unreadable metadata), training falls back to the newest intact step with a
one-line warning and moves the damaged one aside; evaluation refuses and names both,
since scoring an older step than the run trained to would be misleading.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import sys
from typing import Any

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from msrd_jax import distributed, files
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


class CheckpointDamaged(UserError):
  """A checkpoint's files no longer hold what was saved (or cannot be read at all)."""

  def __init__(self, message: str, step: int | None = None, reason: str = ''):
    super().__init__(message)
    self.step = step
    self.reason = reason


def tree_sha256(tree: Any) -> str:
  """SHA-256 over a pytree: each leaf's path, dtype, shape and bytes, in key order.

  Each leaf's bytes are hashed on a thread pool (hashlib releases the GIL on large
  buffers), then the per-leaf digests are hashed in key order: a state of a gigabyte
  costs a fraction of a second per save on a many-core host, not seconds.
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  items = sorted((jax.tree_util.keystr(path), leaf) for path, leaf in leaves)

  def digest(leaf) -> str:
    a = np.ascontiguousarray(np.asarray(leaf))
    return f'{a.dtype.str}|{a.shape}|{hashlib.sha256(a.reshape(-1).view(np.uint8)).hexdigest()}'

  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    digests = list(pool.map(digest, [leaf for _, leaf in items]))
  h = hashlib.sha256()
  for (path, _), d in zip(items, digests):
    h.update(f'{path}|{d}\n'.encode())
  return h.hexdigest()


def state_checksums(state: dict) -> dict[str, str]:
  """{top-level entry: SHA-256}: a partial restore can check the entries it reads."""
  return {k: tree_sha256(v) for k, v in state.items()}


def _meta_sha256(meta: dict) -> str:
  body = {k: v for k, v in meta.items() if k != 'meta_sha256'}
  return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


_quiet_abandoned_reads = False


def _silence_abandoned_reads() -> None:
  """Drops the tracebacks of reads that Orbax abandons when one read of a step fails.

  Orbax stops waiting for the other arrays and closes its event loop; their reads
  then complete onto the closed loop and Python prints one 'Event loop is closed'
  traceback for each, burying the one-line report of the damage. Installed once,
  after a failed restore; any other unraisable exception reaches the previous hook.
  """
  global _quiet_abandoned_reads
  if _quiet_abandoned_reads:
    return
  _quiet_abandoned_reads = True
  previous = sys.unraisablehook

  def hook(unraisable):
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and str(e) == 'Event loop is closed':
      return
    previous(unraisable)

  sys.unraisablehook = hook


def _short(e: BaseException, limit: int = 300) -> str:
  text = ' '.join(str(e).split())
  return f'{type(e).__name__}: {text[:limit]}{"..." if len(text) > limit else ""}'


def _get(config: ml_collections.ConfigDict, dotted: str):
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node


def _jsonable(value: Any) -> Any:
  return json.loads(json.dumps(value, default=list))


# The teacher is identified by its weights' fingerprint, not by where its file lies.
# How the memory's shrinkage is differentiated changes no parameter and no output.
NOT_IDENTITY = ('model.teacher_weights', 'model.memory.shrink_grad')


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
  calibration = config.get('calibration')
  if calibration is not None and calibration.source == 'holdout':
    # Holding images out for calibration changes the training set.
    out['calibration.holdout_fraction'] = calibration.holdout_fraction
  return {k: v for k, v in out.items() if k not in NOT_IDENTITY}


# Identity fields added after checkpoints were first written, with the value whose
# behaviour the code had before the field existed: a checkpoint that lacks one was made
# with that value, and loads under a config that has it (and under no other).
ADDED_FIELDS: dict[str, Any] = {
  'model.init': 'kaiming',
  'model.teacher_seed': None,
  'model.msff.form': 'normalized',
  'model.msff.gate_init': 0.0,
}


def differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
  stored = {**{k: v for k, v in ADDED_FIELDS.items() if k in current}, **stored}
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
        # With several processes, Orbax's background threads would run its barriers
        # (device collectives unless msrd_jax.distributed switches them to the
        # coordination service) interleaved with the training step's collectives in a
        # different order on each process. Saving in the foreground keeps program order.
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
    """Refuses a config (or teacher) that differs from the latest checkpoint's.

    The latest checkpoint whose meta is intact is compared; a damaged one is left to
    `restore`, which falls back or refuses.
    """
    found = self._newest_intact_meta()
    if found is None:
      return
    step, meta = found
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
    The meta carries the checksums that `restore` verifies.
    """
    state = jax.tree_util.tree_map(np.asarray, jax.device_get(state))
    meta = _jsonable({**meta, 'checksums': state_checksums(state)})
    meta['meta_sha256'] = _meta_sha256(meta)
    self.manager.save(
      step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta))
    )

  def wait(self) -> None:
    """Returns once every save started so far is on disk."""
    self.manager.wait_until_finished()

  def restore_meta(self, step: int | None = None) -> dict:
    """The meta of `step` (default: the latest), verified against its own checksum."""
    step = self.latest_step() if step is None else step
    where = f'checkpoint step {step} in {self.checkpoint_dir!r}'
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
        'meta'
      ]
    except Exception as e:  # Orbax and json raise many types for damaged files
      reason = f'its metadata cannot be read ({_short(e)})'
      raise CheckpointDamaged(f'{where} is damaged: {reason}', step, reason) from None
    if not isinstance(meta, dict) or 'data_step' not in meta:
      reason = 'its metadata is not what was saved'
      raise CheckpointDamaged(f'{where} is damaged: {reason}', step, reason)
    # Checkpoints written before checksums existed carry none; they are trusted.
    if 'meta_sha256' in meta and meta['meta_sha256'] != _meta_sha256(meta):
      reason = 'its metadata does not match its checksum'
      raise CheckpointDamaged(f'{where} is damaged: {reason}', step, reason)
    return meta

  def _newest_intact_meta(self) -> tuple[int, dict] | None:
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return step, self.restore_meta(step)
      except CheckpointDamaged:
        continue
    return None

  def _restore_step(self, target: dict, step: int, partial: bool) -> tuple[dict, dict]:
    """(state, meta) of one step, both verified; CheckpointDamaged otherwise."""
    meta = self.restore_meta(step)
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    state_args = ocp.args.PyTreeRestore(
      abstract,
      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=partial,
    )
    where = f'checkpoint step {step} in {self.checkpoint_dir!r}'
    try:
      state = self.manager.restore(step, args=ocp.args.Composite(state=state_args))['state']
    except Exception as e:  # a damaged file or one of another model: see `restore`
      _silence_abandoned_reads()
      reason = f'its arrays cannot be restored ({_short(e)})'
      raise CheckpointDamaged(f'{where} is damaged: {reason}', step, reason) from None
    stored = meta.get('checksums') or {}
    bad = [k for k in state if k in stored and tree_sha256(state[k]) != stored[k]]
    if bad:
      reason = f'the saved {", ".join(bad)} no longer match their SHA-256 checksum'
      raise CheckpointDamaged(f'{where} is damaged: {reason}', step, reason)
    return state, meta

  def restore(
    self, target: dict, step: int | None = None, partial: bool = False, fallback: bool = False
  ) -> tuple[dict, dict]:
    """(state shaped like `target`, meta) of `step` (default: the latest intact one).

    target: a pytree of arrays or ShapeDtypeStructs. partial: `target` names only some
    top-level entries of the saved state (evaluation reads params and batch_stats and
    leaves the optimizer state on disk); only those are verified.
    fallback: when the latest step is damaged, restore the newest intact one instead,
    print one warning line per damaged step and move those steps to
    DIR/damaged_checkpoints/ (so that later saves neither collide with them nor let
    Orbax's max_to_keep delete the intact step in their favour). Without it, a
    damaged latest step is refused with CheckpointDamaged naming it and the newest
    intact one.

    Raises:
      FileNotFoundError: no checkpoint at all.
      CheckpointDamaged: as above, or when no step is intact.
    """
    if step is not None:
      return self._restore_step(target, step, partial)
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f'no checkpoint in {self.checkpoint_dir!r}')
    damaged: list[CheckpointDamaged] = []
    for s in steps:
      try:
        state, meta = self._restore_step(target, s, partial)
      except CheckpointDamaged as e:
        damaged.append(e)
        continue
      if damaged and not fallback:
        raise CheckpointDamaged(
          f'the latest checkpoint, step {steps[0]} in {self.checkpoint_dir!r}, is damaged '
          f'({damaged[0].reason}); step {s} is intact. Run the train command again with '
          f'the same config: it resumes from step {s}, redoes the later steps and moves '
          'the damaged one aside.',
          steps[0],
          damaged[0].reason,
        )
      for e in damaged:
        moved = self._set_aside(e.step)
        print(
          f'warning: checkpoint step {e.step} is damaged ({e.reason}); resuming from '
          f'step {s}, the newest intact one (damaged step moved to {moved})',
          file=sys.stderr,
          flush=True,
        )
      return state, meta
    listed = '; '.join(f'step {e.step}: {e.reason}' for e in damaged)
    raise CheckpointDamaged(
      f'no checkpoint in {self.checkpoint_dir!r} can be restored ({listed}). If they were '
      'written by another version of msrd_jax, its model may differ from this one; '
      'otherwise the files are damaged. Train into a new --workdir, or move the '
      'checkpoints folder away to start this one afresh.'
    )

  def _set_aside(self, step: int) -> str:
    """Moves a damaged step to DIR/damaged_checkpoints/ (never deletes it)."""
    self.manager.wait_until_finished()
    src = os.path.join(self.checkpoint_dir, str(step))
    dest_dir = os.path.join(self.path, 'damaged_checkpoints')
    os.makedirs(dest_dir, exist_ok=True)
    dest, n = os.path.join(dest_dir, str(step)), 1
    while os.path.exists(dest):
      dest, n = os.path.join(dest_dir, f'{step}.{n}'), n + 1
    if distributed.is_main_process() and os.path.exists(src):
      os.rename(src, dest)
    self.manager.reload()
    return dest
