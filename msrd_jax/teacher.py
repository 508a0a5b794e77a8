"""The frozen teacher: a Flax ResNet with torchvision's v1.5 semantics.

The teacher returns the outputs of layer1, layer2 and layer3 (strides 4, 8, 16) for RGB
images in [0, 1]; ImageNet normalization happens inside. Its BatchNorm always uses the
running statistics and it is never optimized.

Parameter names follow the torchvision state_dict with '.' before an index turned into
'_' (`layer1.0.downsample.1.weight` -> `layer1_0/downsample_1/scale`), so that the weight
port in `msrd_jax.port` is a renaming plus a transpose.

Public API:
  ARCH_SPECS, feature_channels(arch)
  ResNet, BasicBlock, Bottleneck        (Flax modules; the blocks are reused by the OCE)
  init_teacher(arch, seed) -> variables (random weights, with a loud warning)
  load_teacher(arch, path) -> variables (a file written by `python -m msrd_jax.port`)
  from_config(config) -> variables      (the teacher a config names)
  save_teacher(path, arch, variables)
  extract_features(arch, weights, images) -> [e1, e2, e3]
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from msrd_jax import files
from msrd_jax.errors import UserError
from msrd_jax.layers import Layers

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TEACHER_FORMAT = 'msrd_jax.teacher/1'


class TeacherFileError(UserError):
  """A teacher file that is not one, or holds another architecture."""


@dataclasses.dataclass(frozen=True)
class ArchSpec:
  block: str  # 'basic' or 'bottleneck'
  layers: tuple[int, int, int, int]
  width_per_group: int = 64

  @property
  def expansion(self) -> int:
    return 1 if self.block == 'basic' else 4


# A teacher architecture: a name of ARCH_SPECS or a spec of one's own.
Arch = str | ArchSpec

ARCH_SPECS: dict[str, ArchSpec] = {
  'resnet18': ArchSpec('basic', (2, 2, 2, 2)),
  'resnet34': ArchSpec('basic', (3, 4, 6, 3)),
  'resnet50': ArchSpec('bottleneck', (3, 4, 6, 3)),
  'wide_resnet50_2': ArchSpec('bottleneck', (3, 4, 6, 3), 128),
  'wide_resnet101_2': ArchSpec('bottleneck', (3, 4, 23, 3), 128),
}


def arch_spec(arch: Arch) -> ArchSpec:
  """The spec of a named architecture, or a ValueError listing the known ones.

  An ArchSpec passes through, so that reduced configurations (used by the parity
  fixtures) work wherever a name does.
  """
  if isinstance(arch, ArchSpec):
    return arch
  try:
    return ARCH_SPECS[arch]
  except KeyError:
    raise ValueError(
      f'unknown teacher architecture {arch!r}; expected one of {", ".join(ARCH_SPECS)}'
    ) from None


def feature_channels(arch: Arch) -> tuple[int, int, int]:
  """Channels (C1, C2, C3) of the teacher's layer1..layer3 outputs."""
  e = arch_spec(arch).expansion
  return (64 * e, 128 * e, 256 * e)


class BasicBlock(nn.Module):
  """torchvision's BasicBlock: two 3x3 convs; the stride sits on the first."""

  planes: int
  stride: int = 1
  downsample: bool = False
  layers: Layers = Layers()

  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv, norm = self.layers.conv, functools.partial(self.layers.norm, train)
    y = nn.relu(norm('bn1')(conv(self.planes, 3, self.stride, 'conv1')(x)))
    y = norm('bn2')(conv(self.planes, 3, 1, 'conv2')(y))
    if self.downsample:
      x = norm('downsample_1')(conv(self.planes, 1, self.stride, 'downsample_0')(x))
    return nn.relu(y + x)


class Bottleneck(nn.Module):
  """torchvision's Bottleneck (v1.5): 1x1, 3x3 with the stride, 1x1 expanding by 4."""

  planes: int
  stride: int = 1
  downsample: bool = False
  width_per_group: int = 64
  layers: Layers = Layers()

  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv, norm = self.layers.conv, functools.partial(self.layers.norm, train)
    width = self.planes * self.width_per_group // 64
    y = nn.relu(norm('bn1')(conv(width, 1, 1, 'conv1')(x)))
    y = nn.relu(norm('bn2')(conv(width, 3, self.stride, 'conv2')(y)))
    y = norm('bn3')(conv(self.planes * 4, 1, 1, 'conv3')(y))
    if self.downsample:
      x = norm('downsample_1')(conv(self.planes * 4, 1, self.stride, 'downsample_0')(x))
    return nn.relu(y + x)


def make_stage(
  spec: ArchSpec,
  name: str,
  planes: int,
  blocks: int,
  stride: int,
  in_channels: int,
  layers: Layers,
) -> list[nn.Module]:
  """The blocks of one ResNet stage, named like torchvision's `layerK.i`."""
  kind = BasicBlock if spec.block == 'basic' else Bottleneck
  extra = {} if spec.block == 'basic' else {'width_per_group': spec.width_per_group}
  needs_downsample = stride != 1 or in_channels != planes * spec.expansion
  return [
    kind(
      planes=planes,
      stride=stride if i == 0 else 1,
      downsample=needs_downsample and i == 0,
      layers=layers,
      name=f'{name}_{i}',
      **extra,
    )
    for i in range(blocks)
  ]


class ResNet(nn.Module):
  """The teacher: torchvision ResNet up to layer3, frozen BatchNorm.

  Input: (B, H, W, 3) RGB in [0, 1]. Output: [e1, e2, e3], NHWC at strides 4, 8, 16 with
  `feature_channels(arch)` channels (spatial sizes follow PyTorch's floor arithmetic:
  H -> ceil(H/2) -> ceil(../2) ... as torchvision does for odd sizes).
  """

  arch: Arch
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> list[jax.Array]:
    spec = arch_spec(self.arch)
    layers = Layers(self.dtype)
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    x = ((images.astype(jnp.float32) - mean) / std).astype(self.dtype)
    x = nn.relu(layers.norm(False, 'bn1')(layers.conv(64, 7, 2, 'conv1')(x)))
    # Flax pads max-pool windows with -inf, as PyTorch does.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    features = []
    in_channels = 64
    for k, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2))):
      for block in make_stage(
        spec, f'layer{k + 1}', planes, spec.layers[k], stride, in_channels, layers
      ):
        x = block(x)  # always frozen: running statistics
      in_channels = planes * spec.expansion
      features.append(x)
    return features


def init_teacher(arch: str, seed: int = 0, warn: bool = True) -> dict:
  """Random teacher variables {'params', 'batch_stats'} (torchvision's init scheme).

  A random teacher gives features with no ImageNet knowledge; anomaly scores made with
  it are not meaningful for comparison with published figures, hence the warning.
  """
  if warn:
    warnings.warn(
      f'The {arch} teacher has RANDOM weights (model.teacher_weights is None): '
      'results are not comparable with published figures. Port ImageNet weights '
      'with `python -m msrd_jax.port` and set model.teacher_weights.',
      RuntimeWarning,
      stacklevel=2,
    )
  model = ResNet(arch)
  variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 64, 64, 3)))
  return flax.core.unfreeze(variables)


def teacher_shapes(arch: Arch) -> dict:
  """The variable tree of a teacher as ShapeDtypeStructs, without allocating it."""
  model = ResNet(arch)
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


def save_teacher(path: str, arch: str, variables: dict) -> None:
  """Writes teacher variables as one msgpack file that `load_teacher` reads.

  The file holds numpy float32 arrays and the architecture's name; no torch is needed
  to read it. Written to a temporary name first so a crash never leaves half a file.
  """
  arch_spec(arch)
  payload = {
    'format': TEACHER_FORMAT,
    'arch': arch,
    'variables': jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), variables),
  }
  files.atomic_write(path, flax.serialization.msgpack_serialize(payload))


def load_teacher(arch: str, path: str) -> dict:
  """Reads a teacher written by `save_teacher` / `python -m msrd_jax.port`.

  Raises TeacherFileError naming the file when it is not such a file, holds another
  architecture, or its tree or shapes differ from `arch`'s.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f'teacher weights {path!r} do not exist; write them with '
      f'`python -m msrd_jax.port --arch {arch} --input ... '
      f'--output {path}`'
    )
  with open(path, 'rb') as f:
    data = f.read()
  try:
    payload = flax.serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several unrelated types for garbage.
    raise TeacherFileError(
      f'{path!r} is not a teacher file written by msrd_jax.port ({type(e).__name__}: {e})'
    ) from None
  if not isinstance(payload, dict) or payload.get('format') != TEACHER_FORMAT:
    raise TeacherFileError(
      f'{path!r} is not a teacher file written by msrd_jax.port'
      f' (expected format {TEACHER_FORMAT!r})'
    )
  if payload['arch'] != arch:
    raise TeacherFileError(
      f'{path!r} holds a {payload["arch"]!r} teacher but the '
      f'config asks for {arch!r} (model.backbone)'
    )
  variables = payload['variables']
  expected = flax.traverse_util.flatten_dict(flax.core.unfreeze(teacher_shapes(arch)), sep='/')
  found = flax.traverse_util.flatten_dict(variables, sep='/')
  problems = [f'missing {k}' for k in expected if k not in found]
  problems += [f'unexpected {k}' for k in found if k not in expected]
  problems += [
    f'{k}: shape {found[k].shape}, expected {expected[k].shape}'
    for k in expected
    if k in found and found[k].shape != expected[k].shape
  ]
  if problems:
    raise TeacherFileError(
      f'{path!r} does not match the {arch} teacher: ' + '; '.join(problems[:10])
    )
  return variables


def from_config(config: ml_collections.ConfigDict) -> dict:
  """The teacher of a config: model.teacher_weights, or a random one drawn from
  model.teacher_seed (None: config.seed)."""
  arch = config.model.backbone
  if config.model.teacher_weights:
    return load_teacher(arch, config.model.teacher_weights)
  seed = config.model.get('teacher_seed')
  return init_teacher(arch, seed=config.seed if seed is None else seed, warn=True)


def fingerprint(variables: dict) -> float:
  """A cheap number that changes with the teacher's weights (stored in checkpoints)."""
  leaves = jax.tree_util.tree_leaves(variables)
  return float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in leaves))


@functools.partial(jax.jit, static_argnames=('arch',))
def _forward(variables, images, arch):
  return ResNet(arch).apply(variables, images)


def extract_features(
  arch: str, weights: str | None, images: np.ndarray | jax.Array
) -> list[jax.Array]:
  """Teacher features of a batch of images.

  Args:
    arch: one of ARCH_SPECS ('resnet18', ..., 'wide_resnet101_2').
    weights: a file written by `python -m msrd_jax.port`, or None for random weights
      (with a RuntimeWarning: features are then not meaningful).
    images: (B, H, W, 3) float32 RGB in [0, 1].

  Returns:
    [e1, e2, e3]: NHWC float32 arrays, strides 4, 8, 16, channels feature_channels(arch).
  """
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'images must be (B, H, W, 3) RGB, got shape {images.shape}')
  variables = init_teacher(arch, warn=True) if weights is None else load_teacher(arch, weights)
  return _forward(variables, images, arch)
