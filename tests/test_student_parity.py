"""The student's modules against independent PyTorch references.

tests/fixtures/student_parity.npz holds what scripts/student_reference.py's PyTorch modules
(RD4AD's de-ResNet and BN_layer, Hou et al.'s CoordAtt, MemAE's read, design.md's MSFF,
anomalib 2.7.0's OCBE + de_resnet18 for the plain-RD student) compute from the weights and
inputs of tests/student_fixture_recipe.py. Here the same weights are drawn again, mapped
onto our Flax trees, and our modules must reproduce, for every check:

  - the forward in eval mode (random running statistics),
  - the forward in train mode (batch statistics) and the running statistics it leaves,
  - the gradients of RD4AD's loss (msrd_jax.losses, plus the memory's entropy term) with
    respect to the inputs and the parameters the recipe lists.

Errors are max |ours - torch| / max |torch| per array, the reference being PyTorch in
float64. Largest found (CPU, float32; per check with `-s`): forward 2.5e-5, running
statistics 1.6e-6, gradients 7.7e-5, all in checks whose BatchNorms see 4 values per
channel; elsewhere forward 2.2e-6, statistics 1.6e-7, gradients 1.5e-6.

One documented difference from PyTorch is part of the mapping, not a tolerance: Hou et
al.'s conv1 has a bias, ours not (the BatchNorm after it removes it): a bias b with running
mean m is our running mean m - b, before and after a train step. The running variance is
PyTorch's (the unbiased batch variance averaged in), compared as it is; see
test_running_variance_averages_the_unbiased_batch_variance.
"""

from __future__ import annotations

import functools
import json
import os
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import student_fixture_recipe as recipe

from msrd_jax import losses, port
from msrd_jax.coord_attention import CoordAttention
from msrd_jax.decoder import Decoder, DecoderBlock
from msrd_jax.fusion import MFF, MSFF
from msrd_jax.memory import MemoryBank
from msrd_jax.model import Student
from msrd_jax.oce import OCE

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'student_parity.npz')

# max |ours - torch| / max |torch| (the reference is exact: PyTorch in float64), per kind
# of array. A train-mode BatchNorm over only 4 values per channel (the OCE at 2 x 1, in
# four checks) divides by the spread of 4 numbers and amplifies float32 rounding: there
# PyTorch's own float32 forward is 2e-5 from the exact one, so those checks get the
# looser tolerances.
TOLERANCES = {'forward': 1e-5, 'stats': 1e-5, 'grad': 2e-5}
TOLERANCES_FEW_VALUES = {'forward': 5e-5, 'stats': 1e-5, 'grad': 2e-4}
PYTORCH_MOMENTUM = 0.1


def _tol(name: str, kind: str) -> float:
  counts = json.loads(str(_fixture()[f'{name}/train/bn_counts'])).values()
  few = min(counts, default=np.inf) <= 4
  return (TOLERANCES_FEW_VALUES if few else TOLERANCES)[kind]


# Largest deviation per check and kind of array, printed at the end of the module.
DEVIATIONS: dict[str, dict[str, float]] = {}


# ---------------------------------------------------------------------------------------
# Our side of each check.


class DecoderStage(nn.Module):
  """One decoder stage as RD4AD builds it: DecoderBlocks, the first one upsampling.

  Our Decoder always builds all three stages; the wide check covers its first stage only.
  """

  block: str
  planes: int
  blocks: int
  width_per_group: int
  level: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i in range(self.blocks):
      x = DecoderBlock(
        self.block,
        self.planes,
        upsample=i == 0,
        width_per_group=self.width_per_group,
        name=f'level{self.level}_{i}',
      )(x, train=train)
    return [x]


class RDBottleneck(nn.Module):
  """RD4AD's BN_layer in our modules: the MFF alignment + concatenation, then the OCE."""

  @nn.compact
  def __call__(self, features, train: bool = False):
    x = MFF(recipe.BASIC_CHANNELS, name='fusion')(features, train=train)
    return [OCE('resnet18', name='oce')(x, train=train)]


def _as_list(out):
  return (list(out) if isinstance(out, (list, tuple)) else [out]), None


@functools.cache
def ours(name: str):
  """(module, prefix, call) of check `name`.

  prefix: where the torch keys land in the whole Student's tree ('decoder.' for a
  Decoder checked alone); it is cut from our paths. call(module, variables, inputs,
  train, **apply_kwargs) returns ((outputs, entropy or None), mutated variables or None).
  """

  def plain(module, variables, xs, train, **kw):
    out = module.apply(variables, *(xs if len(xs) == 1 else [xs]), train=train, **kw)
    if kw:
      out, mutated = out
      return _as_list(out), mutated
    return _as_list(out), None

  def memory(module, variables, xs, train, **kw):
    out, entropy, _ = module.apply(variables, xs[0])
    return ([out], entropy), ({'batch_stats': {}} if kw else None)

  def student(module, variables, xs, train, **kw):
    out = module.apply(variables, xs, train=train, **kw)
    (decoded, aux), mutated = out if kw else (out, None)
    entropy = aux['entropy'] if module.memory_mode != 'off' else None
    return (decoded, entropy), mutated

  m = recipe.MEMORY
  table = {
    'decoder_basic': (Decoder('resnet18', attention=False), 'decoder.', plain),
    'decoder_basic_ca': (Decoder('resnet18', attention=True), 'decoder.', plain),
    'decoder_wide_stage': (
      DecoderStage('bottleneck', 256, blocks=2, width_per_group=128, level=3),
      'decoder.',
      plain,
    ),
    'bn_layer_basic': (RDBottleneck(), '', plain),
    'oce_wide': (OCE('wide_resnet50_2', blocks=2), 'oce.', plain),
    'coord_attention': (CoordAttention(), 'attention.', plain),
    'memory_replace': (
      MemoryBank(m['slots'], m['temperature'], None, 'replace'),
      'memory.',
      memory,
    ),
    'memory_residual': (
      MemoryBank(m['slots'], m['temperature'], None, 'residual'),
      'memory.',
      memory,
    ),
    'msff': (MSFF(recipe.BASIC_CHANNELS, attention=False), 'fusion.', plain),
    'msff_ca': (MSFF(recipe.BASIC_CHANNELS, attention=True), 'fusion.', plain),
    'student_rd': (
      Student('resnet18', fusion='mff', attention=(), memory_mode='off'),
      '',
      student,
    ),
    'student_msrd': (
      Student(
        'resnet18',
        memory_slots=recipe.STUDENT_MEMORY['slots'],
        memory_temperature=recipe.STUDENT_MEMORY['temperature'],
      ),
      '',
      student,
    ),
  }
  return table[name]


ENTROPY_WEIGHTS = {
  'memory_replace': recipe.MEMORY_ENTROPY_WEIGHT,
  'memory_residual': recipe.MEMORY_ENTROPY_WEIGHT,
  'student_msrd': recipe.STUDENT_ENTROPY_WEIGHT,
}


# ---------------------------------------------------------------------------------------
# Torch state_dict keys -> our variable paths.

# Rewrites of a torch key (dots), applied in order; the result's dots become '/'.
_RULES = [
  # RD4AD's de_resnet: layer1 rebuilds level 3, layer3 level 1.
  (r'^decoder\.layer(\d)\.(\d+)\.', lambda m: f'decoder.level{4 - int(m[1])}_{m[2]}.'),
  # RD4AD's BN_layer (anomalib's OCBE): the alignment is our MFF, bn_layer our OCE.
  (r'^bottleneck\.(conv|bn)1\.', lambda m: f'fusion.level1_down1.{m[1]}.'),
  (r'^bottleneck\.(conv|bn)2\.', lambda m: f'fusion.level1_down2.{m[1]}.'),
  (r'^bottleneck\.(conv|bn)3\.', lambda m: f'fusion.level2_down1.{m[1]}.'),
  (r'^(?:bottleneck\.bn_layer|bn_layer|oce)\.(\d+)\.', lambda m: f'oce.layer_{m[1]}.'),
  # MSFF.
  (
    r'^fusion\.maps\.(\d)_to_(\d)\.down\.(\d)\.([01])\.',
    lambda m: f'fusion.map_{m[1]}_to_{m[2]}.down{int(m[3]) + 1}.{("conv", "bn")[int(m[4])]}.',
  ),
  (r'^fusion\.maps\.(\d)_to_(\d)\.', lambda m: f'fusion.map_{m[1]}_to_{m[2]}.'),
  (r'^fusion\.attention\.(\d)\.', lambda m: f'fusion.attention_{int(m[1]) + 1}.'),
  (r'^fusion\.align\.(conv|bn)1\.', lambda m: f'fusion.align.level1_down1.{m[1]}.'),
  (r'^fusion\.align\.(conv|bn)2\.', lambda m: f'fusion.align.level1_down2.{m[1]}.'),
  (r'^fusion\.align\.(conv|bn)3\.', lambda m: f'fusion.align.level2_down1.{m[1]}.'),
  # Sequential indices of the shortcuts.
  (r'\.(upsample|downsample)\.(\d)\.', lambda m: f'.{m[1]}_{m[2]}.'),
]
# RD4AD's BN_layer defines conv4/bn4 and never uses them (anomalib keeps them).
_UNUSED = re.compile(r'^bottleneck\.(conv4|bn4)\.')

# kind -> (collection, our leaf name, torch array -> ours)
_KINDS = {
  'conv': ('params', 'kernel', lambda w: w.transpose(2, 3, 1, 0)),
  # ConvTranspose2d (I, O, kh, kw) -> Deconv2x2 kernel[a, b, c, f] = weight[c, f, a, b].
  'deconv': ('params', 'kernel', lambda w: w.transpose(2, 3, 0, 1)),
  'bias': ('params', 'bias', None),
  'bn_weight': ('params', 'scale', None),
  'bn_bias': ('params', 'bias', None),
  'running_mean': ('batch_stats', 'mean', None),
  'running_var': ('batch_stats', 'var', None),
  'memory': ('params', 'memory', None),
  'gate': ('params', 'gate', None),
  'fusion': ('params', 'fusion_logits', None),
}
# Ours -> torch's layout, for comparing gradients.
_TO_TORCH = {'conv': lambda k: k.transpose(3, 2, 0, 1), 'deconv': lambda k: k.transpose(2, 3, 0, 1)}


def our_path(key: str, prefix: str) -> tuple[str, ...] | None:
  """Our (collection, *path) of a torch key, or None for a key with no counterpart."""
  if _UNUSED.match(key):
    return None
  module, _, leaf = key.rpartition('.')
  module += '.'
  for pattern, repl in _RULES:
    module = re.sub(pattern, repl, module)
  assert module.startswith(prefix), (key, module, prefix)
  module = module[len(prefix) :]
  return tuple(p for p in module.split('.') if p), leaf


def _ca_prefixes(manifest) -> list[str]:
  return [k[: -len('conv_h.weight')] for k in manifest if k.endswith('conv_h.weight')]


def fold_ca_bias(manifest, state: dict) -> dict:
  """Hou et al.'s conv1 bias b into the BatchNorm's running mean: ours is m - b."""
  state = dict(state)
  for p in _ca_prefixes(manifest):
    bias = state.pop(p + 'conv1.bias')
    state[p + 'bn1.running_mean'] = state[p + 'bn1.running_mean'] - bias
  return state


def to_flax(name: str, manifest, state: dict) -> dict:
  """Our {'params', 'batch_stats'} from a torch state_dict of check `name`."""
  _, prefix, _ = ours(name)
  state = fold_ca_bias(manifest, state)
  out = {'params': {}, 'batch_stats': {}}
  for key, array in state.items():
    kind = manifest[key][0]
    if kind == 'count':
      continue
    found = our_path(key, prefix)
    if found is None:
      continue
    path, _ = found
    collection, leaf, convert = _KINDS[kind]
    node = out[collection]
    for p in path:
      node = node.setdefault(p, {})
    assert leaf not in node, key
    node[leaf] = jnp.asarray(convert(array) if convert else array)
  return out


def _flat(tree) -> dict:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/')


# ---------------------------------------------------------------------------------------
# Running a check.


@functools.cache
def _fixture() -> dict:
  return dict(np.load(FIXTURE))


@functools.cache
def _case(name: str):
  fx = _fixture()
  manifest = {k: (v[0], tuple(v[1])) for k, v in json.loads(str(fx[f'{name}/manifest'])).items()}
  state = recipe.random_state_dict(manifest, recipe.check_seed(name, recipe.WEIGHT_SEED))
  return fx, manifest, state


def _inputs(name: str) -> list[np.ndarray]:
  """The check's inputs: the draw the generator kept clear of the ReLUs' kinks."""
  return recipe.random_inputs(name, int(_fixture()[f'{name}/draw']))


def _record(name: str, what: str, got, want) -> float:
  """max |got - want| / max |want|, kept in DEVIATIONS; an all-zero reference (the
  gradient of a mapping whose fusion weight relu cuts) must be matched exactly."""
  want = np.asarray(want, np.float64)
  got = np.asarray(got, np.float64)
  assert got.shape == want.shape, (name, what, got.shape, want.shape)
  scale, diff = np.abs(want).max(), np.abs(got - want).max()
  err = float(diff / scale) if scale else (0.0 if diff == 0 else float('inf'))
  kind = what.split('/')[0]
  DEVIATIONS.setdefault(name, {})
  DEVIATIONS[name][kind] = max(DEVIATIONS[name].get(kind, 0.0), err)
  return err


CHECK_NAMES = list(recipe.CHECKS)


def test_fixture_covers_every_check_and_is_small():
  fx = _fixture()
  assert {k.split('/')[0] for k in fx if '/' in k} == set(CHECK_NAMES)
  assert os.path.getsize(FIXTURE) < 3 * 2**20
  # The plain-RD student was checked against anomalib's modules, not our transcription.
  assert str(fx['student_rd/reference']).startswith('anomalib')


@pytest.mark.parametrize('name', CHECK_NAMES)
def test_port_fills_every_variable(name):
  """Every one of our variables comes from exactly one torch tensor, of the right shape."""
  _, manifest, state = _case(name)
  module, _, call = ours(name)
  inputs = [jnp.zeros(s) for s in recipe.CHECKS[name]['inputs']]
  expected = _flat(
    jax.eval_shape(
      lambda: module.init(jax.random.key(0), *(inputs if len(inputs) == 1 else [inputs]))
    )
  )
  got = _flat(to_flax(name, manifest, state))
  assert sorted(got) == sorted(expected)
  for k, v in expected.items():
    assert got[k].shape == v.shape, (k, got[k].shape, v.shape)


# XLA's full optimization takes 3x longer to compile these one-shot graphs than it saves.
_FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


@functools.cache
def _run(name: str):
  """Our eval outputs, train outputs, new batch stats and gradients for check `name`."""
  fx, manifest, state = _case(name)
  module, _, call = ours(name)
  variables = to_flax(name, manifest, state)
  inputs = [jnp.asarray(a) for a in _inputs(name)]
  shapes = [fx[f'{name}/train/out{k}'].shape for k in range(len(fx_outputs(name)))]
  targets = [jnp.asarray(t) for t in recipe.random_targets(name, shapes)]
  beta = ENTROPY_WEIGHTS.get(name, 0.0)

  def loss_fn(params, xs):
    (outs, entropy), mutated = call(
      module,
      {'params': params, 'batch_stats': variables['batch_stats']},
      xs,
      True,
      mutable=['batch_stats'],
    )
    loss = losses.distillation_loss(targets, outs, 'global')
    if entropy is not None:
      loss = loss + beta * entropy
    return loss, (outs, entropy, mutated['batch_stats'])

  def both(variables, xs):
    evaluated, _ = call(module, variables, xs, False)
    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
    return evaluated, grad_fn(variables['params'], xs)

  compiled = jax.jit(both).lower(variables, inputs).compile(_FAST_COMPILE)
  evaluated, ((loss, (outs, entropy, stats)), grads) = compiled(variables, inputs)
  return {
    'eval': evaluated,
    'train': (outs, entropy, loss),
    'stats': stats,
    'grads': grads,
  }


def fx_outputs(name: str) -> list[str]:
  fx = _fixture()
  return sorted(k for k in fx if k.startswith(f'{name}/train/out'))


@pytest.mark.parametrize('name', CHECK_NAMES)
def test_eval_forward_matches_pytorch(name):
  fx = _fixture()
  outs, entropy = _run(name)['eval']
  for k, o in enumerate(outs):
    err = _record(name, 'forward/eval', o, fx[f'{name}/eval/out{k}'])
    assert err <= _tol(name, 'forward'), f'{name} eval out{k}: {err:.2e}'
  if f'{name}/eval/entropy' in fx:
    err = _record(name, 'forward/entropy', entropy, fx[f'{name}/eval/entropy'])
    assert err <= _tol(name, 'forward'), f'{name} entropy: {err:.2e}'


@pytest.mark.parametrize('name', CHECK_NAMES)
def test_train_forward_and_running_statistics_match_pytorch(name):
  fx, manifest, state = _case(name)
  _, prefix, _ = ours(name)
  outs, entropy, loss = _run(name)['train']
  for k, o in enumerate(outs):
    err = _record(name, 'forward/train', o, fx[f'{name}/train/out{k}'])
    assert err <= _tol(name, 'forward'), f'{name} train out{k}: {err:.2e}'
  err = _record(name, 'forward/loss', loss, fx[f'{name}/train/loss'])
  assert err <= _tol(name, 'forward'), f'{name} loss: {err:.2e}'

  # PyTorch's statistics after the step, in our terms.
  stored = f'{name}/train/stats/'
  after = {k[len(stored) :]: v for k, v in fx.items() if k.startswith(stored)}
  for key in [k for k in after if our_path(k, prefix) is None]:  # anomalib's unused bn4
    np.testing.assert_array_equal(after.pop(key), state[key])
  assert set(after) == {
    k
    for k, (kind, _) in manifest.items()
    if kind in ('running_mean', 'running_var') and our_path(k, prefix)
  }
  # The folded conv1 bias shifts CoordAtt's running means after the step as before.
  after.update(
    {
      k: v
      for k, v in fold_ca_bias(manifest, {**state, **after}).items()
      if k.endswith('running_mean') and k in after
    }
  )
  got = _flat(_run(name)['stats'])
  assert len(got) == len(after)
  for key, want in after.items():
    path, leaf = our_path(key, prefix)
    ours_key = '/'.join(path + (_KINDS[manifest[key][0]][1],))
    err = _record(name, 'stats', got[ours_key], want)
    assert err <= _tol(name, 'stats'), f'{name} {key}: {err:.2e}'


@pytest.mark.parametrize('name', CHECK_NAMES)
def test_gradients_match_pytorch(name):
  fx, manifest, _ = _case(name)
  _, prefix, _ = ours(name)
  gparams, ginputs = _run(name)['grads']
  for k, g in enumerate(ginputs):
    err = _record(name, 'grad/inputs', g, fx[f'{name}/grad/input{k}'])
    assert err <= _tol(name, 'grad'), f'{name} d loss / d input{k}: {err:.2e}'
  flat = _flat(gparams)
  for key in recipe.CHECKS[name]['grads']:
    kind = manifest[key][0]
    path, _ = our_path(key, prefix)
    g = np.asarray(flat['/'.join(path + (_KINDS[kind][1],))])
    if kind in _TO_TORCH:
      g = _TO_TORCH[kind](g)[: recipe.GRAD_SLICE]
    err = _record(name, 'grad/params', g, fx[f'{name}/grad/{key}'])
    assert err <= _tol(name, 'grad'), f'{name} d loss / d {key}: {err:.2e}'


def test_running_variance_averages_the_unbiased_batch_variance():
  """As PyTorch does, and unlike Flax's BatchNorm: the batch term of the running variance
  is the unbiased variance. With 4 values per channel (the OCE's BatchNorms in the
  plain-RD check) it is 4/3 of the biased variance that normalizes the batch, so the
  difference would be far beyond any tolerance."""
  fx, _, state = _case('student_rd')
  got = _flat(_run('student_rd')['stats'])['oce/layer_0/bn1/var']
  torch_new = fx['student_rd/train/stats/bottleneck.bn_layer.0.bn1.running_var']
  torch_old = state['bottleneck.bn_layer.0.bn1.running_var']
  assert json.loads(str(fx['student_rd/train/bn_counts']))['bottleneck.bn_layer.0.bn1'] == 4
  m = PYTORCH_MOMENTUM
  torch_batch = (torch_new - (1 - m) * torch_old) / m
  ours_batch = (np.asarray(got) - (1 - m) * torch_old) / m
  np.testing.assert_allclose(ours_batch, torch_batch, rtol=1e-4, atol=1e-6)
  assert np.abs(torch_batch * 3 / 4 - torch_batch).max() > 100 * 1e-4 * np.abs(torch_batch).max()


def test_zz_print_deviations():
  """Largest deviation per check, and its tolerance (run with -s to see them)."""
  kinds = ('forward', 'stats', 'grad')
  print('\nlargest max|ours - torch| / max|torch| per check (tolerance):')
  print(f'{"check":<20}' + ''.join(f'{k:>20}' for k in kinds))
  for name in CHECK_NAMES:
    row = DEVIATIONS.get(name, {})
    cells = [f'{row[k]:.1e} ({_tol(name, k):.0e})' if k in row else '-' for k in kinds]
    print(f'{name:<20}' + ''.join(f'{c:>20}' for c in cells))


def test_port_converts_an_rd4ad_student_as_these_checks_map_it():
  """msrd_jax.port.convert_rd_student (what scripts/anomalib_rd_peer.py replay loads
  anomalib's student with) gives this module's mapping, which the checks above hold to
  anomalib's OCBE and de_resnet18; bad keys and shapes are errors that name them."""
  _, manifest, state = _case('student_rd')
  state = {k: np.asarray(v) for k, v in state.items()}
  want = _flat(to_flax('student_rd', manifest, state))
  got = _flat(port.convert_rd_student(state, flax.traverse_util.unflatten_dict(want, sep='/')))
  assert got.keys() == want.keys()
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)
  bad = dict(state, **{'decoder.extra.weight': np.zeros(3)})
  bad['decoder.layer1.0.conv1.weight'] = np.zeros((1, 2, 2, 2), np.float32)
  del bad['bottleneck.bn_layer.0.conv1.weight']
  with pytest.raises(port.PortError) as error:
    port.convert_rd_student(bad, flax.traverse_util.unflatten_dict(want, sep='/'))
  for part in (
    "unexpected key 'decoder.extra.weight'",
    "shape mismatch for 'decoder.layer1.0.conv1.weight'",
    "missing key 'bottleneck.bn_layer.0.conv1.weight'",
  ):
    assert part in str(error.value)
  # Only the plain-RD student has RD4AD's layout.
  msrd = {'params': {'fusion': {'attention_1': {'w': np.zeros(1)}}}}
  with pytest.raises(port.PortError, match='not a plain-RD student'):
    port.rd_student_entries(msrd)
