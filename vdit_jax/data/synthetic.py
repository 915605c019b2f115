"""Built-in synthetic video clips: one coloured shape bouncing around a dark frame.

The default training data, so a newcomer needs no download. Each clip shows ONE shape
(square, circle or triangle) of a random colour and size on a dark background, starting at a
random position and moving at constant speed in one of four directions, reflecting off the
borders so it always stays fully inside the frame (or, with bounce=False, starting where its
whole path fits inside, so it never reaches a border). The class label encodes what a model can
learn to generate on demand:

    label = shape_index * len(DIRECTIONS) + direction_index        # in [0, NUM_CLASSES)

`direction` is the direction of motion at frame 0; the start position is drawn so the
shape travels at least one frame in that direction before its first bounce. With
bounce=False it is the direction of motion in every frame, so a label or caption describes
the whole clip.

`SyntheticShapes` is a grain random-access source (`__len__`, `__getitem__`): clip `idx` is
a pure function of `(seed, idx)` and the constructor arguments, so any worker can render any
clip and a checkpointed pipeline resumes exactly.

With an `audio.AudioSpec` the clips also carry a soundtrack that the video determines (the
built-in audio-visual data of issue 30, "Synchronised audio"): every bounce off a border, and
nothing else, makes a short percussive tone that starts at the exact (sub-sample) bounce time,
at the pitch of the shape (SHAPE_PITCHES_HZ) and as loud as the shape is fast. Frame k of a
clip is at k / fps seconds, so a model has to place each click on the frame where the shape
turns around, pick the pitch from the shape and the loudness from the speed.
"""

from __future__ import annotations

import math
import numbers
import types

import numpy as np

from vdit_jax.data import audio as audio_lib

SHAPES = ('square', 'circle', 'triangle')
# Ordered name -> (R, G, B) in 0..255; the colour index of a clip is its position here.
COLOURS = types.MappingProxyType({
    'red': (230, 40, 40),
    'green': (40, 200, 60),
    'blue': (50, 90, 240),
    'yellow': (240, 220, 40),
    'magenta': (220, 50, 220),
    'cyan': (40, 220, 230),
    'white': (240, 240, 240),
})
DIRECTIONS = ('right', 'left', 'down', 'up')
NUM_CLASSES = len(SHAPES) * len(DIRECTIONS)
# Pitch in Hz of the bounce sound of each shape, in SHAPES order (square, circle, triangle):
# one octave apart, so they stay apart after the mel features and Griffin-Lim, and all
# well below the Nyquist frequency of the default 16 kHz audio. eval/sync.py reads them to
# tell which shape a sound belongs to.
SHAPE_PITCHES_HZ = (500.0, 1000.0, 2000.0)

# Unit step (dx, dy) per direction, image coordinates (y grows downwards).
_DIRECTION_STEPS = np.array([(1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0)])
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)  # [K, 3]

_MIN_SIDE = 8  # smallest frame side that fits a shape plus its margin
SHAPE_SIZE = (0.20, 0.35)  # default (min, max) shape box side, as a fraction of min(H, W)
_MAX_SHAPE_SIZE = 0.75  # larger boxes leave no room to move (and none for the margin at 8 px)
_SPEED_RANGE = (1.0, 2.5)  # pixels per frame at 32x32 and time_stride 1
_BACKGROUND_RANGE = (0, 30)  # grey level of the background, per clip
_MARGIN = 1.0  # pixels kept between the shape edge and the border (room for anti-aliasing)
# The bounce sound: a sine at the shape's pitch, rising linearly over _BURST_ATTACK_S, then
# decaying exponentially with time constant _BURST_DECAY_S, reaching exactly 0 at
# _BURST_LENGTH_S (the exponential minus its value there, rescaled, so it ends without a
# click). Peak amplitude _BURST_PEAK * speed / fastest speed: loudness says the speed.
_BURST_ATTACK_S = 0.001
_BURST_DECAY_S = 0.025
_BURST_LENGTH_S = 0.080
_BURST_PEAK = 0.35


def _check_positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
    raise ValueError(f'{name} must be a positive integer, got {value!r}.')
  return int(value)


def _reflect(position: np.ndarray, lo: float, hi: float) -> np.ndarray:
  """Folds positions on a line into [lo, hi] as a ball bouncing between two walls."""
  span = hi - lo
  if span <= 0:
    return np.full_like(position, lo)
  u = np.mod(position - lo, 2.0 * span)
  return lo + np.where(u > span, 2.0 * span - u, u)


class SyntheticShapes:
  """Random-access source of synthetic clips (grain `RandomAccessDataSource` protocol).

  Args:
    num_frames: frames per clip, T.
    height: frame height H in pixels (at least 8).
    width: frame width W in pixels (at least 8).
    num_examples: number of distinct clips (the source's length).
    seed: non-negative integer; clip `idx` depends only on (seed, idx) and the sizes.
    time_stride: frames are sampled every `time_stride` frames of the base motion, so a
      clip rendered with time_stride=0.5 is the same motion at double the frame rate
      (frame 2k of it equals frame k of the time_stride=1 clip).
    colours: the colours clips are drawn from: None or '' for all of COLOURS, else names
      of COLOURS as a comma-separated string or a sequence ('red,blue'). With all
      colours, clip `idx` is the same as before this option existed; a subset keeps each
      clip's shape, direction, size and motion and repaints it from the subset.
    captions: also return each clip's caption, e.g. 'a red square moving left' (see
      `caption`): what the text-conditioned model trains on.
    shape_size: (min, max) side of a shape's box as fractions of min(H, W), drawn
      uniformly per clip; 0 < min <= max <= 0.75. Bigger shapes are easier for a small
      model to generate whole (BUILD_NOTES.md, "Fragments in numbers").
    bounce: True (the default): the shape reflects off the borders. False: no clip
      reaches a border: the speed is capped at what the clip's duration
      (num_frames - 1) * time_stride leaves room for, and the start is drawn so the
      whole path lies inside. Then the motion is constant and its direction is the
      label's in every frame (with bounces, most 8-frame clips of big shapes turn back,
      so a caption's direction holds for their first frames only). The cap depends on
      the duration, so two clips of one idx match across time_stride only when their
      durations are equal. Files and shards sources leave it unread.
    shape_weights: () or None (the default) draws the three SHAPES equally often, and clip
      `idx` is the same as before this option existed; else one non-negative weight per
      shape (e.g. (2, 1, 1): squares in half the clips), normalised. The draw uses the
      same random number, so a clip keeps its colour, direction, size and motion.
    audio: None (the default: video only, the clips exactly as before this option) or an
      `audio.AudioSpec`: also render each clip's soundtrack at audio.sample_rate, with
      frame k at k / audio.fps seconds (so base-motion time tau is at
      tau / (time_stride * audio.fps) seconds). It covers [0, num_frames / fps) seconds,
      audio.num_samples(num_frames) samples, the last frame's interval included. Each
      bounce in that span (the unfolded centre start + step * speed * tau crossing a
      border; with bounce=False there are none, so the audio is silent) starts a burst:
      a sine at SHAPE_PITCHES_HZ[shape] with a 1 ms linear attack and an exponential
      decay (time constant 25 ms) that ends 80 ms after the bounce, peak amplitude
      0.35 * speed / fastest speed, phase 0 at the exact bounce time (sample n holds the
      burst at n / sample_rate - t_bounce, for every n at or after it). Bursts that
      overlap add; the sum is clipped to [-1, 1]. No random number is drawn for it: the
      video and the other fields are the same with or without audio.

  `source[idx]` returns a dict of numpy values:
    video      uint8 [T, H, W, 3]
    label      int32 []   shape * len(DIRECTIONS) + direction
    shape      int32 []   index into SHAPES
    colour     int32 []   index into COLOURS
    direction  int32 []   index into DIRECTIONS
    caption    str        only with captions=True: 'a {colour} {shape} moving {direction}'
    audio         float32 [S]  only with audio: the soundtrack in [-1, 1],
                               S = audio.num_samples(T)
    event_times   float64 [E]  only with audio: bounce times in seconds, sorted (E may be 0)
    event_speeds  float64 [E]  only with audio: the shape's speed at each bounce, in pixels
                               per second (speed per base frame * time_stride * fps)
  """

  def __init__(self, num_frames: int, height: int, width: int,
               num_examples: int = 100_000, seed: int = 0, time_stride: float = 1.0,
               colours=None, captions: bool = False, shape_size=SHAPE_SIZE,
               bounce: bool = True, shape_weights=None,
               audio: audio_lib.AudioSpec | None = None):
    self.num_frames = _check_positive_int('num_frames', num_frames)
    self.height = _check_positive_int('height', height)
    self.width = _check_positive_int('width', width)
    self.num_examples = _check_positive_int('num_examples', num_examples)
    if min(self.height, self.width) < _MIN_SIDE:
      raise ValueError(
          f'height and width must be at least {_MIN_SIDE} pixels so a shape fits inside '
          f'the frame, got height={height!r}, width={width!r}.')
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
      raise ValueError(f'seed must be a non-negative integer, got {seed!r}.')
    self.seed = int(seed)
    if (isinstance(time_stride, bool) or not isinstance(time_stride, numbers.Real)
        or not math.isfinite(time_stride) or time_stride <= 0):
      raise ValueError(f'time_stride must be a finite number > 0, got {time_stride!r}.')
    self.time_stride = float(time_stride)
    self.colour_ids = colour_subset(colours)  # indices into COLOURS
    self.captions = bool(captions)
    self.shape_size = check_shape_size(shape_size)
    if not isinstance(bounce, (bool, np.bool_)):
      raise ValueError(f'bounce must be True or False, got {bounce!r}.')
    self.bounce = bool(bounce)
    self.shape_weights = check_shape_weights(shape_weights)
    self._shape_edges = (None if self.shape_weights is None else
                         np.cumsum(self.shape_weights) / sum(self.shape_weights))  # [3]
    if audio is not None and not isinstance(audio, audio_lib.AudioSpec):
      raise ValueError(f'audio must be None or an audio.AudioSpec, got {audio!r}.')
    self.audio = audio

    # Pixel-centre coordinates, shared by every clip.
    self._xs = (np.arange(self.width, dtype=np.float32) + 0.5)[None, None, :]  # [1, 1, W]
    self._ys = (np.arange(self.height, dtype=np.float32) + 0.5)[None, :, None]  # [1, H, 1]
    self._times = np.arange(self.num_frames, dtype=np.float64) * self.time_stride  # [T]
    self._pixel_scale = min(self.height, self.width) / 32.0
    self._max_speed = _SPEED_RANGE[1] * self._pixel_scale  # the fastest clip's speed

  def __len__(self) -> int:
    return self.num_examples

  def __repr__(self) -> str:
    return (f'SyntheticShapes(num_frames={self.num_frames}, height={self.height}, '
            f'width={self.width}, num_examples={self.num_examples}, seed={self.seed}, '
            f'time_stride={self.time_stride}{self._colours_repr()}{self._size_repr()}'
            f'{"" if self.bounce else ", bounce=False"}'
            f'{"" if self.shape_weights is None else f", shape_weights={self.shape_weights}"}'
            f'{"" if self.audio is None else f", audio={self.audio!r}"})')

  def _size_repr(self) -> str:
    return '' if self.shape_size == SHAPE_SIZE else f', shape_size={self.shape_size}'

  def _colours_repr(self) -> str:
    if len(self.colour_ids) == len(COLOURS):
      return ''
    return f", colours='{','.join(list(COLOURS)[i] for i in self.colour_ids)}'"

  def __getitem__(self, idx) -> dict[str, np.ndarray]:
    if isinstance(idx, bool) or not isinstance(idx, numbers.Integral):
      raise TypeError(f'SyntheticShapes index must be an integer, got {idx!r}.')
    requested = int(idx)
    idx = requested + self.num_examples if requested < 0 else requested
    if not 0 <= idx < self.num_examples:
      raise IndexError(f'index {requested} is out of range for SyntheticShapes of length '
                       f'{self.num_examples} (valid: -{self.num_examples} .. '
                       f'{self.num_examples - 1}).')

    # One draw of all random numbers: cheaper than one generator call per quantity.
    u = np.random.default_rng([self.seed, idx]).random(8)  # [8] in [0, 1)
    if self._shape_edges is None:
      shape = min(int(u[0] * len(SHAPES)), len(SHAPES) - 1)
    else:  # the first shape whose cumulative weight exceeds u[0]
      shape = min(int(np.searchsorted(self._shape_edges, u[0], side='right')), len(SHAPES) - 1)
    direction = min(int(u[1] * len(DIRECTIONS)), len(DIRECTIONS) - 1)
    num_colours = len(self.colour_ids)
    colour = self.colour_ids[min(int(u[2] * num_colours), num_colours - 1)]
    background = float(int(_BACKGROUND_RANGE[0]
                           + u[3] * (_BACKGROUND_RANGE[1] - _BACKGROUND_RANGE[0] + 1)))
    lo_size, hi_size = self.shape_size
    side = (lo_size + u[4] * (hi_size - lo_size)) * min(
        self.height, self.width)
    speed = (_SPEED_RANGE[0] + u[5] * (_SPEED_RANGE[1] - _SPEED_RANGE[0])) * self._pixel_scale
    start_u, start_v = u[6], u[7]

    half = side / 2.0
    # Centre limits per axis that keep the shape (and its anti-aliased fringe) inside.
    lo = half + _MARGIN
    hi_x = self.width - half - _MARGIN
    hi_y = self.height - half - _MARGIN
    step_x, step_y = _DIRECTION_STEPS[direction]
    duration = float(self._times[-1])  # base frames from the first frame to the last
    if not self.bounce and duration > 0:
      # The fastest speed whose path still fits between the limits of the moving axis.
      speed = min(speed, max((hi_x if step_x else hi_y) - lo, 0.0) / duration)

    def start(v, hi, step):
      if step == 0:
        return lo + v * (hi - lo)
      if not self.bounce:  # the whole path inside [lo, hi]
        room = max(hi - lo - speed * duration, 0.0)
        return lo + v * room if step > 0 else hi - v * room
      # Leave one base frame of travel before the first bounce, so frame 0 -> 1 moves
      # in the labelled direction.
      room = max(hi - lo - speed, 0.0)
      return lo + v * room if step > 0 else hi - v * room

    x0, y0 = start(start_u, hi_x, step_x), start(start_v, hi_y, step_y)
    cx = _reflect(x0 + step_x * speed * self._times, lo, hi_x)
    cy = _reflect(y0 + step_y * speed * self._times, lo, hi_y)
    cx = cx.astype(np.float32)[:, None, None]  # [T, 1, 1]
    cy = cy.astype(np.float32)[:, None, None]  # [T, 1, 1]

    dx = self._xs - cx  # [T, 1, W]
    dy = self._ys - cy  # [T, H, 1]
    half = np.float32(half)
    # Signed distance (pixels, negative inside) to the shape's outline.
    if SHAPES[shape] == 'square':
      sdf = np.maximum(np.abs(dx), np.abs(dy))  # [T, H, W]
      sdf -= half
    elif SHAPES[shape] == 'circle':
      sdf = dx * dx + dy * dy  # [T, H, W]
      np.sqrt(sdf, out=sdf)
      sdf -= half
    else:  # triangle, apex up, base at the bottom of its box
      base = dy - half  # [T, H, 1]
      sides = 2.0 * np.abs(dx) - dy  # [T, H, W]
      sides -= half
      sides *= np.float32(1.0 / math.sqrt(5.0))
      sdf = np.maximum(base, sides, out=sides)  # [T, H, W]
      # Clip to the shape's box: at the sharp corners the fringe of two half-planes would
      # reach up to ~1.1 px beyond the box, past the margin.
      np.maximum(sdf, np.abs(dx) - half, out=sdf)
      np.maximum(sdf, -dy - half, out=sdf)
    # Pixel coverage clip(0.5 - sdf, 0, 1) as a rounded level 0..255, in place.
    level = np.subtract(np.float32(0.5), sdf, out=sdf)  # [T, H, W]
    level *= np.float32(255.0)
    np.clip(level, 0.0, 255.0, out=level)
    level += np.float32(0.5)
    level = level.astype(np.uint8)  # [T, H, W]
    # Colour of each coverage level, blended over the background.
    ramp = np.arange(256, dtype=np.float32)[:, None] / np.float32(255.0)  # [256, 1]
    lut = background + ramp * (_PALETTE[colour] - np.float32(background))  # [256, 3]
    lut = np.rint(lut).astype(np.uint8)  # [256, 3]
    video = np.take(lut, level, axis=0)  # [T, H, W, 3]
    example = {
        'video': video,
        'label': np.int32(shape * len(DIRECTIONS) + direction),
        'shape': np.int32(shape),
        'colour': np.int32(colour),
        'direction': np.int32(direction),
    }
    if self.captions:
      example['caption'] = caption(shape, colour, direction)
    if self.audio is not None:
      moving = (x0, hi_x, step_x) if step_x else (y0, hi_y, step_y)
      example.update(self._soundtrack(shape, speed, lo, *moving))
    return example

  def _soundtrack(self, shape: int, speed: float, lo: float, start: float, hi: float,
                  step: float) -> dict[str, np.ndarray]:
    """The audio, event_times and event_speeds of a clip moving along one axis from
    `start` at `speed` pixels per base frame, in direction `step` (+-1), between `lo`
    and `hi`."""
    spec = self.audio
    seconds_per_base = 1.0 / (self.time_stride * spec.fps)  # seconds per base frame
    end = self.num_frames / spec.fps  # the audio covers [0, end) seconds
    if self.bounce:
      times = bounce_times(start, step * speed, lo, hi, self.num_frames * self.time_stride)
      times = times * seconds_per_base  # [E]
      times = times[times < end]
    else:  # no clip reaches a border
      times = np.zeros((0,), np.float64)
    amplitude = _BURST_PEAK * speed / self._max_speed
    wave = render_bursts(times, SHAPE_PITCHES_HZ[shape], amplitude, spec.sample_rate,
                         spec.num_samples(self.num_frames))
    return {
        'audio': wave,
        'event_times': times.astype(np.float64),
        'event_speeds': np.full(times.shape, speed / seconds_per_base, np.float64),
    }


def bounce_times(start: float, velocity: float, lo: float, hi: float,
                 duration: float) -> np.ndarray:
  """Base times in [0, duration) at which a centre bouncing between lo and hi turns back.

  The centre is `_reflect(start + velocity * tau, lo, hi)`: the unfolded line turns back
  exactly where it crosses a wall lo + m * span (span = hi - lo, m an integer) other than
  one it starts on, so for velocity > 0 the bounces are at tau_m = (lo + m * span - start)
  / velocity for the walls m with lo + m * span > start (and mirrored for velocity < 0).

  Args:
    start: unfolded position at tau = 0, in [lo, hi].
    velocity: signed speed along the axis per base frame (0: no bounces).
    lo: lower wall.
    hi: upper wall (hi <= lo: the centre cannot move, no bounces).
    duration: end of the base-time span (exclusive).

  Returns:
    float64 [E], sorted.
  """
  span = hi - lo
  if span <= 0 or velocity == 0 or duration <= 0:
    return np.zeros((0,), np.float64)
  speed = abs(velocity)
  count = int(math.ceil(speed * duration / span)) + 1  # walls the line can reach, at most
  fold = (start - lo) / span
  if velocity > 0:  # walls above start: m = floor(fold) + 1, + 2, ...
    walls = lo + (math.floor(fold) + 1 + np.arange(count)) * span  # [count]
    taus = (walls - start) / speed
  else:  # walls below start: m = ceil(fold) - 1, - 2, ...
    walls = lo + (math.ceil(fold) - 1 - np.arange(count)) * span  # [count]
    taus = (start - walls) / speed
  return taus[(taus >= 0) & (taus < duration)]


def render_bursts(times: np.ndarray, pitch: float, amplitude: float, sample_rate: int,
                  num_samples: int) -> np.ndarray:
  """The bounce sounds: one burst per event time (seconds), summed and clipped to [-1, 1].

  Burst at t_e, for every sample n with dt = n / sample_rate - t_e in [0, 80 ms):
  amplitude * envelope(dt) * sin(2 pi pitch dt), envelope rising linearly from 0 to 1
  over 1 ms, then (exp(-(dt - 1 ms) / 25 ms) - e) / (1 - e) with e its value at 80 ms.

  Returns:
    float32 [num_samples].
  """
  wave = np.zeros((num_samples,), np.float64)  # [S]
  length = int(math.ceil(_BURST_LENGTH_S * sample_rate)) + 1
  tail = math.exp(-(_BURST_LENGTH_S - _BURST_ATTACK_S) / _BURST_DECAY_S)
  for t_event in np.asarray(times, np.float64):
    first = int(math.ceil(t_event * sample_rate))
    n = np.arange(first, min(first + length, num_samples))  # [L]
    dt = np.maximum(n / sample_rate - t_event, 0.0)  # [L]; >= 0 up to rounding
    decay = (np.exp(-(dt - _BURST_ATTACK_S) / _BURST_DECAY_S) - tail) / (1.0 - tail)
    envelope = np.where(dt < _BURST_ATTACK_S, dt / _BURST_ATTACK_S, decay)
    envelope = np.where(dt < _BURST_LENGTH_S, envelope, 0.0)
    wave[n] += amplitude * envelope * np.sin(2.0 * np.pi * pitch * dt)
  return np.clip(wave, -1.0, 1.0).astype(np.float32)


def from_data_config(data, *, num_examples: int, seed: int, num_frames=None,
                     time_stride=None, captions: bool = False,
                     audio: audio_lib.AudioSpec | None = None) -> SyntheticShapes:
  """The clips `config.data` describes (size, colours, shape sizes, bounce), with
  `num_examples` clips from `seed`: the training source (data/pipeline.py) and the
  held-out clips of sampling and the benches, so both read every option the same way.
  `num_frames` and `time_stride` default to the config's; `audio` (an AudioSpec, e.g.
  `audio.AudioSpec.from_config(config.audio)`) adds the soundtrack."""
  return SyntheticShapes(
      data.num_frames if num_frames is None else num_frames, data.height, data.width,
      num_examples=num_examples, seed=seed, captions=captions,
      time_stride=data.time_stride if time_stride is None else time_stride,
      colours=data.colours,
      shape_size=data.shape_size,
      bounce=data.bounce,
      shape_weights=data.shape_weights,
      audio=audio)


def check_shape_weights(shape_weights):
  """() or None -> None (equal shares); else a tuple of len(SHAPES) floats >= 0, sum > 0."""
  if shape_weights is None or (not isinstance(shape_weights, str)
                               and hasattr(shape_weights, '__len__') and len(shape_weights) == 0):
    return None
  try:
    weights = tuple(float(v) for v in shape_weights)
    ok = (all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in shape_weights)
          and len(weights) == len(SHAPES) and all(math.isfinite(w) and w >= 0 for w in weights)
          and sum(weights) > 0)
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f'shape_weights={shape_weights!r} must be () or {len(SHAPES)} finite '
                     f'weights >= 0 with a positive sum, one per shape of {SHAPES}.')
  return weights


def check_shape_size(shape_size) -> tuple[float, float]:
  """(min, max) shape box side as fractions of min(H, W): 0 < min <= max <= 0.75."""
  try:
    lo, hi = (float(v) for v in shape_size)
    ok = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in shape_size)
  except (TypeError, ValueError):
    ok = False
  if not ok or not (math.isfinite(lo) and math.isfinite(hi)) or not 0 < lo <= hi <= _MAX_SHAPE_SIZE:
    raise ValueError(f'shape_size={shape_size!r} must be (min, max) fractions of the shorter '
                     f'frame side with 0 < min <= max <= {_MAX_SHAPE_SIZE}.')
  return lo, hi


def colour_subset(colours) -> tuple[int, ...]:
  """None / '' -> every index of COLOURS; 'red,blue' or ('red', 'blue') -> their indices."""
  if colours is None or (isinstance(colours, str) and not colours.strip()):
    return tuple(range(len(COLOURS)))
  names = colours.split(',') if isinstance(colours, str) else list(colours)
  names = [n.strip() if isinstance(n, str) else n for n in names]
  unknown = [n for n in names if n not in COLOURS]
  if unknown or not names:
    raise ValueError(f'colours={colours!r} must name colours of {tuple(COLOURS)} '
                     f'(comma-separated); unknown: {unknown}.')
  return tuple(sorted({list(COLOURS).index(n) for n in names}))


def _lookup(kind: str, names, value) -> str:
  if isinstance(value, str):
    if value not in names:
      raise ValueError(f'{kind} {value!r} is not one of {tuple(names)}.')
    return value
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f'{kind} must be a name or an index, got {value!r}.')
  names = tuple(names)
  if not 0 <= int(value) < len(names):
    raise ValueError(f'{kind} index {value!r} is out of range [0, {len(names)}).')
  return names[int(value)]


def direction_step(direction) -> np.ndarray:
  """Unit step (dx, dy) of a direction (name or index) in image coordinates, y down:
  direction_step('up') == [0, -1]. The clips move by speed times this per frame."""
  name = _lookup('direction', DIRECTIONS, direction)
  return _DIRECTION_STEPS[DIRECTIONS.index(name)].copy()


def opposite_direction(direction) -> str:
  """The name of the direction whose step is minus this one's: 'left' for 'right'."""
  steps = _DIRECTION_STEPS == -direction_step(direction)  # [4, 2]
  return DIRECTIONS[int(np.flatnonzero(steps.all(axis=1))[0])]


def caption(shape, colour, direction) -> str:
  """Text for a clip, e.g. caption(0, 'red', 1) == 'a red square moving left'.

  Each argument is a name or an index into SHAPES / COLOURS / DIRECTIONS (numpy ints work,
  so a clip's fields can be passed directly).
  """
  shape = _lookup('shape', SHAPES, shape)
  colour = _lookup('colour', COLOURS, colour)
  direction = _lookup('direction', DIRECTIONS, direction)
  return f'a {colour} {shape} moving {direction}'
