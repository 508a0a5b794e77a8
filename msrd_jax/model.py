"""The assembly: teacher -> fusion -> OCE -> memory -> student decoder.

`Student` holds every trainable part; the frozen teacher stays outside it, so its weights
are never in the optimizer state and receive no gradient. `MSRD` wires the two from a
config and is what training, evaluation and prediction call.

With model.fusion = 'mff', model.coord_attention = () and model.memory.mode = 'off' the
student is plain RD4AD (Deng & Li, CVPR 2022).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from msrd_jax import teacher as teacher_lib
from msrd_jax.decoder import Decoder
from msrd_jax.fusion import MFF, MSFF
from msrd_jax.layers import Layers
from msrd_jax.memory import MemoryBank
from msrd_jax.oce import OCE


class Student(nn.Module):
  """Teacher features [e1, e2, e3] -> (student features [d1, d2, d3], aux).

  aux: {'entropy': scalar read-weight entropy of the memory (0 when off),
        'query': (B, h4, w4, D) the one-class embedding before the memory,
        'embedding': (B, h4, w4, D) the one-class embedding after the memory}.
  With `train`, BatchNorm uses (and updates) batch statistics.
  """

  arch: teacher_lib.Arch
  fusion: str = 'msff'
  msff_init_self: float = 1.0
  msff_init_other: float = 0.5
  msff_form: str = 'normalized'
  msff_gate_init: float = 0.0
  attention: tuple[str, ...] = ('fusion', 'decoder')
  memory_mode: str = 'replace'
  memory_slots: int = 50
  memory_temperature: float = 1.0
  memory_shrink: float | None = None
  memory_shrink_grad: str = 'exact'
  oce_blocks: int | None = None
  layers: Layers = Layers()

  @nn.compact
  def __call__(
    self, features: Sequence[jax.Array], train: bool = False
  ) -> tuple[list[jax.Array], dict]:
    channels = teacher_lib.feature_channels(self.arch)
    features = [f.astype(self.layers.dtype) for f in features]
    if self.fusion == 'msff':
      fuse = MSFF(
        channels,
        self.msff_init_self,
        self.msff_init_other,
        attention='fusion' in self.attention,
        form=self.msff_form,
        gate_init=self.msff_gate_init,
        layers=self.layers,
        name='fusion',
      )
    elif self.fusion == 'mff':
      fuse = MFF(channels, self.layers, name='fusion')
    else:
      raise ValueError(f"model.fusion must be 'msff' or 'mff', got {self.fusion!r}")
    query = OCE(self.arch, self.oce_blocks, self.layers, name='oce')(fuse(features, train), train)
    z, entropy, _ = MemoryBank(
      self.memory_slots,
      self.memory_temperature,
      self.memory_shrink,
      self.memory_mode,
      self.memory_shrink_grad,
      name='memory',
    )(query)
    decoded = Decoder(
      self.arch, attention='decoder' in self.attention, layers=self.layers, name='decoder'
    )(z, train)
    aux = {'entropy': entropy, 'query': query, 'embedding': z}
    return decoded, aux


def student_from_config(
  config: ml_collections.ConfigDict, bn_axis_name: str | None = None
) -> Student:
  m = config.model
  return Student(
    arch=m.backbone,
    fusion=m.fusion,
    msff_init_self=m.msff.init_self,
    msff_init_other=m.msff.init_other,
    msff_form=m.msff.form,
    msff_gate_init=m.msff.gate_init,
    attention=tuple(m.coord_attention),
    memory_mode=m.memory.mode,
    memory_slots=m.memory.slots,
    memory_temperature=m.memory.temperature,
    memory_shrink=m.memory.shrink,
    memory_shrink_grad=m.memory.shrink_grad,
    oce_blocks=m.get('oce_blocks'),
    layers=Layers(jnp.dtype(config.train.dtype), bn_axis_name, m.get('init', 'kaiming')),
  )


class MSRD:
  """Teacher and student of one config, as pure functions of their variables.

  teacher_vars: {'params', 'batch_stats'} of the frozen ResNet.
  student_vars: {'params', 'batch_stats'} of the Student.
  bn_axis_name: the pmap axis over which training-mode BatchNorm is synchronized.
  """

  def __init__(self, config: ml_collections.ConfigDict, bn_axis_name: str | None = None):
    self.arch = config.model.backbone
    self.teacher = teacher_lib.ResNet(self.arch, dtype=jnp.dtype(config.train.dtype))
    self.student = student_from_config(config, bn_axis_name)

  def teacher_features(self, teacher_vars: dict, images: jax.Array) -> list[jax.Array]:
    """[e1, e2, e3] as float32, outside any gradient; images (B, H, W, 3) in [0, 1]."""
    with jax.named_scope('Teacher'):  # names its operations in profiles (msrd_jax.profiling)
      feats = self.teacher.apply(teacher_vars, images)
    return [jax.lax.stop_gradient(f.astype(jnp.float32)) for f in feats]

  def init(self, rng: jax.Array, teacher_vars: dict, image_size: int) -> dict:
    """Fresh student variables for square inputs of `image_size`."""
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)

    @jax.jit  # eager initialization dispatches op by op and takes many seconds
    def init(rng, teacher_vars):
      return self.student.init(rng, self.teacher_features(teacher_vars, images))

    return dict(init(rng, teacher_vars))

  def abstract_variables(self, image_size: int) -> dict:
    """The student's variables as ShapeDtypeStructs, computed without running anything.

    What a checkpoint is restored into; depends on the teacher only through its shapes.
    """
    return jax.eval_shape(
      lambda: self.init(jax.random.key(0), teacher_lib.teacher_shapes(self.arch), image_size)
    )

  def apply_train(
    self, teacher_vars: dict, params: dict, batch_stats: dict, images: jax.Array
  ) -> tuple[list, list, dict, dict]:
    """Training forward: BN on batch statistics. Returns (e, d, aux, new batch_stats)."""
    feats = self.teacher_features(teacher_vars, images)
    (decoded, aux), updates = self.student.apply(
      {'params': params, 'batch_stats': batch_stats}, feats, train=True, mutable=['batch_stats']
    )
    return feats, [d.astype(jnp.float32) for d in decoded], aux, updates['batch_stats']

  def apply_eval(
    self, teacher_vars: dict, student_vars: dict, images: jax.Array
  ) -> tuple[list, list, dict]:
    """Inference forward: BN on running averages. Returns (e, d, aux)."""
    feats = self.teacher_features(teacher_vars, images)
    decoded, aux = self.student.apply(student_vars, feats, train=False)
    return feats, [d.astype(jnp.float32) for d in decoded], aux
