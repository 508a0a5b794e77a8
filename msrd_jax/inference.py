"""The one inference path: a trained run, its jitted map function, maps for a loader.

    run = inference.load_run(config, workdir)
    for batch, maps, scores in inference.predictions(run, loader):
      ...  # only the valid rows of each padded batch

Evaluation, prediction, calibration and export all go through `load_run` and
`make_predict_fn`, so that they score images exactly alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator

import jax
import ml_collections
import numpy as np

from msrd_jax import anomaly_map as anomaly_map_lib
from msrd_jax import checkpoint
from msrd_jax import config as config_lib
from msrd_jax import data as data_lib
from msrd_jax import teacher as teacher_lib
from msrd_jax.model import MSRD


@dataclasses.dataclass
class Run:
  """A trained run, ready to score images: model, variables on the device, checkpoint meta."""

  config: ml_collections.ConfigDict
  model: MSRD
  teacher_vars: dict
  student_vars: dict
  meta: dict

  @property
  def resolution(self) -> int:
    """Side of the maps: eval.resolution, else the input size."""
    return self.config.eval.resolution or self.config.data.image_size


def eval_loader(config: ml_collections.ConfigDict, samples: list, **options) -> data_lib.EvalLoader:
  """The padded, prefetching loader of `samples` at the config's input size and batch.

  options: EvalLoader's other arguments (resolution, on_error, mask_resize).
  """
  return data_lib.EvalLoader(
    samples,
    config.data.image_size,
    config.eval.batch_size,
    num_threads=config.data.num_threads,
    prefetch=config.data.prefetch,
    **options,
  )


def make_predict_fn(
  model: MSRD, config: ml_collections.ConfigDict, with_query: bool = False
) -> Callable:
  """A jitted (teacher_vars, student_vars, images) -> (maps (B, R, R), scores (B,)).

  images: (B, S, S, 3) float32 in [0, 1]; R = eval.resolution (default S).
  with_query: also return the one-class embedding before the memory, (B, h, w, D), from
  the same forward pass (what evaluate.memory_usage reads the memory bank with).
  """
  resolution = config.eval.resolution or config.data.image_size
  e = config.eval

  @jax.jit
  def predict(teacher_vars, student_vars, images):
    feats, decoded, aux = model.apply_eval(teacher_vars, student_vars, images)
    maps, scores = anomaly_map_lib.anomaly_map(
      feats,
      decoded,
      resolution,
      mode=e.map_mode,
      sigma=float(e.sigma),
      align_corners=bool(e.align_corners),
    )
    return (maps, scores, aux['query']) if with_query else (maps, scores)

  return predict


def require_checkpoint(workdir: str) -> int:
  """The latest step of `workdir`; FileNotFoundError (one clear line) when untrained.

  A cheap check, so that commands fail before loading anything.
  """
  with checkpoint.Workdir(workdir, create=False) as wd:
    step = wd.latest_step()
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {wd.checkpoint_dir!r}: train first')
  return step


def load_run(
  config: ml_collections.ConfigDict, workdir: str, teacher_vars: dict | None = None
) -> Run:
  """The latest checkpoint of `workdir` under `config`.

  teacher_vars: the config's teacher if already loaded (else it is loaded here). Only
  the student's parameters and BN statistics are read, not the optimizer state.
  Raises FileNotFoundError when there is no checkpoint, CheckpointMismatch when it was
  made with another config or another teacher.
  """
  config_lib.validate(config)
  if teacher_vars is None:
    teacher_vars = teacher_lib.from_config(config)
  model = MSRD(config)
  template = model.abstract_variables(config.data.image_size)
  with checkpoint.Workdir(workdir, create=False) as wd:
    if wd.latest_step() is None:
      raise FileNotFoundError(f'no checkpoint in {wd.checkpoint_dir!r}: train first')
    wd.check_compatible(config, teacher_lib.fingerprint(teacher_vars))
    student_vars, meta = wd.restore(
      {'params': template['params'], 'batch_stats': template['batch_stats']}, partial=True
    )
  return Run(config, model, jax.device_put(teacher_vars), jax.device_put(student_vars), meta)


def predictions(
  run: Run, batches: Iterable[dict], predict_fn: Callable | None = None
) -> Iterator[tuple]:
  """(batch, maps (b, R, R), scores (b,)) for each batch of an EvalLoader.

  predict_fn: a `make_predict_fn` (default: the run's, without the query); each of its
  outputs follows the batch, cut to the valid rows. Only the valid rows of a padded
  batch are returned (b <= the batch size); the batch's own arrays keep their padding.
  The next batch is dispatched to the device before this one's results are fetched, so
  that decoding and compute overlap.
  """
  predict_fn = predict_fn or make_predict_fn(run.model, run.config)
  pending = None
  for batch in batches:
    out = predict_fn(run.teacher_vars, run.student_vars, batch['image'])
    if pending is not None:
      yield _fetch(*pending)
    pending = (batch, out)
  if pending is not None:
    yield _fetch(*pending)


def _fetch(batch: dict, out: tuple) -> tuple:
  valid = int(np.sum(batch['valid']))
  return (batch, *(x[:valid] for x in jax.device_get(out)))
