"""The per-operation profile: HLO parsing and trace aggregation on programs whose
operations are known."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cli

from msrd_jax import layers, profiling


def _loss(x, kernel, w):
  y = layers.conv2d(x, kernel, 1, 1)  # a convolution, then a matrix product
  return jnp.sum(jnp.tanh(y.reshape(-1, y.shape[-1]) @ w))


@pytest.fixture(scope='module')
def compiled_and_args():
  """The gradient of `_loss`, compiled once for both tests, and its arguments."""
  rng = np.random.default_rng(0)
  args = (
    jnp.asarray(rng.normal(size=(2, 24, 24, 16)), jnp.float32),
    jnp.asarray(rng.normal(size=(3, 3, 16, 32)), jnp.float32),
    jnp.asarray(rng.normal(size=(32, 8)), jnp.float32),
  )
  return jax.jit(jax.grad(_loss, argnums=(1, 2))).lower(*args).compile(), args


def test_parse_hlo_finds_every_instruction_with_its_kind_and_origin(compiled_and_args):
  compiled, _ = compiled_and_args
  text = compiled.as_text()
  instructions = profiling.parse_hlo(text)
  # Every instruction line of the text is parsed (parameters and constants included).
  names = {ln.split(' = ')[0].split()[-1].lstrip('%') for ln in text.splitlines() if ' = ' in ln}
  assert set(instructions) == names
  kinds = {i.kind for i in instructions.values()}
  assert 'convolution' in kinds and 'dot' in kinds
  # The forward convolution carries the JAX operation it came from, outside any gradient
  # transpose; the gradient's operations are marked as such.
  convs = [i for i in instructions.values() if i.kind == 'convolution']
  assert any('conv_general_dilated' in i.op_name and 'transpose(' not in i.op_name for i in convs)
  assert any('transpose(' in i.op_name for i in instructions.values())


def test_profile_times_the_operations_of_the_program_it_ran(compiled_and_args):
  compiled, args = compiled_and_args
  times = profiling.profile(compiled, lambda: compiled(*args), calls=2)
  instructions = profiling.parse_hlo(compiled.as_text())
  assert times and all(t.instruction.name in instructions for t in times)
  assert all(t.seconds >= 0 for t in times)
  assert [t.seconds for t in times] == sorted((t.seconds for t in times), reverse=True)
  kinds = {t.instruction.kind for t in times}
  assert {'convolution', 'dot'} <= kinds
  # XLA's own kernel gradients (layers.kernel_grad_method) carry no JAX name.
  assert {'forward', 'backward'} <= {t.direction for t in times}
  assert {t.direction for t in times} <= {'forward', 'backward', profiling.UNNAMED}
  for key in (lambda t: t.instruction.kind, lambda t: t.direction, lambda t: t.network):
    rows = profiling.breakdown(times, key)
    assert sum(f for _, _, f in rows) == pytest.approx(1.0)
    assert sum(s for _, s, _ in rows) == pytest.approx(sum(t.seconds for t in times))
  text = profiling.report(times, wall_seconds=0.01, top=3)
  assert 'by kind of operation' in text and text.count('\n  ') >= 3


def test_an_operation_without_a_jax_name_is_counted_apart():
  def op(op_name):
    return profiling.OpTime(profiling.Instruction('c', 'convolution', 'f32[1]', op_name, 'x'), 1.0)

  unnamed = op('')
  assert unnamed.network == unnamed.direction == unnamed.part == profiling.UNNAMED
  loss = op('jit(step)/reduce_sum')
  assert (loss.network, loss.direction, loss.part) == (
    'loss and optimizer',
    'forward',
    '(outside the modules)',
  )
  grad = op('jit(step)/transpose(jvp(Student))/decoder/level1_0/conv2/conv_general_dilated')
  assert (grad.network, grad.direction, grad.part) == ('student', 'backward', 'decoder/level1_0')


@pytest.mark.slow
def test_profile_command_names_the_teacher_and_the_student():
  done = cli(
    'msrd_jax.benchmark',
    'profile',
    '--config=configs/synthetic.py',
    '--config.data.image_size=64',
    '--config.train.batch_size=2',
    '--iters=1',
    '--top=5',
  )
  assert done.returncode == 0, done.stderr[-2000:]
  by_network = done.stdout.split('by network:')[1].split('\n\n')[0]
  for network in ('teacher', 'student', 'loss and optimizer'):
    assert network in by_network
  assert 'the 5 slowest operations' in done.stdout


# A fusion like XLA:CPU's: a decoder convolution and the anomaly map's channel sum, named
# after its root (the sum).
_FUSED_HLO = """HloModule jit_predict, entry_computation_layout={()->f32[2,4,4]{2,1,0}}

%fused_computation.5 (param_0: f32[2,4,4,8], param_1: f32[3,3,8,8]) -> f32[2,4,4] {
  %param_0 = f32[2,4,4,8]{3,2,1,0} parameter(0)
  %param_1 = f32[3,3,8,8]{3,2,1,0} parameter(1)
  %convolution.1 = f32[2,4,4,8]{3,2,1,0} convolution(%param_0, %param_1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(predict)/Student/decoder/level1_5/conv2/conv_general_dilated" stack_frame_id=1}
  %mul.2 = f32[2,4,4,8]{3,2,1,0} multiply(%convolution.1, %convolution.1), metadata={op_name="jit(predict)/jit(anomaly_map)/mul" stack_frame_id=2}
  %constant.3 = f32[] constant(0)
  ROOT %reduce_sum.4 = f32[2,4,4]{2,1,0} reduce(%mul.2, %constant.3), dimensions={3}, to_apply=%region_0, metadata={op_name="jit(predict)/jit(anomaly_map)/reduce_sum" stack_frame_id=3}
}

ENTRY %main (p0: f32[2,4,4,8], p1: f32[3,3,8,8]) -> f32[2,4,4] {
  %p0 = f32[2,4,4,8]{3,2,1,0} parameter(0)
  %p1 = f32[3,3,8,8]{3,2,1,0} parameter(1)
  ROOT %ynn_fusion.5 = f32[2,4,4]{2,1,0} fusion(%p0, %p1), kind=kCustom, calls=%fused_computation.5, metadata={op_name="jit(predict)/jit(anomaly_map)/reduce_sum" stack_frame_id=3}
}
"""  # noqa: E501


def test_a_fusion_is_named_after_its_costliest_operation():
  fusion = profiling.parse_hlo(_FUSED_HLO)['ynn_fusion.5']
  assert fusion.kind == 'convolution'
  assert fusion.op_name.endswith('Student/decoder/level1_5/conv2/conv_general_dilated')
  assert profiling.OpTime(fusion, 1.0).network == 'student'
  # without the convolution, the sum is the costliest operation, and names the fusion
  elementwise = profiling.parse_hlo(_FUSED_HLO.replace('convolution(', 'add('))['ynn_fusion.5']
  assert elementwise.kind == 'reduce' and elementwise.op_name.endswith('anomaly_map)/reduce_sum')
  # with no costly operation at all, the fusion keeps its own name, not its first one's
  plain = _FUSED_HLO.replace('convolution(', 'add(').replace(' reduce(', ' add(')
  plain = profiling.parse_hlo(plain)['ynn_fusion.5']
  assert plain.kind == 'elementwise' and plain.op_name.endswith('anomaly_map)/reduce_sum')
