"""The model modules (design.md sections 2-6) against numpy transcriptions of the
published formulas and against properties that must hold.

Big architectures are checked with jax.eval_shape only (no compute); real forward and
backward passes use resnet18 at 64 px.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
import pytest

from msrd_jax import config as config_lib
from msrd_jax import coord_attention, fusion, losses, memory, teacher
from msrd_jax import model as model_lib

BN_EPS = 1e-5

# Published facts, written out independently of teacher.ARCH_SPECS: blocks per stage
# (layer1..layer3), block type and the channels (C1, C2, C3) of layer1..layer3.
ARCHS = {
  'resnet18': ((2, 2, 2), 'basic', (64, 128, 256)),
  'resnet34': ((3, 4, 6), 'basic', (64, 128, 256)),
  'resnet50': ((3, 4, 6), 'bottleneck', (256, 512, 1024)),
  'wide_resnet50_2': ((3, 4, 6), 'bottleneck', (256, 512, 1024)),
  'wide_resnet101_2': ((3, 4, 23), 'bottleneck', (256, 512, 1024)),
}


# ---------------------------------------------------------------------------- helpers


def flat(tree) -> dict[tuple[str, ...], object]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def randomize(variables, seed: int):
  """Every leaf replaced by numpy random values; BN variances strictly positive."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in flat(variables).items():
    shape = np.shape(leaf)
    if path[-1] == 'var':
      v = rng.uniform(0.5, 2.0, shape)
    elif path[-1] == 'scale':
      v = rng.uniform(0.5, 3.0, shape) * rng.choice([-1.0, 1.0], shape)
    else:
      v = rng.normal(0.0, 1.0, shape)
    out[path] = jnp.asarray(v, jnp.float32)
  return flax.traverse_util.unflatten_dict(out)


def np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def np_bn(x, stats, params):
  return (x - stats['mean']) / np.sqrt(stats['var'] + BN_EPS) * params['scale'] + params['bias']


def small_config(backbone: str = 'resnet18', image_size: int = 64):
  c = config_lib.base_config()
  c.model.backbone = backbone
  c.data.image_size = image_size
  return c


def student_shapes(config, image_size: int):
  """Student variables as ShapeDtypeStructs, without compute."""
  msrd = model_lib.MSRD(config)
  tshapes = teacher.teacher_shapes(config.model.backbone)
  return (
    msrd,
    tshapes,
    jax.eval_shape(lambda tv: msrd.init(jax.random.key(0), tv, image_size), tshapes),
  )


def has_key(tree, name: str) -> bool:
  return any(name in path for path in flat(tree))


# ------------------------------------------------------------ 1. coordinate attention


def np_coord_attention(x, p, s):
  x = np.asarray(x, np.float64)
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
  s = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), s)
  _, h, _, _ = x.shape
  pooled_h = x.mean(axis=2)  # (B, H, C): average over W
  pooled_w = x.mean(axis=1)  # (B, W, C): average over H
  y = np.concatenate([pooled_h, pooled_w], axis=1)  # (B, H + W, C)
  # The paper's conv1 has a bias; the BN right after absorbs it, so ours has none.
  y = y @ p['conv1']['kernel'][0, 0]
  pre = np_bn(y, s['bn1'], p['bn1'])
  y = pre * np.clip(pre + 3.0, 0.0, 6.0) / 6.0
  y_h, y_w = y[:, :h], y[:, h:]
  a_h = np_sigmoid(y_h @ p['conv_h']['kernel'][0, 0] + p['conv_h']['bias'])
  a_w = np_sigmoid(y_w @ p['conv_w']['kernel'][0, 0] + p['conv_w']['bias'])
  return x * a_h[:, :, None, :] * a_w[:, None, :, :], pre


def test_coord_attention_matches_numpy_formula():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, 7, 16)), jnp.float32)  # H != W
  module = coord_attention.CoordAttention(train=False)
  variables = randomize(module.init(jax.random.key(0), x), seed=1)
  got = np.asarray(module.apply(variables, x))
  want, pre_activation = np_coord_attention(x, variables['params'], variables['batch_stats'])
  # The randomized BN is far from an identity and h-swish sees all three pieces.
  assert (pre_activation < -3).any() and (pre_activation > 3).any()
  assert (np.abs(pre_activation) < 3).any()
  assert got.shape == x.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_coord_attention_eval_mode_uses_running_statistics():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 4, 6, 8)), jnp.float32)
  module = coord_attention.CoordAttention(train=False)
  variables = randomize(module.init(jax.random.key(0), x), seed=3)
  shifted = flax.core.unfreeze(variables)
  shifted['batch_stats']['bn1']['mean'] = shifted['batch_stats']['bn1']['mean'] + 1.0
  assert not np.allclose(module.apply(variables, x), module.apply(shifted, x))


@pytest.mark.parametrize('channels,mip', [(64, 8), (1024, 32), (16, 8), (512, 16)])
def test_coord_attention_mip_channels(channels, mip):
  assert coord_attention.mip_channels(channels) == mip
  module = coord_attention.CoordAttention()
  shapes = jax.eval_shape(
    module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 3, 5, channels), jnp.float32)
  )
  p = shapes['params']
  assert p['conv1']['kernel'].shape == (1, 1, channels, mip)
  assert 'bias' not in p['conv1']  # redundant before BN
  assert p['conv_h']['kernel'].shape == (1, 1, mip, channels)
  assert p['conv_w']['kernel'].shape == (1, 1, mip, channels)
  assert p['conv_h']['bias'].shape == (channels,)
  assert shapes['batch_stats']['bn1']['mean'].shape == (mip,)


# -------------------------------------------------------------------- 2. memory bank


def np_read_weights(z, m, tau, lam):
  z, m = np.asarray(z, np.float64), np.asarray(m, np.float64)
  cos = (z @ m.T) / (np.linalg.norm(z, axis=-1)[:, None] * np.linalg.norm(m, axis=-1))
  s = cos / tau
  w = np.exp(s - s.max(axis=-1, keepdims=True))
  w = w / w.sum(axis=-1, keepdims=True)
  if lam > 0:
    w = np.maximum(w - lam, 0) * w / (np.abs(w - lam) + 1e-12)
    w = w / (w.sum(axis=-1, keepdims=True) + 1e-12)
  return w


def np_entropy(w):
  w = np.asarray(w, np.float64)
  return np.mean(-np.sum(w * np.log(w + 1e-12), axis=-1))


def _queries_and_memory(p=64, n=50, d=16, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(p, d)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32))


# lam <= 1/N: the largest softmax weight is >= 1/N, so no row is shrunk to all zeros.
@pytest.mark.parametrize('tau,lam', [(0.05, 1 / 50), (0.05, 0.0), (0.5, 1 / 50), (1.0, 0.01)])
def test_read_weights_match_numpy_and_are_convex(tau, lam):
  z, m = _queries_and_memory()
  w = np.asarray(memory.read_weights(jnp.asarray(z), jnp.asarray(m), tau, lam))
  assert w.shape == (64, 50)
  assert (w >= 0).all()
  np.testing.assert_allclose(w.sum(axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(w, np_read_weights(z, m, tau, lam), atol=1e-5)


def test_shrinkage_makes_weights_sparse():
  z, m = _queries_and_memory()
  sparse = np.asarray(memory.read_weights(jnp.asarray(z), jnp.asarray(m), 0.05, 1 / 50))
  dense = np.asarray(memory.read_weights(jnp.asarray(z), jnp.asarray(m), 0.05, 0.0))
  assert (dense > 0).all()
  # Most slots of every query are exactly zero, yet every query reads something.
  assert (sparse == 0).mean() > 0.5
  assert ((sparse > 0).sum(axis=-1) >= 1).all()
  # Shrinkage zeroes exactly the slots whose softmax weight is below lambda.
  np.testing.assert_array_equal(sparse == 0, dense <= 1 / 50)


def test_read_weights_keep_summing_to_one_when_nothing_survives_shrinkage():
  # An all-zero query has cosine 0 with every slot: the softmax is exactly uniform and
  # hard shrinkage at 1/N would zero the whole row; it must still read a convex mix.
  _, m = _queries_and_memory()
  w = np.asarray(memory.read_weights(jnp.zeros((2, 16)), jnp.asarray(m), 0.05, 1 / 50))
  np.testing.assert_allclose(w.sum(axis=-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(w, 1 / 50, atol=1e-7)


def test_validate_bounds_the_shrink_threshold():
  c = config_lib.base_config()
  c.model.memory.shrink = 1.5
  with pytest.raises(config_lib.ConfigError, match='model.memory.shrink'):
    config_lib.validate(c)


def test_entropy_matches_numpy():
  z, m = _queries_and_memory(seed=3)
  for tau, lam in [(0.05, 1 / 50), (0.5, 0.0)]:
    w = np_read_weights(z, m, tau, lam).astype(np.float32)
    got = float(memory.entropy(jnp.asarray(w)))
    np.testing.assert_allclose(got, np_entropy(w), rtol=1e-5)
  # One-hot rows have zero entropy, uniform rows log(N).
  assert abs(float(memory.entropy(jnp.eye(5)))) < 1e-6
  np.testing.assert_allclose(float(memory.entropy(jnp.full((3, 8), 1 / 8))), np.log(8), rtol=1e-6)


def _bank_input(seed=0):
  return np.random.default_rng(seed).normal(size=(2, 3, 4, 16)).astype(np.float32)


def test_memory_replace_reads_w_times_m():
  z = _bank_input()
  bank = memory.MemoryBank(slots=10, temperature=0.1, mode='replace')
  variables = bank.init(jax.random.key(0), jnp.asarray(z))
  assert set(flat(variables)) == {('params', 'memory')}
  mem = np.asarray(variables['params']['memory'])
  assert mem.shape == (10, 16)
  out, ent, w = bank.apply(variables, jnp.asarray(z))
  w_ref = np_read_weights(z.reshape(-1, 16), mem, 0.1, 1 / 10)  # shrink None -> 1/N
  np.testing.assert_allclose(np.asarray(w).reshape(-1, 10), w_ref, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out), (w_ref @ mem).reshape(z.shape), atol=1e-5)
  np.testing.assert_allclose(float(ent), np_entropy(w_ref), rtol=1e-4, atol=1e-6)


def test_memory_residual_starts_as_identity_and_uses_gate():
  z = _bank_input(1)
  bank = memory.MemoryBank(slots=10, temperature=0.1, shrink=0.0, mode='residual')
  variables = bank.init(jax.random.key(0), jnp.asarray(z))
  params = flax.core.unfreeze(variables['params'])
  assert set(params) == {'memory', 'gate'}
  assert np.shape(params['gate']) == () and float(params['gate']) == 0.0
  out, _, _ = bank.apply(variables, jnp.asarray(z))
  np.testing.assert_array_equal(np.asarray(out), z)
  params['gate'] = jnp.asarray(0.5, jnp.float32)
  out, _, _ = bank.apply({'params': params}, jnp.asarray(z))
  mem = np.asarray(params['memory'])
  w_ref = np_read_weights(z.reshape(-1, 16), mem, 0.1, 0.0)
  np.testing.assert_allclose(np.asarray(out), z + 0.5 * (w_ref @ mem).reshape(z.shape), atol=1e-5)


def test_memory_off_is_identity_without_params():
  z = _bank_input(2)
  bank = memory.MemoryBank(mode='off')
  variables = bank.init(jax.random.key(0), jnp.asarray(z))
  assert not jax.tree_util.tree_leaves(variables)
  out, ent, _ = bank.apply(variables, jnp.asarray(z))
  np.testing.assert_array_equal(np.asarray(out), z)
  assert float(ent) == 0.0


def test_memory_unknown_mode_raises():
  with pytest.raises(ValueError, match='memory mode'):
    memory.MemoryBank(mode='sideways').init(jax.random.key(0), jnp.zeros((1, 2, 2, 4)))


# ------------------------------------------------------------------------- 3. MSFF


def test_fusion_weights_fast_normalized():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(3, 3)).astype(np.float32)
  a[0, 1], a[2, 2] = -0.3, -2.0  # make sure some logits are negative
  w = np.asarray(fusion.fusion_weights(jnp.asarray(a)))
  r = np.maximum(a.astype(np.float64), 0)
  s = r.sum(axis=-1)
  np.testing.assert_allclose(w, r / (s[:, None] + 1e-4), rtol=1e-6)
  assert (w >= 0).all()
  assert (w[a < 0] == 0).all()
  np.testing.assert_allclose(w.sum(axis=-1), s / (s + 1e-4), rtol=1e-6)
  # Rows with positive mass sum to 1 - O(1e-4), never above 1.
  assert (w.sum(axis=-1) < 1).all() and (w.sum(axis=-1) > 1 - 1e-3)[s > 0.5].all()


def _features(channels, b=2, h1=16, w1=12, seed=0):
  """[e1, e2, e3] at strides 4, 8, 16 of a (4 h1) x (4 w1) image; non-square."""
  rng = np.random.default_rng(seed)
  return [
    jnp.asarray(rng.normal(size=(b, h1 >> k, w1 >> k, c)), jnp.float32)
    for k, c in enumerate(channels)
  ]


@pytest.mark.parametrize('init_self,init_other', [(1.0, 0.5), (0.7, 0.2)])
def test_msff_fusion_logits_init(init_self, init_other):
  channels = (8, 16, 32)
  msff = fusion.MSFF(channels, init_self, init_other)
  shapes = jax.eval_shape(msff.init, jax.random.key(0), _features(channels))
  assert shapes['params']['fusion_logits'].shape == (3, 3)
  # Only the logits are fetched, so XLA drops the rest of the initialization.
  a = np.asarray(
    jax.jit(lambda k, f: msff.init(k, f)['params']['fusion_logits'])(
      jax.random.key(0), _features(channels, b=1, h1=4, w1=4)
    )
  )
  np.testing.assert_array_equal(np.diag(a), np.full(3, init_self, np.float32))
  np.testing.assert_array_equal(a[~np.eye(3, dtype=bool)], np.full(6, init_other, np.float32))


def test_msff_and_mff_output_shapes_resnet18():
  channels = ARCHS['resnet18'][2]
  feats = [jax.ShapeDtypeStruct(f.shape, f.dtype) for f in _features(channels)]
  for module in (fusion.MSFF(channels), fusion.MFF(channels)):
    variables = jax.eval_shape(module.init, jax.random.key(0), feats)
    out = jax.eval_shape(module.apply, variables, feats)
    assert out.shape == (2, 4, 3, 3 * 256), type(module).__name__
  msff_params = jax.eval_shape(fusion.MSFF(channels).init, jax.random.key(0), feats)['params']
  # All nine mappings; identities have no parameters.
  for i in range(1, 4):
    for j in range(1, 4):
      assert (f'map_{j}_to_{i}' in msff_params) == (i != j), (j, i)
  for i in range(1, 4):
    assert f'attention_{i}' in msff_params


def test_mappings_land_on_target_level():
  channels = (8, 16, 32)
  feats = _features(channels, b=1, h1=16, w1=12)
  for j in range(3):
    for i in range(3):
      mapping = fusion.Mapping(j, i, channels)
      hw = feats[i].shape[1:3]
      variables = jax.eval_shape(
        lambda x, m=mapping, hw=hw: m.init(jax.random.key(0), x, hw), feats[j]
      )
      out = jax.eval_shape(lambda v, x, m=mapping, hw=hw: m.apply(v, x, hw), variables, feats[j])
      assert out.shape == feats[i].shape, (j, i)
      params = flat(variables.get('params', {}))
      if j < i:  # (i - j) 3x3/2 conv-BN-ReLU, C_j -> ... -> C_i
        convs = sorted(p for p in params if p[-1] == 'kernel')
        assert [params[p].shape for p in convs] == [
          (3, 3, channels[k], channels[k + 1]) for k in range(j, i)
        ]
      elif j > i:  # 1x1 conv C_j -> C_i
        assert params[('conv', 'kernel')].shape == (1, 1, channels[j], channels[i])
      else:
        assert not params


def test_upward_mapping_is_conv_bn_then_bilinear():
  channels = (4, 6, 8)
  rng = np.random.default_rng(5)
  x = rng.normal(size=(2, 3, 5, 8)).astype(np.float32)  # level 3
  for target, hw in ((0, (12, 20)), (1, (6, 10))):
    mapping = fusion.Mapping(2, target, channels)
    variables = randomize(mapping.init(jax.random.key(0), jnp.asarray(x), hw), seed=6)
    got = np.asarray(mapping.apply(variables, jnp.asarray(x), hw))
    p = jax.tree_util.tree_map(np.asarray, variables['params'])
    s = jax.tree_util.tree_map(np.asarray, variables['batch_stats'])
    y = np_bn(x.astype(np.float64) @ p['conv']['kernel'][0, 0], s['bn'], p['bn'])
    np.testing.assert_allclose(
      got, numpy_reference.bilinear_resize(y, hw, axes=(1, 2)), rtol=1e-5, atol=1e-5
    )


def test_msff_fuses_with_normalized_weights():
  """G_i = relu(sum_j w_ij T(j->i)(e_j)) with w from the learned logits.

  With the attention off, G_3 is the last C3 channels of the output (Align keeps level 3
  as is) and G_1, G_2 are what Align's first conv of their level receives.
  """
  channels = (4, 6, 8)
  feats = _features(channels, b=1, h1=8, w1=4, seed=7)
  msff = fusion.MSFF(channels, attention=False)
  variables = flax.core.unfreeze(randomize(msff.init(jax.random.key(0), feats), seed=8))
  a = np.array([[1.0, -0.5, 0.25], [0.3, 0.6, 0.0], [2.0, 0.1, 0.7]], np.float32)
  variables['params']['fusion_logits'] = jnp.asarray(a)
  out, state = msff.apply(variables, feats, capture_intermediates=True)
  w = np.maximum(a, 0) / (np.maximum(a, 0).sum(-1, keepdims=True) + 1e-4)
  for i in range(3):
    hw = feats[i].shape[1:3]
    g_ref = np.zeros(feats[i].shape)
    for j in range(3):
      name = f'map_{j + 1}_to_{i + 1}'
      if i == j:
        t = np.asarray(feats[j])
      else:
        sub = {c: v[name] for c, v in variables.items() if name in v}
        t = np.asarray(fusion.Mapping(j, i, channels).apply(sub, feats[j], hw))
      g_ref += w[i, j] * t
    g_ref = np.maximum(g_ref, 0)
    if i == 2:
      np.testing.assert_allclose(np.asarray(out)[..., -channels[2] :], g_ref, rtol=1e-4, atol=1e-5)
    else:
      name = f'level{i + 1}_down1'
      sub = {c: v['align'][name] for c, v in variables.items()}
      want = fusion.ConvBNReLU(channels[i + 1], 2).apply(sub, jnp.asarray(g_ref, jnp.float32))
      got = state['intermediates']['align'][name]['__call__'][0]
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


# ------------------------------------------------- 4. decoder / teacher shape agreement


def _arch_shapes(arch: str):
  """(teacher features, student features, aux, student variables) as shapes, 256 px."""
  config = small_config(arch, 256)
  msrd, tshapes, sshapes = student_shapes(config, 256)
  images = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  e, d, aux = jax.eval_shape(msrd.apply_eval, tshapes, sshapes, images)
  return e, d, aux, sshapes


def test_deconv2x2_is_pytorch_transposed_conv():
  # PyTorch ConvTranspose2d(C, F, 2, stride=2): out[2i + a, 2j + b] = x[i, j] @ W[:, :, a, b],
  # transcribed as a loop, and jax.lax.conv_transpose with the same (flipped) kernel.
  from msrd_jax import decoder

  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 5, 4)).astype(np.float32)
  mod = decoder.Deconv2x2(6)
  variables = mod.init(jax.random.key(0), x)
  kernel = np.asarray(variables['params']['kernel'])
  got = np.asarray(mod.apply(variables, x))
  ref = np.zeros((2, 6, 10, 6), np.float32)
  for i in range(3):
    for j in range(5):
      for a in range(2):
        for b in range(2):
          ref[:, 2 * i + a, 2 * j + b] = x[:, i, j] @ kernel[a, b]
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  lax_ref = jax.lax.conv_transpose(
    x, kernel[::-1, ::-1], (2, 2), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  np.testing.assert_allclose(got, np.asarray(lax_ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('arch', sorted(ARCHS))
def test_student_matches_teacher_shapes(arch):
  blocks, kind, channels = ARCHS[arch]
  e, d, aux, variables = _arch_shapes(arch)
  assert [x.shape for x in e] == [(2, 256 // s, 256 // s, c) for s, c in zip((4, 8, 16), channels)]
  assert [x.shape for x in d] == [x.shape for x in e]
  assert all(x.dtype == jnp.float32 for x in d)
  # OCE: embedding of 512 * expansion channels at stride 32.
  expansion = 1 if kind == 'basic' else 4
  assert aux['embedding'].shape == (2, 8, 8, 512 * expansion)
  assert aux['entropy'].shape == ()
  params = variables['params']
  oce = params['oce']
  assert len(oce) == (2 if kind == 'basic' else 3), sorted(oce)
  first = oce[sorted(oce)[0]]
  # The first OCE block has the 1x1/2 conv + BN shortcut from 3 * C3 channels.
  assert first['downsample_0']['kernel'].shape == (1, 1, 3 * channels[2], 512 * expansion)
  # de-ResNet: the stage for level 3 has layers[0] blocks, level 2 layers[1], level 1
  # layers[2] (RD4AD's de_resnet).
  dec = params['decoder']
  for level, n in zip((3, 2, 1), blocks):
    names = sorted(k for k in dec if k.startswith(f'level{level}_'))
    assert len(names) == n, (level, names)
    up = dec[f'level{level}_0']
    # The first block upsamples with a 2x2/2 transposed conv shortcut; the rest do not.
    assert up['upsample_0']['kernel'].shape[:2] == (2, 2)
    assert all('upsample_0' not in dec[k] for k in names if not k.endswith('_0'))


# ------------------------------------------------------------- 5. ablation switches


def _attention_paths(params):
  return [p for p in flat(params) if any('attention' in k for k in p)]


def test_plain_rd4ad_has_no_msrd_parts():
  config = small_config('resnet18', 64)
  config.model.fusion = 'mff'
  config.model.coord_attention = ()
  config.model.memory.mode = 'off'
  config_lib.validate(config)
  msrd, tshapes, variables = student_shapes(config, 64)
  params = variables['params']
  assert not _attention_paths(params)
  assert 'memory' not in params and not has_key(params, 'memory')
  assert not has_key(params, 'fusion_logits')
  assert not any(k.startswith('map_') for p in flat(params) for k in p)
  # Every BN statistic of the plain model lives in fusion (align), oce or decoder.
  assert set(params) == {'fusion', 'oce', 'decoder'}
  images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  e, d, aux = jax.eval_shape(msrd.apply_eval, tshapes, variables, images)
  assert [x.shape for x in d] == [x.shape for x in e]
  assert aux['embedding'].shape == (2, 2, 2, 512)


def test_default_student_has_every_msrd_part():
  config = small_config('resnet18', 64)
  assert config.model.fusion == 'msff'
  assert tuple(config.model.coord_attention) == ('fusion', 'decoder')
  assert config.model.memory.mode == 'replace'
  _, _, variables = student_shapes(config, 64)
  params = variables['params']
  assert params['fusion']['fusion_logits'].shape == (3, 3)
  assert params['memory']['memory'].shape == (50, 512)
  for i in (1, 2, 3):
    assert f'attention_{i}' in params['fusion']
  for name, block in params['decoder'].items():
    assert 'attention' in block, name
  assert 'attention' in variables['batch_stats']['decoder']['level1_0']


def test_attention_only_in_decoder():
  config = small_config('resnet18', 64)
  config.model.coord_attention = ('decoder',)
  _, _, variables = student_shapes(config, 64)
  params = variables['params']
  paths = _attention_paths(params)
  assert paths and all(p[0] == 'decoder' for p in paths)
  assert all('attention' in block for block in params['decoder'].values())
  assert 'fusion_logits' in params['fusion']  # still MSFF, just without attention


def test_attention_only_in_fusion():
  config = small_config('resnet18', 64)
  config.model.coord_attention = ('fusion',)
  _, _, variables = student_shapes(config, 64)
  paths = _attention_paths(variables['params'])
  assert {p[1] for p in paths} == {'attention_1', 'attention_2', 'attention_3'}
  assert all(p[0] == 'fusion' for p in paths)


# ------------------------------------------------------------------------ 6. losses


def np_cos_distance(e, d, axis):
  e, d = np.asarray(e, np.float64), np.asarray(d, np.float64)
  return 1 - (e * d).sum(axis) / (np.linalg.norm(e, axis=axis) * np.linalg.norm(d, axis=axis))


def _pairs(seed=0):
  rng = np.random.default_rng(seed)
  shapes = [(3, 8, 6, 4), (3, 4, 3, 8), (3, 2, 2, 16)]
  e = [rng.normal(size=s).astype(np.float32) for s in shapes]
  # Correlated student features so the cosines are far from 0 and differ per image.
  d = [(x + rng.normal(scale=0.5 + i, size=x.shape)).astype(np.float32) for i, x in enumerate(e)]
  return e, d


def test_global_cosine_loss_matches_numpy():
  e, d = _pairs()
  for x, y in zip(e, d):
    want = np.mean(np_cos_distance(x.reshape(3, -1), y.reshape(3, -1), axis=-1))
    got = float(losses.global_cosine_loss(jnp.asarray(x), jnp.asarray(y)))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Differs from the per-position loss on the same data.
    assert abs(got - np.mean(np_cos_distance(x, y, axis=-1))) > 1e-3


def test_pixel_cosine_loss_matches_numpy():
  e, d = _pairs(1)
  for x, y in zip(e, d):
    want = np.mean(np_cos_distance(x, y, axis=-1))
    got = float(losses.pixel_cosine_loss(jnp.asarray(x), jnp.asarray(y)))
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize('kind', ['global', 'pixel'])
def test_distillation_loss_sums_levels(kind):
  e, d = _pairs(2)
  if kind == 'global':
    want = sum(
      np.mean(np_cos_distance(x.reshape(3, -1), y.reshape(3, -1), axis=-1)) for x, y in zip(e, d)
    )
  else:
    want = sum(np.mean(np_cos_distance(x, y, axis=-1)) for x, y in zip(e, d))
  got = float(
    losses.distillation_loss([jnp.asarray(x) for x in e], [jnp.asarray(y) for y in d], kind)
  )
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Identical features give zero loss; opposite ones 2 per level.
  same = float(losses.distillation_loss(e, e, kind))
  assert abs(same) < 1e-5
  np.testing.assert_allclose(
    float(losses.distillation_loss(e, [-x for x in e], kind)), 6.0, rtol=1e-5
  )


def test_distillation_loss_rejects_unknown_kind():
  e, d = _pairs()
  with pytest.raises(ValueError, match='cosine|global|pixel'):
    losses.distillation_loss(e, d, 'l2')


# ---------------------------------------------------- 7. frozen teacher, no gradient


def he_random(shapes, seed: int):
  """Random variables of the given shapes at a sane scale (He-scaled kernels, BN near
  identity), without running any initializer."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in flat(shapes).items():
    shape = leaf.shape
    if path[-1] == 'kernel':
      v = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    elif path[-1] in ('scale', 'var'):
      v = rng.uniform(0.5, 1.5, shape)
    else:
      v = rng.normal(scale=0.1, size=shape)
    out[path] = jnp.asarray(v, leaf.dtype)
  return flax.traverse_util.unflatten_dict(out)


def test_teacher_gets_no_gradient_and_is_not_a_student_param():
  config = small_config('resnet18', 64)
  msrd, tshapes, sshapes = student_shapes(config, 64)
  teacher_vars, student_vars = he_random(tshapes, 0), he_random(sshapes, 1)
  images = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 64, 64, 3)), jnp.float32)

  def loss(tv, params):
    e, d, aux, _ = msrd.apply_train(tv, params, student_vars['batch_stats'], images)
    return losses.distillation_loss(e, d) + aux['entropy']

  g_teacher = jax.jit(jax.grad(loss))(teacher_vars, student_vars['params'])
  leaves = jax.tree_util.tree_leaves(g_teacher)
  assert len(leaves) == len(jax.tree_util.tree_leaves(tshapes))
  assert all(not np.any(np.asarray(g)) for g in leaves)

  # The same loss does reach the student (here: its last decoder block).
  def block_loss(block):
    params = flax.core.unfreeze(student_vars['params'])
    params['decoder']['level1_1'] = block
    return loss(teacher_vars, params)

  g_block = jax.jit(jax.grad(block_loss))(student_vars['params']['decoder']['level1_1'])
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(g_block))
  assert np.any(np.asarray(g_block['conv1']['kernel']))
  assert np.any(np.asarray(g_block['attention']['conv_h']['kernel']))

  # The teacher's variables are not in the student's tree.
  teacher_top = set(tshapes['params'])
  assert {'conv1', 'bn1', 'layer1_0', 'layer3_0'} <= teacher_top
  assert not teacher_top & set(sshapes['params'])
  assert not set(tshapes['batch_stats']) & set(sshapes['batch_stats'])
  assert not any(k.startswith('layer') for k in sshapes['params'])


# ------------------------------------------------------------ 8. config validation


def test_base_config_is_valid():
  config_lib.validate(config_lib.base_config())
  for size in (32, 64, 96, 224):
    config_lib.validate(small_config('resnet18', size))


@pytest.mark.parametrize(
  'field,value,needle',
  [
    ('data.image_size', 100, 'data.image_size'),
    ('data.image_size', 16, 'data.image_size'),
    ('data.image_size', 80, 'data.image_size'),  # a multiple of 16, not of 32
    ('model.backbone', 'resnet152', 'model.backbone'),
    ('model.fusion', 'bifpn', 'model.fusion'),
    ('model.memory.mode', 'sparse', 'model.memory.mode'),
    ('model.coord_attention', ('fusion', 'encoder'), 'encoder'),
  ],
)
def test_validate_rejects(field, value, needle):
  config = config_lib.base_config()
  *parents, leaf = field.split('.')
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(config)
  assert isinstance(info.value, ValueError)
  message = str(info.value)
  assert needle in message and str(value if not isinstance(value, tuple) else value[1]) in message


def test_validate_lists_every_problem_at_once():
  config = config_lib.base_config()
  config.data.image_size = 100
  config.model.backbone = 'resnet152'
  config.model.fusion = 'bifpn'
  config.model.memory.mode = 'sparse'
  config.model.coord_attention = ('encoder', 'decoder')
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(config)
  message = str(info.value)
  for needle in (
    'data.image_size',
    '100',
    'model.backbone',
    'resnet152',
    'model.fusion',
    'bifpn',
    'model.memory.mode',
    'sparse',
    'model.coord_attention',
    'encoder',
  ):
    assert needle in message, needle
  assert len(message.strip().splitlines()) == 1 + 5
