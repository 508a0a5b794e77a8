"""The one base class of errors a user can cause and fix without reading a traceback.

Bad data, a bad config field, missing or mismatched weights, a checkpoint of another
run, a diverged run: each subclass carries a message that names the file or field and
what was expected. The command line (msrd_jax.cli) prints that message on one line and
exits with status 2.
"""

from __future__ import annotations


class UserError(ValueError):
  """An error in what the user gave: data, config, weights, work directory."""
