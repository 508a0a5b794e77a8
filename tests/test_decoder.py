"""The decoder: transposed convolutions and shapes that mirror the teacher."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_helpers import (
  ARCHS,
  small_config,
  student_shapes,
)

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
