"""Multi-process training for real: 2 processes x 2 CPU devices on localhost.

Each test starts its own processes (loopback only, a free port), bounds every wait and
kills whatever is left when it ends, passing or not. The model is the smallest the config
allows (resnet18 teacher read from a file, 32 px, MFF fusion, no attention, one OCE
block, the memory bank only where evaluation gathers its reads): what is tested is the
plumbing between processes, and on 2 cores each process compiles its own programs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import ROOT

from msrd_jax import checkpoint, teacher

STEPS = 6

# Small programs compile fast; the optimization level of XLA's CPU backend changes
# compile time (a third less) much more than it changes the numbers.
XLA_FLAGS = '--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0'


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _teacher_file(path: str) -> str:
  """A random resnet18 teacher in numpy (no compilation), as a ported file would be."""
  rng = np.random.default_rng(0)
  flat = flax.traverse_util.flatten_dict(teacher.teacher_shapes('resnet18'))
  values = {}
  for key, leaf in flat.items():
    name = key[-1]
    if name == 'kernel':
      fan_in = int(np.prod(leaf.shape[:-1]))
      values[key] = rng.normal(0, np.sqrt(2 / fan_in), leaf.shape).astype(np.float32)
    else:
      values[key] = np.full(leaf.shape, 1.0 if name in ('scale', 'var') else 0.0, np.float32)
  teacher.save_teacher(path, 'resnet18', flax.traverse_util.unflatten_dict(values))
  return path


@pytest.fixture(scope='module')
def teacher_path(tmp_path_factory) -> str:
  return _teacher_file(str(tmp_path_factory.mktemp('teacher') / 'resnet18.msgpack'))


@pytest.fixture(scope='module')
def xla_cache(tmp_path_factory) -> str:
  # Shared by every process of the module: a restarted job finds its programs compiled.
  return str(tmp_path_factory.mktemp('xla_cache'))


def _small_model_flags() -> list[str]:
  return [
    '--config.model.backbone=resnet18',
    '--config.data.image_size=32',
    '--config.model.fusion=mff',
    '--config.model.coord_attention=()',
    '--config.model.oce_blocks=1',
  ]


class _Job:
  """Processes started together; `kill_all` (always called on exit) ends what is left."""

  def __init__(self, log_dir: str):
    self.log_dir = log_dir
    self.procs: list[subprocess.Popen] = []
    self.logs: list[str] = []

  def start(self, argv: list[str], env: dict, name: str) -> subprocess.Popen:
    log = os.path.join(self.log_dir, f'{name}.log')
    self.logs.append(log)
    with open(log, 'w') as f:
      # A process group of its own: killing it ends the process and any child.
      proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
      )
    self.procs.append(proc)
    return proc

  def wait(self, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in self.procs:
      try:
        codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
      except subprocess.TimeoutExpired:
        self.kill_all()
        pytest.fail(f'processes still running after {timeout:.0f} s\n{self.output()}')
    return codes

  def kill_all(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
          os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)

  def output(self, tail: int = 3000) -> str:
    out = []
    for log in self.logs:
      with open(log, errors='replace') as f:
        text = f.read().replace('\r', '\n')
      out.append(f'--- {os.path.basename(log)}\n{text[-tail:]}')
    return '\n'.join(out)


@contextlib.contextmanager
def _job(log_dir: str):
  job = _Job(log_dir)
  try:
    yield job
  finally:
    job.kill_all()


def _env(xla_cache: str, **extra: str) -> dict:
  env = dict(
    os.environ,
    PYTHONPATH=ROOT,
    XLA_FLAGS=XLA_FLAGS,
    JAX_COMPILATION_CACHE_DIR=xla_cache,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
    PYTHONUNBUFFERED='1',
  )
  env.update(extra)
  return env


# One process of a 2-process job, or (process_count 1) the single-device reference: the
# same global batches through the same step, in float64 with SGD as in test_train's
# 8-vs-1-device test, so that what remains is the parallel split and nothing else.
EQUIVALENCE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update('jax_enable_x64', True)
    import numpy as np, optax
    from msrd_jax import config as config_lib, data as data_lib, distributed, model as model_lib
    from msrd_jax import teacher, train

    root, teacher_path, address, num_processes, process_id, out = sys.argv[1:]
    c = config_lib.base_config()
    c.model.backbone = 'resnet18'
    c.data.image_size = 32
    c.model.fusion, c.model.coord_attention, c.model.memory.mode = 'mff', (), 'off'
    c.model.oce_blocks = 1
    c.train.dtype = 'float64'
    c.train.batch_size = 8
    if int(num_processes) > 1:
      c.train.distributed = True
      c.train.coordinator_address = address
      c.train.num_processes = int(num_processes)
      c.train.process_id = int(process_id)
    distributed.initialize(c)  # the explicit (manual) way of joining the job
    devices = jax.local_devices()
    print('process', jax.process_index(), 'of', jax.process_count(), 'local devices',
          len(devices), 'global devices', jax.device_count(), flush=True)
    tv = teacher.load_teacher('resnet18', teacher_path)
    m = model_lib.MSRD(c, bn_axis_name=train.AXIS)
    tx = optax.sgd(0.05)
    # A random state drawn in numpy (model.init would compile once more per process),
    # all in float64 (a step that changed the dtypes would compile twice).
    rng = np.random.default_rng(1)

    def draw(path, leaf):
      name = path[-1].key
      if name == 'kernel':
        return rng.normal(0, np.sqrt(1 / np.prod(leaf.shape[:-1])), leaf.shape)
      return np.full(leaf.shape, 1.0 if name in ('scale', 'var') else 0.0)

    shapes = train.state_template(m, tx, tv, c)
    state0 = shapes.replace(
        step=np.zeros((), np.int32),
        params=jax.tree_util.tree_map_with_path(draw, shapes.params),
        batch_stats=jax.tree_util.tree_map_with_path(draw, shapes.batch_stats),
        opt_state=tx.init(jax.tree_util.tree_map_with_path(draw, shapes.params)))
    samples = data_lib.list_samples('mvtec', root, 'brick', 'train')
    loader = data_lib.TrainLoader(
        samples, 32, 8, seed=0, num_local_devices=len(devices),
        process_index=jax.process_index(), process_count=jax.process_count(), num_threads=2)
    step = jax.pmap(train.make_train_step(m, tx, c), axis_name=train.AXIS)
    state, tvr = train._replicate(state0, devices), train._replicate(tv, devices)
    losses = []
    with loader.iterate(0) as batches:
      for _, batch in zip(range(3), batches):  # each process reads its own rows
        state, metrics = step(state, tvr, data_lib.shard_batch(batch['image'], len(devices)))
        losses.append(float(metrics['loss'][0]))
    if jax.process_index() == 0:
      delta = jax.tree_util.tree_map(lambda a, b: np.asarray(a[0]) - np.asarray(b),
                                     state.params, state0.params)
      np.savez(out, delta=np.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(delta)]),
               losses=np.array(losses),
               **{f'bn{i}': np.asarray(x[0]) for i, x in
                  enumerate(jax.tree_util.tree_leaves(state.batch_stats))})
    print('done', json.dumps(losses), flush=True)
""")


def test_two_processes_train_like_one_device_with_the_same_global_batch(
  synthetic_root, teacher_path, xla_cache, tmp_path
):
  port = _free_port()
  env = _env(xla_cache, JAX_COORDINATOR_BIND_ADDRESS=f'127.0.0.1:{port}')
  multi, single = str(tmp_path / 'multi.npz'), str(tmp_path / 'single.npz')
  start = time.monotonic()
  with _job(str(tmp_path)) as job:
    for i in range(2):
      argv = [sys.executable, '-c', EQUIVALENCE_SCRIPT, synthetic_root, teacher_path]
      job.start(argv + [f'127.0.0.1:{port}', '2', str(i), multi], env, f'process{i}')
    codes = job.wait(timeout=420)
    assert codes == [0, 0], job.output()
    two_processes = job.output()
  with _job(str(tmp_path)) as job:  # the reference: one process, one device
    env1 = _env(xla_cache, XLA_FLAGS=XLA_FLAGS.replace('count=2', 'count=1'))
    job.start(
      [sys.executable, '-c', EQUIVALENCE_SCRIPT, synthetic_root, teacher_path]
      + ['', '1', '0', single],
      env1,
      'reference',
    )
    assert job.wait(timeout=420) == [0], job.output()
  a, b = np.load(multi), np.load(single)
  rel = float(np.linalg.norm(a['delta'] - b['delta']) / np.linalg.norm(b['delta']))
  stats = max(
    float(np.abs(a[k] - b[k]).max() / np.abs(b[k]).max()) for k in a.files if k.startswith('bn')
  )
  print(two_processes)
  print(
    f'2 processes x 2 devices vs 1 device, float64, 3 steps: losses {a["losses"].tolist()} vs '
    f'{b["losses"].tolist()}; parameter updates differ by {rel:.2e} (relative), BN '
    f'statistics by {stats:.2e}; {time.monotonic() - start:.0f} s'
  )
  assert 'process 1 of 2 local devices 2 global devices 4' in two_processes
  np.testing.assert_allclose(a['losses'], b['losses'], rtol=1e-6)  # the loss is float32
  assert rel < 1e-3 and stats < 1e-5  # test_train's 8-vs-1 bounds


# `python -m msrd_jax.train` that SIGKILLs its own process right after a given step is
# dispatched: a process dying mid-run, at a point the test knows (the checkpoint of the
# step before it is complete, the steps after it have not run).
DYING_TRAIN = textwrap.dedent("""
    import os, signal, sys
    from absl import app
    from msrd_jax import cli, train
    real_train, die_at = train.train, int(os.environ['TEST_DIE_AT_STEP'])

    def train_then_die(config, workdir, on_step=None, teacher_vars=None):
      def on(step):
        if step == die_at:
          os.kill(os.getpid(), signal.SIGKILL)
      return real_train(config, workdir, on_step=on, teacher_vars=teacher_vars)

    train.train = train_then_die
    sys.argv = ['msrd_jax.train', *sys.argv[1:]]
    cli.define_flags()
    app.run(train.main)
""")


def _train_flags(root: str, workdir: str, teacher_path: str) -> list[str]:
  return [
    '--config',
    os.path.join(ROOT, 'configs', 'synthetic.py'),
    '--workdir',
    workdir,
    '--config.train.distributed=True',
    '--config.data.dataset=mvtec',
    f'--config.data.root={root}',
    f'--config.model.teacher_weights={teacher_path}',
    *_small_model_flags(),
    '--config.data.num_threads=2',
    '--config.train.batch_size=8',
    f'--config.train.steps={STEPS}',
    '--config.train.checkpoint_every_steps=2',
    '--config.train.keep_checkpoints=5',
    '--config.train.log_every_steps=1',
    '--config.eval.batch_size=8',
    '--config.eval.num_pictures=4',
  ]


def _slurm_env(xla_cache: str, process_id: int, port: int) -> dict:
  """What srun sets for task `process_id` of 2 on one node; JAX finds the job in it."""
  return _env(
    xla_cache,
    SLURM_JOB_ID='4242',
    SLURM_STEP_NODELIST='127.0.0.1',
    SLURM_STEP_NUM_NODES='1',
    SLURM_NTASKS='2',
    SLURM_PROCID=str(process_id),
    SLURM_LOCALID=str(process_id),
    # JAX derives the port from the job id; a free one keeps parallel runs apart.
    JAX_COORDINATOR_PORT=str(port),
    JAX_COORDINATOR_BIND_ADDRESS=f'127.0.0.1:{port}',
  )


def _logged_steps(workdir: str) -> list[int]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [json.loads(line)['step'] for line in f if line.strip()]


@pytest.mark.slow
def test_a_killed_process_ends_the_job_and_a_restart_resumes_from_the_last_checkpoint(
  synthetic_root, teacher_path, xla_cache, tmp_path
):
  workdir = str(tmp_path / 'run')
  ckpt = os.path.join(workdir, 'checkpoints')
  flags = _train_flags(synthetic_root, workdir, teacher_path)
  train_cmd = [sys.executable, '-m', 'msrd_jax.train', *flags]
  t0 = time.monotonic()

  # 1. Launched as SLURM would: two tasks, SLURM_* set, nothing about the job in the
  # flags. Process 1 is killed once step 3 is under way: checkpoint 2 is complete.
  with _job(str(tmp_path)) as job:
    port = _free_port()
    survivor = job.start(train_cmd, _slurm_env(xla_cache, 0, port), 'first0')
    dying_env = dict(_slurm_env(xla_cache, 1, port), TEST_DIE_AT_STEP='3')
    dying = job.start([sys.executable, '-c', DYING_TRAIN, *flags], dying_env, 'first1')
    try:
      dying.wait(timeout=420)
    except subprocess.TimeoutExpired:
      pytest.fail(f'process 1 did not reach step 3\n{job.output()}')
    assert dying.returncode == -signal.SIGKILL, job.output()
    t_kill = time.monotonic()
    try:  # blocked in a collective with a dead peer; JAX's heartbeat timeout is 100 s
      survivor_code = survivor.wait(timeout=5)
    except subprocess.TimeoutExpired:
      survivor_code = None  # SLURM's --kill-on-bad-exit would end it; so does the test
    survivor_s = time.monotonic() - t_kill
    first = job.output()
  saved = sorted(int(s) for s in os.listdir(ckpt) if s.isdigit())  # complete ones only
  assert saved == [2], f'checkpoints {saved}\n{first}'
  step2_mtime = os.path.getmtime(os.path.join(ckpt, '2'))
  print(
    f'first launch: process 1 killed during step 3 ({time.monotonic() - t0:.0f} s in), '
    f'checkpoints {saved}, steps logged {_logged_steps(workdir)}; process 0 '
    + (
      f'exited by itself with status {survivor_code} after {survivor_s:.0f} s'
      if survivor_code is not None
      else 'was still waiting for it 5 s later and was killed'
    )
  )

  # 2. The same command again (a new port, as a new job would get) resumes and finishes.
  with _job(str(tmp_path)) as job:
    port = _free_port()
    for i in range(2):
      job.start(train_cmd, _slurm_env(xla_cache, i, port), f'second{i}')
    codes = job.wait(timeout=420)
    second = job.output()
  assert codes == [0, 0], second
  print(f'restart: both processes exited 0; {time.monotonic() - t0:.0f} s in all')
  assert _logged_steps(workdir) == list(range(1, STEPS + 1)), _logged_steps(workdir)
  # Steps up to the last checkpoint were not trained again: their checkpoints are as
  # the first launch left them, and the log has each step once.
  assert os.path.getmtime(os.path.join(ckpt, '2')) == step2_mtime
  assert f' 2/{STEPS} [' in second and f' 0/{STEPS} [' not in second, second
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  assert 0.0 <= results['brick']['image_auroc'] <= 1.0
  assert os.path.isfile(os.path.join(workdir, 'pictures', 'examples.png'))
  with open(os.path.join(workdir, 'evaluation.json')) as f:
    reads = json.load(f)['memory']  # one batch of embeddings, gathered from both processes
  assert reads['images'] == 8 and 1 <= reads['slots_read'] <= reads['slots'], reads
  # The same evaluation in one process reads the same embeddings.
  single = [a for a in flags if a != '--config.train.distributed=True']
  subprocess.run(
    [sys.executable, '-m', 'msrd_jax.evaluate', *single],
    cwd=ROOT,
    env=_env(xla_cache),
    check=True,
    capture_output=True,
    timeout=300,
  )
  with open(os.path.join(workdir, 'evaluation.json')) as f:
    alone = json.load(f)['memory']
  assert alone == pytest.approx(reads, rel=1e-4), (alone, reads)
  assert not [f for f in os.listdir(workdir) if f.endswith('.tmp')]

  # 3. One process (this one, one device) reads what two processes wrote.
  with checkpoint.Workdir(workdir, create=False) as wd:
    assert wd.latest_step() == STEPS
    meta = wd.restore_meta()
    state = wd.manager.restore(STEPS, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))[
      'state'
    ]
  assert meta['data_step'] == STEPS
  leaves = jax.tree_util.tree_leaves(state['params'])
  assert leaves and all(np.isfinite(np.asarray(x)).all() for x in leaves)
