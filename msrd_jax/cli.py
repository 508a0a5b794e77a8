"""Command-line plumbing shared by the commands: flags and clean errors.

Every command takes `--config path/to/config.py[:arg]` (any field overridable as
`--config.a.b=value`) and `--workdir DIR`. Commands that use a trained run (predict,
calibrate, export) make --config optional: without it the config is the run's own
DIR/config.json, overrides still applied (see msrd_jax.run_config). Errors a user can
cause (bad data, missing weights, a mismatched checkpoint, a diverged run, an invalid
field) end the command with one line on stderr and exit status 2 instead of a stack
trace.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

import jax
from absl import flags, logging
from ml_collections import config_flags

from msrd_jax import config as config_lib
from msrd_jax import run_config
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


def _raise_keyboard_interrupt(signum, frame):
  raise KeyboardInterrupt(f'signal {signum}')


def run(argv, fn: Callable) -> None:
  """Calls fn(config, workdir) and turns user errors into one line and exit code 2."""
  if len(argv) > 1:
    raise SystemExit(f'unexpected arguments: {" ".join(argv[1:])}')
  if not FLAGS['verbosity'].present:
    # Orbax reports every file it writes at INFO; keep the progress bar readable.
    logging.set_verbosity(logging.WARNING)
  enable_compilation_cache()
  # A scheduler's SIGTERM gets the same treatment as Ctrl-C: training saves its step.
  signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
  exit_on_user_error(lambda: fn(resolve_config(FLAGS.workdir), FLAGS.workdir))


def exit_on_user_error(fn: Callable, *args):
  """fn(*args); an error the user caused ends the process with one line and status 2."""
  try:
    return fn(*args)
  except USER_ERRORS as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
