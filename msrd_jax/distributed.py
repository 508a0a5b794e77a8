"""Multi-process (multi-host) runs: joining the job, and what only one process does.

With `train.distributed = True` every process of the job runs the same command. Before
anything touches a device, `initialize(config)` calls `jax.distributed.initialize()`:

* on SLURM, Open MPI, Kubernetes (JobSet) and Cloud TPU, JAX finds the coordinator
  address, the number of processes and this process's id in the environment that the
  launcher sets (SLURM_*, OMPI_*, ...); `JAX_COORDINATOR_ADDRESS` (or
  `JAX_COORDINATOR_PORT` with SLURM) overrides the address it derives;
* anywhere else, `train.coordinator_address` ('host:port' of process 0),
  `train.num_processes` and `train.process_id` (flags `--config.train.<field>=...`) say
  it, one command per host.

From then on `jax.devices()` lists the devices of all processes, `jax.local_devices()`
this process's own; pmap runs over the local devices and its collectives (gradients,
BatchNorm statistics) span all of them. On CPU, JAX's cross-process collectives are gloo
(`jax_cpu_collectives_implementation`, gloo by default in JAX 0.10).
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from absl import flags as absl_flags
from jax._src import xla_bridge  # backends_are_initialized() has no public name
from jax.experimental import multihost_utils
from orbax.checkpoint._src.multihost import multihost as _orbax_multihost  # noqa: F401 (its flag)

from msrd_jax.errors import UserError


class DistributedSetupError(UserError):
  """The distributed fields of a config cannot start a multi-process job."""


def _explicit(config: ml_collections.ConfigDict) -> dict:
  t = config.train
  given = {
    'coordinator_address': t.get('coordinator_address'),
    'num_processes': t.get('num_processes'),
    'process_id': t.get('process_id'),
  }
  return {k: v for k, v in given.items() if v is not None}


def initialize(config: ml_collections.ConfigDict) -> bool:
  """Joins the multi-process job when config.train.distributed is set.

  Safe to call more than once (later calls do nothing), and a no-op for a
  single-process config. It must run before any JAX computation, device query or
  compilation of the process: JAX fixes the set of devices on first use.

  Returns:
    Whether this process is part of a multi-process job.

  Raises:
    DistributedSetupError: the backend is already in use, or the job could not be
      joined (e.g. no coordinator address in the flags or the environment).
  """
  if not config.train.distributed:
    return False
  if jax.distributed.is_initialized():
    return True
  if xla_bridge.backends_are_initialized():
    raise DistributedSetupError(
      'train.distributed is set but JAX is already running in this process as a single '
      'process; call msrd_jax.distributed.initialize(config) before anything that '
      'touches a device (loading the teacher, creating a state, jax.devices()).'
    )
  kwargs = _explicit(config)
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, TypeError) as e:
    raise DistributedSetupError(
      f'cannot join the multi-process job ({e}). Outside SLURM / Open MPI / '
      'Kubernetes / Cloud TPU, give --config.train.coordinator_address=HOST:PORT (of '
      'process 0), --config.train.num_processes and --config.train.process_id on every '
      'host.'
    ) from None
  _use_coordination_barriers()
  _connect_cpu_collectives()
  return True


def _use_coordination_barriers() -> None:
  """Makes Orbax's barriers wait on the coordination service instead of on devices.

  By default Orbax synchronizes processes with a collective computation on the
  devices; one process entering it while another still runs its own device work can
  stall both for good on XLA:CPU. The coordination service's barriers involve no
  device and time out with an error instead. (An absl flag of Orbax's; it is read
  only where the command line has been parsed, as the project's commands do.)
  """
  absl_flags.FLAGS.set_default('experimental_orbax_use_distributed_barrier', True)


def _connect_cpu_collectives() -> None:
  """Opens the CPU collectives' connections while the processes are in step.

  On CPU, JAX's cross-process collectives (gloo) connect a group of devices at the
  group's first collective, and fail if a process arrives at it more than 30 s (fixed)
  after another, as one still compiling on a busy machine does; later collectives of a
  connected group wait as long as it takes. Joining the job has just made the
  processes wait for each other, so the two groups a run uses are connected now: all
  devices (the training step's means) and one device per process (gathers, Orbax's
  barriers).
  """
  if jax.default_backend() != 'cpu':
    return
  ones = np.ones(jax.local_device_count(), np.float32)
  jax.block_until_ready(jax.pmap(lambda x: jax.lax.psum(x, 'all'), axis_name='all')(ones))
  multihost_utils.process_allgather(np.int32(jax.process_index()))


def is_main_process() -> bool:
  """Whether this process writes the run's files (process 0 of the job)."""
  return jax.process_index() == 0


def _share_size(n: int) -> int:
  """Items per process when n are split in contiguous shares (the last may be shorter)."""
  return -(-n // jax.process_count())


def shard_range(n: int) -> tuple[int, int]:
  """[start, stop) of this process's contiguous share of n items (equal sizes but the
  last ones, which may be shorter or empty)."""
  per = _share_size(n)
  start = min(n, jax.process_index() * per)
  return start, min(n, start + per)


def process_shares(local: np.ndarray, max_rows: int) -> list[np.ndarray]:
  """Every process's `local` rows, in process order (collective: all processes call it).

  local: (k, ...) with k <= max_rows, the same trailing shape and dtype everywhere.
  A single process gets [local].
  """
  if jax.process_count() == 1:
    return [local]
  padded = np.zeros((max_rows, *local.shape[1:]), local.dtype)
  padded[: len(local)] = local
  counts = np.asarray(multihost_utils.process_allgather(np.int32(len(local))))
  blocks = np.asarray(multihost_utils.process_allgather(padded))  # (processes, max_rows, ...)
  return [blocks[p, : counts[p]] for p in range(jax.process_count())]


def gather_rows(local: np.ndarray, n: int) -> np.ndarray:
  """(n, ...): the rows of every process's `shard_range(n)` share, in order.

  local: this process's rows (stop - start, ...). Collective: all processes call it.
  """
  return np.concatenate(process_shares(local, _share_size(n)))
