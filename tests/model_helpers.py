"""Shared helpers of the model tests: random variables, numpy BatchNorm, small configs."""

import flax
import jax
import jax.numpy as jnp
import numpy as np

from msrd_jax import config as config_lib
from msrd_jax import model as model_lib
from msrd_jax import teacher

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
