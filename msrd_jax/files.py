"""Writing files so that a crash never leaves half of one behind."""

from __future__ import annotations

import json
import os
from typing import Any


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


def write_json(path: str, payload: Any) -> None:
  """`payload` as indented JSON with sorted keys, written atomically."""
  atomic_write(path, json.dumps(payload, indent=2, sort_keys=True) + '\n')
