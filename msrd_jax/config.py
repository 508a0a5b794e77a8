"""The full set of configuration fields, with the defaults of design.md.

Config files in `configs/` start from `base_config()` and change what their experiment
needs; every field can be overridden on the command line as `--config.a.b=value`.
"""

from __future__ import annotations

import ml_collections

ARCHITECTURES = ('resnet18', 'resnet34', 'resnet50', 'wide_resnet50_2', 'wide_resnet101_2')
FUSIONS = ('msff', 'mff')
ATTENTION_PLACES = ('fusion', 'decoder')
MEMORY_MODES = ('replace', 'residual', 'off')
LOSSES = ('global', 'pixel')
MAP_MODES = ('add', 'mul')
DATASETS = ('mvtec', 'visa')


def base_config() -> ml_collections.ConfigDict:
  """Every field the code reads, at the paper's settings (design.md)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.backbone = 'wide_resnet50_2'
  # Path written by `python -m msrd_jax.port`, or None for a random teacher.
  c.model.teacher_weights = ml_collections.FieldReference(None, field_type=str)
  c.model.fusion = 'msff'
  c.model.msff = ml_collections.ConfigDict({'init_self': 1.0, 'init_other': 0.5})
  c.model.coord_attention = ('fusion', 'decoder')
  c.model.memory = ml_collections.ConfigDict()
  c.model.memory.mode = 'replace'
  c.model.memory.slots = 50
  c.model.memory.temperature = 0.05
  # None means 1 / slots.
  c.model.memory.shrink = ml_collections.FieldReference(None, field_type=float)
  c.model.memory.entropy_weight = 2e-4

  c.data = ml_collections.ConfigDict()
  c.data.dataset = 'mvtec'  # folder layout of MVTec AD (also BTAD, MPDD, own data) or 'visa'
  c.data.root = ml_collections.FieldReference(None, field_type=str)
  c.data.category = 'bottle'
  c.data.image_size = 256
  c.data.num_threads = 8
  c.data.prefetch = 2
  # Decoded, resized training images are kept in memory up to this many bytes.
  c.data.cache_bytes = 4 * 2**30

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 16  # global batch, split across all devices
  c.train.epochs = 200
  c.train.learning_rate = 0.005
  c.train.b1 = 0.5
  c.train.b2 = 0.999
  c.train.loss = 'global'
  c.train.dtype = 'float32'  # or 'bfloat16' for the compute of trainable modules
  c.train.checkpoint_every_steps = 500
  c.train.keep_checkpoints = 2
  c.train.log_every_steps = 10

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 16
  c.eval.map_mode = 'add'
  c.eval.sigma = 4.0
  # None means the model's input size.
  c.eval.resolution = ml_collections.FieldReference(None, field_type=int)
  c.eval.num_pictures = 12
  return c
