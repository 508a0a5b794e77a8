"""The config of a trained run, read back from its directory.

Commands that use a trained run (predict, calibrate, export) need no --config: the run
directory holds the resolved config of its training, DIR/config.json. It is laid over
`base_config()` (so that fields added since the run was trained take their defaults),
then the command line's overrides (`--config.eval.batch_size=4`) are applied. An
override of a field the checkpoint depends on (checkpoint.IDENTITY_FIELDS) is refused
when the run is loaded, as training refuses it.

This file is also the default of those commands' --config flag: `get_config()` types
the overrides, and the values come from config.json (see `load`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import flax
import ml_collections
from absl import logging

from msrd_jax import config as config_lib
from msrd_jax.errors import UserError

CONFIG_FILE = 'config.json'


class NotARunDirectory(UserError):
  """A --workdir without the config.json that training writes."""


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """base_config(): the types of the fields that --config.a.b=value may override."""
  del arg
  return config_lib.base_config()


def load(workdir: str, overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """The run's config: base_config() <- DIR/config.json <- overrides.

  Args:
    workdir: a run directory written by `python -m msrd_jax.train`.
    overrides: flattened 'a.b' -> value, applied last (the command line's).

  Raises:
    NotARunDirectory: no DIR/config.json (nothing was trained there), or it is not JSON.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    what = 'does not exist' if not os.path.isdir(workdir) else f'has no {CONFIG_FILE}'
    raise NotARunDirectory(
      f'{workdir!r} {what}: it is not a trained run. Train first with '
      f'`python -m msrd_jax.train --config ... --workdir {workdir}`, or pass --config.'
    )
  try:
    with open(path) as f:
      stored = json.load(f)
  except (OSError, ValueError) as e:
    raise NotARunDirectory(f'cannot read {path}: {type(e).__name__}: {e}') from None
  config = config_lib.base_config()
  flat = flax.traverse_util.flatten_dict(stored, sep='.')
  known = {k: v for k, v in flat.items() if _has_field(config, k)}
  unknown = sorted(set(flat) - set(known))
  if unknown:
    # A run of another version of the code; a field that shapes the model is still
    # caught by the checkpoint's identity check.
    logging.warning('%s: fields unknown to this version, ignored: %s', path, ', '.join(unknown))
  config.update_from_flattened_dict(known)
  if overrides:
    config.update_from_flattened_dict(dict(overrides))
  return config


def _has_field(config: ml_collections.ConfigDict, dotted: str) -> bool:
  node = config
  for part in dotted.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return not isinstance(node, ml_collections.ConfigDict)
