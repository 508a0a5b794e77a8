"""Where training and evaluation figures go: metrics.jsonl and TensorBoard event files.

    DIR/metrics.jsonl     one JSON object per logged step ({"step": ..., "loss": ...})
    DIR/tensorboard/      event files (`tensorboard --logdir DIR/tensorboard`)

tensorboardX writes the event files without TensorFlow. Only process 0 writes (the
others get a writer that does nothing), so that a multi-process run logs once.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping

from msrd_jax import files


def _summary_writer_class():
  """tensorboardX.SummaryWriter, imported on first use and without PyTorch.

  tensorboardX imports torch when it is installed (only to accept its tensors, which
  this project never passes), which costs seconds per process on a machine that has
  PyTorch beside JAX. Unless torch is already loaded, it is hidden for that import.
  """
  if 'tensorboardX' in sys.modules or 'torch' in sys.modules:
    import tensorboardX
  else:
    sys.modules['torch'] = None  # makes `import torch` raise ImportError
    try:
      import tensorboardX
    finally:
      del sys.modules['torch']
  return tensorboardX.SummaryWriter


class MetricWriter:
  """Appends records to metrics.jsonl and scalars to TensorBoard under `workdir`."""

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None):
    """Args:
    workdir: the run directory.
    enabled: False on every process but the first: nothing is written.
    resume_step: the step a resumed run restarts from; rows of metrics.jsonl after
      it (logged before an interruption, then lost with the unsaved steps) are
      dropped, so that every step appears once.
    """
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if not enabled:
      return
    if resume_step is not None and os.path.isfile(self.path):
      _truncate_after(self.path, resume_step)
    self._tb = _summary_writer_class()(os.path.join(workdir, 'tensorboard'), flush_secs=30)

  def write(self, step: int, scalars: Mapping[str, float], prefix: str = 'train') -> None:
    """One record: a metrics.jsonl line and a TensorBoard scalar per value."""
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': int(step), **{k: float(v) for k, v in scalars.items()}}) + '\n')
    self.add_scalars(step, scalars, prefix)

  def add_scalars(self, step: int, scalars: Mapping[str, float], prefix: str) -> None:
    """TensorBoard only: one scalar per value, tagged '<prefix>/<name>'."""
    if not self.enabled:
      return
    for name, value in scalars.items():
      self._tb.add_scalar(f'{prefix}/{name}', float(value), int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _truncate_after(path: str, step: int) -> None:
  with open(path) as f:
    lines = f.read().splitlines()
  kept = []
  for line in lines:
    try:
      if json.loads(line)['step'] <= step:
        kept.append(line)
    except (ValueError, KeyError, TypeError):  # a line cut short by a crash
      continue
  if len(kept) != len(lines):
    files.atomic_write(path, ''.join(f'{line}\n' for line in kept))
