"""The exported model: same maps and scores as the Python model, loadable with jax alone."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from msrd_jax import data as data_lib
from msrd_jax import export, inference

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md')


def readme_snippet() -> str:
  """The README's loading snippet, the Python block after the export-snippet marker."""
  with open(README) as f:
    text = f.read()
  match = re.search(r'<!-- export-snippet.*?-->\n```python\n(.*?)```', text, re.S)
  assert match, 'README.md has lost its export snippet'
  return match.group(1)


@pytest.fixture(scope='module')
def exported(calibrated_run, tmp_path_factory):
  config, workdir, _, record = calibrated_run
  path = str(tmp_path_factory.mktemp('export') / 'brick.npz')
  header = export.export_run(config, workdir, path)
  return config, workdir, record, path, header


@pytest.fixture(scope='module')
def reference(calibrated_run):
  """(images (7, S, S, 3), maps, scores) of the Python model: 5 defective test images,
  then the README snippet's 2 random images."""
  config, workdir, _, _ = calibrated_run
  folder = os.path.join(config.data.root, config.data.category, 'test', 'color')
  size = config.data.image_size
  images = np.concatenate(
    [
      np.stack(
        [
          data_lib.resize_image(data_lib.load_image(os.path.join(folder, f)), size)
          for f in sorted(os.listdir(folder))[:5]
        ]
      ),
      np.random.default_rng(0).random((2, size, size, 3), np.float32),  # as the snippet
    ]
  )
  run = inference.load_run(config, workdir)
  predict = inference.make_predict_fn(run.model, config)
  maps, scores = jax.device_get(predict(run.teacher_vars, run.student_vars, images))
  return images, maps, scores


@pytest.mark.slow
def test_exported_function_equals_the_python_model(exported, reference):
  _, _, record, path, header = exported
  images, want_maps, want_scores = reference
  assert header['image_size'] == 96 and header['resolution'] == 96
  assert header['image_threshold'] == record['image_threshold']
  assert header['pixel_threshold'] == record['pixel_threshold']
  assert header['color_scale'] == record['color_scale']
  assert set(header['platforms']) == {'cpu', 'cuda', 'tpu'}
  with np.load(path) as z:
    assert json.loads(z['header'].tobytes()) == header
    function = jax.export.deserialize(bytearray(z['function'].tobytes()))
    params = [z[f'param_{i}'] for i in range(header['num_params'])]
  assert str(function.in_avals[-1].shape[0]) == 'batch'  # symbolic
  call = jax.jit(function.call)
  for n in (1, 7):
    maps, scores = jax.device_get(call(params, images[:n]))
    assert maps.shape == (n, 96, 96) and scores.shape == (n,)
    np.testing.assert_allclose(maps, want_maps[:n], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores, want_scores[:n], rtol=1e-5)


@pytest.mark.slow
def test_the_readme_snippet_runs_without_this_package(exported, reference, tmp_path):
  _, _, record, path, _ = exported
  images, maps, scores = reference
  out = tmp_path / 'out.npz'
  code = readme_snippet().replace("'widget.npz'", repr(path)) + (
    '\nimport sys\n'
    "assert 'msrd_jax' not in sys.modules, 'the snippet imported msrd_jax'\n"
    f'np.savez({str(out)!r}, images=images, maps=maps, scores=scores, anomalous=anomalous)\n'
  )
  # Outside the repository, with nothing of it on the path.
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  result = subprocess.run(
    [sys.executable, '-c', code],
    cwd=str(tmp_path),
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(out) as got:
    np.testing.assert_array_equal(got['images'], images[5:])
    np.testing.assert_allclose(got['maps'], maps[5:], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got['scores'], scores[5:], rtol=1e-5)
    np.testing.assert_array_equal(got['anomalous'], got['scores'] > record['image_threshold'])
