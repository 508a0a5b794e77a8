"""Command-line plumbing shared by the commands: flags and clean errors.

Every command takes `--config path/to/config.py[:arg]` (any field overridable as
`--config.a.b=value`) and `--workdir DIR`. Commands that use a trained run (predict,
calibrate, export) make --config optional: without it the config is the run's own
DIR/config.json, overrides still applied (see msrd_jax.run_config).

Errors a user can cause (bad flags, an unknown config field, bad data, missing weights,
a mismatched or damaged checkpoint, a diverged run, an invalid field) end the command
with one line on stderr and exit status 2 instead of a stack trace. SIGINT (Ctrl-C) and
SIGTERM end it with one line and status 130 / 143, after training has saved the step it
reached (msrd_jax.interrupts).

Exit statuses: 0 done, 1 a bug (with its traceback), 2 an error of the user's,
130 / 143 interrupted by SIGINT / SIGTERM.
"""

from __future__ import annotations

import difflib
import os
import re
import signal
import sys
from collections.abc import Callable

import jax
import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from msrd_jax import config as config_lib
from msrd_jax import interrupts, run_config
from msrd_jax.errors import UserError

FLAGS = flags.FLAGS

# The errors whose message is the whole story for the user (a missing file included).
USER_ERRORS = (UserError, FileNotFoundError)


def define_flags(
  workdir_help: str = 'Directory of the run (checkpoints, metrics, results).',
  config_required: bool = True,
) -> None:
  """--config and --workdir. config_required=False: --config defaults to the run's own."""
  if config_required:
    config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=True)
  else:
    # The default file only types the --config.a.b overrides; `resolve_config` reads
    # the values from DIR/config.json.
    config_flags.DEFINE_config_file(
      'config',
      run_config.__file__,
      "Config file (configs/*.py); default: the run's DIR/config.json.",
      lock_config=True,
    )
  flags.DEFINE_string('workdir', None, workdir_help)
  flags.mark_flags_as_required(['config', 'workdir'] if config_required else ['workdir'])


def resolve_config(workdir: str):
  """--config as given, else DIR/config.json with the --config.a.b overrides applied."""
  if FLAGS['config'].present:
    return FLAGS.config
  return run_config.load(workdir, FLAGS['config'].override_values)


def enable_compilation_cache() -> None:
  """Keeps compiled XLA programs on disk, so a resumed run does not compile again.

  The folder is $JAX_COMPILATION_CACHE_DIR if set, else <cache>/xla (see
  config.default_cache_dir); an explicit jax config setting is left alone.
  """
  if jax.config.jax_compilation_cache_dir or os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return
  jax.config.update(
    'jax_compilation_cache_dir', os.path.join(config_lib.default_cache_dir(), 'xla')
  )


def run(argv, fn: Callable) -> None:
  """Calls fn(config, workdir) and turns user errors into one line and exit code 2."""
  if len(argv) > 1:
    _fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if not FLAGS['verbosity'].present:
    # Orbax reports every file it writes at INFO; keep the progress bar readable.
    logging.set_verbosity(logging.WARNING)
  enable_compilation_cache()
  # A scheduler's SIGTERM gets the same treatment as Ctrl-C: training saves its step.
  interrupts.install()
  exit_on_user_error(lambda: fn(resolve_config(FLAGS.workdir), FLAGS.workdir))


def _fail(message: str, code: int = 2):
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


def wait_for_device() -> None:
  """Waits for every computation still running on the device.

  A Python exception can leave a dispatched step running on XLA's threads; exiting the
  interpreter under it ends in a segmentation fault instead of the intended status.
  """
  try:
    jax.effects_barrier()
    for x in jax.live_arrays():
      try:
        x.block_until_ready()
      except Exception:  # a failed or deleted computation: nothing left to wait for
        pass
  except Exception:  # never mask the error being reported
    pass


def exit_on_user_error(fn: Callable, *args):
  """fn(*args); a user error ends the process with one line and status 2, SIGINT or
  SIGTERM with one line and 130 / 143; a bug keeps its traceback (status 1)."""
  try:
    return fn(*args)
  except USER_ERRORS as e:
    wait_for_device()
    _fail(str(e))
  except KeyboardInterrupt as e:  # interrupts.Interrupted, or Ctrl-C from elsewhere
    wait_for_device()
    if not isinstance(e, interrupts.Interrupted):
      e = interrupts.Interrupted(signal.SIGINT)
    print(f'interrupted: {e}', file=sys.stderr, flush=True)
    sys.exit(e.exit_code)
  except BaseException:
    wait_for_device()
    raise


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (app.run's flags_parser) with one-line errors and status 2.

  absl reports most flag errors itself but lets others escape as tracebacks: an
  override of a config field that does not exist, a config file that cannot be loaded.
  """
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    _fail(f'{e} (--helpfull lists the flags)')
  except (AttributeError, KeyError) as e:  # ml_collections: no such field
    _fail(_unknown_field_message(argv, e))
  except OSError as e:  # the config file, found missing on its first use
    _fail(_config_file_message(argv, e))
  if 'config' in FLAGS:
    try:
      FLAGS.config.keys()  # a file that failed to load raises on first access
    except OSError as e:
      _fail(_config_file_message(argv, e))
  return rest


def _config_file_message(argv: list[str], e: OSError) -> str:
  """The file named by --config and the last line of why it did not load."""
  path = ''
  for i, a in enumerate(argv):
    if a.startswith('--config='):
      path = a.partition('=')[2]
    elif a == '--config' and i + 1 < len(argv):
      path = argv[i + 1]
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return f'cannot load the config file {path!r}: {lines[-1] if lines else e}'


def _unknown_field_message(argv: list[str], error: Exception) -> str:
  """Names the override that failed, the closest field names and the fields there are."""
  config = config_lib.base_config()
  for arg in argv:
    m = re.match(r'--config\.([\w.]+)', arg)
    if not m:
      continue
    node, parts = config, m.group(1).split('.')
    for depth, part in enumerate(parts):
      if isinstance(node, ml_collections.ConfigDict) and part in node:
        node = node[part]
        continue
      if not isinstance(node, ml_collections.ConfigDict):
        break  # a field below a plain value: ml_collections' own message says it
      parent = '.'.join(parts[:depth])
      prefix = f'{parent}.' if parent else ''
      names = sorted(node.keys())
      close = difflib.get_close_matches(part, names, n=2, cutoff=0.6)
      hint = f'; did you mean {" or ".join(prefix + c for c in close)}?' if close else ''
      return (
        f'--config.{m.group(1)}: the config has no field {prefix + part!r}{hint} '
        f'(fields of {parent or "the config"}: {", ".join(names)})'
      )
  return f'a --config override names no field of the config ({error})'
