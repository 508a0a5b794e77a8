"""The teacher and its weight port against real torchvision outputs and manifests."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import teacher_fixture_recipe as recipe

from msrd_jax import port, teacher

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')


def _manifest(arch: str) -> dict[str, tuple[int, ...]]:
  with open(os.path.join(FIXTURES, 'manifests', f'{arch}.json')) as f:
    return {k: tuple(v) for k, v in json.load(f)['keys'].items()}


@pytest.fixture(scope='module')
def parity_fixture():
  return dict(np.load(os.path.join(FIXTURES, 'teacher_parity.npz')))


@pytest.mark.parametrize('name', sorted(recipe.FIXTURE_CONFIGS))
def test_matches_torchvision_outputs(parity_fixture, name):
  cfg = recipe.FIXTURE_CONFIGS[name]
  spec = teacher.ArchSpec(cfg['block'], tuple(cfg['layers']), cfg['width_per_group'])
  shapes = json.loads(str(parity_fixture[f'{name}/manifest']))
  state = recipe.random_state_dict(shapes, recipe.WEIGHT_SEED)
  variables = port.convert_state_dict(spec, state)
  for b, h, w in recipe.FIXTURE_INPUTS:
    images = recipe.random_images(b, h, w, recipe.IMAGE_SEED)
    got = teacher.ResNet(spec).apply(variables, images)
    for level, g in enumerate(got, start=1):
      ref = parity_fixture[f'{name}/{h}x{w}/e{level}']
      assert g.shape == ref.shape, (name, h, level)
      rel = np.abs(np.asarray(g) - ref).max() / np.abs(ref).max()
      assert rel <= 1e-5, f'{name} {h}x{w} e{level}: relative error {rel:.2e}'


@pytest.mark.parametrize('arch', sorted(teacher.ARCH_SPECS))
def test_port_maps_every_key_of_the_torchvision_manifest(arch):
  shapes = _manifest(arch)
  entries = port.plan_port(arch, shapes)
  mapped = {e.torch_key for e in entries}
  ignored = {k for k in shapes if k not in mapped}
  assert all(
    k.startswith(('layer4.', 'fc.')) or k.endswith('num_batches_tracked') for k in ignored
  ), sorted(ignored)[:5]
  # Every teacher variable comes from exactly one key, with the transposed shape.
  expected = jax.tree_util.tree_leaves(teacher.teacher_shapes(arch))
  assert len(entries) == len(expected) == len(mapped)
  for e in entries:
    if e.is_conv:
      o, i, kh, kw = shapes[e.torch_key]
      assert e.convert(np.zeros((o, i, kh, kw))).shape == (kh, kw, i, o)


@pytest.mark.parametrize('arch', sorted(teacher.ARCH_SPECS))
def test_feature_channels_match_the_manifest(arch):
  shapes = _manifest(arch)
  last = {k: v for k, v in shapes.items() if k.endswith('bn3.weight') or k.endswith('bn2.weight')}
  for level, channels in enumerate(teacher.feature_channels(arch), start=1):
    outs = [v[0] for k, v in last.items() if k.startswith(f'layer{level}.')]
    assert max(outs) == channels


def _resnet18_state():
  return recipe.random_state_dict(_manifest('resnet18'), seed=7)


def test_port_errors_name_the_key_and_both_shapes():
  state = _resnet18_state()
  bad = dict(state)
  del bad['layer2.0.bn1.running_var']
  with pytest.raises(port.PortError, match=r"missing key 'layer2\.0\.bn1\.running_var'"):
    port.convert_state_dict('resnet18', bad)
  bad = dict(state, **{'layer3.0.extra.weight': np.zeros(3, np.float32)})
  with pytest.raises(port.PortError, match=r"unexpected key 'layer3\.0\.extra\.weight'"):
    port.convert_state_dict('resnet18', bad)
  bad = dict(state, **{'layer1.0.conv1.weight': np.zeros((64, 64, 1, 1), np.float32)})
  with pytest.raises(
    port.PortError,
    match=r'layer1\.0\.conv1\.weight.*\(64, 64, 1, 1\).*'
    r'\(64, 64, 3, 3\)',
  ):
    port.convert_state_dict('resnet18', bad)
  # A resnet18 state_dict is not a resnet50 one.
  with pytest.raises(port.PortError, match='resnet50'):
    port.convert_state_dict('resnet50', state)


def test_port_ignores_layer4_fc_and_batch_counters():
  state = _resnet18_state()
  assert any(k.startswith('layer4.') for k in state)
  assert any(k.endswith('num_batches_tracked') for k in state)
  trimmed = {k: v for k, v in state.items() if not port.IGNORED.search(k)}
  a = port.convert_state_dict('resnet18', state)
  b = port.convert_state_dict('resnet18', trimmed)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_to_state_dict_inverts_the_port():
  # A torchvision state_dict survives port and back bit for bit (less what the teacher
  # does not hold), and so does a random teacher the other way round.
  state = _resnet18_state()
  back = port.to_state_dict('resnet18', port.convert_state_dict('resnet18', state))
  kept = {k: v for k, v in state.items() if not port.IGNORED.search(k)}
  assert back.keys() == kept.keys()
  for k, v in kept.items():
    assert back[k].shape == v.shape, k
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  variables = teacher.init_teacher('resnet18', seed=3, warn=False)
  again = port.convert_state_dict('resnet18', port.to_state_dict('resnet18', variables))
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, variables)


def _port_cli(arch, src, out) -> subprocess.CompletedProcess:
  """`python -m msrd_jax.port` as a user runs it."""
  return subprocess.run(
    [
      sys.executable,
      '-m',
      'msrd_jax.port',
      '--arch',
      arch,
      '--input',
      str(src),
      '--output',
      str(out),
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_cli_refuses_to_overwrite_its_input(tmp_path):
  from safetensors.numpy import save_file

  src = tmp_path / 'r18.safetensors'
  save_file(_resnet18_state(), str(src))
  before = src.read_bytes()
  done = _port_cli('resnet18', src, src)
  assert done.returncode == 2 and 'is the input file' in done.stderr
  assert src.read_bytes() == before


def test_cli_safetensors_and_pth_give_the_same_teacher(tmp_path):
  from safetensors.numpy import save_file

  torch = pytest.importorskip('torch')
  state = _resnet18_state()
  st = tmp_path / 'r18.safetensors'
  save_file(state, str(st))
  pth = tmp_path / 'r18.pth'
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, str(pth))
  for src in (st, pth):
    done = _port_cli('resnet18', src, tmp_path / f'{src.suffix[1:]}.msgpack')
    assert done.returncode == 0, done.stderr
    assert 'wrote' in done.stdout
  a = teacher.load_teacher('resnet18', str(tmp_path / 'safetensors.msgpack'))
  b = teacher.load_teacher('resnet18', str(tmp_path / 'pth.msgpack'))
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
  # The converted kernel is the transposed torch weight.
  np.testing.assert_array_equal(
    a['params']['layer2_0']['conv1']['kernel'], state['layer2.0.conv1.weight'].transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(a['batch_stats']['bn1']['var'], state['bn1.running_var'])
  # The convenience API reads the same file and gives stride 4/8/16 features.
  images = np.random.default_rng(0).uniform(size=(2, 64, 48, 3)).astype(np.float32)
  feats = teacher.extract_features('resnet18', str(tmp_path / 'pth.msgpack'), images)
  assert [f.shape for f in feats] == [(2, 16, 12, 64), (2, 8, 6, 128), (2, 4, 3, 256)]
  ref = teacher.ResNet('resnet18').apply(b, images)
  for f, r in zip(feats, ref):  # jit and eager differ only by float rounding
    assert np.abs(np.asarray(f) - r).max() <= 1e-5 * np.abs(r).max()


@pytest.mark.parametrize(
  'content,suffix,match',
  [
    (b'not a checkpoint at all', '.pth', 'not a readable PyTorch checkpoint'),
    (b'\x00\x01garbage', '.safetensors', 'not a readable .safetensors file'),
    (b'{}', '.json', 'unknown weight format'),
  ],
)
def test_cli_rejects_files_that_are_not_checkpoints(tmp_path, content, suffix, match):
  if suffix == '.pth':
    pytest.importorskip('torch')
  bad = tmp_path / f'bad{suffix}'
  bad.write_bytes(content)
  out = tmp_path / 'out.msgpack'
  done = _port_cli('resnet18', bad, out)
  assert done.returncode == 2
  err = done.stderr.strip()
  assert match in err and str(bad) in err
  assert 'Traceback' not in err
  assert not out.exists()


def test_load_teacher_rejects_other_files_and_archs(tmp_path):
  path = tmp_path / 'r18.msgpack'
  teacher.save_teacher(
    str(path), 'resnet18', port.convert_state_dict('resnet18', _resnet18_state())
  )
  with pytest.raises(ValueError, match="holds a 'resnet18' teacher.*'resnet34'"):
    teacher.load_teacher('resnet34', str(path))
  junk = tmp_path / 'junk.msgpack'
  junk.write_bytes(b'\x93\x01\x02')
  with pytest.raises(ValueError, match='not a teacher file'):
    teacher.load_teacher('resnet18', str(junk))
  with pytest.raises(FileNotFoundError, match='msrd_jax.port'):
    teacher.load_teacher('resnet18', str(tmp_path / 'absent.msgpack'))


def test_random_teacher_warns_loudly():
  images = np.zeros((1, 32, 32, 3), np.float32)
  with pytest.warns(RuntimeWarning, match='RANDOM weights'):
    feats = teacher.extract_features('resnet18', None, images)
  assert [f.shape[1] for f in feats] == [8, 4, 2]


def test_teacher_is_frozen_batchnorm():
  # Running statistics are used even on a batch whose own statistics differ: the output
  # of one image does not depend on the others in its batch.
  variables = teacher.init_teacher('resnet18', warn=False)
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(3, 32, 32, 3)).astype(np.float32)
  together = teacher.ResNet('resnet18').apply(variables, images)
  alone = teacher.ResNet('resnet18').apply(variables, images[:1])
  for t, a in zip(together, alone):
    assert np.abs(t[:1] - a).max() <= 1e-5 * np.abs(a).max()


def test_unknown_arch_is_a_clear_error():
  with pytest.raises(ValueError, match='unknown teacher architecture.*resnet18'):
    teacher.feature_channels('resnet19')
