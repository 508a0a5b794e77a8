"""The one exception type of the data package."""

from __future__ import annotations

from msrd_jax.errors import UserError


class DataError(UserError):
  """A data set, file or data argument is not what the data package expects.

  The message names the file or folder concerned and what was expected, so
  that a user can fix the data without reading a stack trace.
  """
