"""Times the training step under several process layouts on one machine (CPU devices).

  python scripts/bench_processes.py --layouts 1x4,2x2 --image-size 96 --batch 8 --windows 3

Each layout PxD starts P processes on localhost with D simulated CPU devices each
(XLA_FLAGS=--xla_force_host_platform_device_count=D), joined by jax.distributed (gloo
collectives between processes), and times the training step of a resnet18 model (the
demo's student, random teacher) on random images, the global batch split across the P*D
devices. Two data-parallel mechanisms are timed:

  * pmap: what training uses (`jax.pmap` over the local devices, axis 'batch');
  * jit: `jax.jit` over a Mesh of all global devices, the batch sharded along it and the
    state replicated (BatchNorm statistics and gradients then span the global batch
    without an axis name).

Reported per mechanism and layout (the layouts of a mechanism run back to back): after
two warm-up steps, `--windows` windows of `--window-steps` steps are timed (each step
waits for its result); the figure is the median of the windows' mean step times, with
each window's mean and the first two steps (compilation included). On a machine with
fewer cores than devices, or shared with other work, the figures measure contention as
much as parallelism.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

WORKER = r"""
import json, sys, time
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from msrd_jax import config as config_lib, distributed, model as model_lib, teacher, train

mode, size, batch, windows, per_window, address, count, pid = sys.argv[1:]
size, batch, count, pid = int(size), int(batch), int(count), int(pid)
windows, per_window = int(windows), int(per_window)
c = config_lib.base_config()
c.model.backbone = 'resnet18'
c.data.image_size = size
if count > 1:
  c.train.distributed = True
  c.train.coordinator_address, c.train.num_processes, c.train.process_id = address, count, pid
distributed.initialize(c)
tv = teacher.init_teacher('resnet18', warn=False)
tx = train.make_optimizer(c)
local = batch // jax.process_count()
rng = np.random.default_rng(jax.process_index())
batches = [rng.uniform(size=(local, size, size, 3)).astype(np.float32) for _ in range(4)]
if mode == 'pmap':
  m = model_lib.MSRD(c, bn_axis_name=train.AXIS)
  devices = jax.local_devices()
  step = jax.pmap(train.make_train_step(m, tx, c), axis_name=train.AXIS, donate_argnums=(0,))
  state = train._replicate(train.create_state(m, tx, tv, c), devices)
  tvr = train._replicate(tv, devices)
  run = lambda s, i: step(s, tvr, batches[i % 4].reshape(len(devices), -1, size, size, 3))
else:
  m = model_lib.MSRD(c, bn_axis_name=None)
  mesh = Mesh(np.array(jax.devices()), ('batch',))
  rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P('batch'))
  put = lambda t: jax.tree_util.tree_map(
    lambda x: jax.make_array_from_process_local_data(rep, np.asarray(x)), t)
  state, tvr = put(train.create_state(m, tx, tv, c)), put(tv)
  step = jax.jit(train.make_train_step(m, tx, c, axis_name=None), donate_argnums=(0,),
                 in_shardings=(rep, rep, shard), out_shardings=(rep, rep))
  run = lambda s, i: step(s, tvr, jax.make_array_from_process_local_data(
    shard, batches[i % 4], (batch, size, size, 3)))
t = time.perf_counter()
for i in range(2):
  state, metrics = run(state, i)
jax.block_until_ready(metrics)
first = time.perf_counter() - t
means = []
for w in range(windows):
  t = time.perf_counter()
  for i in range(per_window):
    state, metrics = run(state, i)
    jax.block_until_ready(metrics)
  means.append((time.perf_counter() - t) / per_window)
if jax.process_index() == 0:
  print('RESULT ' + json.dumps({'first_two_s': first, 'median_s': float(np.median(means)),
                                'windows_s': means}), flush=True)
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_layout(processes: int, devices: int, mode: str, args) -> dict:
  """Starts the processes of one layout and returns process 0's figures."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  port = _free_port()
  env = dict(
    os.environ,
    PYTHONPATH=root,
    XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
    JAX_COORDINATOR_BIND_ADDRESS=f'127.0.0.1:{port}',
  )
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        '-c',
        WORKER,
        mode,
        str(args.image_size),
        str(args.batch),
        str(args.windows),
        str(args.window_steps),
        f'127.0.0.1:{port}',
        str(processes),
        str(i),
      ],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(processes)
  ]
  try:
    outputs = [p.communicate(timeout=args.timeout)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outputs, strict=True):
    if p.returncode:
      raise RuntimeError(f'a process of {processes}x{devices} {mode} failed:\n{out[-3000:]}')
  line = next(x for x in outputs[0].splitlines() if x.startswith('RESULT '))
  return json.loads(line[len('RESULT ') :])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--layouts', default='1x4,2x2', help='PROCESSESxDEVICES, comma-separated')
  parser.add_argument('--modes', default='pmap,jit')
  parser.add_argument('--image-size', type=int, default=96)
  parser.add_argument('--batch', type=int, default=8, help='global batch')
  parser.add_argument('--windows', type=int, default=3, help='timed windows after 2 warm-up steps')
  parser.add_argument('--window-steps', type=int, default=3, help='steps per window')
  parser.add_argument('--timeout', type=float, default=1800)
  args = parser.parse_args()
  print(f'resnet18, {args.image_size} px, global batch {args.batch}, {os.cpu_count()} CPU cores')
  print('mode  layout  step (s, median of windows)  windows (s)  first 2 steps (s)  load')
  for mode in args.modes.split(','):
    for layout in args.layouts.split(','):
      processes, devices = (int(x) for x in layout.split('x'))
      r = run_layout(processes, devices, mode, args)
      windows = ', '.join(f'{t:.2f}' for t in r['windows_s'])
      print(
        f'{mode:4}  {layout:6}  {r["median_s"]:28.3f}  {windows}  {r["first_two_s"]:17.1f}  '
        f'{os.getloadavg()[0]:.1f}',
        flush=True,
      )


if __name__ == '__main__':
  main()
