"""Faults as a user meets them: real signals, real kills, damaged files, bad inputs.

Every run here is the command line in a subprocess, as a user starts it. The promise
under test: nothing is lost beyond the steps after the last checkpoint (for SIGINT and
SIGTERM not even those), every resumed run ends bit-identical to an uninterrupted one,
and every error ends with its documented status and one line, never a traceback or a
crash. The model is the smallest the code builds (resnet18 plain RD4AD at 96 px, one
OCE block, batch 4) and subprocesses share the session's XLA cache, so that each one
compiles nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import flax
import jax
import numpy as np
import pytest
from data_fixtures import write_image

from msrd_jax import checkpoint
from msrd_jax import config as config_lib
from msrd_jax import teacher as teacher_lib
from msrd_jax import train as train_lib
from msrd_jax.data import folder, pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATEGORY = 'widget'
STEPS = 35  # a multiple of EVERY: the last two checkpoints are STEPS - EVERY and STEPS
EVERY = 5
BATCH = 4
SIZE = 96
N_TRAIN = 8
TIMEOUT = 300

# The config of every run, as command-line overrides (configs/mvtec.py is the base).
OVERRIDES = {
  'model.backbone': 'resnet18',
  'model.fusion': 'mff',
  'model.coord_attention': '()',
  'model.memory.mode': 'off',
  'model.oce_blocks': '1',
  'data.image_size': str(SIZE),
  'data.num_threads': '2',
  'train.batch_size': str(BATCH),
  'train.log_every_steps': '1',
  'train.keep_checkpoints': '2',
  'eval.batch_size': '4',
  'eval.num_pictures': '2',
}


def _config(root: str):
  """The same config in this process (for templates of the saved state)."""
  c = config_lib.base_config()
  c.data.root, c.data.category = root, CATEGORY
  c.model.backbone, c.model.fusion, c.model.coord_attention = 'resnet18', 'mff', ()
  c.model.memory.mode, c.model.oce_blocks = 'off', 1
  c.data.image_size, c.train.batch_size, c.train.steps = SIZE, BATCH, STEPS
  return c


def _args(root, workdir, steps=STEPS, every=EVERY, evaluate=False, **extra) -> list[str]:
  fields = {
    **OVERRIDES,
    'data.root': str(root),
    'train.steps': str(steps),
    'train.checkpoint_every_steps': str(every),
    'eval.after_training': str(evaluate),
    **extra,
  }
  return [
    f'--config=configs/mvtec.py:{CATEGORY}',
    f'--workdir={workdir}',
    *(f'--config.{k}={v}' for k, v in fields.items()),
  ]


def _env() -> dict:
  env = dict(os.environ, PYTHONPATH=ROOT)
  env['JAX_COMPILATION_CACHE_DIR'] = jax.config.jax_compilation_cache_dir or ''
  return env


class Command:
  """`python -m MODULE ARGS` running in the background, output kept in files."""

  def __init__(self, tmp, module: str, *args: str):
    self.out_path, self.err_path = f'{tmp}.out', f'{tmp}.err'
    with open(self.out_path, 'w') as out, open(self.err_path, 'w') as err:
      self.proc = subprocess.Popen(
        [sys.executable, '-m', module, *args], cwd=ROOT, env=_env(), stdout=out, stderr=err
      )

  def wait(self) -> Command:
    try:
      self.proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      raise
    return self

  @property
  def returncode(self) -> int | None:
    return self.proc.poll()

  @property
  def stdout(self) -> str:
    with open(self.out_path) as f:
      return f.read()

  @property
  def stderr(self) -> str:
    with open(self.err_path) as f:
      return f.read()

  def lines(self, prefix: str) -> list[str]:
    """stderr lines starting with `prefix` (progress-bar redraws split on '\\r')."""
    text = self.stderr.replace('\r', '\n')
    return [line for line in text.splitlines() if line.startswith(prefix)]

  def assert_clean(self, code: int) -> None:
    """Exit status `code`, and no traceback or crash report."""
    assert self.returncode == code, (self.returncode, self.stderr[-3000:])
    assert 'Traceback' not in self.stderr, self.stderr[-3000:]
    assert 'Fatal Python error' not in self.stderr, self.stderr[-3000:]


def run(tmp, module: str, *args: str) -> Command:
  return Command(tmp, module, *args).wait()


# --- what a run left on disk ------------------------------------------------------


def _steps(workdir) -> list[int]:
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(e) for e in os.listdir(d) if e.isdigit()) if os.path.isdir(d) else []


def _tmp_dirs(workdir) -> list[str]:
  d = os.path.join(workdir, 'checkpoints')
  return [e for e in os.listdir(d) if 'tmp' in e] if os.path.isdir(d) else []


def _meta(workdir, step: int) -> dict:
  with open(os.path.join(workdir, 'checkpoints', str(step), 'meta', 'metadata')) as f:
    return json.load(f)


def _logged(workdir) -> list[int]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [json.loads(line)['step'] for line in f if line.strip()]


def _largest_file(step_dir: str) -> str:
  found = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs]
  return max(found, key=os.path.getsize)


# --- data -------------------------------------------------------------------------


def _noise(rng, shape) -> np.ndarray:
  return rng.integers(0, 256, shape, dtype=np.uint8)


def make_category(root, category: str = CATEGORY, seed: int = 0) -> str:
  """8 training images, 2 good and 2 defective test images with 0/255 masks."""
  rng = np.random.default_rng(seed)
  base = os.path.join(root, category)
  for i in range(N_TRAIN):
    write_image(os.path.join(base, 'train', 'good', f'{i:03d}.png'), _noise(rng, (SIZE, SIZE, 3)))
  for i in range(2):
    write_image(os.path.join(base, 'test', 'good', f'{i:03d}.png'), _noise(rng, (SIZE, SIZE, 3)))
    write_image(os.path.join(base, 'test', 'crack', f'{i:03d}.png'), _noise(rng, (SIZE, SIZE, 3)))
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[10:30, 20:40] = 255
    write_image(os.path.join(base, 'ground_truth', 'crack', f'{i:03d}_mask.png'), mask)
  return base


def break_png_data(path: str) -> None:
  """Garbles a PNG's compressed pixels but keeps every chunk's CRC valid.

  The header and the chunk structure stay intact, so only decoding finds the damage.
  """
  with open(path, 'rb') as f:
    data = bytearray(f.read())
  pos = 8
  while pos < len(data):
    length, kind = struct.unpack('>I4s', data[pos : pos + 8])
    if kind == b'IDAT':
      body = data[pos + 8 : pos + 8 + length]
      body[2:] = bytes(b ^ 0x5A for b in body[2:])
      data[pos + 8 : pos + 8 + length] = body
      crc = zlib.crc32(kind + bytes(body)) & 0xFFFFFFFF
      data[pos + 8 + length : pos + 12 + length] = struct.pack('>I', crc)
      break
    pos += 12 + length
  with open(path, 'wb') as f:
    f.write(data)


@pytest.fixture(scope='module')
def data_root(tmp_path_factory) -> str:
  root = tmp_path_factory.mktemp('faults_data')
  make_category(root)
  return str(root)


@pytest.fixture(scope='module')
def reference(data_root, tmp_path_factory) -> str:
  """An uninterrupted run of STEPS steps; every resumed run must end identical to it."""
  workdir = str(tmp_path_factory.mktemp('reference') / 'run')
  done = run(f'{workdir}-log', 'msrd_jax.train', *_args(data_root, workdir))
  done.assert_clean(0)
  assert _steps(workdir) == [STEPS - EVERY, STEPS]
  assert _logged(workdir) == list(range(1, STEPS + 1))
  return workdir


def _progress(cmd: Command) -> int:
  """The step the run's progress bar shows last (0 before it appears)."""
  found = re.findall(rf'\| *(\d+)/{STEPS} \[', cmd.stderr)
  return int(found[-1]) if found else 0


def _wait_for_step(cmd: Command, step: int) -> float:
  """Until the run has dispatched `step` (it is training); fails if it ends first.

  Returns the seconds its last step took, so that delays can be drawn in steps,
  whatever the machine's speed.
  """
  deadline = time.monotonic() + TIMEOUT
  seen, since, took = 0, time.monotonic(), 0.0
  while seen < step:
    assert cmd.returncode is None, f'the run ended before step {step}:\n{cmd.stderr[-3000:]}'
    assert time.monotonic() < deadline, cmd.stderr[-3000:]
    time.sleep(0.01)
    now = _progress(cmd)
    if now > seen:
      if seen:
        took = (time.monotonic() - since) / (now - seen)
      seen, since = now, time.monotonic()
  return took


def _wait_for_checkpoint_write(cmd: Command, workdir) -> None:
  """Until Orbax is writing a step (its temporary folder exists)."""
  deadline = time.monotonic() + TIMEOUT
  while not _tmp_dirs(workdir):
    assert cmd.returncode is None, cmd.stderr[-3000:]
    assert time.monotonic() < deadline, cmd.stderr[-3000:]
    time.sleep(0.005)


# --- signals, kills and a damaged checkpoint, met by one run ---------------------


def _flip_bytes(path: str, count: int, seed: int) -> None:
  rng = np.random.default_rng(seed)
  with open(path, 'r+b') as f:
    size = os.path.getsize(path)
    for pos in rng.choice(size, count, replace=False):
      f.seek(int(pos))
      byte = f.read(1)[0]
      f.seek(int(pos))
      f.write(bytes([byte ^ 0xFF]))


def _flip_array_bytes(step_dir: str, seed: int) -> None:
  """A few flipped bytes in every large file of a step's arrays: all entries are hit."""
  state = os.path.join(step_dir, 'state')
  for i, (d, _, fs) in enumerate(sorted(os.walk(state))):
    for f in fs:
      path = os.path.join(d, f)
      if os.path.getsize(path) > 2**20:
        _flip_bytes(path, 4, seed + i)


SCHEDULE = ('SIGINT', 'SIGKILL during a write', 'SIGTERM', 'SIGINT', 'SIGTERM')


@pytest.mark.slow
def test_signals_kills_and_damage_lose_nothing_and_the_run_ends_bit_identical(
  data_root, reference, tmp_path
):
  """One run meets, in turn: SIGINT and SIGTERM at random moments (each saves the
  step reached: nothing lost), SIGKILL in the middle of a checkpoint write (only the
  steps after the last checkpoint are lost), flipped bytes in its newest checkpoint
  (evaluation refuses it; training falls back to the intact step). It then ends with
  exactly the reference's parameters, every step logged once."""
  rng = np.random.default_rng(7)
  workdir = str(tmp_path / 'run')
  for i, fault in enumerate(SCHEDULE):
    start = max(_steps(workdir), default=0)
    killing = fault.startswith('SIGKILL')
    # Checkpoints every step while killing, so that the kill lands inside a write.
    every = 1 if killing else EVERY
    cmd = Command(tmp_path / f'{i}', 'msrd_jax.train', *_args(data_root, workdir, every=every))
    step_seconds = _wait_for_step(cmd, start + 2)
    if killing:
      _wait_for_checkpoint_write(cmd, workdir)
    else:  # anywhere within the next step: inside it, its check, a save
      time.sleep(float(rng.uniform(0.0, 1.0)) * min(step_seconds, 1.0))
    signum = getattr(signal, fault.split()[0])
    cmd.proc.send_signal(signum)
    cmd.wait()
    saved = max(_steps(workdir), default=0)
    reached = _progress(cmd)
    print(
      f'{fault:>24}: {step_seconds:.2f} s/step, sent after step {reached}; exit '
      f'{cmd.returncode}; newest checkpoint {start} -> {saved}; steps lost {reached - saved}'
    )
    assert saved < STEPS, 'the run finished before the signal; give it more steps'
    if killing:
      assert cmd.returncode == -signal.SIGKILL
      assert saved >= start  # at worst the steps after the last checkpoint are lost
      assert _tmp_dirs(workdir), 'the kill was meant to land inside a checkpoint write'
      continue
    cmd.assert_clean(128 + signum)
    assert cmd.lines('interrupted:') == [
      f'interrupted: saved step {saved} in {workdir}/checkpoints'
    ]
    assert saved > start
    # The step reached is saved and every step up to it logged once: nothing lost.
    assert _logged(workdir) == list(range(1, saved + 1))

  intact, newest = _steps(workdir)
  _flip_array_bytes(os.path.join(workdir, 'checkpoints', str(newest)), seed=3)
  # Evaluating an older step than the run reached would mislead: refused, both named.
  done = run(tmp_path / 'evaluate', 'msrd_jax.evaluate', *_args(data_root, workdir))
  done.assert_clean(2)
  (line,) = done.lines('error:')
  assert f'step {newest} in' in line and 'damaged' in line and 'SHA-256' in line, line
  assert f'step {intact} is intact' in line, line

  # Training falls back to the intact step with a warning and redoes the rest.
  done = run(tmp_path / 'last', 'msrd_jax.train', *_args(data_root, workdir))
  done.assert_clean(0)
  (warning,) = done.lines('warning: checkpoint')
  assert f'step {newest} is damaged' in warning and f'from step {intact}' in warning, warning
  assert os.path.isdir(os.path.join(workdir, 'damaged_checkpoints', str(newest)))
  assert not _tmp_dirs(workdir)  # the killed write's leftovers are cleaned up
  assert _logged(workdir) == list(range(1, STEPS + 1))
  # Bit-identical: the SHA-256 of every saved array equals the uninterrupted run's.
  assert _meta(workdir, STEPS)['checksums'] == _meta(reference, STEPS)['checksums']


# --- every kind of damage, through the checkpoint API ------------------------------


@pytest.fixture(scope='module')
def state_template(data_root):
  config = _config(data_root)
  tx = train_lib.make_optimizer(config)
  teacher_vars = teacher_lib.init_teacher('resnet18', warn=False)
  template = train_lib.state_template(train_lib.MSRD(config), tx, teacher_vars, config)
  return flax.serialization.to_state_dict(template)


def _truncate(path: str, size: int | None = None) -> None:
  """Cuts the file to `size` bytes (default: half of it)."""
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2 if size is None else size)


def _overwrite(path: str, text: bytes) -> None:
  with open(path, 'wb') as f:
    f.write(text)


def _change_meta_value(step_dir: str) -> None:
  path = os.path.join(step_dir, 'meta', 'metadata')
  with open(path, 'rb') as f:
    text = f.read()
  _overwrite(path, text.replace(b'"data_step": ', b'"data_step": 1'))


# damage -> (what it does to the newest step, what the refusal says)
DAMAGES = {
  'flipped array bytes': (
    lambda d: _flip_bytes(_largest_file(os.path.join(d, 'state')), 4, 1),
    'no longer match their SHA-256',  # Orbax reads these silently: only the checksum sees
  ),
  'truncated array file': (
    lambda d: _truncate(_largest_file(os.path.join(d, 'state'))),
    'arrays cannot be restored',
  ),
  'meta not JSON': (
    lambda d: _overwrite(os.path.join(d, 'meta', 'metadata'), b'{"data_st'),
    'metadata cannot be read',
  ),
  'meta value changed': (_change_meta_value, 'metadata does not match its checksum'),
  'Orbax tree metadata truncated': (
    lambda d: _truncate(os.path.join(d, 'state', '_METADATA')),
    'arrays cannot be restored',
  ),
}


@pytest.mark.slow
@pytest.mark.parametrize('damage', sorted(DAMAGES))
def test_each_damage_is_found_and_the_intact_step_kept(
  reference, state_template, tmp_path, damage, capsys
):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  apply, reason = DAMAGES[damage]
  apply(os.path.join(workdir, 'checkpoints', str(STEPS)))
  older = STEPS - EVERY
  with checkpoint.Workdir(workdir, create=False) as wd:
    with pytest.raises(checkpoint.CheckpointDamaged, match=f'step {STEPS} in .* {older} is intact'):
      wd.restore(state_template)
    assert _steps(workdir) == [older, STEPS]  # refusing changes nothing
    _, meta = wd.restore(state_template, fallback=True)
    assert meta['data_step'] == older
    assert wd.latest_step() == older
  assert _steps(workdir) == [older]
  assert os.path.isdir(os.path.join(workdir, 'damaged_checkpoints', str(STEPS)))
  (warning,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith('warning:')]
  assert f'step {STEPS} is damaged' in warning and f'from step {older}' in warning
  assert reason in warning, warning


@pytest.mark.slow
def test_no_intact_step_is_refused_naming_each(reference, state_template, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  for step in (STEPS - EVERY, STEPS):
    _flip_bytes(_largest_file(os.path.join(workdir, 'checkpoints', str(step), 'state')), 4, step)
  with checkpoint.Workdir(workdir, create=False) as wd:
    with pytest.raises(
      checkpoint.CheckpointDamaged, match=f'step {STEPS}: .*step {STEPS - EVERY}:'
    ):
      wd.restore(state_template, fallback=True)
  assert _steps(workdir) == [STEPS - EVERY, STEPS]


# --- bad inputs -------------------------------------------------------------------


def test_bad_data_found_during_training_exits_2_without_a_crash(tmp_path):
  """A training image that only decoding can find broken, in the second batch: the
  first step is still running on XLA's threads when the error arrives."""
  root = tmp_path / 'data'
  base = make_category(root)
  names = [s.name for s in folder.list_mvtec(root, CATEGORY, 'train')]
  loader = pipeline.TrainLoader(names, SIZE, BATCH, seed=0)
  second_batch_only = sorted(set(loader.batch_indices(1)) - set(loader.batch_indices(0)))
  broken = os.path.join(base, names[second_batch_only[0]])
  break_png_data(broken)
  # Grey masks: reported once for the category, and binarized at half scale.
  grey = np.tile(np.arange(SIZE, dtype=np.uint8) * 2, (SIZE, 1))
  for i in range(2):
    write_image(os.path.join(base, 'ground_truth', 'crack', f'{i:03d}_mask.png'), grey)
  done = run(tmp_path / 'log', 'msrd_jax.train', *_args(root, tmp_path / 'run', evaluate=True))
  done.assert_clean(2)
  (error,) = done.lines('error:')
  assert broken in error and 'decod' in error, error
  # Two grey masks, one warning, naming whichever was read first.
  (warning,) = done.lines('warning: the mask')
  assert '_mask.png is not binary' in warning and 'binarized at > 127' in warning, warning


# A progress bar at its start: a file whose damage only decoding finds (its checksums
# intact) is met by the first batch, before any step is done.
_PROGRESS = re.compile(r'^train \S+: +0%\|')


def _refused_in_one_line(cmd: Command, needle: str) -> None:
  """Exit 2, one `error:` line holding `needle`, nothing else but the random-teacher warning."""
  cmd.wait().assert_clean(2)
  teacher_warning = ('RANDOM weights', 'init_teacher(')
  lines = [
    x
    for x in cmd.stderr.replace('\r', '\n').splitlines()
    if x.strip() and not any(w in x for w in teacher_warning) and not _PROGRESS.match(x)
  ]
  assert lines == cmd.lines('error:'), cmd.stderr
  assert needle in cmd.stderr, (needle, cmd.stderr)


def test_bad_inputs_are_refused_in_one_line_before_anything_runs(tmp_path):
  """Each refused with one line naming the file or field and status 2, before anything
  is trained. (Files cut short or with flipped bytes, grey masks and misspelt fields are
  also covered in-process by test_robustness.py.)"""
  bad_data = {}

  def category(name: str) -> tuple[str, str]:
    root = str(tmp_path / name)
    return root, make_category(root)

  root, base = category('no_mask')
  os.remove(os.path.join(base, 'ground_truth', 'crack', '001_mask.png'))
  bad_data['missing mask'] = (root, 'crack/001_mask.png')
  root, base = category('broken_image')
  break_png_data(os.path.join(base, 'train', 'good', '003.png'))
  bad_data['broken image'] = (root, 'good/003.png')
  root, base = category('wrong_size_mask')
  write_image(
    os.path.join(base, 'ground_truth', 'crack', '000_mask.png'), np.zeros((8, 8), np.uint8)
  )
  bad_data['wrong-size mask'] = (root, 'crack/000_mask.png')
  root, base = category('empty_train')
  for name in os.listdir(os.path.join(base, 'train', 'good')):
    os.remove(os.path.join(base, 'train', 'good', name))
  bad_data['empty train/good'] = (root, f'{CATEGORY}/train/good holds no images')
  bad = {
    name: (needle, _args(root, tmp_path / f'run_{i}', evaluate=True))
    for i, (name, (root, needle)) in enumerate(bad_data.items())
  }
  root = tmp_path / 'no_mask'
  bad['unknown field'] = (
    "--config.model.nonexistnt: the config has no field 'model.nonexistnt'",
    _args(root, tmp_path / 'b', **{'model.nonexistnt': '1'}),
  )
  bad['missing config file'] = (
    "cannot load the config file 'configs/nonexistent.py'",
    ['--config=configs/nonexistent.py', f'--workdir={tmp_path / "c"}'],
  )
  # Started together: each spends its time importing, single-threaded.
  cmds = {
    k: Command(tmp_path / k.replace(' ', '_').replace('/', '_'), 'msrd_jax.train', *a)
    for k, (_, a) in bad.items()
  }
  for name, cmd in cmds.items():
    _refused_in_one_line(cmd, bad[name][0])
  for w in [f'run_{i}' for i in range(len(bad_data))] + ['b', 'c']:
    assert _steps(tmp_path / w) == [], w  # nothing trained, nothing saved


@pytest.mark.slow
def test_evaluate_refuses_a_truncated_checkpoint_in_one_line(data_root, reference, tmp_path):
  cut = str(tmp_path / 'cut')
  shutil.copytree(reference, cut)
  state = os.path.join(cut, 'checkpoints', str(STEPS), 'state')
  # Every data file of the store (OCDBT groups leaves into files differently from run
  # to run): the parameters that evaluation reads are in one of them. 16 bytes are left.
  for d, _, fs in os.walk(state):
    if os.path.basename(d) == 'd':
      for f in fs:
        _truncate(os.path.join(d, f), 16)
  # Orbax abandons the other reads of a step when one fails: no traceback of theirs.
  _refused_in_one_line(
    Command(tmp_path / 'log', 'msrd_jax.evaluate', *_args(data_root, cut)),
    f"step {STEPS} in '{cut}/checkpoints', is damaged (its arrays cannot be restored",
  )


def test_run_all_reports_a_bad_category_and_goes_on(tmp_path):
  """The bad category comes first; the command still reaches the next one (finished
  already here: test_robustness.py shows in-process that the next one is trained)."""
  root = tmp_path / 'data'
  make_category(root)
  bad = make_category(root, 'aaa_broken', seed=1)
  os.remove(os.path.join(bad, 'ground_truth', 'crack', '000_mask.png'))
  workdir = tmp_path / 'run'
  scores = {'image_auroc': 0.75, 'pixel_auroc': 0.5, 'au_pro': 0.25}
  os.makedirs(workdir / CATEGORY)
  with open(workdir / CATEGORY / 'results.json', 'w') as f:
    json.dump({CATEGORY: scores}, f)
  args = [a for a in _args(root, workdir) if not a.startswith('--config=')]
  done = run(tmp_path / 'log', 'msrd_jax.run_all', '--config=configs/mvtec.py', *args)
  done.assert_clean(2)
  (failed,) = done.lines('[1/2] aaa_broken: FAILED')
  assert '000_mask.png' in failed
  assert f'[2/2] {CATEGORY}: done, skipped' in done.stdout
  (error,) = done.lines('error:')
  assert error.startswith('error: 1 of 2 categories failed: aaa_broken:'), error
  assert f'| {CATEGORY} | 75.0 |' in done.stdout  # the table of the others
  with open(workdir / 'results.json') as f:
    assert json.load(f) == {CATEGORY: scores}
