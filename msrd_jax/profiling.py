"""Where a compiled program's time goes: a jax.profiler trace, per XLA operation.

XLA:CPU runs a compiled program as a sequence of thunks, one per operation of its
optimized HLO, and jax.profiler records each under the operation's name. `profile`
traces a few calls of a compiled function, sums each operation's time, and joins it
with the HLO text: the opcode, the result shape, and the JAX operation it came from
(its `op_name` metadata, e.g. `transpose(jvp(Student))/decoder/level3_0/conv2/
conv_general_dilated`: the backward pass of a decoder convolution).

Thunks that do not depend on each other run concurrently, and a large operation spreads
over XLA's intra-op threads: operation times are thread time, so they can add up to
more than the wall time of a call. Shares are of the summed operation time.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re
import tempfile
from collections.abc import Callable, Iterable

import jax

# One instruction of HLO text: `[ROOT] [%]name = shape opcode(operands), attributes`.
_INSTRUCTION = re.compile(
  r'^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+) = (?P<shape>\(.*?\)|\S+) '
  r'(?P<opcode>[\w\-]+)\((?P<rest>.*)$'
)
_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+) \(.*\{\s*$')
_CALLS = re.compile(r'calls=%?([\w.\-]+)')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# The group of an operation that carries no JAX operation name.
UNNAMED = '(no JAX operation name)'
# What makes a fused computation costly, in order of precedence.
_HEAVY = ('convolution', 'dot', 'custom-call', 'reduce-window', 'reduce', 'scatter', 'gather')


@dataclasses.dataclass(frozen=True)
class Instruction:
  """One operation of the optimized HLO."""

  name: str
  opcode: str
  shape: str
  op_name: str  # the JAX operation and module path it came from ('' if none)
  kind: str  # what it computes: 'convolution', 'dot', 'reduce', 'elementwise', 'copy', ...


@dataclasses.dataclass(frozen=True)
class OpTime:
  """An operation's time per call of the program, summed over the threads it used."""

  instruction: Instruction
  seconds: float

  @property
  def direction(self) -> str:
    """'backward' for the transpose (gradient) pass of a differentiated function,
    UNNAMED for an operation XLA made without a JAX operation name."""
    if not self.instruction.op_name:
      return UNNAMED
    return 'backward' if 'transpose(' in self.instruction.op_name else 'forward'

  @property
  def part(self) -> str:
    """The module path of the operation, without JAX's transformation wrappers, up to
    two levels (e.g. 'decoder/level3_0'); '(outside the modules)' for the loss, the
    optimizer and what XLA added."""
    if not self.instruction.op_name:
      return UNNAMED
    path = [p for p in self.instruction.op_name.split('/')[1:] if p and '(' not in p]
    return '/'.join(path[:-1][:2]) or '(outside the modules)'

  @property
  def network(self) -> str:
    """'teacher', 'student' or 'loss and optimizer' (what the model's named scopes and
    the student's module tree say), or UNNAMED for an operation that XLA made without
    a JAX operation name (e.g. the kernel gradient of a convolution that XLA
    differentiates itself)."""
    name = self.instruction.op_name
    if not name:
      return UNNAMED
    if 'Teacher' in name:
      return 'teacher'
    return 'student' if 'Student' in name else 'loss and optimizer'


def parse_hlo(text: str) -> dict[str, Instruction]:
  """Every instruction of an HLO module's text, by name.

  A fusion's kind is that of the costliest operation inside its fused computation
  (convolution, dot, ...), or 'elementwise', and its JAX operation name is that
  operation's: XLA:CPU fuses, e.g., two decoder blocks and the anomaly map's channel sum
  into one fusion named after its root, the sum, where the time is the convolutions'.
  """
  inside_of: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
  raw = []
  computation = None
  for line in text.splitlines():
    head = _COMPUTATION.match(line)
    if head:
      computation = head.group('name')
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    op_name = _OP_NAME.search(m.group('rest'))
    op_name = op_name.group(1) if op_name else ''
    inside_of[computation].append((m.group('opcode'), op_name))
    calls = _CALLS.search(m.group('rest'))
    raw.append((m, op_name, calls.group(1) if calls else None))
  out = {}
  for m, op_name, calls in raw:
    opcode = m.group('opcode')
    kind = opcode
    if opcode == 'fusion':
      inside = inside_of.get(calls, [])
      opcodes = {o for o, _ in inside}
      kind = next((h for h in _HEAVY if h in opcodes), 'elementwise')
      op_name = next((n for o, n in inside if o == kind and n), op_name)
    out[m.group('name')] = Instruction(m.group('name'), opcode, m.group('shape'), op_name, kind)
  return out


def _trace_events(trace_dir: str) -> Iterable[tuple[str, str, float]]:
  """(hlo_module, hlo_op, seconds) of every XLA operation in a jax.profiler trace."""
  from jax.profiler import ProfileData

  for path in glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True):
    for plane in ProfileData.from_file(path).planes:
      for line in plane.lines:
        for event in line.events:
          stats = dict(event.stats)
          if 'hlo_op' in stats:
            yield str(stats.get('hlo_module', '')), str(stats['hlo_op']), event.duration_ns * 1e-9


def profile(compiled, call: Callable[[], object], calls: int = 3) -> list[OpTime]:
  """Traces `calls` calls of `call()` (which runs `compiled` and returns its output);
  returns each operation's time per call, slowest first."""
  text = compiled.as_text()
  instructions = parse_hlo(text)
  module = text.split(',', 1)[0].removeprefix('HloModule ').strip()
  totals: dict[str, float] = collections.defaultdict(float)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(calls):
        out = call()
      jax.block_until_ready(out)
    for hlo_module, op, seconds in _trace_events(trace_dir):
      if hlo_module == module and op in instructions:
        totals[op] += seconds
  times = [OpTime(instructions[op], t / calls) for op, t in totals.items()]
  return sorted(times, key=lambda o: -o.seconds)


def breakdown(times: list[OpTime], key: Callable[[OpTime], str]) -> list[tuple[str, float, float]]:
  """(group, seconds per call, share of all operation time), largest first."""
  groups: dict[str, float] = collections.defaultdict(float)
  for t in times:
    groups[key(t)] += t.seconds
  total = sum(groups.values()) or 1.0
  return sorted(((g, s, s / total) for g, s in groups.items()), key=lambda r: -r[1])


def report(times: list[OpTime], wall_seconds: float, top: int = 25) -> str:
  """The profile as text: totals, the breakdowns, and the slowest operations."""
  total = sum(t.seconds for t in times)
  lines = [
    f'wall time per call {1e3 * wall_seconds:.1f} ms; operation time {1e3 * total:.1f} ms '
    f'({len(times)} operations; thread time, see msrd_jax.profiling)'
  ]
  for title, key in (
    ('by kind of operation', lambda t: t.instruction.kind),
    ('by network', lambda t: t.network),
    ('by pass', lambda t: t.direction),
    ('by module', lambda t: t.part),
    ('by pass and kind', lambda t: f'{t.direction} {t.instruction.kind}'),
  ):
    lines.append(f'\n{title}:')
    lines += [f'  {1e3 * s:9.1f} ms {100 * f:5.1f} %  {g}' for g, s, f in breakdown(times, key)]
  lines.append(f'\nthe {min(top, len(times))} slowest operations:')
  for t in times[:top]:
    i = t.instruction
    where = i.op_name.removeprefix('jit(').split(')/', 1)[-1] if i.op_name else '-'
    lines.append(
      f'  {1e3 * t.seconds:9.1f} ms {100 * t.seconds / (total or 1):5.1f} %  {i.kind:<12} '
      f'{i.shape:<28} {where}'
    )
  return '\n'.join(lines)
