"""Ports torchvision ResNet weights into the Flax teacher (and an RD4AD/anomalib student).

    python -m msrd_jax.port --arch wide_resnet50_2 \
        --input wide_resnet50_2-32ee1156.pth --output teachers/wide_resnet50_2.msgpack

Sources: a torchvision state_dict saved as `.pth`/`.pt` (needs torch; read with
weights_only=True, so no pickled code runs) or `.safetensors` (no torch needed; timm's
'tv_in1k' ResNets use torchvision's key names). The output is read by
`msrd_jax.teacher.load_teacher` with no torch installed.

Mapping: conv weight (O, I, kh, kw) -> kernel (kh, kw, I, O); BatchNorm weight, bias,
running_mean, running_var -> scale, bias, mean, var. layer4.*, fc.* and
*.num_batches_tracked are not part of the teacher and are ignored. Any other key the
teacher lacks, any key the teacher needs that is missing and any shape mismatch is an
error that names the key (and both shapes).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence

import flax
import numpy as np
from absl import app, flags

from msrd_jax import cli
from msrd_jax import teacher as teacher_lib
from msrd_jax.errors import UserError

FLAGS = flags.FLAGS


class PortError(UserError):
  """A state_dict that does not fit the requested teacher, or a file that is none."""


IGNORED = re.compile(r'^(layer4\.|fc\.)|\.num_batches_tracked$|^num_batches_tracked$')
_BN_NAMES = {
  'weight': ('params', 'scale'),
  'bias': ('params', 'bias'),
  'running_mean': ('batch_stats', 'mean'),
  'running_var': ('batch_stats', 'var'),
}


@dataclasses.dataclass(frozen=True)
class Entry:
  """How one torch tensor becomes one Flax variable."""

  torch_key: str
  collection: str  # 'params' or 'batch_stats'
  path: tuple[str, ...]  # module path then variable name
  torch_shape: tuple[int, ...]  # the shape the torch tensor must have
  transposed: bool = False  # a ConvTranspose2d: torch (I, O, kh, kw), ours (kh, kw, I, O)

  @property
  def is_conv(self) -> bool:
    return self.path[-1] == 'kernel'

  @property
  def _axes(self) -> tuple[int, ...]:
    return (2, 3, 0, 1) if self.transposed else (2, 3, 1, 0)

  def convert(self, array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, np.float32)
    return np.transpose(array, self._axes) if self.is_conv else array

  def invert(self, array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, np.float32)
    return np.transpose(array, np.argsort(self._axes)) if self.is_conv else array


def _torch_name(module_path: Sequence[str]) -> str:
  # 'layer1_0/downsample_1' -> 'layer1.0.downsample.1'
  return '.'.join(re.sub(r'_(\d+)$', r'.\1', p) for p in module_path)


def expected_entries(arch: teacher_lib.Arch) -> dict[str, Entry]:
  """The torch keys (with their shapes) that the `arch` teacher needs."""
  return _entries(teacher_lib.teacher_shapes(arch), _torch_name)


def _entries(
  variables: Mapping, torch_module: Callable[[Sequence[str]], str], transposed=lambda s: False
) -> dict[str, Entry]:
  """torch key -> Entry for every variable of a Flax tree (arrays or shapes).

  torch_module maps a module path to torch's module name; transposed(shape) says which
  kernels are ConvTranspose2d weights."""
  shapes = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  entries = {}
  for (collection, *modules, name), leaf in shapes.items():
    shape = tuple(np.shape(leaf))
    flip = name == 'kernel' and transposed(shape)
    if name == 'kernel':
      kh, kw, i, o = shape
      torch_suffix, torch_shape = 'weight', (i, o, kh, kw) if flip else (o, i, kh, kw)
    else:
      torch_suffix = {
        ('params', 'scale'): 'weight',
        ('params', 'bias'): 'bias',
        ('batch_stats', 'mean'): 'running_mean',
        ('batch_stats', 'var'): 'running_var',
      }[(collection, name)]
      torch_shape = shape
    key = f'{torch_module(modules)}.{torch_suffix}'
    entries[key] = Entry(key, collection, (*modules, name), torch_shape, flip)
  return entries


def plan_port(arch: teacher_lib.Arch, shapes: Mapping[str, Sequence[int]]) -> list[Entry]:
  """Checks a state_dict's keys and shapes against the `arch` teacher.

  Args:
    arch: teacher architecture.
    shapes: torch key -> tensor shape, e.g. from a state_dict or a manifest.

  Returns:
    One Entry per teacher variable, in a fixed order.

  Raises:
    PortError listing every missing key, unexpected key and shape mismatch.
  """
  return _plan(expected_entries(arch), shapes, IGNORED, arch)


def _plan(
  expected: dict[str, Entry], shapes: Mapping[str, Sequence[int]], ignored: re.Pattern, what: str
) -> list[Entry]:
  problems = []
  for key in expected:
    if key not in shapes:
      problems.append(f'missing key {key!r} (shape {expected[key].torch_shape})')
  for key, shape in shapes.items():
    if ignored.search(key):
      continue
    if key not in expected:
      problems.append(f'unexpected key {key!r} (shape {tuple(shape)})')
    elif tuple(shape) != expected[key].torch_shape:
      problems.append(
        f'shape mismatch for {key!r}: file has {tuple(shape)}, '
        f'{what} needs {expected[key].torch_shape}'
      )
  if problems:
    shown = '\n  '.join(problems[:20])
    more = f'\n  ... and {len(problems) - 20} more' if len(problems) > 20 else ''
    raise PortError(f'the state_dict does not fit {what}:\n  {shown}{more}')
  return list(expected.values())


def convert_state_dict(arch: teacher_lib.Arch, state_dict: Mapping[str, np.ndarray]) -> dict:
  """torch state_dict (numpy arrays) -> teacher variables {'params', 'batch_stats'}."""
  entries = plan_port(arch, {k: np.shape(v) for k, v in state_dict.items()})
  flat = {(e.collection, *e.path): e.convert(state_dict[e.torch_key]) for e in entries}
  return flax.traverse_util.unflatten_dict(flat)


def to_state_dict(arch: teacher_lib.Arch, variables: Mapping) -> dict[str, np.ndarray]:
  """Teacher variables -> the torch state_dict (numpy, torch layout) that ports back to them.

  The inverse of `convert_state_dict`, for giving a PyTorch model the very teacher a
  run used (a random one included): load it with `load_state_dict(..., strict=False)`;
  layer4 and fc are not part of the teacher.
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  return {key: e.invert(flat[(e.collection, *e.path)]) for key, e in expected_entries(arch).items()}


# The plain-RD student (RD4AD's code, anomalib's ReverseDistillation): its bottleneck
# (RD4AD's BN_layer, anomalib's OCBE) and decoder (de_resnet) as our Student with
# fusion 'mff', no coordinate attention and no memory. Our module path -> torch's.
_RD_STUDENT_MODULES = [
  # de_resnet's layer1 rebuilds level 3, layer3 level 1.
  (r'^decoder/level(\d)_(\d+)(?=/|$)', lambda m: f'decoder/layer{4 - int(m[1])}_{m[2]}'),
  # BN_layer's conv1/bn1 .. conv3/bn3 align levels 1 and 2: our MFF.
  (r'^fusion/level1_down1/(conv|bn)$', lambda m: f'bottleneck/{m[1]}1'),
  (r'^fusion/level1_down2/(conv|bn)$', lambda m: f'bottleneck/{m[1]}2'),
  (r'^fusion/level2_down1/(conv|bn)$', lambda m: f'bottleneck/{m[1]}3'),
  # BN_layer's bn_layer: our OCE.
  (r'^oce/layer_(\d+)', lambda m: f'bottleneck/bn_layer_{m[1]}'),
]
# RD4AD's BN_layer defines conv4 / bn4 and never uses them; anomalib keeps them.
RD_STUDENT_IGNORED = re.compile(r'^bottleneck\.(conv4|bn4)\.|num_batches_tracked$')


def _rd_student_name(module_path: Sequence[str]) -> str:
  path = '/'.join(module_path)
  for pattern, repl in _RD_STUDENT_MODULES:
    path = re.sub(pattern, repl, path)
  return _torch_name(path.split('/'))


def rd_student_entries(variables: Mapping) -> dict[str, Entry]:
  """The torch keys (with their shapes) of a plain-RD student's variables.

  variables: the {'params', 'batch_stats'} (or their shapes) of a Student with fusion
  'mff', no coordinate attention and memory 'off'. Its 2 x 2 kernels are the decoder's
  ConvTranspose2d weights."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  extra = sorted('/'.join(k) for k in flat if k[1] not in ('decoder', 'fusion', 'oce'))
  if extra or any(k[2].startswith('attention') for k in flat if k[1] == 'fusion'):
    raise PortError(f'not a plain-RD student (fusion mff, no attention, no memory): {extra}')
  return _entries(variables, _rd_student_name, transposed=lambda s: s[:2] == (2, 2))


def convert_rd_student(state_dict: Mapping[str, np.ndarray], template: Mapping) -> dict:
  """The state_dict of RD4AD's / anomalib's student (keys 'bottleneck.*' and
  'decoder.*', numpy arrays) -> our plain-RD Student's {'params', 'batch_stats'}, shaped
  as `template` (e.g. `MSRD.abstract_variables` of a config with model.fusion 'mff',
  model.coord_attention () and model.memory.mode 'off'). Keys and shapes are checked as
  the teacher's; PyTorch's running variance is taken as it is."""
  entries = _plan(
    rd_student_entries(template),
    {k: np.shape(v) for k, v in state_dict.items()},
    RD_STUDENT_IGNORED,
    'the plain-RD student',
  )
  flat = {(e.collection, *e.path): e.convert(state_dict[e.torch_key]) for e in entries}
  return flax.traverse_util.unflatten_dict(flat)


def _unwrap(obj, path: str) -> dict[str, np.ndarray]:
  """Accepts a bare state_dict or the common {'state_dict': ...} / {'model': ...} wraps."""
  if isinstance(obj, Mapping):
    for wrapper in ('state_dict', 'model'):
      if wrapper in obj and isinstance(obj[wrapper], Mapping):
        obj = obj[wrapper]
        break
  if not isinstance(obj, Mapping) or not obj:
    raise PortError(f'{path!r} holds no state_dict (found {type(obj).__name__})')
  out = {}
  for key, value in obj.items():
    if not hasattr(value, 'shape'):
      raise PortError(
        f'{path!r}: entry {key!r} is a {type(value).__name__}, '
        'not a tensor; is this a torchvision state_dict?'
      )
    # DataParallel checkpoints prefix every key with 'module.'.
    out[key.removeprefix('module.')] = value
  return out


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a `.pth`/`.pt` or `.safetensors` state_dict into numpy float arrays."""
  if not os.path.isfile(path):
    raise PortError(f'{path!r} does not exist')
  ext = os.path.splitext(path)[1].lower()
  if ext == '.safetensors':
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

    try:
      raw = load_file(path)
    except Exception as e:  # safetensors raises its own error types for bad headers.
      raise PortError(f'{path!r} is not a readable .safetensors file ({e})') from None
    return _unwrap(raw, path)
  if ext in ('.pth', '.pt', '.bin', '.ckpt'):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise PortError(
        f'reading {path!r} needs PyTorch (`pip install torch`); or convert it once '
        'to .safetensors, which needs no torch'
      ) from None
    try:
      raw = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises pickle/zip/runtime errors for bad files.
      raise PortError(
        f'{path!r} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})'
      ) from None
    state = _unwrap(raw, path)
    return {
      k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
      for k, v in state.items()
    }
  raise PortError(f'{path!r}: unknown weight format {ext!r}; expected .pth, .pt or .safetensors')


def port(arch: str, input_path: str, output_path: str) -> dict:
  """Reads torch weights, converts them and writes the Flax teacher file."""
  teacher_lib.arch_spec(arch)
  if os.path.exists(output_path) and os.path.samefile(input_path, output_path):
    raise PortError(
      f'--output {output_path!r} is the input file; choose another name so that the '
      'source weights are kept'
    )
  state = read_state_dict(input_path)
  try:
    variables = convert_state_dict(arch, state)
  except PortError as e:
    raise PortError(f'{input_path!r}: {e}') from None
  teacher_lib.save_teacher(output_path, arch, variables)
  return variables


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  variables = cli.exit_on_user_error(port, FLAGS.arch, FLAGS.input, FLAGS.output)
  count = sum(np.size(x) for x in flax.traverse_util.flatten_dict(variables).values())
  print(f'wrote {FLAGS.output}: {FLAGS.arch} teacher, {count:,} values')


if __name__ == '__main__':
  flags.DEFINE_enum('arch', None, list(teacher_lib.ARCH_SPECS), 'Teacher architecture.')
  flags.DEFINE_string('input', None, '.pth/.pt or .safetensors file (a torchvision state_dict).')
  flags.DEFINE_string('output', None, 'Teacher file to write.')
  flags.mark_flags_as_required(['arch', 'input', 'output'])
  app.run(main, flags_parser=cli.parse_flags)
