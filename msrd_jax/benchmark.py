"""XLA throughput of the model's hot paths: images/s, latency, compile time, FLOP/s.

    python -m msrd_jax.benchmark teacher --arch wide_resnet50_2 --size 256 --batch 8
    python -m msrd_jax.benchmark train --config configs/mvtec.py   # whole training step
    python -m msrd_jax.benchmark train --config configs/mvtec.py --config.model.fusion=mff \
        --config.model.coord_attention="()" --config.model.memory.mode=off  # plain RD4AD
    python -m msrd_jax.benchmark infer --config configs/mvtec.py   # maps + scores, and batch 1
    python -m msrd_jax.benchmark params --config configs/mvtec.py  # parameter counts
    python -m msrd_jax.benchmark profile --config configs/mvtec.py # where the step's time goes
    python -m msrd_jax.benchmark profile --program infer ...       # the same for inference
    python -m msrd_jax.benchmark peak                              # float32 matmul GFLOP/s
    ... --json results.json                                        # the figures as JSON

Each measurement compiles first (timed separately: the compile time), then times
`--repeats` windows of `--iters` calls each, waiting for the device, and reports the
median and the spread of the windows. FLOPs per image come from XLA's cost analysis of
the compiled program, so that the achieved FLOP/s can be compared with the device's peak;
`peak` measures that peak as the machine delivers it to XLA: the GFLOP/s of large float32
matrix products, the operation that reaches the highest FLOP/s on a CPU or GPU, so that no
network of convolutions can be expected to run faster per FLOP.
Figures depend on the machine; they are printed, never asserted.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from msrd_jax import cli, files, inference, profiling, teacher, train
from msrd_jax import model as model_lib

FLAGS = flags.FLAGS


@dataclasses.dataclass
class Measurement:
  """One benchmarked program: what, at which shapes, and how fast."""

  what: str
  backbone: str
  image_size: int
  batch: int
  compile_seconds: float
  seconds_per_call: float  # median over the timed windows
  spread: tuple[float, float]  # fastest and slowest window, seconds per call
  flops_per_image: float | None  # XLA's cost analysis; None where the backend gives none
  details: str = ''

  @property
  def images_per_second(self) -> float:
    return self.batch / self.seconds_per_call

  @property
  def gflops_per_second(self) -> float | None:
    if self.flops_per_image is None:
      return None
    return self.flops_per_image * self.images_per_second / 1e9

  def line(self) -> str:
    flops = (
      ''
      if self.flops_per_image is None
      else f', {self.flops_per_image / 1e9:.1f} GFLOP/image, {self.gflops_per_second:.1f} GFLOP/s'
    )
    lo, hi = self.spread
    return (
      f'{self.what} {self.backbone} {self.image_size}px batch {self.batch}{self.details}: '
      f'{self.images_per_second:8.2f} images/s, {1e3 * self.seconds_per_call / self.batch:.1f} '
      f'ms/image (windows {self.batch / hi:.2f}..{self.batch / lo:.2f} images/s), compile '
      f'{self.compile_seconds:.1f} s{flops}'
    )

  def to_json(self) -> dict:
    out = dataclasses.asdict(self)
    out.update(images_per_second=self.images_per_second, gflops_per_second=self.gflops_per_second)
    return out


def _flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):  # older JAX: one dict per computation
    cost = cost[0] if cost else None
  if not cost or 'flops' not in cost:
    return None
  return float(cost['flops'])


@dataclasses.dataclass
class Program:
  """A jitted function and its arguments, as the benchmark runs it."""

  what: str
  fn: Callable  # jitted
  args: tuple
  batch: int
  config_like: tuple[str, int]  # (backbone, image size)
  details: str = ''
  # (output, args) -> the next call's args (the training step feeds its state back).
  update: Callable = lambda out, args: args

  def compile(self):
    return self.fn.lower(*self.args).compile()

  def runner(self, compiled) -> Callable[[], object]:
    """A function that calls `compiled` once on the current arguments, moves them on,
    and returns the output (not waited for)."""
    args = self.args

    def run():
      nonlocal args
      out = compiled(*args)
      args = self.update(out, args)
      return out

    return run


def _seconds_per_call(run: Callable[[], object], calls: int) -> float:
  """Wall time of `calls` calls of `run`, waited for, per call."""
  start = time.perf_counter()
  for _ in range(calls):
    out = run()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / calls


def measure(program: Program, iters: int, repeats: int) -> Measurement:
  """Compiles the program, then times it: `repeats` windows of `iters` calls."""
  start = time.perf_counter()
  compiled = program.compile()
  compile_seconds = time.perf_counter() - start
  run = program.runner(compiled)
  jax.block_until_ready(run())  # warm-up
  windows = [_seconds_per_call(run, iters) for _ in range(repeats)]
  flops = _flops(compiled)
  return Measurement(
    program.what,
    program.config_like[0],
    program.config_like[1],
    program.batch,
    compile_seconds,
    statistics.median(windows),
    (min(windows), max(windows)),
    None if flops is None else flops / program.batch,
    program.details,
  )


def _images(batch: int, size: int) -> jax.Array:
  rng = np.random.default_rng(0)
  return jax.device_put(rng.uniform(size=(batch, size, size, 3)).astype(np.float32))


def teacher_program(arch: str, size: int, batch: int) -> Program:
  """The teacher forward (layer1..3) on random weights."""
  variables = teacher.init_teacher(arch, warn=False)
  forward = jax.jit(teacher.ResNet(arch).apply)
  return Program('teacher', forward, (variables, _images(batch, size)), batch, (arch, size))


def _describe(config) -> str:
  m = config.model
  return (
    f' fusion={m.fusion} attention={tuple(m.coord_attention)} memory={m.memory.mode}'
    f' dtype={config.train.dtype}'
  )


def train_step_program(config) -> Program:
  """The whole jitted training step (teacher, student, loss, grads, Adam), one device."""
  batch, size = config.train.batch_size, config.data.image_size
  teacher_vars = teacher.init_teacher(config.model.backbone, warn=False)
  model = model_lib.MSRD(config)
  tx = train.make_optimizer(config)
  state = train.create_state(model, tx, teacher_vars, config)
  step = jax.jit(train.make_train_step(model, tx, config, axis_name=None), donate_argnums=(0,))
  return Program(
    'train step',
    step,
    (state, teacher_vars, _images(batch, size)),
    batch,
    (config.model.backbone, size),
    _describe(config),
    update=lambda out, args: (out[0], *args[1:]),
  )


def inference_program(config, batch: int) -> Program:
  """Anomaly maps and scores (teacher, student, per-level maps, resize, blur, max)."""
  size = config.data.image_size
  teacher_vars = teacher.init_teacher(config.model.backbone, warn=False)
  model = model_lib.MSRD(config)
  student_vars = model.init(jax.random.key(0), teacher_vars, size)
  predict = inference.make_predict_fn(model, config)
  return Program(
    'inference',
    predict,
    (teacher_vars, student_vars, _images(batch, size)),
    batch,
    (config.model.backbone, size),
    _describe(config),
  )


PEAK_SIZES = (1024, 2048, 4096)


def matmul_program(n: int, dtype: str = 'float32') -> Program:
  """One n x n matrix product (2 n^3 FLOPs) in `dtype`, for `peak`."""
  rng = np.random.default_rng(0)
  a, b = (
    jax.device_put(rng.standard_normal((n, n), dtype=np.float32).astype(dtype)) for _ in range(2)
  )
  return Program('matmul', jax.jit(jax.numpy.matmul), (a, b), 1, (dtype, n))


def peak_line(m: Measurement) -> str:
  lo, hi = m.spread
  flops = m.flops_per_image
  return (
    f'matmul {m.image_size} x {m.image_size} {m.backbone}: {m.gflops_per_second:8.1f} GFLOP/s '
    f'(windows {flops / hi / 1e9:.1f}..{flops / lo / 1e9:.1f}), compile {m.compile_seconds:.1f} s'
  )


def profile_program(program: Program, calls: int, top: int) -> str:
  """The per-operation profile of a program (msrd_jax.profiling) as text."""
  compiled = program.compile()
  run = program.runner(compiled)
  jax.block_until_ready(run())  # warm-up
  wall = _seconds_per_call(run, calls)
  times = profiling.profile(compiled, run, calls)
  head = (
    f'{program.what} {program.config_like[0]} {program.config_like[1]}px batch '
    f'{program.batch}{program.details}'
  )
  return head + '\n' + profiling.report(times, wall, top)


def parameter_counts(config) -> dict[str, int]:
  """Parameters per module (teacher and each part of the student), without allocating."""
  count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
  teacher_shapes = teacher.teacher_shapes(config.model.backbone)
  student = model_lib.MSRD(config).abstract_variables(config.data.image_size)
  counts = {'teacher (frozen)': count(teacher_shapes['params'])}
  counts.update({k: count(v) for k, v in student['params'].items()})
  counts['student total (trained)'] = count(student['params'])
  return counts


COMMANDS = ('teacher', 'train', 'infer', 'params', 'profile', 'peak')


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f'usage: python -m msrd_jax.benchmark {{{",".join(COMMANDS)}}} [--flags]')
  what = argv[1]
  print(
    f'backend {jax.default_backend()}, {jax.device_count()} device(s): '
    f'{jax.devices()[0].device_kind}; jax {jax.__version__}',
    flush=True,
  )
  config = FLAGS.config
  results: list[Measurement] = []
  if what == 'params':
    print(f'parameters, {config.model.backbone} at {config.data.image_size} px:')
    for name, n in parameter_counts(config).items():
      print(f'  {name:>24}: {n:>12,}')
    return
  if what == 'profile':
    program = (
      train_step_program(config)
      if FLAGS.program == 'train'
      else inference_program(config, config.eval.batch_size)
    )
    print(profile_program(program, FLAGS.iters, FLAGS.top), flush=True)
    return
  if what == 'peak':
    for dtype in FLAGS.dtypes:
      for n in (int(x) for x in FLAGS.matmul_sizes):
        m = measure(matmul_program(n, dtype), FLAGS.iters, FLAGS.repeats)
        results.append(dataclasses.replace(m, flops_per_image=2.0 * n**3))
        print(peak_line(results[-1]), flush=True)
  elif what == 'train':
    results.append(measure(train_step_program(config), FLAGS.iters, FLAGS.repeats))
  elif what == 'infer':
    results.append(
      measure(inference_program(config, config.eval.batch_size), FLAGS.iters, FLAGS.repeats)
    )
    # A production line scores one image at a time: the latency of batch 1.
    results.append(measure(inference_program(config, 1), FLAGS.iters, FLAGS.repeats))
  else:
    archs = list(teacher.ARCH_SPECS) if FLAGS.arch == 'all' else [FLAGS.arch]
    for arch in archs:
      program = teacher_program(arch, FLAGS.size, FLAGS.batch)
      results.append(measure(program, FLAGS.iters, FLAGS.repeats))
      print(results[-1].line(), flush=True)
  if what not in ('teacher', 'peak'):
    for r in results:
      print(r.line(), flush=True)
  if FLAGS.json:
    files.write_json(FLAGS.json, [r.to_json() for r in results])


if __name__ == '__main__':
  config_flags.DEFINE_config_file(
    'config',
    'configs/synthetic.py',
    'train/infer/params: config file; fields overridden as --config.a.b=value.',
  )
  flags.DEFINE_string('arch', 'wide_resnet50_2', "teacher: an architecture, or 'all'.")
  flags.DEFINE_integer('size', 256, 'teacher: image size.')
  flags.DEFINE_integer(
    'batch', 8, 'teacher: batch size (train uses train.batch_size, infer eval.batch_size and 1).'
  )
  flags.DEFINE_integer('iters', 3, 'Calls per timed window.')
  flags.DEFINE_integer('repeats', 3, 'Timed windows; the median is reported.')
  flags.DEFINE_string('json', None, 'Also write the figures to this JSON file.')
  flags.DEFINE_list(
    'matmul_sizes', [str(n) for n in PEAK_SIZES], 'peak: the sizes n of the n x n products.'
  )
  flags.DEFINE_multi_enum(
    'dtypes', ['float32'], ['float32', 'bfloat16'], 'peak: the dtypes of the matrix products.'
  )
  flags.DEFINE_enum('program', 'train', ['train', 'infer'], 'profile: which program.')
  flags.DEFINE_integer('top', 25, 'profile: how many of the slowest operations to list.')
  # A user error (a config field, $MSRD_JAX_KERNEL_GRAD) is one line and exit status 2.
  app.run(lambda argv: cli.exit_on_user_error(main, argv))
