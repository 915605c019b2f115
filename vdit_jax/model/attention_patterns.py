"""Attention patterns on the token grid: which tokens each query attends to.

Tokens q/k/v [B, N, K, Dh] lie on the grid (T', H', W') in (t, h, w) order
(patching.py). Every pattern but `full` is attention within groups of tokens:
the tokens are regrouped into [B * G, n, K, Dh] (G groups of n tokens),
attended with `attention.dot_product_attention` (whatever impl is passed) and
put back. All groups are windows (wt, wh, ww) of the grid, -1 meaning a whole
axis, so one regrouping serves every pattern:

- `full`: all N tokens, through the seam's own path (with its sequence-parallel
  strategies).
- `factorised`: spatial attention within each frame, window (1, H', W'), and
  temporal attention across the frames at each position, window (T', 1, 1).
  'alternating': even blocks spatial, odd blocks temporal. 'within_block': both
  in every block as two attention sub-layers, spatial (`attn`) then temporal
  (`attn_temporal`); the temporal one has its own adaLN-Zero (shift, scale,
  gate) projection `adaln_temporal`, zero at init, so a fresh block is still
  the identity, and a checkpoint of a one-attention model loads into it with
  the new sub-layer switched off.
- `windowed`: local windows (wt, wh, ww), each dividing its grid axis. With
  `window_shift`, odd blocks use windows shifted by half a window (Swin): the
  tokens are rolled by -s = -(w // 2) on every axis whose window is smaller than
  the grid, so these windows straddle the even blocks' borders. The last window
  on a shifted axis then holds tokens from both ends of the grid; a mask keeps
  them apart: two tokens of one window attend to each other iff
  floor((c - s) / w) agrees on every axis, c being the original coordinates.
  Masked attention runs through `jax.nn.dot_product_attention(mask=...)`, so it
  needs an impl in MASKED_IMPLS.
- `hierarchical`: the heads are split into G groups (head h in group h % G),
  and group g attends within windows `hierarchical_windows[g]`, listed coarse to
  fine, each dividing the one before (e.g. the whole clip, then (2, 4, 4)). The
  groups' outputs go back to their heads and the output projection mixes the
  scales, as in multi-scale dilated attention (DilateFormer) or multi-scale
  window attention. The coarse heads carry information across the fine
  windows' borders within the block, so no shift and no mask: any impl works.
  Interleaved groups (h % G) keep every group on every device when the heads
  are sharded over `tensor` and (K / tensor) % G == 0.

Blocks that differ by layer parity (alternating, shifted windows) have a period
of 2; scanned models stack them as cycles of two blocks (see dit.py), so the
scanned loop has no conditional.

Sequence sharding: the explicit strategies of `model.sequence_parallel` are for
full attention; the other patterns keep it 'none' and may still shard tokens
over the mesh axis `sequence` (logical axis activation_length): the XLA
partitioner moves tokens as the groups need them.
"""

import dataclasses
import math
from typing import Optional, Sequence, Tuple

import einops
import jax
import jax.numpy as jnp
import numpy as np

from vdit_jax.model import attention as attention_lib

PATTERNS = ('full', 'factorised', 'windowed', 'hierarchical')
FACTORISED_MODES = ('alternating', 'within_block')
# Impls with a masked path (shifted windows): jax.nn.dot_product_attention(mask=...) with
# implementation 'xla', or 'cudnn' (jax turns the mask into a bias; not run in this
# repository's tests). 'auto' takes 'xla' there: a window's n x n logits are small.
MASKED_IMPLS = ('auto', 'xla', 'cudnn')

Window = Tuple[int, int, int]


def impl_name(impl) -> str:
  """'blockwise:512x1024' (or an attention.AttentionImpl) -> 'blockwise'."""
  return getattr(impl, 'name', None) or str(impl).partition(':')[0]


@dataclasses.dataclass(frozen=True)
class PatternSpec:
  """The model's attention pattern (config keys model.attention_pattern, ...)."""
  name: str = 'full'
  factorised_mode: str = 'alternating'
  window_size: Window = (2, 4, 4)          # (wt, wh, ww) tokens; -1: the whole axis
  window_shift: bool = True                # windowed: shifted windows on odd blocks
  hierarchical_windows: Tuple[Window, ...] = ((-1, -1, -1), (2, 4, 4))  # coarse -> fine

  @property
  def period(self) -> int:
    """Blocks per repeating unit: 2 where even and odd blocks differ."""
    if self.name == 'factorised' and self.factorised_mode == 'alternating':
      return 2
    if self.name == 'windowed' and self.window_shift:
      return 2
    return 1


@dataclasses.dataclass(frozen=True)
class Grouping:
  """What one attention sub-layer attends to.

  kind: 'full' | 'spatial' | 'temporal' | 'windowed' | 'hierarchical' (a name);
  windows: one (wt, wh, ww) per head group (-1: whole axis); shifted: Swin shift.
  """
  kind: str
  windows: Tuple[Window, ...] = ()
  shifted: bool = False


FULL = Grouping('full')
SPATIAL = Grouping('spatial', ((1, -1, -1),))
TEMPORAL = Grouping('temporal', ((-1, 1, 1),))


def _tupled(value):
  """Lists (e.g. from JSON) -> tuples, recursively, so that specs stay hashable."""
  if isinstance(value, (list, tuple)):
    return tuple(_tupled(v) for v in value)
  return value


def spec_from_config(model_cfg) -> PatternSpec:
  """A complete config.model section -> PatternSpec; checked by check_spec."""
  return PatternSpec(
      name=model_cfg.attention_pattern, factorised_mode=model_cfg.factorised_mode,
      window_size=_tupled(model_cfg.window_size), window_shift=model_cfg.window_shift,
      hierarchical_windows=_tupled(model_cfg.hierarchical_windows))


def block_groupings(pattern: PatternSpec, layer: int) -> Tuple[Grouping, ...]:
  """The attention sub-layers of block `layer` (only layer % pattern.period matters)."""
  if pattern.name == 'full':
    return (FULL,)
  if pattern.name == 'factorised':
    if pattern.factorised_mode == 'within_block':
      return (SPATIAL, TEMPORAL)
    return (SPATIAL,) if layer % 2 == 0 else (TEMPORAL,)
  if pattern.name == 'windowed':
    return (Grouping('windowed', (pattern.window_size,),
                     shifted=bool(pattern.window_shift) and layer % 2 == 1),)
  if pattern.name == 'hierarchical':
    return (Grouping('hierarchical', pattern.hierarchical_windows),)
  raise ValueError(f'model.attention_pattern={pattern.name!r} is not one of {PATTERNS}.')


# --- checks -------------------------------------------------------------------------------


def _check_window_entries(window, what: str) -> None:
  if (not isinstance(window, tuple) or len(window) != 3
      or not all(isinstance(w, int) and not isinstance(w, bool) for w in window)
      or not all(w > 0 or w == -1 for w in window)):
    raise ValueError(f'{what}={window!r} must be 3 ints (wt, wh, ww) in tokens, each '
                     'positive or -1 for the whole axis.')


def check_spec(pattern: PatternSpec, *, num_heads: int, depth: int, scan_layers: bool,
               attention_impl: str, sequence_parallel: str) -> None:
  """Rules that do not depend on the token grid; raises ValueError naming the value."""
  if pattern.name not in PATTERNS:
    raise ValueError(f'model.attention_pattern={pattern.name!r} is not one of {PATTERNS}.')
  if pattern.name == 'full':
    return
  if sequence_parallel != 'none':
    raise ValueError(
        f'model.sequence_parallel={sequence_parallel!r} is a strategy for full attention '
        f'over all N tokens, but model.attention_pattern={pattern.name!r} attends within '
        "frames, positions or windows; set model.sequence_parallel='none' (tokens may still "
        'be sharded over mesh.sequence: the XLA partitioner then moves tokens as the groups '
        'need them).')
  if pattern.name == 'factorised' and pattern.factorised_mode not in FACTORISED_MODES:
    raise ValueError(f'model.factorised_mode={pattern.factorised_mode!r} is not one of '
                     f'{FACTORISED_MODES}.')
  if pattern.name == 'windowed':
    _check_window_entries(pattern.window_size, 'model.window_size')
    if not isinstance(pattern.window_shift, bool):
      raise ValueError(f'model.window_shift={pattern.window_shift!r} must be True or False.')
    if pattern.window_shift and impl_name(attention_impl) not in MASKED_IMPLS:
      raise ValueError(
          f'model.window_shift=True masks the shifted windows that wrap around the grid, '
          f'which needs model.attention_impl in {MASKED_IMPLS}, not {attention_impl!r}; '
          'or set model.window_shift=False.')
  if pattern.name == 'hierarchical':
    windows = pattern.hierarchical_windows
    if not isinstance(windows, tuple) or not windows:
      raise ValueError(f'model.hierarchical_windows={windows!r} must be a non-empty tuple of '
                       '(wt, wh, ww) windows, coarse to fine.')
    for i, window in enumerate(windows):
      _check_window_entries(window, f'model.hierarchical_windows[{i}]')
    if num_heads % len(windows):
      raise ValueError(
          f'model.num_heads={num_heads} is not divisible by the {len(windows)} scales of '
          f'model.hierarchical_windows={windows}: each scale gets an equal group of heads.')
  if scan_layers and depth % pattern.period:
    raise ValueError(
        f'model.attention_pattern={pattern.name!r} alternates two kinds of block (even and '
        f'odd), which model.scan_layers=True stacks in pairs, so model.depth={depth} must '
        'be even; or set model.scan_layers=False.')


def resolve_window(window: Sequence[int], grid: Sequence[int],
                   what: str = 'window') -> Window:
  """(wt, wh, ww) with -1 -> the whole axis; raises unless each divides its grid axis."""
  window = tuple(window)
  _check_window_entries(window, what)
  resolved = tuple(g if w == -1 else w for w, g in zip(window, grid))
  for axis, w, g in zip('THW', resolved, grid):
    if g % w:
      raise ValueError(
          f"{what}={window} does not divide the token grid (T', H', W')={tuple(grid)}: "
          f"{w} does not divide {axis}'={g}. Each window size must divide its grid axis "
          '(frames/pt, height/ph, width/pw), or be -1 for the whole axis.')
  return resolved


def check_grid(pattern: PatternSpec, grid: Sequence[int]) -> None:
  """Rules that depend on the token grid (T', H', W'): windows divide it, scales nest."""
  grid = tuple(int(g) for g in grid)
  if pattern.name == 'windowed':
    resolve_window(pattern.window_size, grid, 'model.window_size')
  if pattern.name == 'hierarchical':
    resolved = [resolve_window(w, grid, f'model.hierarchical_windows[{i}]')
                for i, w in enumerate(pattern.hierarchical_windows)]
    for i in range(1, len(resolved)):
      coarse, fine = resolved[i - 1], resolved[i]
      if any(c % f for c, f in zip(coarse, fine)):
        raise ValueError(
            f'model.hierarchical_windows={pattern.hierarchical_windows} must go from coarse '
            f'to fine, each window dividing the one before, but {fine} (entry {i}) does not '
            f'divide {coarse} (entry {i - 1}) on the token grid {grid}.')


# --- regrouping and attention -------------------------------------------------------------


def swin_shift(grid: Sequence[int], window: Sequence[int]) -> Window:
  """Swin shift: half a window on each axis whose window is smaller than the grid."""
  return tuple(w // 2 if w < g else 0 for w, g in zip(window, grid))


def _roll(x, grid, shift):
  """Cyclic roll of tokens [B, N, K, Dh] on the grid by `shift` (t, h, w)."""
  if not any(shift):
    return x
  t, h, w = grid
  x = einops.rearrange(x, 'b (t h w) k d -> b t h w k d', t=t, h=h, w=w)
  x = jnp.roll(x, tuple(shift), axis=(1, 2, 3))  # [B, T', H', W', K, Dh]
  return einops.rearrange(x, 'b t h w k d -> b (t h w) k d')


def _window_sizes(grid, window):
  (t, h, w), (wt, wh, ww) = grid, window
  return dict(gt=t // wt, wt=wt, gh=h // wh, wh=wh, gw=w // ww, ww=ww)


def shifted_window_mask(grid: Sequence[int], window: Sequence[int],
                        shift: Sequence[int]) -> np.ndarray:
  """[G, n, n] bool: which tokens of each window of the rolled grid may attend to each other.

  Rolled position p holds the token at original coordinate c = (p + s) mod g;
  tokens share a region iff floor((c - s) / w) agrees on every axis (the tokens
  wrapped round from the start of an axis form region -1 there).
  """
  codes = np.zeros(tuple(grid), np.int64)
  for axis, (g, w, s) in enumerate(zip(grid, window, shift)):
    original = (np.arange(g) + s) % g
    region = (original - s) // w + 1  # 0 .. g // w
    shape = [1, 1, 1]
    shape[axis] = g
    codes = codes * (g // w + 1) + region.reshape(shape)  # [T', H', W']
  codes = einops.rearrange(codes, '(gt wt) (gh wh) (gw ww) -> (gt gh gw) (wt wh ww)',
                           **_window_sizes(grid, window))  # [G, n]
  return codes[:, :, None] == codes[:, None, :]  # [G, n, n]


def masked_dot_product_attention(q, k, v, mask, impl: str = 'xla'):
  """q/k/v [B, n, K, Dh], mask bool broadcastable to [B, K, n, n] -> [B, n, K, Dh]."""
  name = impl_name(impl)
  if name not in MASKED_IMPLS:
    raise ValueError(f'attention_impl={impl!r} has no masked path here (needed by shifted '
                     f'windows); use one of {MASKED_IMPLS}.')
  return jax.nn.dot_product_attention(q, k, v, mask=mask,
                                      implementation='xla' if name == 'auto' else name)


def window_attention(q, k, v, grid: Sequence[int], window: Sequence[int],
                     shift: Sequence[int] = (0, 0, 0), impl: str = 'xla'):
  """Attention within windows of the grid, optionally cyclically shifted (Swin).

  q/k/v [B, N, K, Dh] with N = T' H' W' -> [B, N, K, Dh]. `shift` (st, sh, sw)
  rolls the tokens by -shift first (and back after) and masks the wrapped windows.
  """
  grid = tuple(grid)
  window = resolve_window(window, grid)
  shift = tuple(int(s) for s in shift)
  if q.shape[1] != math.prod(grid):
    raise ValueError(f'{q.shape[1]} tokens do not fill the token grid {grid}.')
  if any(s < 0 or s >= w for s, w in zip(shift, window)):
    raise ValueError(f'shift={shift} must be in [0, window) for window={window}.')
  sizes = _window_sizes(grid, window)

  def to_windows(x):  # [B, N, K, Dh] -> [B*G, n, K, Dh]
    x = _roll(x, grid, tuple(-s for s in shift))
    return einops.rearrange(
        x, 'b (gt wt gh wh gw ww) k d -> (b gt gh gw) (wt wh ww) k d', **sizes)

  qw, kw, vw = to_windows(q), to_windows(k), to_windows(v)  # [B*G, n, K, Dh]
  if any(shift):
    mask = jnp.asarray(shifted_window_mask(grid, window, shift))  # [G, n, n]
    mask = jnp.tile(mask[:, None], (q.shape[0], 1, 1, 1))  # [B*G, 1, n, n]
    out = masked_dot_product_attention(qw, kw, vw, mask, impl)
  else:
    out = attention_lib.dot_product_attention(qw, kw, vw, impl)  # [B*G, n, K, Dh]
  out = einops.rearrange(
      out, '(b gt gh gw) (wt wh ww) k d -> b (gt wt gh wh gw ww) k d', **sizes)
  return _roll(out, grid, shift)  # [B, N, K, Dh]


def spatial_attention(q, k, v, grid: Sequence[int], impl: str = 'xla'):
  """Attention within each frame: groups (b t), n = H' W'. [B, N, K, Dh] -> same."""
  return window_attention(q, k, v, grid, SPATIAL.windows[0], impl=impl)


def temporal_attention(q, k, v, grid: Sequence[int], impl: str = 'xla'):
  """Attention across frames at each position: groups (b h w), n = T'. [B, N, K, Dh] -> same."""
  return window_attention(q, k, v, grid, TEMPORAL.windows[0], impl=impl)


def multiscale_window_attention(q, k, v, grid: Sequence[int],
                                windows: Sequence[Sequence[int]], impl: str = 'xla'):
  """Head group g (heads h with h % G == g) attends within windows[g]. [B, N, K, Dh] -> same."""
  num = len(windows)
  if q.shape[2] % num:
    raise ValueError(f'{q.shape[2]} heads do not split into {num} equal groups, one per '
                     f'window {tuple(windows)}.')
  split = lambda x: einops.rearrange(x, 'b n (k g) d -> g b n k d', g=num)
  qs, ks, vs = split(q), split(k), split(v)  # [G, B, N, K/G, Dh]
  outs = [window_attention(qs[i], ks[i], vs[i], grid, window, impl=impl)
          for i, window in enumerate(windows)]
  return einops.rearrange(jnp.stack(outs), 'g b n k d -> b n (k g) d')  # [B, N, K, Dh]


def attend(q, k, v, grid: Optional[Sequence[int]], grouping: Grouping, impl: str = 'xla',
           sequence_parallel: str = 'none'):
  """One attention sub-layer's pattern: q/k/v [B, N, K, Dh] -> [B, N, K, Dh]."""
  if grouping.kind == 'full':
    return attention_lib.dot_product_attention(q, k, v, impl, sequence_parallel)
  if sequence_parallel != 'none':
    raise ValueError(f'sequence_parallel={sequence_parallel!r} applies to full attention '
                     f'only, not to {grouping.kind!r} attention.')
  if grid is None:
    raise ValueError(f'{grouping.kind!r} attention needs the token grid (T\', H\', W\').')
  grid = tuple(int(g) for g in grid)
  if len(grouping.windows) > 1:
    return multiscale_window_attention(q, k, v, grid, grouping.windows, impl)
  window = resolve_window(grouping.windows[0], grid)
  shift = swin_shift(grid, window) if grouping.shifted else (0, 0, 0)
  return window_attention(q, k, v, grid, window, shift, impl)


# --- cost ---------------------------------------------------------------------------------


def attention_sublayers(pattern: PatternSpec) -> int:
  """Attention sub-layers (each with q, k, v, out and adaLN) per block."""
  return max(len(block_groupings(pattern, layer)) for layer in range(pattern.period))


def score_macs_per_token(pattern: PatternSpec, grid: Sequence[int], depth: int,
                         width: int) -> int:
  """Multiply-accumulates of q.k^T for one query token over `depth` blocks (A.V costs the same).

  Each head group of width width / G attends to its window's n tokens; shifted
  windows count whole windows (the masked scores are computed too).
  """
  grid = tuple(int(g) for g in grid)
  macs = 0
  for layer in range(depth):
    for grouping in block_groupings(pattern, layer):
      if grouping.kind == 'full':
        macs += width * math.prod(grid)
        continue
      group_width = width // len(grouping.windows)
      macs += sum(group_width * math.prod(resolve_window(w, grid)) for w in grouping.windows)
  return macs
