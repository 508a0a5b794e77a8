"""A trained run as one self-contained file that needs only JAX to run.

    python -m msrd_jax.export --workdir runs/widget --output widget.npz

The whole inference function (ImageNet normalization, teacher, student, anomaly map,
blur and image score) is serialized with `jax.export` (StableHLO) for a batch of any
size; its weights travel beside it as arrays, and the input size, thresholds and colour
scale of the run's calibration (msrd_jax.calibrate) as a JSON header. The file is an
uncompressed NumPy .npz archive:

  header       uint8, the UTF-8 JSON header (see `header`)
  function     uint8, `jax.export.Exported.serialize()` of
               (params, images (B, S, S, 3) float32 RGB in [0, 1]) -> (maps (B, R, R), scores (B,))
  param_<i>    the i-th weight array, i < header['num_params'], in the order `params` takes

Loading it needs `jax`, `numpy` and `flatbuffers` only (README, "Export"):

    with np.load(path) as z:
      header = json.loads(z['header'].tobytes())
      exported = jax.export.deserialize(bytearray(z['function'].tobytes()))
      params = [z[f'param_{i}'] for i in range(header['num_params'])]
    maps, scores = exported.call(params, images)

It is lowered for the platforms given (default CPU, CUDA and TPU) and runs with the same
or a newer jax, within jax.export's compatibility window (about six months).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging

from msrd_jax import calibrate, cli, files, inference

FORMAT = 'msrd_jax.export/1'
DEFAULT_PLATFORMS = ('cpu', 'cuda', 'tpu')

FLAGS = flags.FLAGS


def export_function(run: inference.Run, platforms=DEFAULT_PLATFORMS):
  """(jax.export.Exported, params): the run's inference function with a symbolic batch.

  params: the flat list of weight arrays the function takes first.
  """
  predict = inference.make_predict_fn(run.model, run.config)
  leaves, treedef = jax.tree_util.tree_flatten((run.teacher_vars, run.student_vars))

  def fn(params, images):
    teacher_vars, student_vars = jax.tree_util.tree_unflatten(treedef, params)
    return predict(teacher_vars, student_vars, images)

  size = run.config.data.image_size
  (batch,) = jax.export.symbolic_shape('batch')
  exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(
    [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves],
    jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
  )
  return exported, [np.asarray(x) for x in jax.device_get(leaves)]


def header(run: inference.Run, record: dict, num_params: int, platforms) -> dict:
  """The JSON header: what the function takes and gives, and how to decide."""
  c = run.config
  return {
    'format': FORMAT,
    'image_size': int(c.data.image_size),
    'resolution': int(run.resolution),
    'input': 'images: float32 (batch, image_size, image_size, 3), RGB in [0, 1], '
    'resized to image_size x image_size (bilinear); ImageNet normalization is inside',
    'outputs': 'maps: float32 (batch, resolution, resolution); scores: float32 (batch,), '
    'the max of each map',
    'image_threshold': record['image_threshold'],
    'pixel_threshold': record['pixel_threshold'],
    'color_scale': record['color_scale'],
    'decision': 'anomalous when score > image_threshold; a defect pixel when map > '
    'pixel_threshold; normalized score = score / image_threshold',
    'calibration': {
      k: record[k]
      for k in ('source', 'images', 'false_alarm_rate', 'pixel_false_alarm_rate', 'limited')
    },
    'num_params': num_params,
    'platforms': list(platforms),
    'category': c.data.category,
    'backbone': c.model.backbone,
    'checkpoint_step': int(run.meta['data_step']),
    'map_settings': calibrate.map_settings(c),
    'jax_version': jax.__version__,
  }


def export_run(
  config: ml_collections.ConfigDict,
  workdir: str,
  output: str,
  platforms=DEFAULT_PLATFORMS,
) -> dict:
  """Writes the run's exported model to `output` (atomically); returns its header."""
  inference.require_checkpoint(workdir)
  record = calibrate.load(workdir, config)
  run = inference.load_run(config, workdir)
  stale = calibrate.stale_warning(record, run)
  if stale:
    logging.warning('%s', stale)
  exported, params = export_function(run, platforms)
  head = header(run, record, len(params), platforms)
  arrays = {
    'header': np.frombuffer(json.dumps(head, indent=2).encode(), np.uint8),
    'function': np.frombuffer(bytes(exported.serialize()), np.uint8),
    **{f'param_{i}': p for i, p in enumerate(params)},
  }
  with files.atomic_file(output) as f:  # a file object: np.savez adds no '.npz'
    np.savez(f, **arrays)
  return head


def main(argv) -> None:
  def run(config, workdir):
    platforms = tuple(p for p in FLAGS.platforms.split(',') if p)
    head = export_run(config, workdir, FLAGS.output, platforms)
    size = os.path.getsize(FLAGS.output) / 2**20
    print(
      f'{FLAGS.output}: {size:.1f} MiB, input (batch, {head["image_size"]}, '
      f'{head["image_size"]}, 3), platforms {",".join(platforms)}'
    )

  cli.run(argv, run)


if __name__ == '__main__':
  cli.define_flags('Directory of the trained run.', config_required=False)
  flags.DEFINE_string('output', None, 'The file to write (.npz).')
  flags.DEFINE_string('platforms', ','.join(DEFAULT_PLATFORMS), 'Comma-separated platforms.')
  flags.mark_flags_as_required(['output'])
  app.run(main)
