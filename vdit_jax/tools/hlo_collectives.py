"""Bytes a compiled step sends between slices (over DCN), read from its HLO text.

Two forms of cross-slice traffic appear in compiled programs:

* Megascale transfers. libtpu compiles a multi-slice program per slice: its
  collectives' replica groups hold the devices of one slice, and what crosses
  slices is a `send` (with its `recv`) to the `xla_megascale_runtime`, carrying
  `_xla_megascale_transfer_type` (ALL_REDUCE, ALL_GATHER, ...) and
  `_xla_megascale_target`: either `"{1,2}x{0:3}"` (slices 1 and 2, times the
  slice's devices 0..3) or explicit groups of device ids `{{100000,200000},...}`.
  The send's operand is the part of the data one device hands to DCN, already cut
  down by the in-slice collectives around it, and often padded with zeros (a
  `ZeroCrop` custom call: [1, 18, 6912] -> [2, 18, 6912]); the `data_*` figures
  leave those zeros out.
* Collectives whose replica groups span slices, in a program compiled for all
  devices at once: explicit groups `{{0,1},{2,3}}`, iota groups `[2,4]<=[8]` or
  `[4,2]<=[2,4]T(1,0)`, or mesh-axes groups `mesh['a'=2,'b'=4] {'a'}`. A group id
  is an index into the program's device assignment, mapped to slices by the caller.

Each transfer is priced with bandwidth-optimal algorithms that do the in-slice part
first (hierarchical): among S slices, one device sends 2 (S-1)/S p for an all-reduce
of its share p, (S-1) p for an all-gather of its piece p, (S-1)/S p for a
reduce-scatter or all-to-all, and p for a point-to-point send. A collective inside
a while loop runs once per iteration: its bytes are multiplied by the loop's trip
count, from `known_trip_count` where XLA put it on the loop, else from a loop
condition of the form `counter < constant` (the way lax.scan and fori_loop lower),
else counted once and reported as unknown.
"""

import dataclasses
import math
import re
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all',
               'collective-permute')
MEGASCALE_KINDS = {'ALL_REDUCE': 'all-reduce', 'ALL_GATHER': 'all-gather',
                   'REDUCE_SCATTER': 'reduce-scatter', 'ALL_TO_ALL': 'all-to-all'}
# Attributes naming computations an instruction runs (async `-done` ops repeat their
# start's `calls=` and are skipped).
_CALLEE = re.compile(r'\b(body|condition|calls|to_apply|true_computation|false_computation)'
                     r'=%?([\w.\-]+)')
_CALLEE_LIST = re.compile(r'\b(branch_computations|calls)=\{([^}]*)\}')


@dataclasses.dataclass(frozen=True)
class Instruction:
  name: str
  shape: str                  # result shape, e.g. 'f32[16,8]{1,0}' or a tuple '(...)'
  opcode: str
  operands: Tuple[str, ...]   # operand texts: '%x' or 'f32[8]{0} %x'
  attrs: str                  # everything after the operand list
  root: bool = False


@dataclasses.dataclass
class Module:
  computations: Dict[str, List[Instruction]]
  entry: str
  num_partitions: int
  replica_count: int
  by_name: Dict[str, Instruction]


@dataclasses.dataclass(frozen=True)
class Transfer:
  """One collective whose data crosses slices."""
  name: str
  computation: str
  kind: str            # all-reduce | all-gather | reduce-scatter | all-to-all | send | ...
  source: str          # 'megascale' or 'replica groups'
  payload_bytes: int   # what one device hands to DCN per execution (see module doc)
  slices: int          # slices it spans
  bytes_per_device: int  # sent over DCN by one device per execution
  executions: int      # per step: the product of the trip counts of enclosing loops
  dtype: str = ''      # element type of the payload ('bf16', 'f32', ...)
  data_bytes: int = 0  # payload_bytes less the zeros the compiler padded it with
  data_bytes_per_device: int = 0  # bytes_per_device for data_bytes


@dataclasses.dataclass
class DcnTraffic:
  """Cross-slice traffic of one compiled step."""
  transfers: List[Transfer]
  bytes_per_device: int      # per step: sum of bytes_per_device x executions
  data_bytes_per_device: int  # the same without the compiler's zero padding
  bytes_by_dtype: Dict[str, int]  # bytes_per_device split by payload element type
  loops: List[str]           # each while loop around a transfer: name, trip count, source
  unknown_loops: int         # of those, loops whose trip count was not found (counted once)
  notes: List[str]

  def loop_summary(self) -> str:
    if not self.loops:
      return 'no cross-slice transfer inside a loop'
    text = (f'{len(self.loops)} while loop(s) around cross-slice transfers, '
            f'bytes multiplied by trip count: {"; ".join(self.loops)}')
    if self.unknown_loops:
      text += f' ({self.unknown_loops} with unknown trip count, counted once)'
    return text


def _matching(text: str, start: int) -> int:
  """Index just past the bracket closing the one at text[start]."""
  pairs = {'(': ')', '[': ']', '{': '}'}
  stack = []
  for i in range(start, len(text)):
    c = text[i]
    if c in pairs:
      stack.append(pairs[c])
    elif stack and c == stack[-1]:
      stack.pop()
      if not stack:
        return i + 1
  raise ValueError(f'unbalanced brackets in HLO text: {text[start:start + 80]!r}')


def _split_top(text: str) -> List[str]:
  """Splits at commas outside brackets."""
  parts, depth, current = [], 0, []
  for c in text:
    if c in '([{':
      depth += 1
    elif c in ')]}':
      depth -= 1
    if c == ',' and depth == 0:
      parts.append(''.join(current).strip())
      current = []
    else:
      current.append(c)
  if ''.join(current).strip():
    parts.append(''.join(current).strip())
  return parts


_INSTRUCTION = re.compile(r'^\s+(ROOT\s+)?%?([^\s=]+)\s*=\s*')
_OPCODE = re.compile(r'\s*([\w\-]+)\(')


def _parse_instruction(line: str) -> Optional[Instruction]:
  """The instruction on a line, or None if the line holds none."""
  try:
    return _parse_instruction_or_raise(line)
  except ValueError:  # unbalanced brackets: a line of a kernel's text, not HLO
    return None


def _parse_instruction_or_raise(line: str) -> Optional[Instruction]:
  m = _INSTRUCTION.match(line)
  if not m:
    return None
  rest = line[m.end():]
  if rest.startswith('('):
    end = _matching(rest, 0)
  else:
    end = rest.find(' ')
    if end < 0:
      return None
  shape, rest = rest[:end], rest[end:]
  op = _OPCODE.match(rest)
  if not op:
    return None
  open_at = op.end() - 1
  close = _matching(rest, open_at)
  return Instruction(name=m.group(2), shape=shape, opcode=op.group(1),
                     operands=tuple(_split_top(rest[open_at + 1:close - 1])),
                     attrs=rest[close:].lstrip(', '), root=bool(m.group(1)))


_HEADER = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)\s*\(')


def parse_module(text: str) -> Module:
  """The computations and instructions of an HLO module's text (`compiled.as_text()`).

  An instruction may run over several lines (a kernel's backend_config holds newlines):
  a line that neither starts an instruction, opens a computation nor closes one ('}'
  alone) continues the instruction before it.
  """
  header = text[:text.find('\n')] if '\n' in text else text
  partitions = re.search(r'\bnum_partitions=(\d+)', header)
  replicas = re.search(r'\breplica_count=(\d+)', header)
  computations, by_name, entry, current, pending = {}, {}, None, None, None

  def flush():
    instr = _parse_instruction(pending) if pending is not None else None
    if instr is not None and current is not None:
      computations[current].append(instr)
      by_name[instr.name] = instr

  for line in text.splitlines():
    if line.startswith('HloModule'):
      continue
    opens = not line[:1].isspace() and line.rstrip().endswith('{') and _HEADER.match(line)
    starts = line[:1].isspace() and _INSTRUCTION.match(line)
    if opens or starts or line.strip() == '}':
      flush()
      pending = None
    if opens:
      current = opens.group(2)
      computations[current] = []
      if opens.group(1):
        entry = current
    elif line.strip() == '}':
      current = None
    elif starts:
      pending = line
    elif pending is not None:
      pending += ' ' + line.strip()
  flush()
  if entry is None:
    raise ValueError('HLO text has no ENTRY computation.')
  return Module(computations=computations, entry=entry,
                num_partitions=int(partitions.group(1)) if partitions else 1,
                replica_count=int(replicas.group(1)) if replicas else 1, by_name=by_name)


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape, summed over tuple elements (token[] is 0)."""
  total = 0
  for dtype, dims in re.findall(r'\b([a-z]\w*)\[([^\]]*)\]', shape):
    if dtype == 'token':
      continue
    bits = 8 if dtype == 'pred' else int(re.search(r'\d+', dtype).group())
    count = math.prod(int(d.lstrip('<=')) for d in dims.split(',') if d.strip())
    total += (count * bits + 7) // 8
  return total


def _operand_shape(module: Module, operand: str) -> str:
  """Shape of one operand: inline if printed ('f32[8]{0} %x'), else its instruction's."""
  if ' ' in operand.strip():
    return operand.strip().rsplit(' ', 1)[0]
  name = operand.strip().lstrip('%')
  if name not in module.by_name:
    raise ValueError(f'HLO operand {operand!r} names no instruction.')
  return module.by_name[name].shape


def _operand_bytes(module: Module, operand: str) -> int:
  return shape_bytes(_operand_shape(module, operand))


def _iota_groups(text: str) -> List[List[int]]:
  """'[G,S]<=[d0,d1,..]T(perm)': iota over d0*d1*.., shaped [d0,..], transposed, as [G,S]."""
  m = re.fullmatch(r'\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?', text.strip())
  if not m:
    raise ValueError(f'not an iota replica group list: {text!r}')
  out_dims = [int(x) for x in m.group(1).split(',')]
  dims = [int(x) for x in m.group(2).split(',')]
  ids = np.arange(math.prod(dims)).reshape(dims)
  if m.group(3):
    ids = ids.transpose([int(x) for x in m.group(3).split(',')])
  return ids.reshape(out_dims).tolist() if len(out_dims) == 2 else [ids.reshape(-1).tolist()]


def _mesh_groups(text: str) -> List[List[int]]:
  """"mesh['a'=2,'b'=4] {'a'}": devices sharing every coordinate but the listed axes.

  Device ids are iota over the mesh unless `device_ids=(...)` follows it; an axis
  'a':(p)s is the sub-axis of size s after the major factor p of axis a.
  """
  m = re.fullmatch(r"mesh\[([^\]]*)\](?:,\s*device_ids=\((.*)\))?\s*\{(.*)\}", text.strip())
  if not m:
    raise ValueError(f'not a mesh-axes replica group list: {text!r}')
  names, sizes = [], []
  for item in _split_top(m.group(1)):
    name, size = item.rsplit('=', 1)
    names.append(name.strip().strip("'\""))
    sizes.append(int(size))
  n = math.prod(sizes)
  if m.group(2):
    ids_text = m.group(2).strip()
    ids = (np.asarray(_iota_groups(ids_text)).reshape(-1) if '<=' in ids_text
           else np.asarray([int(x) for x in re.findall(r'\d+', ids_text)]))
    if ids.size != n:
      raise ValueError(f'mesh device_ids hold {ids.size} ids, the mesh {n}: {text!r}')
  else:
    ids = np.arange(n)
  picked = []  # (axis index, pre, size)
  for item in _split_top(m.group(3)):
    sub = re.fullmatch(r"['\"]?([^'\":]+)['\"]?(?::\((\d+)\)(\d+))?", item.strip())
    if not sub or sub.group(1) not in names:
      raise ValueError(f'replica group axis {item.strip()} is not one of the mesh axes '
                       f'{names}.')
    axis = names.index(sub.group(1))
    pre, size = (int(sub.group(2)), int(sub.group(3))) if sub.group(2) else (1, sizes[axis])
    picked.append((axis, pre, size))
  # Split each axis at the boundaries of its picked sub-axes (major factor first).
  bounds = {a: {1, sizes[a]} for a in range(len(sizes))}
  for a, pre, size in picked:
    bounds[a] |= {pre, pre * size}
  split_dims, where = [], {}
  for a in range(len(sizes)):
    edges = sorted(bounds[a])
    for lo, hi in zip(edges, edges[1:]):
      where[(a, lo)] = len(split_dims)
      split_dims.append(hi // lo)
  ids = ids.reshape(split_dims)
  group_dims = []
  for a, pre, size in picked:
    edges = sorted(bounds[a])
    group_dims += [where[(a, lo)] for lo, hi in zip(edges, edges[1:])
                   if lo >= pre and hi <= pre * size]
  rest = [d for d in range(len(split_dims)) if d not in group_dims]
  group_size = math.prod(split_dims[d] for d in group_dims)
  return ids.transpose(rest + group_dims).reshape(-1, group_size).tolist()


def replica_groups(attrs: str, num_devices: int) -> List[List[int]]:
  """The replica groups of a collective's attributes, in any of the three text forms.

  No `replica_groups` or an empty list means one group of all `num_devices`.
  """
  key = 'replica_groups='
  at = attrs.find(key)
  if at < 0:
    return [list(range(num_devices))]
  text = attrs[at + len(key):]
  if text.startswith('{'):
    groups = [[int(x) for x in re.findall(r'\d+', g)]
              for g in re.findall(r'\{([^{}]*)\}', text[:_matching(text, 0)])]
    groups = [g for g in groups if g]
    return groups or [list(range(num_devices))]
  if text.startswith('['):
    m = re.match(r'\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?', text)
    if not m:
      raise ValueError(f'cannot read replica groups {text[:80]!r}')
    return _iota_groups(m.group())
  if text.startswith('mesh['):
    end = _matching(text, text.find('['))
    if text[end:].startswith(', device_ids=('):
      end = _matching(text, end + len(', device_ids='))
    brace = text.find('{', end)
    return _mesh_groups(text[:_matching(text, brace)])
  raise ValueError(f'cannot read replica groups {text[:80]!r}')


def _megascale_slices(attrs: str) -> Optional[int]:
  """Slices a megascale transfer spans, from `_xla_megascale_target`."""
  m = re.search(r'_xla_megascale_target="?\{', attrs)
  if not m:
    return None
  text = attrs[m.end() - 1:]
  first = text[:_matching(text, 0)]
  if first.startswith('{{'):  # explicit groups of device ids: one id per slice
    return len(re.findall(r'\d+', re.search(r'\{\{([^}]*)\}', first).group(1)))
  count = 0  # '{1,2}x{0:3}': slice numbers (a or a:b, inclusive), times devices
  for item in first.strip('{}').split(','):
    lo, _, hi = item.partition(':')
    count += int(hi) - int(lo) + 1 if hi else 1
  return count


def _producer(module: Module, operand: str, through: Sequence[str] = ()
              ) -> Optional[Instruction]:
  """The instruction an operand names, looking through the single-operand ops `through`."""
  instr = module.by_name.get(operand.split()[-1].lstrip('%'))
  while instr is not None and instr.opcode in through and len(instr.operands) == 1:
    instr = module.by_name.get(instr.operands[0].split()[-1].lstrip('%'))
  return instr


def _unpadded_bytes(module: Module, operand: str, payload: int) -> int:
  """The payload without the zeros of a ZeroCrop custom call that padded it (libtpu pads
  a device's share before a DCN transfer, e.g. [1, 18, 6912] to [2, 18, 6912])."""
  pad = _producer(module, operand, through=('bitcast', 'copy'))
  if (pad is not None and pad.opcode == 'custom-call' and 'custom_call_target="ZeroCrop"'
      in pad.attrs and len(pad.operands) == 1):
    return min(payload, _operand_bytes(module, pad.operands[0]))
  return payload


def _trip_count(module: Module, loop: Instruction) -> Tuple[Optional[int], str]:
  """(trip count or None, where it came from) of a while instruction."""
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.attrs)
  if m:
    return int(m.group(1)), 'known_trip_count'
  cond = re.search(r'\bcondition=%?([\w.\-]+)', loop.attrs)
  body = module.computations.get(cond.group(1), []) if cond else []
  root = next((i for i in body if i.root), None)
  if root is None or root.opcode != 'compare' or len(root.operands) != 2:
    return None, 'unknown'
  direction = re.search(r'direction=(\w+)', root.attrs)
  a, b = (module.by_name.get(o.split()[-1].lstrip('%')) for o in root.operands)
  if direction and direction.group(1) == 'GT':
    a, b = b, a
  elif not direction or direction.group(1) != 'LT':
    return None, 'unknown'
  if (a is None or b is None or a.opcode != 'get-tuple-element' or b.opcode != 'constant'
      or not re.fullmatch(r'-?\d+', b.operands[0])):
    return None, 'unknown'
  limit = int(b.operands[0])
  # lax loops count from 0; a constant start in the init tuple (XLA peels a first
  # iteration out of a loop by starting it at 1) overrides that.
  start = 0
  index = re.search(r'\bindex=(\d+)', a.attrs)
  init = _producer(module, loop.operands[0]) if loop.operands else None
  if index and init is not None and init.opcode == 'tuple':
    first = _producer(module, init.operands[int(index.group(1))], through=('copy', 'bitcast'))
    if (first is not None and first.opcode == 'constant'
        and re.fullmatch(r'-?\d+', first.operands[0])):
      start = int(first.operands[0])
  return max(limit - start, 0), 'loop condition'


def _execution_counts(module: Module):
  """Per computation: (times it runs per step, the while loops around it)."""
  order, seen = [], set()

  def callees(instr: Instruction):
    if instr.opcode.endswith('-done') or instr.opcode.endswith('-update'):
      return []
    found = [(k, n) for k, n in _CALLEE.findall(instr.attrs)]
    for k, names in _CALLEE_LIST.findall(instr.attrs):
      found += [(k, n.strip().lstrip('%')) for n in names.split(',') if n.strip()]
    return [(k, n) for k, n in found if n in module.computations]

  def visit(comp: str):  # post-order, iteratively (deep call chains)
    stack = [(comp, False)]
    while stack:
      c, done = stack.pop()
      if done:
        order.append(c)
        continue
      if c in seen:
        continue
      seen.add(c)
      stack.append((c, True))
      for instr in module.computations[c]:
        for _, callee in callees(instr):
          if callee not in seen:
            stack.append((callee, False))

  visit(module.entry)
  counts = {c: 0 for c in module.computations}
  loops: Dict[str, Set[Tuple[str, Optional[int], str]]] = {c: set() for c in module.computations}
  counts[module.entry] = 1
  for comp in reversed(order):  # callers before callees
    for instr in module.computations[comp]:
      trip = None
      for key, callee in callees(instr):
        factor = 1
        inherited = set(loops[comp])
        if instr.opcode == 'while' and key in ('body', 'condition'):
          if trip is None:
            trip = _trip_count(module, instr)
          factor = trip[0] if trip[0] is not None else 1
          inherited.add((instr.name, trip[0], trip[1]))
        counts[callee] += counts[comp] * factor
        loops[callee] |= inherited
  return counts, loops


def _price(kind: str, share: float, slices: int) -> int:
  """Bytes one device sends over DCN for one execution (module doc's cost model)."""
  if slices <= 1:
    return 0
  factor = {'all-reduce': 2 * (slices - 1) / slices, 'all-gather': slices - 1,
            'reduce-scatter': (slices - 1) / slices,
            'all-to-all': (slices - 1) / slices}.get(kind, 1.0)
  return int(round(factor * share))


def dcn_traffic(text: str, slice_of: Optional[Sequence[int]] = None) -> DcnTraffic:
  """Cross-slice transfers of a compiled program and the bytes each device sends per step.

  Args:
    text: the program's HLO text (`jax.stages.Compiled.as_text()`).
    slice_of: slice of each device of the program's device assignment (index = the
      device id in replica groups). Without it, or when the program is compiled per
      slice (fewer devices than `slice_of`), only megascale transfers count.
  """
  module = parse_module(text)
  counts, loops = _execution_counts(module)
  program_devices = module.num_partitions * module.replica_count
  use_groups = slice_of is not None and len(slice_of) == program_devices
  notes = []
  if slice_of is not None and not use_groups:
    notes.append(f'the program runs on {program_devices} devices of '
                 f'{len(slice_of)} (one slice each): its replica groups stay in a slice')
  transfers, loop_names = [], {}
  for comp, instrs in module.computations.items():
    if not counts.get(comp):
      continue
    for instr in instrs:
      transfer = None
      if instr.opcode == 'send' and '_xla_megascale_transfer_type' in instr.attrs:
        kind = re.search(r'_xla_megascale_transfer_type="?(\w+)', instr.attrs).group(1)
        kind = MEGASCALE_KINDS.get(kind, kind.lower())
        payload = _operand_bytes(module, instr.operands[0])
        data = _unpadded_bytes(module, instr.operands[0], payload)
        slices = _megascale_slices(instr.attrs) or 2
        transfer = (kind, 'megascale', payload, slices, _price(kind, payload, slices),
                    _price(kind, data, slices), data)
      elif use_groups and instr.opcode.removesuffix('-start') in COLLECTIVES:
        kind = instr.opcode.removesuffix('-start')
        payload = sum(_operand_bytes(module, o) for o in instr.operands)
        if kind == 'collective-permute':
          text = instr.attrs[instr.attrs.find('source_target_pairs=') + 20:]
          pairs = [[int(x) for x in p] for p in re.findall(
              r'\{(\d+),(\d+)\}', text[:_matching(text, 0)] if text.startswith('{') else '')]
          crossing = any(slice_of[s] != slice_of[t] for s, t in pairs)
          slices, sent = (2, payload) if crossing else (1, 0)
        else:
          slices, sent = 1, 0
          for group in replica_groups(instr.attrs, program_devices):
            s = len({slice_of[d] for d in group})
            share = payload / (len(group) / s) if kind in ('all-reduce', 'reduce-scatter') \
                else payload
            if s > 1 and _price(kind, share, s) > sent:
              slices, sent = s, _price(kind, share, s)
        if sent:
          transfer = (kind, 'replica groups', payload, slices, sent, sent, payload)
      if transfer is None:
        continue
      kind, source, payload, slices, sent, data_sent, data = transfer
      dtype = re.match(r'\(?\s*([a-z]\w*)\[', _operand_shape(module, instr.operands[0]))
      transfers.append(Transfer(name=instr.name, computation=comp, kind=kind, source=source,
                                payload_bytes=payload, slices=slices,
                                bytes_per_device=sent, executions=counts[comp],
                                dtype=dtype.group(1) if dtype else '?', data_bytes=data,
                                data_bytes_per_device=data_sent))
      for name, trip, how in loops[comp]:
        loop_names[name] = (trip, how)
  loop_lines = [f'{name}: {trip if trip is not None else "?"} ({how})'
                for name, (trip, how) in sorted(loop_names.items())]
  unknown = sum(1 for trip, _ in loop_names.values() if trip is None)
  by_dtype = {}
  for t in transfers:
    by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.bytes_per_device * t.executions
  return DcnTraffic(
      transfers=transfers,
      bytes_per_device=sum(t.bytes_per_device * t.executions for t in transfers),
      data_bytes_per_device=sum(t.data_bytes_per_device * t.executions for t in transfers),
      bytes_by_dtype=by_dtype, loops=loop_lines, unknown_loops=unknown, notes=notes)
