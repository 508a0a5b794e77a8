"""Writing files so that a crash never leaves half of one behind."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import IO, Any


def atomic_write(path: str, data: str | bytes) -> None:
  """Writes `data` to `path` through a temporary file renamed into place.

  Readers see the old file or the new one, never a partial write; missing parent
  folders are created.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp'
  with open(tmp, 'wb' if isinstance(data, bytes) else 'w') as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[IO[bytes]]:
  """A binary file object whose content replaces `path` when the block ends without error.

  For writers that stream (np.savez of a large archive) rather than hand over bytes.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp'
  try:
    with open(tmp, 'wb') as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  os.replace(tmp, path)


def write_json(path: str, payload: Any) -> None:
  """`payload` as indented JSON with sorted keys, written atomically."""
  atomic_write(path, json.dumps(payload, indent=2, sort_keys=True) + '\n')
