"""The pieces behind fault handling, tested fast and in-process (test_faults.py runs
the commands): signal handling, file checks, grey masks, checksums, run_all's failures."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from data_fixtures import make_mvtec_tree, write_image

from msrd_jax import checkpoint, cli, interrupts, run_all, train
from msrd_jax import config as config_lib
from msrd_jax.data import DataError, check_files, list_mvtec, load_mask


def test_a_signal_inside_polling_only_sets_the_flag():
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  with interrupts.polling():
    assert interrupts.received() is None
    os.kill(os.getpid(), signal.SIGTERM)
    assert interrupts.received() == signal.SIGTERM  # no exception: the loop decides
  assert interrupts.received() is None
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_signal_outside_polling_interrupts_with_its_exit_code():
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  interrupts.install()
  try:
    for signum, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
      with pytest.raises(interrupts.Interrupted) as caught:
        os.kill(os.getpid(), signum)
      assert caught.value.exit_code == code
      assert isinstance(caught.value, KeyboardInterrupt)  # `except Exception` lets it by
  finally:
    signal.signal(signal.SIGINT, before[0])
    signal.signal(signal.SIGTERM, before[1])


def test_check_files_finds_what_a_header_or_a_crc_shows(tmp_path):
  base = make_mvtec_tree(tmp_path, size=(16, 12))
  check_files(list_mvtec(tmp_path, 'widget', 'test'), num_threads=2)
  flipped = os.path.join(base, 'test', 'crack', '001.png')
  with open(flipped, 'r+b') as f:  # one flipped byte in the last chunk before IEND
    data = bytearray(f.read())
    data[-14] ^= 0xFF
    f.seek(0)
    f.write(data)
  cut = os.path.join(base, 'test', 'good', '000.png')
  with open(cut, 'r+b') as f:
    f.truncate(os.path.getsize(cut) - 20)
  small_mask = os.path.join(base, 'ground_truth', 'hole', '000_mask.png')
  write_image(small_mask, np.zeros((5, 5), np.uint8))
  samples = list_mvtec(tmp_path, 'widget', 'test')
  with pytest.raises(DataError) as caught:
    check_files(samples, num_threads=2)
  # The first problem in the split's order, and how many others there are.
  message = str(caught.value)
  assert message.startswith(f'cannot read image file {flipped}'), message
  assert message.endswith('(2 more file(s) of this split have problems too)'), message
  with pytest.raises(DataError, match=f'the mask {small_mask} is 5x5 .* is 16x12'):
    check_files([s for s in samples if s.defect_type == 'hole'])
  with pytest.raises(DataError, match=f'cannot read image file {cut}'):
    check_files([s for s in samples if s.image_path == cut])


def test_grey_masks_are_binarized_at_half_scale_with_one_warning_per_category(tmp_path, capsys):
  ramp = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (8, 1))  # 64 grey levels
  first = write_image(tmp_path / 'a' / 'ground_truth' / 'crack' / '000_mask.png', ramp)
  second = write_image(tmp_path / 'a' / 'ground_truth' / 'hole' / '000_mask.png', ramp)
  other = write_image(tmp_path / 'b' / 'ground_truth' / 'crack' / '000_mask.png', ramp)
  for path in (first, second, other):
    np.testing.assert_array_equal(load_mask(path), ramp > 127)
  warnings = [x for x in capsys.readouterr().err.splitlines() if x.startswith('warning:')]
  assert len(warnings) == 2  # categories a and b, once each
  assert first in warnings[0] and '64 grey levels' in warnings[0]
  assert 'binarized at > 127' in warnings[0] and '> 0 would mark 98.4 %' in warnings[0]
  # Label maps (VisA: small values per defect) and 0/255 masks are left to '> 0', silently.
  labels = np.zeros((8, 8), np.uint8)
  labels[1, 1], labels[2, 2], labels[3, 3] = 1, 2, 3
  np.testing.assert_array_equal(load_mask(write_image(tmp_path / 'l.png', labels)), labels > 0)
  assert capsys.readouterr().err == ''


def test_state_checksum_sees_one_flipped_bit_and_not_dict_order():
  a = {'w': np.arange(6, dtype=np.float32).reshape(2, 3), 'b': {'x': np.ones(3, np.int32)}}
  b = {'b': {'x': np.ones(3, np.int32)}, 'w': np.arange(6, dtype=np.float32).reshape(2, 3)}
  assert checkpoint.tree_sha256(a) == checkpoint.tree_sha256(b)
  flipped = a['w'].copy()
  flipped.view(np.uint32)[1, 2] ^= 1
  assert checkpoint.tree_sha256({**a, 'w': flipped}) != checkpoint.tree_sha256(a)
  # Same bytes, another shape or dtype: another checksum.
  assert checkpoint.tree_sha256({**a, 'w': a['w'].reshape(3, 2)}) != checkpoint.tree_sha256(a)


def test_run_all_goes_on_after_a_failed_category_and_lists_it(tmp_path, monkeypatch, capsys):
  def fake(config, workdir, evaluate_after=None):
    if config.data.category == 'bad':
      raise DataError('the defective test image x.png has no mask')
    return {config.data.category: {'image_auroc': 0.5}}

  monkeypatch.setattr(train, 'train_and_evaluate', fake)
  config = config_lib.base_config()
  with pytest.raises(run_all.CategoriesFailed) as caught:
    run_all.run_all(config, str(tmp_path), ['bad', 'good'])
  assert caught.value.failures == {'bad': 'the defective test image x.png has no mask'}
  assert list(caught.value.results) == ['good']
  assert str(caught.value).startswith('1 of 2 categories failed: bad: the defective')
  assert '[1/2] bad: FAILED: the defective test image x.png' in capsys.readouterr().err
  assert (tmp_path / 'results.md').read_text().count('| good |') == 1


def test_run_all_with_every_category_failed_points_to_no_other_results(tmp_path, monkeypatch):
  def fake(config, workdir, evaluate_after=None):
    raise DataError(f'{config.data.root!r} is not a folder.')

  monkeypatch.setattr(train, 'train_and_evaluate', fake)
  with pytest.raises(run_all.CategoriesFailed) as caught:
    run_all.run_all(config_lib.base_config(), str(tmp_path), ['only'])
  message = str(caught.value)
  assert message.startswith('1 of 1 categories failed: only:'), message
  assert '..' not in message and 'the others' not in message, message


@pytest.mark.parametrize(
  'override, expected',
  [
    ('--config.model.memory.slot=3', 'did you mean model.memory.slots?'),
    ('--config.modl.backbone=resnet18', "no field 'modl'; did you mean model?"),
    ('--config.model.nonexistnt=1', "no field 'model.nonexistnt' (fields of model: backbone,"),
  ],
)
def test_an_unknown_config_field_is_named_with_the_closest_ones(override, expected):
  message = cli._unknown_field_message(['train', '--config=c.py', override], KeyError('x'))
  assert expected in message and '\n' not in message, message
