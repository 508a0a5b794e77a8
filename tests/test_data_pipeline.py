"""The training stream, the evaluation batches and device sharding."""

from __future__ import annotations

import itertools
import os
import threading
import time

import numpy as np
import pytest
from data_fixtures import make_mvtec_tree, write_image

from msrd_jax.data import DataError, EvalLoader, TrainLoader, list_mvtec, resize_mask, shard_batch

N = 10


@pytest.fixture
def train_samples(tmp_path):
  make_mvtec_tree(tmp_path, 'w', n_train=N)
  return list_mvtec(tmp_path, 'w', 'train')


def _rows(batch):
  """Sample indices of a batch's rows (train image i has value i/255)."""
  img = batch['image']
  values = np.round(img * 255).astype(int)
  assert (values == values[:, :1, :1, :1]).all()  # constant images stay so
  return values[:, 0, 0, 0].tolist()


def _expected_stream(seed, n, length):
  perms = (np.random.default_rng([seed, e]).permutation(n) for e in itertools.count())
  return list(itertools.islice(itertools.chain.from_iterable(perms), length))


def _take(loader, steps, start=0):
  with loader.iterate(start) as it:
    return [next(it) for _ in range(steps)]


def _data_threads():
  return [t for t in threading.enumerate() if t.name.startswith('msrd_data')]


def _wait_no_threads(timeout=5.0):
  deadline = time.time() + timeout
  while _data_threads() and time.time() < deadline:
    time.sleep(0.01)
  return not _data_threads()


def test_stream_order_and_shapes(train_samples):
  loader = TrainLoader(
    train_samples, image_size=8, global_batch_size=4, seed=3, num_threads=2, prefetch=2
  )
  assert loader.num_samples == N and loader.steps_per_epoch == 3  # ceil(10/4)
  batches = _take(loader, 7)
  for k, b in enumerate(batches):
    assert b['step'] == k
    assert b['image'].shape == (4, 8, 8, 3) and b['image'].dtype == np.float32
    assert 0 <= b['image'].min() and b['image'].max() <= 1
  got = sum((_rows(b) for b in batches), [])
  # Batches run across epoch boundaries: nothing dropped, nothing partial.
  assert got == _expected_stream(3, N, 28)
  assert loader.batch_indices(5).tolist() == got[20:24]


def test_different_seed_different_order(train_samples):
  a = _take(TrainLoader(train_samples, 8, 5, seed=0, num_threads=1), 2)
  b = _take(TrainLoader(train_samples, 8, 5, seed=1, num_threads=1), 2)
  assert sum(map(_rows, a), []) != sum(map(_rows, b), [])
  assert sorted(sum(map(_rows, a), [])) == list(range(N))


def test_resume_is_exact(train_samples):
  loader = TrainLoader(train_samples, 8, 4, seed=0, num_threads=2)
  full = _take(loader, 9)
  tail = _take(loader, 4, start=5)
  for a, b in zip(full[5:], tail):
    assert a['step'] == b['step']
    np.testing.assert_array_equal(a['image'], b['image'])


@pytest.mark.parametrize('process_count,devices', [(2, 1), (2, 2), (4, 1)])
def test_process_slices_make_the_global_batch(train_samples, process_count, devices):
  b = 8
  whole = _take(TrainLoader(train_samples, 8, b, seed=5, num_threads=2), 4)
  parts = [
    _take(
      TrainLoader(
        train_samples,
        8,
        b,
        seed=5,
        num_local_devices=devices,
        process_index=p,
        process_count=process_count,
        num_threads=2,
      ),
      4,
    )
    for p in range(process_count)
  ]
  for k in range(4):
    local = [parts[p][k]['image'] for p in range(process_count)]
    assert all(x.shape[0] == b // process_count for x in local)
    np.testing.assert_array_equal(np.concatenate(local), whole[k]['image'])
    for x in local:
      assert shard_batch(x, devices).shape == (devices, b // process_count // devices, 8, 8, 3)


def test_batch_divisibility_error(train_samples):
  with pytest.raises(DataError, match='global batch size 6 .* 2 \\* 2 = 4'):
    TrainLoader(train_samples, 8, 6, seed=0, num_local_devices=2, process_count=2)
  with pytest.raises(DataError, match='process_index 2'):
    TrainLoader(train_samples, 8, 4, seed=0, process_index=2, process_count=2)
  with pytest.raises(DataError, match='no training samples'):
    TrainLoader([], 8, 4, seed=0)


def test_cache_serves_images_after_files_vanish(tmp_path, train_samples):
  cached = TrainLoader(train_samples, 8, 5, seed=0, num_threads=2)
  uncached = TrainLoader(train_samples, 8, 5, seed=0, num_threads=2, cache_bytes=0)
  first = _take(cached, 2)  # one epoch: everything decoded once
  np.testing.assert_array_equal(first[1]['image'], _take(uncached, 2)[1]['image'])
  for s in train_samples:
    os.remove(s.image_path)
  again = _take(cached, 4)
  np.testing.assert_array_equal(again[0]['image'], first[0]['image'])
  with pytest.raises(DataError, match=r'train.good.0\d\d\.png does not exist'):
    _take(uncached, 1)
  assert _wait_no_threads()


def test_partial_cache_is_exact(train_samples):
  one_image = 8 * 8 * 3 * 4
  full = _take(TrainLoader(train_samples, 8, 4, seed=2, num_threads=3), 6)
  part = _take(
    TrainLoader(train_samples, 8, 4, seed=2, num_threads=3, cache_bytes=3 * one_image), 6
  )
  for a, b in zip(full, part):
    np.testing.assert_array_equal(a['image'], b['image'])


def test_batches_are_not_aliased(train_samples):
  loader = TrainLoader(train_samples, 8, 10, seed=0, num_threads=2)
  a, b = _take(loader, 2)
  before = b['image'].copy()
  a['image'][:] = -1  # a consumer scribbling on its batch
  np.testing.assert_array_equal(b['image'], before)
  np.testing.assert_array_equal(_take(loader, 2)[1]['image'], before)


def test_worker_error_reaches_consumer_with_file(tmp_path, train_samples):
  bad = train_samples[3].image_path
  with open(bad, 'wb') as f:
    f.write(b'garbage')
  loader = TrainLoader(train_samples, 8, 5, seed=0, num_threads=3)
  it = loader.iterate()
  with pytest.raises(DataError, match=r'cannot decode image file .*003\.png'):
    for _ in range(4):
      next(it)
  assert _wait_no_threads()
  with pytest.raises(StopIteration):
    next(it)  # closed after the error


def test_close_stops_threads(train_samples):
  loader = TrainLoader(train_samples, 8, 2, seed=0, num_threads=4, prefetch=3)
  it = loader.iterate()
  next(it)
  assert _data_threads()
  it.close()
  assert _wait_no_threads()
  with loader.iterate(7) as it2:
    assert next(it2)['step'] == 7
  assert _wait_no_threads()
  it3 = loader.iterate()
  next(it3)
  del it3  # garbage collection closes too
  assert _wait_no_threads()


def test_shard_batch():
  x = np.arange(24).reshape(6, 2, 2)
  s = shard_batch(x, 3)
  assert s.shape == (3, 2, 2, 2)
  np.testing.assert_array_equal(s.reshape(6, 2, 2), x)
  np.testing.assert_array_equal(s[1], x[2:4])
  with pytest.raises(DataError, match='6 rows .* 4 devices'):
    shard_batch(x, 4)


def _eval_tree(tmp_path):
  make_mvtec_tree(
    tmp_path, 'w', n_train=1, n_test_good=3, defects=(('crack', 2), ('hole', 2)), size=(12, 10)
  )
  return list_mvtec(tmp_path, 'w', 'test')


def test_eval_loader_order_padding_masks(tmp_path):
  samples = _eval_tree(tmp_path)  # 7 samples: crack x2, good x3, hole x2
  loader = EvalLoader(samples, image_size=8, batch_size=3, resolution=20, num_threads=2)
  assert len(loader) == 3 and loader.num_samples == 7
  batches = list(loader)
  assert len(batches) == 3
  for b in batches:
    assert b['image'].shape == (3, 8, 8, 3) and b['image'].dtype == np.float32
    assert b['mask'].shape == (3, 20, 20) and b['mask'].dtype == np.uint8
    assert b['label'].shape == (3,) and b['label'].dtype == np.int32
    assert b['valid'].dtype == np.bool_
    assert len(b['name']) == len(b['defect_type']) == 3
    assert set(np.unique(b['mask'])) <= {0, 1}
  names = sum((b['name'] for b in batches), [])
  assert names == [s.name for s in samples] + ['', '']
  valid = np.concatenate([b['valid'] for b in batches])
  assert valid.tolist() == [True] * 7 + [False] * 2
  labels = np.concatenate([b['label'] for b in batches])
  assert labels.tolist() == [1, 1, 0, 0, 0, 1, 1, 0, 0]
  masks = np.concatenate([b['mask'] for b in batches])
  # The fixture's masks mark rows [2, 5) x cols [3, 6) of 10 x 12.
  expected = np.zeros((10, 12), bool)
  expected[2:5, 3:6] = True
  for i in (0, 1, 5, 6):
    np.testing.assert_array_equal(masks[i], resize_mask(expected, 20))
  assert not masks[2:5].any() and not masks[7:].any()
  images = np.concatenate([b['image'] for b in batches])
  np.testing.assert_allclose(images[2], 100 / 255, atol=1e-6)  # test/good/000
  assert not images[7:].any()


def test_eval_default_resolution(tmp_path):
  batch = next(iter(EvalLoader(_eval_tree(tmp_path), 16, 4, num_threads=1)))
  assert batch['mask'].shape == (4, 16, 16)


def test_eval_mask_size_mismatch_names_both(tmp_path):
  samples = _eval_tree(tmp_path)
  write_image(samples[1].mask_path, np.zeros((7, 7), np.uint8))
  with pytest.raises(DataError) as info:
    list(EvalLoader(samples, 8, 4, num_threads=2))
  msg = str(info.value)
  assert samples[1].mask_path in msg and samples[1].image_path in msg
  assert _wait_no_threads()


def test_eval_bad_mask_names_mask(tmp_path):
  samples = _eval_tree(tmp_path)
  with open(samples[0].mask_path, 'wb') as f:
    f.write(b'xx')
  with pytest.raises(DataError, match=r'cannot decode .*crack.000_mask\.png'):
    list(EvalLoader(samples, 8, 4, num_threads=2))
