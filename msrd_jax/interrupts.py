"""Ctrl-C and SIGTERM: noted when they arrive, acted on where stopping is safe.

Python's default Ctrl-C raises KeyboardInterrupt wherever the main thread happens to
be: between a step's dispatch and the check of its figures, inside a checkpoint being
written, while XLA still computes on its own threads. A run stopped there cannot tell
which state it holds, so it cannot save it. Here the handler raises only where nothing
is at stake; inside `polling()` (the training loop) it just records the signal, and
the loop asks `received()` between steps, finishes and saves the step it reached, then
raises `Interrupted`. msrd_jax.cli prints one line for it and exits with 128 + the
signal number (130 for SIGINT, 143 for SIGTERM), as a shell reports a process ended
by that signal.

A second signal while the first is being handled (a save can take a while) ends the
process at once without saving: Orbax never publishes a half-written step, so the
previous checkpoint stays the latest.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
  """The command was stopped by SIGINT or SIGTERM.

  A KeyboardInterrupt, so that `except Exception` clauses let it through as they let
  Ctrl-C through. `detail` says what was kept (e.g. 'saved step 40 in DIR').
  """

  def __init__(self, signum: int, detail: str = ''):
    super().__init__(signum, detail)
    self.signum = int(signum)
    self.detail = detail

  @property
  def exit_code(self) -> int:
    return 128 + self.signum

  def __str__(self) -> str:
    return self.detail or f'{signal_name(self.signum)} received; no training step was running'


def signal_name(signum: int) -> str:
  return signal.Signals(signum).name


_received: int | None = None
_polling = 0


def _handler(signum: int, frame) -> None:
  global _received
  if not _polling:
    raise Interrupted(signum)
  if _received is None:
    _received = signum
    again = 'Ctrl-C' if signum == signal.SIGINT else signal_name(signum)
    print(
      f'\n{signal_name(signum)} received: finishing the current step and saving it '
      f'({again} again stops at once, without saving)',
      file=sys.stderr,
      flush=True,
    )
    return
  print(
    f'\n{signal_name(signum)} received again: stopping without saving; the last '
    'completed checkpoint is kept',
    file=sys.stderr,
    flush=True,
  )
  os._exit(128 + signum)  # no cleanup may run: it could wait on what is being stopped


def install() -> None:
  """Routes SIGINT and SIGTERM to this module (main thread only; else a no-op)."""
  if threading.current_thread() is not threading.main_thread():
    return
  for s in SIGNALS:
    signal.signal(s, _handler)


def received() -> int | None:
  """The signal received inside `polling()`, if any."""
  return _received


@contextlib.contextmanager
def polling() -> Iterator[None]:
  """A section that checks `received()` itself instead of being interrupted.

  Installs the handler for the section if the caller has not (a run started from
  Python rather than from the command line), and restores the previous handlers
  after it. Outside the main thread signals cannot be handled; the section then only
  polls a flag that never gets set.
  """
  global _polling, _received
  main = threading.current_thread() is threading.main_thread()
  previous = {s: signal.getsignal(s) for s in SIGNALS} if main else {}
  if main and _polling == 0:
    _received = None
    for s in SIGNALS:
      signal.signal(s, _handler)
  _polling += 1
  try:
    yield
  finally:
    _polling -= 1
    if _polling == 0:
      _received = None
    for s, h in previous.items():
      signal.signal(s, h)
