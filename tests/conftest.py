"""Shared fixtures: a small synthetic benchmark and a config that trains in seconds."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import jax
import pytest

from msrd_jax import calibrate, teacher, train
from msrd_jax import config as config_lib
from msrd_jax.data.synthetic import ensure_synthetic

# The tests compile many programs and run each a few times: at optimization level 0
# XLA's CPU backend compiles them about a sixth faster (the convolutions are library
# calls either way). Set before JAX starts; test commands inherit it.
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0'
  ).strip()

TRAIN_CATEGORIES = ('brick', 'grass')
# The figures metrics.evaluate_all reports for a category (and results.json holds).
METRIC_NAMES = (
  'image_auroc',
  'pixel_auroc',
  'au_pro',
  'image_ap',
  'pixel_ap',
  'image_f1_max',
  'pixel_f1_max',
  'au_pro_rd4ad',
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='session', autouse=True)
def compilation_cache(tmp_path_factory):
  # Several tests compile the same training step; the persistent cache compiles it once.
  # The environment carries it to the commands the tests start, which compile the same
  # programs again otherwise (the cache key holds the flags and the device count).
  cache = str(tmp_path_factory.mktemp('xla'))
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  saved = {k: os.environ.get(k) for k in _CACHE_ENV}
  os.environ.update({_CACHE_ENV[0]: cache, _CACHE_ENV[1]: '0'})
  yield
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


_CACHE_ENV = ('JAX_COMPILATION_CACHE_DIR', 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS')


@pytest.fixture(scope='session')
def synthetic_root(tmp_path_factory) -> str:
  """Two categories of the synthetic benchmark, generated once per session."""
  return ensure_synthetic(
    tmp_path_factory.mktemp('synthetic') / 'bench', categories=TRAIN_CATEGORIES
  )


def tiny_config(root: str, category: str = 'brick', steps: int = 6):
  """The demo config at test scale: resnet18, 96 px, batch 8."""
  c = config_lib.base_config()
  c.model.backbone = 'resnet18'
  c.data.dataset = 'mvtec'
  c.data.root = root
  c.data.category = category
  c.data.image_size = 96  # 64 px puts the OCE at 2x2, where XLA CPU convolutions crawl
  c.data.num_threads = 2
  c.train.batch_size = 8
  c.train.steps = steps
  c.train.checkpoint_every_steps = 2
  c.train.log_every_steps = 1
  c.eval.batch_size = 16
  c.eval.num_pictures = 4
  # Calibration scores the 80 training images after each training; the tests that need
  # a threshold calibrate explicitly (calibrated_run) on fewer.
  c.calibration.source = 'none'
  return c


def config_file(name: str, arg: str | None = None):
  """The config of configs/<name>.py, loaded from its file as --config loads it."""
  spec = importlib.util.spec_from_file_location(
    f'{name}_config', os.path.join(ROOT, 'configs', f'{name}.py')
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def set_field(config, dotted: str, value) -> None:
  """config.<dotted> = value, whatever the field's current type (e.g. None -> float)."""
  *parents, name = dotted.split('.')
  node = config
  for p in parents:
    node = node[p]
  with node.ignore_type():
    node[name] = value


def mtimes(top) -> dict[str, float]:
  """Modification time of every file under `top`, by path: equal before and after means
  nothing was written."""
  return {
    os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
    for d, _, fs in os.walk(top)
    for f in fs
  }


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
  """`python -m MODULE ARGS` from the repository root, as a user runs it."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run(
    [sys.executable, '-m', module, *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )


@pytest.fixture(scope='session')
def run_with_teacher_file(synthetic_root, tmp_path_factory):
  """A short run whose teacher comes from a file, as a ported one would."""
  base = tmp_path_factory.mktemp('teacher_run')
  weights = str(base / 'teacher.msgpack')
  teacher.save_teacher(weights, 'resnet18', teacher.init_teacher('resnet18', seed=3, warn=False))
  config = tiny_config(synthetic_root, steps=2)
  config.model.teacher_weights = weights
  workdir = str(base / 'run')
  train.train(config, workdir)
  return config, workdir, weights


@pytest.fixture(scope='session')
def calibrated_run(run_with_teacher_file, tmp_path_factory):
  """A copy of run_with_teacher_file calibrated on 8 of its training images.

  Returns (config, workdir, good folder, calibration record).
  """
  config, workdir, _ = run_with_teacher_file
  base = tmp_path_factory.mktemp('calibrated')
  copy = str(base / 'run')
  shutil.copytree(workdir, copy)
  good = base / 'good'
  good.mkdir()
  train_dir = os.path.join(config.data.root, config.data.category, 'train', 'good')
  for name in sorted(os.listdir(train_dir))[:8]:
    shutil.copy(os.path.join(train_dir, name), good / name)
  record = calibrate.calibrate_run(config, copy, good=str(good))
  return config, copy, str(good), record
