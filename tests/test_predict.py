"""Prediction on new images: from the run directory, decisions, bad files, fixed colours."""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest
from conftest import cli as _cli
from PIL import Image

from msrd_jax import config as config_lib
from msrd_jax import data as data_lib
from msrd_jax import predict, run_config, visualize
from msrd_jax.data import scan


def _mixed_folder(root: str, good: str, test: str) -> tuple[str, list[str]]:
  """8 good + 4 defective images (one sub-folder), a truncated PNG, a text file named
  .png and a notes.txt; returns (folder, the defective files' relative paths)."""
  os.makedirs(os.path.join(root, 'line2'))
  for name in sorted(os.listdir(good)):
    shutil.copy(os.path.join(good, name), os.path.join(root, name))
  defective = []
  for name in sorted(os.listdir(os.path.join(test, 'color')))[:4]:
    defective.append(f'line2/color_{name}')
    shutil.copy(os.path.join(test, 'color', name), os.path.join(root, defective[-1]))
  with open(os.path.join(test, 'good', '000.png'), 'rb') as f:
    data = f.read()
  with open(os.path.join(root, 'truncated.png'), 'wb') as f:
    f.write(data[: len(data) // 3])
  with open(os.path.join(root, 'line2', 'readme.png'), 'w') as f:
    f.write('not an image')
  with open(os.path.join(root, 'notes.txt'), 'w') as f:
    f.write('not an image either')
  return root, defective


def test_predict_command_on_good_defective_corrupt_and_other_files(calibrated_run, tmp_path):
  config, workdir, good, record = calibrated_run
  test = os.path.join(config.data.root, config.data.category, 'test')
  folder, defective = _mixed_folder(str(tmp_path / 'photos'), good, test)
  out = tmp_path / 'out'
  # As a user runs it: no --config (the run's config.json), an eval override.
  result = _cli(
    'msrd_jax.predict',
    '--workdir',
    workdir,
    '--input',
    folder,
    '--output',
    str(out),
    '--save_masks',
    '--save_maps',
    '--config.eval.batch_size=4',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert '2 files could not be read' in result.stderr and 'Traceback' not in result.stderr

  with open(out / 'predictions.csv') as f:
    rows = {r['file']: r for r in csv.DictReader(f)}
  goods = sorted(os.listdir(good))
  assert sorted(rows) == sorted(goods + defective + ['truncated.png', 'line2/readme.png'])
  for name in ('truncated.png', 'line2/readme.png'):
    assert rows[name]['status'] == 'error' and name in rows[name]['error']
  ok = {k: r for k, r in rows.items() if r['status'] == 'ok'}
  threshold = record['image_threshold']
  for r in ok.values():
    score = float(r['score'])
    assert float(r['normalized_score']) == pytest.approx(score / threshold, rel=1e-6)
    assert r['decision'] == ('anomalous' if score > threshold else 'normal')
  # The good images were the calibration images: the same scores through both paths.
  np.testing.assert_allclose(
    sorted(float(ok[g]['score']) for g in goods), record['image_scores'], rtol=2e-5
  )

  with open(out / 'summary.json') as f:
    summary = json.load(f)
  assert summary['images'] == 14 and summary['scored'] == 12
  assert summary['normal'] + summary['anomalous'] == 12
  assert summary['anomalous'] == sum(r['decision'] == 'anomalous' for r in ok.values())
  assert sorted(f['file'] for f in summary['failed']) == ['line2/readme.png', 'truncated.png']
  assert summary['skipped'] == ['notes.txt']
  assert summary['image_threshold'] == threshold
  assert summary['color_scale'] == record['color_scale']

  # Pictures: the heatmap is on the run's colour scale, whatever else is in the folder.
  name = defective[0]
  stem = os.path.splitext(name)[0]
  amap = np.load(out / 'maps' / f'{stem}.npy')
  assert amap.shape == (96, 96) and amap.dtype == np.float32
  assert float(amap.max()) == pytest.approx(float(ok[name]['score']), rel=1e-6)
  image = data_lib.resize_image(data_lib.load_image(os.path.join(folder, name)), 96)
  expected = visualize.heatmap_overlay(image, amap, *record['color_scale'])
  with Image.open(out / 'heatmaps' / f'{stem}.png') as im:
    assert np.abs(np.asarray(im).astype(int) - expected).max() <= 1
  with Image.open(out / 'masks' / f'{stem}.png') as im:
    np.testing.assert_array_equal(np.asarray(im) > 0, amap > record['pixel_threshold'])
  assert float(ok[name]['defect_fraction']) == pytest.approx(
    np.mean(amap > record['pixel_threshold'])
  )

  # One file as the input: the same score as within the folder.
  single = _cli(
    'msrd_jax.predict',
    '--workdir',
    workdir,
    '--input',
    os.path.join(folder, name),
    '--output',
    str(tmp_path / 'single'),
  )
  assert single.returncode == 0, single.stderr[-3000:]
  with open(tmp_path / 'single' / 'predictions.csv') as f:
    (row,) = list(csv.DictReader(f))
  assert row['file'] == os.path.basename(name) and row['status'] == 'ok'
  assert float(row['score']) == pytest.approx(float(ok[name]['score']), rel=1e-5)


def test_predict_stops_at_once_with_one_clear_line(calibrated_run, tmp_path):
  _, workdir, good, _ = calibrated_run
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'notes.txt').write_text('no image here')
  untrained = tmp_path / 'untrained'
  untrained.mkdir()
  shutil.copy(os.path.join(workdir, 'config.json'), untrained / 'config.json')
  cases = [
    (workdir, str(empty), 'no images'),
    (str(tmp_path / 'nothing'), good, 'not a trained run'),
    (str(untrained), good, 'no checkpoint'),
  ]
  for run_dir, inputs, message in cases:
    out = _cli(
      'msrd_jax.predict', '--workdir', run_dir, '--input', inputs, '--output', str(tmp_path / 'o')
    )
    assert out.returncode == 2 and message in out.stderr, (message, out.stderr[-2000:])
    assert 'Traceback' not in out.stderr
  # An override that would change the model is refused, as training refuses it.
  out = _cli(
    'msrd_jax.predict',
    '--workdir',
    workdir,
    '--input',
    good,
    '--output',
    str(tmp_path / 'o'),
    '--config.model.memory.mode=off',
  )
  assert out.returncode == 2 and 'model.memory.mode' in out.stderr, out.stderr[-2000:]


def test_the_run_config_is_read_back_with_overrides(tmp_path):
  config = config_lib.base_config()
  config.model.backbone = 'resnet18'
  config.model.coord_attention = ('fusion',)
  config.model.teacher_weights = 'teachers/r18.msgpack'
  config.data.image_size = 64
  (tmp_path / 'config.json').write_text(config.to_json_best_effort(indent=2))
  loaded = run_config.load(str(tmp_path), {'eval.batch_size': 3})
  assert loaded.model.backbone == 'resnet18' and loaded.data.image_size == 64
  assert loaded.model.coord_attention == ('fusion',)  # a tuple again, not a list
  assert loaded.model.teacher_weights == 'teachers/r18.msgpack'
  assert loaded.eval.batch_size == 3 and loaded.model.memory.shrink is None
  config_lib.validate(loaded)
  with pytest.raises(run_config.NotARunDirectory, match='not a trained run'):
    run_config.load(str(tmp_path / 'elsewhere'))


def test_a_bad_file_is_recorded_and_the_others_load(tmp_path):
  good = tmp_path / 'a.png'
  Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(good)
  bad = tmp_path / 'b.png'
  bad.write_bytes(good.read_bytes()[:50])
  samples = [data_lib.Sample(str(p), None, 0, 'x', p.name) for p in (bad, good, bad)]
  loader = data_lib.EvalLoader(samples, 32, 2, num_threads=2, on_error='record')
  batches = list(loader)
  assert [b['error'][i] is None for b in batches for i in range(2)] == [
    False,
    True,
    False,
    True,  # padding
  ]
  assert 'b.png' in batches[0]['error'][0] and not batches[0]['image'][0].any()
  np.testing.assert_allclose(batches[0]['image'][1], 200 / 255, rtol=1e-6)
  with pytest.raises(data_lib.DataError, match='b.png'):
    list(data_lib.EvalLoader(samples, 32, 2, num_threads=2))


def test_output_names_keep_sub_folders_and_never_collide(tmp_path):
  for rel in ('a.png', 'a.jpg', 'b.png', 'sub/a.png', 'out/x.png', 'notes.txt', '.hidden.png'):
    path = tmp_path / rel
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b'')
  found = scan.find_images(str(tmp_path), exclude=[str(tmp_path / 'out')])
  stems = predict.output_stems(found)
  by_rel = {os.path.relpath(p, tmp_path): s for p, s in stems.items()}
  assert by_rel == {'a.png': 'a.png', 'a.jpg': 'a.jpg', 'b.png': 'b', 'sub/a.png': 'sub/a'}
  assert [os.path.relpath(p, tmp_path) for p in found.skipped] == ['notes.txt']
