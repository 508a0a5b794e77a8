"""XLA throughput of the model's hot paths, printed as images/s.

    python -m msrd_jax.benchmark teacher --arch wide_resnet50_2 --size 256 --batch 8
    python -m msrd_jax.benchmark train --config configs/mvtec.py   # whole training step
    python -m msrd_jax.benchmark train --config configs/mvtec.py --config.model.fusion=mff
    python -m msrd_jax.benchmark params --config configs/mvtec.py  # parameter counts

Each measurement compiles first (not timed), then times `--repeats` runs of `--iters`
calls each, waiting for the device, and reports the median. Figures depend on the
machine; they are printed, never asserted.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from msrd_jax import model as model_lib
from msrd_jax import teacher, train

FLAGS = flags.FLAGS


def time_calls(fn: Callable[[], object], iters: int = 5, repeats: int = 3) -> float:
  """Median seconds per call of `fn` (compiled and warmed up once before timing)."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(iters):
      out = fn()
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / iters)
  return statistics.median(times)


def bench_teacher(arch: str, size: int, batch: int, iters: int, repeats: int) -> float:
  """Images/s of the teacher forward (layer1..3) on random weights."""

  variables = teacher.init_teacher(arch, warn=False)
  images = jax.device_put(
    np.random.default_rng(0).uniform(size=(batch, size, size, 3)).astype(np.float32)
  )
  forward = jax.jit(teacher.ResNet(arch).apply)
  seconds = time_calls(lambda: forward(variables, images), iters, repeats)
  return batch / seconds


def bench_train_step(config, batch: int, iters: int, repeats: int) -> float:
  """Images/s of the whole jitted training step (teacher, student, loss, grads, Adam).

  One device, no pmap, random teacher; the config decides backbone, size and modules.
  """

  teacher_vars = teacher.init_teacher(config.model.backbone, warn=False)
  model = model_lib.MSRD(config)
  tx = train.make_optimizer(config)
  state = train.create_state(model, tx, teacher_vars, config)
  step = jax.jit(train.make_train_step(model, tx, config, axis_name=None), donate_argnums=(0,))
  size = config.data.image_size
  images = jax.device_put(
    np.random.default_rng(0).uniform(size=(batch, size, size, 3)).astype(np.float32)
  )
  holder = [state]

  def call():
    holder[0], metrics = step(holder[0], teacher_vars, images)
    return metrics['loss']

  return batch / time_calls(call, iters, repeats)


def parameter_counts(config) -> dict[str, int]:
  """Parameters per module (teacher and each part of the student), without allocating."""

  count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
  teacher_shapes = teacher.teacher_shapes(config.model.backbone)
  student = model_lib.MSRD(config).abstract_variables(config.data.image_size)
  counts = {'teacher (frozen)': count(teacher_shapes['params'])}
  counts.update({k: count(v) for k, v in student['params'].items()})
  counts['student total (trained)'] = count(student['params'])
  return counts


def main(argv: Sequence[str]) -> None:

  if len(argv) != 2 or argv[1] not in ('teacher', 'train', 'params'):
    raise app.UsageError('usage: python -m msrd_jax.benchmark {teacher,train,params} [--flags]')
  what = argv[1]
  print(
    f'backend {jax.default_backend()}, {jax.device_count()} device(s): '
    f'{jax.devices()[0].device_kind}'
  )
  config = FLAGS.config
  if what == 'params':
    print(f'parameters, {config.model.backbone} at {config.data.image_size} px:')
    for name, n in parameter_counts(config).items():
      print(f'  {name:>24}: {n:>12,}')
  elif what == 'train':
    batch = config.train.batch_size
    rate = bench_train_step(config, batch, FLAGS.iters, FLAGS.repeats)
    print(
      f'train step {config.model.backbone} {config.data.image_size}px batch {batch} '
      f'fusion={config.model.fusion} attention={tuple(config.model.coord_attention)}'
      f' memory={config.model.memory.mode} dtype={config.train.dtype}: '
      f'{rate:8.1f} images/s',
      flush=True,
    )
  else:
    archs = list(teacher.ARCH_SPECS) if FLAGS.arch == 'all' else [FLAGS.arch]
    for arch in archs:
      rate = bench_teacher(arch, FLAGS.size, FLAGS.batch, FLAGS.iters, FLAGS.repeats)
      print(
        f'teacher {arch:>16} {FLAGS.size}x{FLAGS.size} batch {FLAGS.batch}: {rate:8.1f} images/s',
        flush=True,
      )


if __name__ == '__main__':
  config_flags.DEFINE_config_file(
    'config',
    'configs/synthetic.py',
    'train/params: config file; fields overridden as --config.a.b=value.',
  )
  flags.DEFINE_string('arch', 'wide_resnet50_2', "teacher: an architecture, or 'all'.")
  flags.DEFINE_integer('size', 256, 'teacher: image size.')
  flags.DEFINE_integer('batch', 8, 'teacher: batch size (train uses train.batch_size).')
  flags.DEFINE_integer('iters', 3, 'Calls per timed repeat.')
  flags.DEFINE_integer('repeats', 3, 'Timed repeats; the median is reported.')
  app.run(main)
