"""The full set of configuration fields, with the defaults of design.md.

Config files in `configs/` start from `base_config()` and change what their experiment
needs; every field can be overridden on the command line as `--config.a.b=value`.
"""

from __future__ import annotations

import os

import ml_collections

from msrd_jax.errors import UserError

ARCHITECTURES = ('resnet18', 'resnet34', 'resnet50', 'wide_resnet50_2', 'wide_resnet101_2')
FUSIONS = ('msff', 'mff')
MSFF_FORMS = ('normalized', 'gated')
ATTENTION_PLACES = ('fusion', 'decoder')
MEMORY_MODES = ('replace', 'residual', 'off')
SHRINK_GRADS = ('masked', 'exact')
LOSSES = ('global', 'pixel')
MAP_MODES = ('add', 'mul')
DATASETS = ('mvtec', 'visa', 'synthetic')
DTYPES = ('float32', 'bfloat16')
CALIBRATION_SOURCES = ('train', 'holdout', 'good_dir', 'none')
INITS = ('kaiming', 'pytorch')
STEPS_PER_EPOCH = ('stream', 'ceil')
MASK_RESIZES = ('nearest', 'bilinear')

MVTEC_URL = 'https://www.mvtec.com/company/research/datasets/mvtec-ad'


def base_config() -> ml_collections.ConfigDict:
  """Every field the code reads, at the paper's settings (design.md)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.backbone = 'wide_resnet50_2'
  # Path written by `python -m msrd_jax.port`, or None for a random teacher.
  c.model.teacher_weights = ml_collections.FieldReference(None, field_type=str)
  c.model.fusion = 'msff'
  # form 'normalized' is design.md's fusion (init_self, init_other: its logits' start);
  # 'gated' adds the other levels to each level's own through learned gates that start
  # at gate_init (README, Ablation study: MSFF's form).
  c.model.msff = ml_collections.ConfigDict(
    {'init_self': 1.0, 'init_other': 0.5, 'form': 'normalized', 'gate_init': 0.0}
  )
  c.model.coord_attention = ('fusion', 'decoder')
  c.model.memory = ml_collections.ConfigDict()
  c.model.memory.mode = 'replace'
  c.model.memory.slots = 50
  # MemAE's addressing, softmax(cos): at 0.05 (design.md's first choice) every position
  # read one of a handful of the slots (README, Ablation study: the temperature).
  c.model.memory.temperature = 1.0
  # None means 1 / slots.
  c.model.memory.shrink = ml_collections.FieldReference(None, field_type=float)
  c.model.memory.entropy_weight = 2e-4
  # How training differentiates the hard shrinkage (memory.hard_shrink): 'exact', the
  # formula's derivative, with which the demo's figures were made, or 'masked', its mask
  # held constant (configs/mvtec.py): the exact derivative spikes at the threshold, and
  # what training makes of the memory then depends on float32 rounding (README, "The
  # memory bank's shrinkage gradient"). Either loads the other's checkpoints.
  c.model.memory.shrink_grad = 'exact'
  # None: 3 Bottlenecks for 50/101-layer teachers, 2 BasicBlocks for 18/34 (design.md).
  c.model.oce_blocks = ml_collections.FieldReference(None, field_type=int)
  # Initialization of the decoder's 2x2 transposed convs and of coordinate attention's
  # 1x1 convs. 'kaiming': kaiming normal (fan_out, ReLU) on the transposed convs, as on
  # every other conv, and Flax's default (lecun normal, zero bias) on coordinate
  # attention. 'pytorch': PyTorch's default, uniform(+-1/sqrt(fan_in)) on weights and
  # biases, which RD4AD's ConvTranspose2d and coordinate attention's reference code keep.
  c.model.init = 'kaiming'
  # The seed of a random teacher (no teacher_weights); None: the run's seed.
  c.model.teacher_seed = ml_collections.FieldReference(None, field_type=int)

  c.data = ml_collections.ConfigDict()
  # 'mvtec': the MVTec AD folder layout (also BTAD, MPDD and one's own data);
  # 'visa': VisA with split_csv/1cls.csv; 'synthetic': the embedded benchmark, generated
  # into data.root (None: a cache folder) on first use and read as 'mvtec'; a data.root
  # that holds other data (not empty, no benchmark marker) is read as 'mvtec'.
  c.data.dataset = 'mvtec'
  c.data.root = ml_collections.FieldReference(None, field_type=str)
  c.data.synthetic_seed = 0
  c.data.category = 'bottle'
  c.data.image_size = 256
  c.data.num_threads = 8
  c.data.prefetch = 2
  # Decoded, resized training images are kept in memory up to this many bytes.
  c.data.cache_bytes = 4 * 2**30

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 16  # global batch, split across all devices
  c.train.epochs = 200
  # None: the step count of train.epochs (below); an int overrides the epochs.
  c.train.steps = ml_collections.FieldReference(None, field_type=int)
  # How epochs become steps, N training images, batch B: 'stream' ceil(epochs * N / B),
  # the steps that show every image `epochs` times; 'ceil' epochs * ceil(N / B),
  # RD4AD's count (its DataLoader ends each epoch with a smaller batch). Either way the
  # batches are full and run across epoch boundaries (data.pipeline.TrainLoader).
  c.train.steps_per_epoch = 'stream'
  c.train.learning_rate = 0.005
  c.train.b1 = 0.5
  c.train.b2 = 0.999
  c.train.loss = 'global'
  c.train.dtype = 'float32'  # or 'bfloat16' for the compute of trainable modules
  c.train.checkpoint_every_steps = 500
  c.train.keep_checkpoints = 2
  c.train.log_every_steps = 10
  # Multi-process (multi-host) training: every process runs the same command, and
  # jax.distributed.initialize() joins them first (see msrd_jax.distributed). On SLURM,
  # Open MPI, Kubernetes and Cloud TPU the job is found in the environment; elsewhere the
  # three fields below say it ('host:port' of process 0, the process count, this one's id).
  c.train.distributed = False
  c.train.coordinator_address = ml_collections.FieldReference(None, field_type=str)
  c.train.num_processes = ml_collections.FieldReference(None, field_type=int)
  c.train.process_id = ml_collections.FieldReference(None, field_type=int)

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 16
  c.eval.map_mode = 'add'
  c.eval.sigma = 4.0
  # None means the model's input size.
  c.eval.resolution = ml_collections.FieldReference(None, field_type=int)
  # False: half-pixel bilinear upsampling of the per-level maps; True: RD4AD's
  # F.interpolate(..., align_corners=True).
  c.eval.align_corners = False
  # Ground-truth masks to eval.resolution: 'nearest', or 'bilinear' then > 0.5 (RD4AD's
  # transforms.Resize of the 0/255 mask, ToTensor, gt > 0.5).
  c.eval.mask_resize = 'nearest'
  c.eval.num_pictures = 12
  c.eval.after_training = True

  # The decision threshold, learned without labelled defects (msrd_jax.calibrate): the
  # scores of defect-free images are stored with the run, and the threshold is their
  # (1 - false_alarm_rate) quantile. Source of those images: 'train' (the training
  # images themselves: no image is taken from training, but their scores are
  # optimistic, so the false-alarm rate on new images exceeds the nominal one),
  # 'holdout' (holdout_fraction of train/good, kept out of training), 'good_dir' (a
  # folder of defect-free images) or 'none' (no calibration after training).
  c.calibration = ml_collections.ConfigDict()
  c.calibration.source = 'train'
  c.calibration.holdout_fraction = 0.1
  c.calibration.good_dir = ml_collections.FieldReference(None, field_type=str)
  c.calibration.false_alarm_rate = 0.01
  c.calibration.pixel_false_alarm_rate = 0.001
  return c


class ConfigError(UserError):
  """A config field holds a value the code cannot use."""


def _one_of(name: str, value, choices) -> list[str]:
  return [] if value in choices else [f'{name} = {value!r} is not one of {choices}']


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError listing every field whose value the code cannot use."""
  m, d, t, e = config.model, config.data, config.train, config.eval
  problems = _one_of('model.backbone', m.backbone, ARCHITECTURES)
  problems += _one_of('model.fusion', m.fusion, FUSIONS)
  problems += [
    f'model.coord_attention has {p!r}, expected places in {ATTENTION_PLACES}'
    for p in m.coord_attention
    if p not in ATTENTION_PLACES
  ]
  if m.fusion == 'mff' and 'fusion' in m.coord_attention:
    problems.append(
      "model.coord_attention has 'fusion', which needs model.fusion = 'msff' (RD's "
      "mff has no fused maps to attend to); drop 'fusion' or use msff"
    )
  problems += _one_of('model.msff.form', m.msff.form, MSFF_FORMS)
  problems += _one_of('model.memory.mode', m.memory.mode, MEMORY_MODES)
  problems += _one_of('model.memory.shrink_grad', m.memory.shrink_grad, SHRINK_GRADS)
  problems += _one_of('model.init', m.init, INITS)
  if m.memory.slots < 1:
    problems.append(f'model.memory.slots must be >= 1, got {m.memory.slots}')
  if m.memory.shrink is not None and not 0 <= m.memory.shrink < 1:
    problems.append(f'model.memory.shrink must be in [0, 1) or None, got {m.memory.shrink}')
  if m.memory.temperature <= 0:
    problems.append(f'model.memory.temperature must be > 0, got {m.memory.temperature}')
  problems += _one_of('data.dataset', d.dataset, DATASETS)
  if d.image_size < 32 or d.image_size % 32:
    problems.append(
      f'data.image_size must be a positive multiple of 32 (the embedding '
      f'is at stride 32 and the decoder doubles it back), got {d.image_size}'
    )
  problems += _one_of('train.loss', t.loss, LOSSES)
  problems += _one_of('train.dtype', t.dtype, DTYPES)
  if t.batch_size < 1:
    problems.append(f'train.batch_size must be >= 1, got {t.batch_size}')
  if t.steps is None and t.epochs <= 0:
    problems.append(f'train.epochs must be > 0, got {t.epochs}')
  if t.steps is not None and t.steps < 1:
    problems.append(f'train.steps must be >= 1 or None, got {t.steps}')
  problems += _one_of('train.steps_per_epoch', t.steps_per_epoch, STEPS_PER_EPOCH)
  if t.checkpoint_every_steps < 1:
    problems.append('train.checkpoint_every_steps must be >= 1')
  problems += _distributed_problems(t)
  problems += _one_of('eval.map_mode', e.map_mode, MAP_MODES)
  problems += _one_of('eval.mask_resize', e.mask_resize, MASK_RESIZES)
  if e.batch_size < 1:
    problems.append(f'eval.batch_size must be >= 1, got {e.batch_size}')
  problems += _calibration_problems(config)
  if problems:
    raise ConfigError('invalid config:\n  ' + '\n  '.join(problems))


def _calibration_problems(config: ml_collections.ConfigDict) -> list[str]:
  c = config.get('calibration')
  if c is None:  # a config file built on an older base_config
    return []
  problems = _one_of('calibration.source', c.source, CALIBRATION_SOURCES)
  if not 0 < c.holdout_fraction < 1:
    problems.append(f'calibration.holdout_fraction must be in (0, 1), got {c.holdout_fraction}')
  if c.source == 'good_dir' and not c.good_dir:
    problems.append("calibration.source = 'good_dir' needs calibration.good_dir (a folder)")
  for name in ('false_alarm_rate', 'pixel_false_alarm_rate'):
    if not 0 < c[name] < 1:
      problems.append(f'calibration.{name} must be in (0, 1), got {c[name]}')
  return problems


def _distributed_problems(t: ml_collections.ConfigDict) -> list[str]:
  given = [
    k for k in ('coordinator_address', 'num_processes', 'process_id') if t.get(k) is not None
  ]
  if given and not t.distributed:
    # Silently training alone while the other hosts wait for this one would be worse.
    return [f'train.{", train.".join(given)} set but train.distributed is False']
  n, i = t.get('num_processes'), t.get('process_id')
  problems = []
  if n is not None and n < 1:
    problems.append(f'train.num_processes must be >= 1, got {n}')
  if i is not None and (i < 0 or (n is not None and i >= n)):
    problems.append(f'train.process_id must be in [0, train.num_processes), got {i}')
  return problems


def default_cache_dir() -> str:
  """$MSRD_JAX_CACHE, else $XDG_CACHE_HOME/msrd_jax, else ~/.cache/msrd_jax."""
  if os.environ.get('MSRD_JAX_CACHE'):
    return os.environ['MSRD_JAX_CACHE']
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'msrd_jax')


def resolve_data(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """(reader, root) for config.data: the reader is 'mvtec' or 'visa'.

  For 'synthetic' the benchmark is generated on first use into data.root (None: a
  cache folder), unless data.root is a non-empty folder that holds no benchmark: that
  is read as a folder in the MVTec layout, so that the demo config trains on one's own
  data. A missing root says where to get the data set and which field to set.
  """
  d = config.data
  if d.dataset == 'synthetic':
    from msrd_jax.data import synthetic  # pylint: disable=g-import-not-at-top

    if d.root and os.path.isdir(d.root) and os.listdir(d.root):
      if synthetic.read_marker(d.root) is None:
        return 'mvtec', d.root
    root = d.root or os.path.join(default_cache_dir(), f'synthetic-seed{d.synthetic_seed}')
    return 'mvtec', synthetic.ensure_synthetic(root, seed=d.synthetic_seed)
  if d.root is None or not os.path.isdir(d.root):
    where = 'is not set' if d.root is None else f'= {d.root!r} is not a folder'
    if d.dataset == 'visa':
      hint = (
        'Download VisA (https://github.com/amazon-science/spot-diff), keep its '
        'split_csv/1cls.csv, and pass --config.data.root=/path/to/VisA.'
      )
    else:
      hint = (
        f'Download MVTec AD from {MVTEC_URL} (mvtec_anomaly_detection.tar.xz), '
        'extract it and pass --config.data.root=/path/to/mvtec_anomaly_detection '
        '(any folder in the same layout works: <root>/<category>/train/good, '
        'test/<defect>, ground_truth/<defect>).'
      )
    raise FileNotFoundError(f'config.data.root {where}. {hint}')
  return d.dataset, d.root
