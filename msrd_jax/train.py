"""Training: one jit-compiled, data-parallel step, Orbax checkpoints, resumable runs.

    python -m msrd_jax.train --config configs/synthetic.py --workdir workdirs/demo
    python -m msrd_jax.train --config configs/mvtec.py --workdir workdirs/bottle \
        --config.data.root=/data/mvtec_anomaly_detection --config.data.category=bottle

Running the same command again after a crash or Ctrl-C resumes from the last checkpoint
and ends with the same parameters as an uninterrupted run. Ctrl-C or SIGTERM finishes
the step in progress, saves it and exits with status 130 / 143 (msrd_jax.interrupts).
Every file the command reads is checked before the first step. At the end the decision
threshold is calibrated on defect-free images (calibration.source, see
msrd_jax.calibrate) and, when eval.after_training is set, the test set is evaluated
(see msrd_jax.evaluate).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app
from tqdm import tqdm

from msrd_jax import (
  calibrate,
  checkpoint,
  cli,
  distributed,
  evaluate,
  interrupts,
  losses,
  metric_writers,
)
from msrd_jax import config as config_lib
from msrd_jax import data as data_lib
from msrd_jax import teacher as teacher_lib
from msrd_jax.errors import UserError
from msrd_jax.model import MSRD

AXIS = 'batch'


class TrainingDiverged(UserError):
  """The loss or the parameters became NaN or Inf."""


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; a pytree, saved whole in checkpoints."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  t = config.train
  return optax.adam(t.learning_rate, b1=t.b1, b2=t.b2)


def create_state(
  model: MSRD,
  tx: optax.GradientTransformation,
  teacher_vars: dict,
  config: ml_collections.ConfigDict,
) -> TrainState:
  """A fresh state (step 0) on the host's default device."""
  variables = model.init(jax.random.PRNGKey(config.seed), teacher_vars, config.data.image_size)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=variables['params'],
    batch_stats=variables['batch_stats'],
    opt_state=tx.init(variables['params']),
  )


def state_template(
  model: MSRD,
  tx: optax.GradientTransformation,
  teacher_vars: dict,
  config: ml_collections.ConfigDict,
) -> TrainState:
  """The shapes and dtypes of `create_state`'s result, computed without running it."""
  return jax.eval_shape(lambda: create_state(model, tx, teacher_vars, config))


def make_loss_fn(model: MSRD, config: ml_collections.ConfigDict) -> Callable:
  """The training loss (params, batch_stats, teacher_vars, images) ->
  (loss, (distillation loss, memory read entropy, new batch_stats))."""
  kind = config.train.loss
  entropy_weight = config.model.memory.entropy_weight if config.model.memory.mode != 'off' else 0.0

  def loss_fn(params, batch_stats, teacher_vars, images):
    e, d, aux, new_stats = model.apply_train(teacher_vars, params, batch_stats, images)
    distill = losses.distillation_loss(e, d, kind)
    loss = distill + entropy_weight * aux['entropy']
    return loss, (distill, aux['entropy'], new_stats)

  return loss_fn


def make_train_step(
  model: MSRD,
  tx: optax.GradientTransformation,
  config: ml_collections.ConfigDict,
  axis_name: str | None = AXIS,
) -> Callable:
  """The pure step (state, teacher_vars, images) -> (state, metrics).

  Under pmap with `axis_name`, gradients and metrics are averaged across devices and
  BatchNorm statistics are synchronized, so N devices with a global batch B compute what
  one device computes with B. images: (b, S, S, 3) float32 in [0, 1].
  """
  loss_fn = make_loss_fn(model, config)

  def step(state: TrainState, teacher_vars: dict, images: jax.Array):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (distill, entropy, new_stats)), grads = grad_fn(
      state.params, state.batch_stats, teacher_vars, images
    )
    metrics = {'loss': loss, 'distill_loss': distill, 'entropy': entropy}
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
      metrics = jax.lax.pmean(metrics, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics['grad_norm'] = optax.tree.norm(grads)
    # One flag for everything that must stay finite before a checkpoint may be written.
    metrics['finite'] = (
      jnp.isfinite(loss)
      & jnp.isfinite(metrics['grad_norm'])
      & jnp.isfinite(optax.tree.norm(params))
    )
    new_state = state.replace(
      step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state
    )
    return new_state, metrics

  return step


def total_steps(config: ml_collections.ConfigDict, num_samples: int) -> int:
  """train.steps, else the steps of train.epochs over num_samples images.

  train.steps_per_epoch 'stream': ceil(epochs * N / B), every image seen `epochs` times;
  'ceil': epochs * ceil(N / B), RD4AD's count (one step per batch of its DataLoader,
  the last batch of an epoch smaller; here all batches are full, see TrainLoader).
  """
  t = config.train
  if t.steps is not None:
    return int(t.steps)
  if t.get('steps_per_epoch', 'stream') == 'ceil':
    return max(1, math.ceil(t.epochs * math.ceil(num_samples / t.batch_size)))
  return max(1, math.ceil(t.epochs * num_samples / t.batch_size))


def _replicate(tree, devices):
  """One copy of every leaf per device, laid out as pmap lays out its own outputs.

  pmap's outputs are sharded over a mesh whose axis is named after pmap's axis_name;
  inputs sharded the same way keep the second step from compiling everything again.
  """
  n = len(devices)

  def put(x):
    x = np.broadcast_to(np.asarray(x), (n, *np.shape(x)))
    mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
    return jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS)))

  return jax.tree_util.tree_map(put, tree)


def _unreplicate(tree):
  """The first local device's copy of each replicated array, on the host (numpy).

  Copied from the device's buffer rather than taken by indexing, which would run one
  small XLA computation per leaf: with several processes, those queued behind the
  others' collectives could stall a checkpoint's barrier.
  """

  def first(x):
    if isinstance(x, jax.Array):
      return np.asarray(x.addressable_data(0)).reshape(x.shape[1:])
    return np.asarray(x[0])

  return jax.tree_util.tree_map(first, tree)


def _host_state(state: TrainState) -> dict:
  return flax.serialization.to_state_dict(jax.device_get(_unreplicate(state)))


class _Log:
  """metrics.jsonl and TensorBoard (process 0), and the progress bar's figures."""

  def __init__(self, workdir: str, enabled: bool, batch_size: int, start_step: int):
    self.writer = metric_writers.MetricWriter(workdir, enabled, resume_step=start_step)
    self.batch_size = batch_size
    self.last = (start_step, time.perf_counter())

  def images_per_second(self, step_done: int) -> float:
    """Throughput since the previous call (the first window includes compilation)."""
    now = time.perf_counter()
    steps, seconds = step_done - self.last[0], now - self.last[1]
    self.last = (step_done, now)
    return steps * self.batch_size / max(seconds, 1e-9)

  def write(self, step: int, record: dict) -> None:
    self.writer.write(step, record)


def make_loader(config: ml_collections.ConfigDict, num_local_devices: int) -> data_lib.TrainLoader:
  """This process's share of the config's training images, in training's order, after
  checking that every file reads (before hours of training)."""
  reader, root = config_lib.resolve_data(config)
  samples = data_lib.list_samples(reader, root, config.data.category, 'train')
  data_lib.check_files(samples, config.data.num_threads)
  samples = calibrate.training_samples(config, samples)  # less a calibration holdout
  return data_lib.TrainLoader(
    samples,
    config.data.image_size,
    config.train.batch_size,
    seed=config.seed,
    num_local_devices=num_local_devices,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    num_threads=config.data.num_threads,
    prefetch=config.data.prefetch,
    cache_bytes=config.data.cache_bytes,
  )


def train(
  config: ml_collections.ConfigDict,
  workdir: str,
  on_step: Callable[[int], None] | None = None,
  teacher_vars: dict | None = None,
) -> TrainState:
  """Trains (or resumes) the run in `workdir`; returns the final state on the host.

  Args:
    config: a full config (see msrd_jax.config).
    workdir: where config.json, metrics.jsonl and checkpoints/ live.
    on_step: called with the step number after each step is dispatched (tests use it
      to interrupt a run).
    teacher_vars: the config's teacher, if the caller has loaded it already.
  """
  config_lib.validate(config)
  distributed.initialize(config)
  is_main = distributed.is_main_process()
  devices = jax.local_devices()

  loader = make_loader(config, len(devices))
  num_steps = total_steps(config, loader.num_samples)

  if teacher_vars is None:
    teacher_vars = teacher_lib.from_config(config)
  model = MSRD(config, bn_axis_name=AXIS)
  tx = make_optimizer(config)

  fingerprint = teacher_lib.fingerprint(teacher_vars)
  with checkpoint.Workdir(workdir, keep=config.train.keep_checkpoints) as wd:
    wd.check_compatible(config, fingerprint)  # before anything in it is written
    start = wd.latest_step() or 0
    if start:  # restored into the state's shapes; no fresh state is computed
      template = state_template(model, tx, teacher_vars, config)
      # The newest intact step; a damaged newer one is named and moved aside.
      restored, meta = wd.restore(flax.serialization.to_state_dict(template), fallback=True)
      state = flax.serialization.from_state_dict(template, restored)
      start = int(meta['data_step'])
    else:
      state = create_state(model, tx, teacher_vars, config)
    if is_main:
      wd.write_config(config)
    ident = checkpoint.identity(config)

    def save(step_done: int, host: dict) -> None:
      wd.save(
        step_done,
        host,
        {
          'data_step': step_done,
          'epoch': step_done / loader.steps_per_epoch,
          'identity': ident,
          'teacher_fingerprint': fingerprint,
          'num_steps': num_steps,
          'time': time.time(),
        },
      )

    if start >= num_steps:
      if is_main:
        print(f'{workdir}: already trained ({start} of {num_steps} steps)')
      return state

    p_step = jax.pmap(make_train_step(model, tx, config), axis_name=AXIS, donate_argnums=(0,))
    state = _replicate(state, devices)
    teacher_r = _replicate(teacher_vars, devices)
    log = _Log(wd.path, is_main, config.train.batch_size, start)
    every = config.train.checkpoint_every_steps
    bar = tqdm(
      total=num_steps,
      initial=start,
      unit='step',
      dynamic_ncols=True,
      disable=not is_main,
      desc=f'train {config.data.category}',
    )
    pending: tuple[int, Any] | None = None
    reached = start  # steps dispatched so far: `state` is the state after them

    def check(step_done: int, metrics) -> dict:
      m = jax.device_get(_unreplicate(metrics))
      if not bool(m['finite']):
        raise TrainingDiverged(
          f'loss {float(m["loss"])} / gradient norm {float(m["grad_norm"])} at step '
          f'{step_done - 1} (0-based) is not finite; training stopped. The last good '
          f'checkpoint (step {wd.latest_step()}) is kept in {wd.checkpoint_dir}.'
        )
      return {k: float(v) for k, v in m.items() if k != 'finite'}

    def report(step_done: int, m: dict) -> None:
      if step_done % config.train.log_every_steps and step_done != num_steps:
        return
      rate = log.images_per_second(step_done)
      bar.set_postfix(loss=f'{m["loss"]:.4f}', img_s=f'{rate:.1f}')
      log.write(
        step_done,
        {
          'epoch': round(step_done / loader.steps_per_epoch, 3),
          **m,
          'images_per_second': rate,
        },
      )

    try:
      # A signal only sets a flag here; it is acted on between steps, below.
      with interrupts.polling():
        with loader.iterate(start) as batches:
          for batch in batches:
            step = int(batch['step'])
            if step >= num_steps or interrupts.received() is not None:
              break
            images = data_lib.shard_batch(batch['image'], len(devices))
            state, metrics = p_step(state, teacher_r, images)
            reached = step + 1
            if pending is not None:  # the previous step's figures, without a stall
              report(pending[0], check(*pending))
            pending = (step + 1, metrics)
            if (step + 1) % every == 0 or step + 1 == num_steps:
              report(step + 1, check(*pending))
              pending = None
              save(step + 1, _host_state(state))
            bar.update(1)
            if on_step is not None:
              on_step(step + 1)
            if interrupts.received() is not None:
              break  # before waiting for the next batch
        signum = interrupts.received()
        if signum is not None:
          bar.close()
          if jax.process_count() == 1:
            detail = _save_reached(state, reached, pending, check, report, save, wd)
          else:
            # Saving is collective: processes interrupted at different points of a step
            # would wait for each other forever, so a multi-process run keeps its last
            # periodic checkpoint.
            detail = f'multi-process run: the last checkpoint (step {wd.latest_step()}) is kept'
          raise interrupts.Interrupted(signum, detail)
    finally:
      # Never leave while a step still runs on XLA's threads: exiting the process
      # under it crashes the interpreter (and a failed step's error surfaces here).
      _wait_for(state)
      bar.close()
      log.writer.close()
    return jax.device_get(_unreplicate(state))


def _save_reached(state, reached: int, pending, check, report, save, wd) -> str:
  """On SIGINT / SIGTERM: finishes the step in flight, checks it, saves it.

  Called between steps, so `state` is the state after `reached` steps and `pending`
  holds the figures of its last step if they were not checked yet. A non-finite step
  raises TrainingDiverged and the last good checkpoint stays the latest. Returns what
  was kept, for the one line msrd_jax.cli prints.
  """
  jax.block_until_ready(state)
  if pending is not None:
    report(pending[0], check(*pending))
  wd.wait()  # a periodic save may still be writing
  latest = wd.latest_step()
  if latest is None and reached == 0:
    return 'stopped before the first step; nothing to save'
  if reached != latest:
    save(reached, _host_state(state))
    wd.wait()
  return f'saved step {reached} in {wd.checkpoint_dir}'


def _wait_for(tree) -> None:
  """Blocks until the device has computed every array of `tree` (donated ones skipped)."""
  for x in jax.tree_util.tree_leaves(tree):
    try:
      x.block_until_ready()
    except (RuntimeError, ValueError, AttributeError):  # deleted (donated), or not an array
      pass


def check_split(config: ml_collections.ConfigDict, split: str) -> list:
  """Lists a split of config.data and checks its files (data.check_files); returns it."""
  reader, root = config_lib.resolve_data(config)
  samples = data_lib.list_samples(reader, root, config.data.category, split)
  data_lib.check_files(samples, config.data.num_threads)
  return samples


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, evaluate_after: bool | None = None
) -> dict | None:
  """Trains, calibrates the decision threshold, evaluates; returns the results or None.

  Calibration (msrd_jax.calibrate) runs unless calibration.source is 'none'.
  evaluate_after: None follows config.eval.after_training. The teacher is loaded once
  for all three. The test split is checked before training, so that a missing mask or
  an unreadable file is reported before the hours of training, not after them.
  """
  config_lib.validate(config)
  # Before the teacher is loaded: that is the first thing to touch a device.
  distributed.initialize(config)
  evaluating = config.eval.after_training if evaluate_after is None else evaluate_after
  if evaluating:
    check_split(config, 'test')
  teacher_vars = teacher_lib.from_config(config)
  train(config, workdir, teacher_vars=teacher_vars)
  if calibrate.source_of(config) != 'none':
    calibrate.calibrate_run(config, workdir, teacher_vars=teacher_vars)
  if not evaluating:
    return None
  return evaluate.evaluate(config, workdir, teacher_vars=teacher_vars)


def main(argv) -> None:
  cli.run(argv, train_and_evaluate)


if __name__ == '__main__':
  cli.define_flags()
  app.run(main, flags_parser=cli.parse_flags)
