"""The benchmark's parameter counts against torchvision's manifests."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
from conftest import ROOT, cli

from msrd_jax import benchmark
from msrd_jax import config as config_lib

MANIFESTS = os.path.join(os.path.dirname(__file__), 'fixtures', 'manifests')


@pytest.mark.parametrize('arch', ['resnet18', 'wide_resnet50_2'])
def test_parameter_counts(arch):
  config = config_lib.base_config()
  config.model.backbone = arch
  counts = benchmark.parameter_counts(config)
  with open(os.path.join(MANIFESTS, f'{arch}.json')) as f:
    keys = json.load(f)['keys']
  # torchvision's trainable tensors up to layer3 (no running statistics, layer4, fc).
  expected = sum(
    math.prod(shape)
    for key, shape in keys.items()
    if not key.startswith(('layer4.', 'fc.'))
    and not key.endswith(('running_mean', 'running_var', 'num_batches_tracked'))
  )
  assert counts['teacher (frozen)'] == expected
  parts = ('fusion', 'oce', 'memory', 'decoder')
  assert counts['student total (trained)'] == sum(counts[p] for p in parts)
  assert counts['memory'] == 50 * 512 * (1 if arch == 'resnet18' else 4)


@pytest.mark.slow
@pytest.mark.parametrize('command', ['train', 'infer'])
def test_benchmark_command_prints_and_writes_its_figures(command, tmp_path):
  out = tmp_path / 'figures.json'
  done = cli(
    'msrd_jax.benchmark',
    command,
    '--config',
    'configs/synthetic.py',
    '--config.data.image_size=64',
    '--config.train.batch_size=2',
    '--config.eval.batch_size=2',
    '--iters=1',
    '--repeats=2',
    f'--json={out}',
  )
  assert done.returncode == 0, done.stderr[-2000:]
  figures = json.loads(out.read_text())
  assert [f['batch'] for f in figures] == ([2] if command == 'train' else [2, 1])
  for f in figures:
    assert f['images_per_second'] > 0 and f['compile_seconds'] > 0
    assert f['spread'][0] <= f['seconds_per_call'] <= f['spread'][1]
    # XLA counts the FLOPs of the compiled program: far more than one MAC per pixel.
    assert f['flops_per_image'] > 64 * 64 * 1000
    assert f'{f["images_per_second"]:8.2f} images/s' in done.stdout


def test_a_bad_kernel_gradient_setting_is_one_error_line(monkeypatch):
  """$MSRD_JAX_KERNEL_GRAD (README, Speed) as a user sets it for the benchmark."""
  monkeypatch.setenv('MSRD_JAX_KERNEL_GRAD', 'fast')
  done = cli(
    'msrd_jax.benchmark',
    'train',
    '--config',
    'configs/synthetic.py',
    '--config.data.image_size=64',
    '--config.train.batch_size=2',
  )
  assert done.returncode == 2, done.stderr[-2000:]
  assert "error: $MSRD_JAX_KERNEL_GRAD must be 'xla' or 'taps'" in done.stderr
  assert 'Traceback' not in done.stderr


def test_flops_count_two_per_multiply_add():
  """The benchmark's FLOPs (XLA's cost analysis) count a multiply-add as two, as
  torch.utils.flop_counter and the usual GFLOP/s peaks do: n x n times n x n is 2 n^3."""
  program = benchmark.matmul_program(64)
  m = benchmark.measure(program, iters=1, repeats=1)
  assert m.flops_per_image == 2 * 64**3
  assert 'matmul 64 x 64 float32' in benchmark.peak_line(m)


@pytest.mark.slow
def test_peak_command_writes_one_figure_per_size(tmp_path):
  out = tmp_path / 'peak.json'
  done = cli('msrd_jax.benchmark', 'peak', '--iters=1', '--repeats=1', f'--json={out}')
  assert done.returncode == 0, done.stderr[-2000:]
  figures = json.loads(out.read_text())
  assert [f['image_size'] for f in figures] == list(benchmark.PEAK_SIZES)
  for f in figures:
    assert f['flops_per_image'] == 2 * f['image_size'] ** 3 and f['gflops_per_second'] > 0


@pytest.mark.slow
def test_gpu_script_runs_through_on_this_machine(tmp_path):
  """scripts/gpu_benchmark.sh, shrunk by its environment variables as its header says,
  runs every step and prints its table (on a CPU: nothing in it needs a GPU)."""
  import subprocess
  import sys

  env = dict(
    os.environ,
    PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'],
    SETTINGS='resnet18 64 configs/synthetic.py',
    BATCHES='2',
    ITERS='1',
    MATMUL_SIZES='128',
    OUT=str(tmp_path),
  )
  done = subprocess.run(
    ['bash', 'scripts/gpu_benchmark.sh'], cwd=ROOT, env=env, capture_output=True, text=True
  )
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'did not fit' not in done.stdout
  lines = done.stdout.splitlines()
  table = lines[next(i for i, line in enumerate(lines) if line.startswith('what')) + 1 :]
  # float32 and bfloat16: the train step at batch 2, inference at 2 and 1.
  assert len(table) == 6, done.stdout
  # Each row names its setting: backbone, size, dtype and batch ('b2'); 'what' may be two
  # words ('train step').
  settings = sorted(
    tuple(t for t in line.split() if t in ('float32', 'bfloat16') or re.fullmatch(r'b\d+', t))
    for line in table
  )
  assert settings == sorted(
    [(d, b) for d in ('float32', 'bfloat16') for b in ('b1', 'b2', 'b2')]
  ), done.stdout
  assert sum(line.startswith('train step') for line in table) == 2, done.stdout
  peaks = json.loads((tmp_path / 'peak.json').read_text())
  assert sorted(f['backbone'] for f in peaks) == ['bfloat16', 'float32']
