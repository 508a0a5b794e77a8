"""The assembly: teacher -> fusion -> OCE -> memory -> student decoder.

`Student` holds every trainable part; the frozen teacher stays outside it, so its weights
are never in the optimizer state and receive no gradient. `MSRD` wires the two from a
config and is what training, evaluation and prediction call.

With model.fusion = 'mff', model.coord_attention = () and model.memory.mode = 'off' the
student is plain RD4AD (Deng & Li, CVPR 2022).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from msrd_jax import teacher as teacher_lib
from msrd_jax.decoder import Decoder
from msrd_jax.fusion import MFF, MSFF
from msrd_jax.memory import MemoryBank
from msrd_jax.oce import OCE


class Student(nn.Module):
  """Teacher features [e1, e2, e3] -> (student features [d1, d2, d3], aux).

  aux: {'entropy': scalar read-weight entropy of the memory (0 when off),
        'embedding': (B, h4, w4, D) the one-class embedding after the memory}.
  """

  arch: teacher_lib.Arch
  fusion: str = 'msff'
  msff_init_self: float = 1.0
  msff_init_other: float = 0.5
  attention: tuple[str, ...] = ('fusion', 'decoder')
  memory_mode: str = 'replace'
  memory_slots: int = 50
  memory_temperature: float = 0.05
  memory_shrink: float | None = None
  oce_blocks: int | None = None
  train: bool = False
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, features: Sequence[jax.Array]) -> tuple[list[jax.Array], dict]:
    kw = dict(train=self.train, dtype=self.dtype, bn_axis_name=self.bn_axis_name)
    channels = teacher_lib.feature_channels(self.arch)
    features = [f.astype(self.dtype) for f in features]
    if self.fusion == 'msff':
      x = MSFF(
        channels,
        self.msff_init_self,
        self.msff_init_other,
        attention='fusion' in self.attention,
        name='fusion',
        **kw,
      )(features)
    elif self.fusion == 'mff':
      x = MFF(channels, name='fusion', **kw)(features)
    else:
      raise ValueError(f"model.fusion must be 'msff' or 'mff', got {self.fusion!r}")
    z = OCE(self.arch, self.oce_blocks, name='oce', **kw)(x)
    z, entropy, _ = MemoryBank(
      self.memory_slots,
      self.memory_temperature,
      self.memory_shrink,
      self.memory_mode,
      name='memory',
    )(z)
    decoded = Decoder(self.arch, attention='decoder' in self.attention, name='decoder', **kw)(z)
    return decoded, {'entropy': entropy, 'embedding': z}


def student_from_config(
  config: ml_collections.ConfigDict, *, train: bool, bn_axis_name: str | None = None
) -> Student:
  m = config.model
  return Student(
    arch=m.backbone,
    fusion=m.fusion,
    msff_init_self=m.msff.init_self,
    msff_init_other=m.msff.init_other,
    attention=tuple(m.coord_attention),
    memory_mode=m.memory.mode,
    memory_slots=m.memory.slots,
    memory_temperature=m.memory.temperature,
    memory_shrink=m.memory.shrink,
    oce_blocks=m.get('oce_blocks'),
    train=train,
    dtype=jnp.dtype(config.train.dtype),
    bn_axis_name=bn_axis_name,
  )


class MSRD:
  """Teacher and student of one config, as pure functions of their variables.

  teacher_vars: {'params', 'batch_stats'} of the frozen ResNet.
  student_vars: {'params', 'batch_stats'} of the Student.
  """

  def __init__(self, config: ml_collections.ConfigDict, bn_axis_name: str | None = None):
    self.arch = config.model.backbone
    self.teacher = teacher_lib.ResNet(self.arch, dtype=jnp.dtype(config.train.dtype))
    self.student_train = student_from_config(config, train=True, bn_axis_name=bn_axis_name)
    self.student_eval = student_from_config(config, train=False)

  def teacher_features(self, teacher_vars: dict, images: jax.Array) -> list[jax.Array]:
    """[e1, e2, e3] as float32, outside any gradient; images (B, H, W, 3) in [0, 1]."""
    feats = self.teacher.apply(teacher_vars, images)
    return [jax.lax.stop_gradient(f.astype(jnp.float32)) for f in feats]

  def init(self, rng: jax.Array, teacher_vars: dict, image_size: int) -> dict:
    """Fresh student variables for square inputs of `image_size`."""
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)

    @jax.jit  # eager initialization dispatches op by op and takes many seconds
    def init(rng, teacher_vars):
      return self.student_eval.init(rng, self.teacher_features(teacher_vars, images))

    return dict(init(rng, teacher_vars))

  def apply_train(
    self, teacher_vars: dict, params: dict, batch_stats: dict, images: jax.Array
  ) -> tuple[list, list, dict, dict]:
    """Training forward: BN on batch statistics. Returns (e, d, aux, new batch_stats)."""
    feats = self.teacher_features(teacher_vars, images)
    (decoded, aux), updates = self.student_train.apply(
      {'params': params, 'batch_stats': batch_stats}, feats, mutable=['batch_stats']
    )
    return feats, [d.astype(jnp.float32) for d in decoded], aux, updates['batch_stats']

  def apply_eval(
    self, teacher_vars: dict, student_vars: dict, images: jax.Array
  ) -> tuple[list, list, dict]:
    """Inference forward: BN on running averages. Returns (e, d, aux)."""
    feats = self.teacher_features(teacher_vars, images)
    decoded, aux = self.student_eval.apply(student_vars, feats)
    return feats, [d.astype(jnp.float32) for d in decoded], aux
