"""metrics.jsonl and the TensorBoard event files, read back as their readers would."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

from conftest import ROOT

from msrd_jax import metric_writers


def _events(directory: str) -> list:
  """Every Event record of the directory's event files (TFRecord framing, unchecked CRCs)."""
  from tensorboardX.proto import event_pb2

  events = []
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), 'rb') as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos : pos + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[pos + 12 : pos + 12 + length])
      events.append(event)
      pos += 12 + length + 4
  return events


def test_records_reach_the_jsonl_and_tensorboard(tmp_path):
  with metric_writers.MetricWriter(str(tmp_path)) as w:
    w.write(1, {'loss': 0.5})
    w.write(2, {'loss': 0.25, 'grad_norm': 3.0})
    w.add_scalars(2, {'image_auroc': 0.75}, 'eval')
  with open(tmp_path / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  assert rows == [{'step': 1, 'loss': 0.5}, {'step': 2, 'loss': 0.25, 'grad_norm': 3.0}]
  scalars = {
    (e.step, v.tag): v.simple_value
    for e in _events(str(tmp_path / 'tensorboard'))
    for v in e.summary.value
  }
  assert scalars == {
    (1, 'train/loss'): 0.5,
    (2, 'train/loss'): 0.25,
    (2, 'train/grad_norm'): 3.0,
    (2, 'eval/image_auroc'): 0.75,
  }


def test_a_resumed_run_drops_the_rows_after_its_checkpoint_and_a_torn_line(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text(
    ''.join(json.dumps({'step': s, 'loss': 1.0}) + '\n' for s in range(1, 6)) + '{"st'
  )
  metric_writers.MetricWriter(str(tmp_path), resume_step=3).close()
  assert [json.loads(line)['step'] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_a_disabled_writer_writes_nothing(tmp_path):
  with metric_writers.MetricWriter(str(tmp_path), enabled=False) as w:
    w.write(1, {'loss': 0.5})
  assert os.listdir(tmp_path) == []


def test_writing_does_not_import_pytorch(tmp_path):
  """tensorboardX would import torch where it is installed: seconds per training process."""
  code = (
    'import sys\n'
    'from msrd_jax import metric_writers\n'
    f'w = metric_writers.MetricWriter({str(tmp_path)!r}); w.write(1, {{"loss": 1.0}}); w.close()\n'
    'print("torch" in sys.modules)\n'
  )
  out = subprocess.run(
    [sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, check=True
  )
  assert out.stdout.strip() == 'False', out.stderr
