r"""Audio-visual sync of a clip and its soundtrack, in milliseconds.

The synthetic audio-visual clips show one shape bouncing off the frame's edges, and each
bounce (and only a bounce) makes a short percussive sound whose pitch says the shape
(SHAPE_PITCHES_HZ). Two estimators read how well a soundtrack lines up with its video:

  events   `visual_events` finds the bounces in the frames: the detector's object
           (eval/detect.py), its centroid refined to sub-pixel by the coverage of its
           anti-aliased edge, and a bounce wherever the centroid's velocity along an axis
           flips sign while the object touches that axis's border; the sub-frame time is
           where the straight paths before and after the turn meet (constant speed).
           `audio_onsets` finds the bursts in the wave: the envelope's half-peak rise,
           with the pitch of the first 30 ms. `match_events` pairs them one-to-one, and
           `sync_report` gives the median |offset|, the share of events within 40 ms,
           missed and extra events, the pitch's accuracy, and the same figures for a
           shuffled control (each video with the next clip's audio): chance.
  lag      `xcorr_lag` needs no event rule: it cross-correlates the visual motion energy
           (the norm of the second difference of a coverage-weighted centroid, a hat
           around each bounce) with the audio onset strength (the rise of the log
           envelope, 1 ms grid) over lags, and returns the best lag, refined between grid
           points.

Times are seconds from the clip's start; frame k is at k / fps. An offset or lag is audio
minus video: positive when the sound comes late.

Measured on the synthetic source at 32 x 32 and 16 fps against its exact bounce times
(tests/sync_test.py, whose docstrings name the clips): bounce times within 2.6 ms (median
0.3 ms; the detector's own centroid alone: median 4 ms, up to 41 ms), onsets 0.5 ms after
the bounce (half-way up the 1 ms attack), xcorr lags within -1.8..+2.4 ms. Through the
project's vocoder (data/audio.py: log-mel, Griffin-Lim) onsets stay within -3.8..+2.7 ms
with 4 iterations (rises of 9-19 ms) and xcorr lags within -3.4..+2.2 ms with 32.
A bounce in the first frame's or the last frames' interval sounds but cannot be seen
(the turn needs a frame on each side), so an onset there counts as extra.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Sequence, Tuple

import numpy as np

from vdit_jax.data.synthetic import SHAPE_PITCHES_HZ
from vdit_jax.eval import detect

WITHIN_S = 0.04  # 'in sync': one frame at 24 fps


def _check_rate(name: str, value) -> float:
  if (isinstance(value, bool) or not isinstance(value, numbers.Real)
      or not math.isfinite(value) or value <= 0):
    raise ValueError(f'{name} must be a finite number > 0, got {value!r}.')
  return float(value)


def _check_wave(wave) -> np.ndarray:
  wave = np.asarray(wave)
  if wave.ndim != 1:
    raise ValueError(f'wave must be 1-D [S] samples, got shape {wave.shape}.')
  wave = wave.astype(np.float64)
  if not np.all(np.isfinite(wave)):
    raise ValueError('wave must hold finite samples; it has NaN or inf.')
  return wave


# ----------------------------------------------------------------------------- video


def _dilate(mask, radius: int) -> np.ndarray:
  """bool [T, H, W]: `mask` grown by `radius` pixels (a square neighbourhood)."""
  _, h, w = mask.shape
  padded = np.pad(mask, ((0, 0), (radius, radius), (radius, radius)))
  out = np.zeros_like(mask)
  for dy in range(2 * radius + 1):
    for dx in range(2 * radius + 1):
      out |= padded[:, dy:dy + h, dx:dx + w]
  return out


@dataclasses.dataclass
class Track:
  """The object's path through a clip, as `visual_events` reads it.

  centroids  [T, 2] (x, y) pixels, NaN where the object is not found
  found      bool [T]
  lo         [T, 2] (x, y) of the object's first pixel edge (left, top); NaN where not found
  hi         [T, 2] (x, y) one past its last pixel (right, bottom edge); NaN where not found
  size       (W, H) of the frame
  """
  centroids: np.ndarray
  found: np.ndarray
  lo: np.ndarray
  hi: np.ndarray
  size: Tuple[int, int]


def track(frames, threshold: float = 60.0, refine: bool = True) -> Track:
  """The object of a clip [T, H, W, 3] (uint8, or float in [-1, 1]) frame by frame.

  The detector (eval/detect.py) finds the object and its colour; its extent is the box of
  the object mask (the largest component after the 3x3 vote). refine=True replaces the
  detector's centroid (of the thresholded foreground, which moves in steps of half a
  pixel) by the centroid of the object and a 2-pixel ring around it, each pixel weighted
  by its coverage: its distance from the background over the object's colour's, clipped
  to [0, 1]. On anti-aliased clips that follows the true centre to about 0.01 pixel.
  """
  x = detect.to_uint8_range(frames)  # [T, H, W, 3]
  t, h, w, _ = x.shape
  det = detect.detect(frames, threshold, clean=False)
  mask = detect.object_mask(detect.foreground(frames, threshold))  # [T, H, W]
  found = det.found & mask.any(axis=(1, 2))  # [T]
  lo = np.full((t, 2), np.nan)
  hi = np.full((t, 2), np.nan)
  for i in np.flatnonzero(found):
    rows = np.flatnonzero(mask[i].any(axis=1))
    cols = np.flatnonzero(mask[i].any(axis=0))
    lo[i] = cols[0], rows[0]
    hi[i] = cols[-1] + 1, rows[-1] + 1
  centroids = np.array(det.centroids, np.float64)  # [T, 2]
  centroids[~found] = np.nan
  if refine and found.any():
    border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1)  # [T, P, 3]
    background = np.median(border, axis=1)  # [T, 3]
    colour = np.asarray(det.colour_rgb, np.float32)  # [3]
    contrast = np.linalg.norm(colour[None] - background, axis=-1)  # [T]
    distance = np.linalg.norm(x - background[:, None, None, :], axis=-1)  # [T, H, W]
    cover = np.clip(distance / np.maximum(contrast, 1.0)[:, None, None], 0.0, 1.0)
    cover *= _dilate(mask, 2)  # [T, H, W]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5  # pixel centres
    total = cover.sum(axis=(1, 2))  # [T]
    ok = found & (total > 0)
    safe = np.where(ok, total, 1.0)
    soft = np.stack([(cover * xs).sum(axis=(1, 2)) / safe,
                     (cover * ys).sum(axis=(1, 2)) / safe], axis=-1)  # [T, 2]
    centroids[ok] = soft[ok]
  return Track(centroids=centroids, found=found, lo=lo, hi=hi, size=(w, h))


def _line(ts, ps):
  """(slope, intercept) of the least-squares line p = slope * t + intercept."""
  ts, ps = np.asarray(ts, np.float64), np.asarray(ps, np.float64)
  tm, pm = ts.mean(), ps.mean()
  slope = ((ts - tm) * (ps - pm)).sum() / ((ts - tm) ** 2).sum()
  return slope, pm - slope * tm


def track_events(path: Track, edge_px: float = 3.0, min_step_px: float = 0.2,
                 fit_frames: int = 2) -> Tuple[np.ndarray, np.ndarray]:
  """Bounces of a `Track`: (times [E] in frames, axes [E] int: 0 = x, 1 = y), by time.

  See `visual_events`; times here are in frame units (frame k at k).
  """
  if isinstance(fit_frames, bool) or not isinstance(fit_frames, numbers.Integral) or fit_frames < 1:
    raise ValueError(f'fit_frames must be an integer >= 1, got {fit_frames!r}.')
  idx = np.flatnonzero(path.found)  # frames with an object
  times, axes = [], []
  for axis in range(2 if len(idx) >= 3 else 0):
    p = path.centroids[idx, axis]  # [F]
    steps = np.diff(p) / np.diff(idx)  # [F - 1] px per frame between found frames
    sign = np.where(steps > min_step_px, 1, np.where(steps < -min_step_px, -1, 0))
    for a in range(len(steps)):
      s = sign[a]
      if s == 0:
        continue
      # The first step against s after a, with at most one still step in between (at
      # constant speed a bounce halfway between two frames leaves them level).
      b = a + 1
      if b < len(steps) and sign[b] == 0:
        b += 1
      if b >= len(steps) or sign[b] != -s:
        continue
      turn = idx[a + 1:b + 1]  # the extreme frame(s)
      speed = max(abs(steps[a]), abs(steps[b]))
      if s > 0:
        gap = np.nanmin(path.size[axis] - path.hi[turn, axis])
      else:
        gap = np.nanmin(path.lo[turn, axis])
      if not gap <= edge_px + speed:
        continue  # a turn in mid-frame is not a bounce
      # Frames strictly before the turn on its incoming path, and strictly after it on
      # the outgoing one: the bounce lies after frame idx[a] and before idx[b + 1].
      before = [a]
      while len(before) < fit_frames and before[0] > 0 and sign[before[0] - 1] == s:
        before.insert(0, before[0] - 1)
      after = [b + 1]
      while len(after) < fit_frames and after[-1] < len(steps) and sign[after[-1]] == -s:
        after.append(after[-1] + 1)
      tb, pb = idx[before].astype(np.float64), p[before]
      ta, pa = idx[after].astype(np.float64), p[after]
      if len(before) > 1 and len(after) > 1:
        m1, c1 = _line(tb, pb)
        m2, c2 = _line(ta, pa)
      elif len(before) > 1:
        m1, c1 = _line(tb, pb)
        m2 = -m1
        c2 = pa[0] - m2 * ta[0]
      elif len(after) > 1:
        m2, c2 = _line(ta, pa)
        m1 = -m2
        c1 = pb[0] - m1 * tb[0]
      else:  # one frame each side: the larger step is the speed (constant speed)
        m1, m2 = s * speed, -s * speed
        c1, c2 = pb[0] - m1 * tb[0], pa[0] - m2 * ta[0]
      if not s * (m1 - m2) > 0:
        continue
      t = (c2 - c1) / (m1 - m2)
      times.append(float(np.clip(t, tb[-1], ta[0])))
      axes.append(axis)
  order = np.argsort(times, kind='stable')
  times = np.asarray(times, np.float64)[order]  # [E]
  axes = np.asarray(axes, np.int64)[order]  # [E]
  # A corner hit turns both axes at once: one event, at the mean of the two times.
  keep_t, keep_a = [], []
  for t, a in zip(times, axes):
    if keep_t and keep_a[-1] != a and t - keep_t[-1] < 1.0:
      keep_t[-1] = 0.5 * (keep_t[-1] + t)
      continue
    keep_t.append(t)
    keep_a.append(a)
  return np.asarray(keep_t, np.float64), np.asarray(keep_a, np.int64)


def visual_events(frames, fps, threshold: float = 60.0, edge_px: float = 3.0,
                  min_step_px: float = 0.2, fit_frames: int = 2,
                  refine: bool = True) -> Tuple[np.ndarray, np.ndarray]:
  """Bounce times of the object in a clip.

  Args:
    frames: uint8 [T, H, W, 3] (or float in [-1, 1]); frame k is at k / fps seconds.
    fps: frames per second.
    threshold: the detector's foreground threshold (0..255).
    edge_px: a turn is a bounce when the object's box comes within edge_px plus one
      frame's travel of the border it moved towards (the object is at most one frame's
      travel from the wall at the frame nearest the bounce).
    min_step_px: steps smaller than this (px/frame) count as still.
    fit_frames: frames fitted on each side of the turn (2: the motion is straight).
    refine: the coverage-weighted centroid (`track`); False: the detector's own.

  Returns:
    (times_s float64 [E], axes int64 [E]: 0 for a bounce off a left/right border, 1 for
    top/bottom), sorted by time. A bounce is where the centroid's velocity along an axis
    flips sign (at most one still step between) near a border; its time is where the
    line through the `fit_frames` centroids strictly before the turn meets the line
    through those strictly after it (one side's line with the other side's slope
    mirrored where a side has one frame). Frames without an object are skipped; a clip
    with fewer than 3 such frames has no events.
  """
  fps = _check_rate('fps', fps)
  times, axes = track_events(track(frames, threshold, refine), edge_px, min_step_px, fit_frames)
  return times / fps, axes


# ----------------------------------------------------------------------------- audio


def envelope(wave, sample_rate, smooth_s: float = 0.002) -> np.ndarray:
  """float64 [S]: |wave| averaged over a centred window of about `smooth_s` seconds
  (an odd number of samples, so sample n's window is centred on n)."""
  wave = _check_wave(wave)
  sample_rate = _check_rate('sample_rate', sample_rate)
  half = max(int(round(smooth_s * sample_rate / 2)), 0)
  width = 2 * half + 1
  padded = np.pad(np.abs(wave), (half + 1, half))  # [S + width]
  csum = np.cumsum(padded)
  return (csum[width:] - csum[:-width]) / width  # [S]


def _nms(values, candidates, gap: int) -> np.ndarray:
  """Candidate indices kept greedily by height, none within `gap` of a higher one."""
  order = candidates[np.argsort(-values[candidates], kind='stable')]
  kept = []
  for i in order:
    if all(abs(i - j) >= gap for j in kept):
      kept.append(i)
  return np.sort(np.asarray(kept, np.int64))


def _crossing(env, i: int, level: float) -> float:
  """Sub-sample position where env rises through `level` between samples i and i + 1."""
  lo, hi = env[i], env[i + 1]
  return i + (level - lo) / (hi - lo) if hi > lo else i + 1.0


def pitch(segment, sample_rate, pad: int = 8) -> float:
  """Dominant frequency (Hz) of a short segment: the peak of its Hann-windowed spectrum,
  zero-padded to at least `pad` times its length, refined by a parabola through the log
  magnitudes of the peak bin and its neighbours. NaN for a silent or too short segment."""
  x = np.asarray(segment, np.float64)
  if x.ndim != 1 or len(x) < 8:
    return float('nan')
  x = (x - x.mean()) * np.hanning(len(x))
  n = 1 << int(math.ceil(math.log2(pad * len(x))))
  mag = np.abs(np.fft.rfft(x, n))  # [n // 2 + 1]
  k = int(np.argmax(mag[1:-1])) + 1
  if mag[k] <= 0:
    return float('nan')
  l0, l1, l2 = np.log(mag[k - 1:k + 2] + 1e-12 * mag[k])
  denom = l0 - 2.0 * l1 + l2
  delta = 0.5 * (l0 - l2) / denom if denom < 0 else 0.0
  return float((k + delta) * sample_rate / n)


def audio_onsets(wave, sample_rate, floor: float = 0.1, min_gap_s: float = 0.08,
                 smooth_s: float = 0.002,
                 pitch_s: float = 0.03) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Percussive onsets in a wave: (times_s [A], strengths [A], pitches_hz [A]), by time.

  The envelope is |wave| averaged over ~2 ms (`envelope`). Its peaks are local maxima of
  at least `floor` times the clip's largest envelope value, kept greedily by height at
  least `min_gap_s` apart (80 ms: the project's vocoder's smeared decay swells again
  34-51 ms after the onset, to 11-22% of the peak, which 40 ms would count as 8 extra
  onsets in 50 bursts at 32 Griffin-Lim iterations; the synthetic bounces are hundreds of
  ms apart). A peak's onset is the first time the envelope rises through
  half the peak after it was last below the floor (and below half the peak: a quiet
  burst rises from below its own half). A peak with no such quiet since the previous
  onset's peak is dropped: a ripple of that burst's decay (a vocoder's, for one), or a
  second burst before the first has died away; so is a burst already loud at the clip's
  first sample (its rise is unseen). The time is interpolated between samples.

  A 1 ms attack puts the half-peak crossing 0.5 ms after the burst's start. A rise smeared
  by Griffin-Lim (9-19 ms from 10% to 90% of the peak with the project's vocoder at 4
  iterations) starts early (pre-echo) and ends late (a softened attack), about evenly:
  the half-peak crossing lands within -3.8..+2.7 ms of the start, -0.4 ms on average.

  Returns:
    times_s: float64 [A] onset times in seconds.
    strengths: float64 [A] the peaks' envelope values (the wave's units).
    pitches_hz: float64 [A] the dominant frequency of the `pitch_s` seconds after each
      onset (`pitch`), NaN where too little of the wave is left.
  """
  wave = _check_wave(wave)
  sample_rate = _check_rate('sample_rate', sample_rate)
  if not 0 < floor < 0.5:
    raise ValueError(f'floor must lie in (0, 0.5) (a fraction of the clip\'s peak, below the '
                     f'half-peak onset level), got {floor!r}.')
  empty = np.zeros(0, np.float64)
  if len(wave) < 3:
    return empty, empty, empty
  env = envelope(wave, sample_rate, smooth_s)  # [S]
  top = float(env.max())
  if top <= 0:
    return empty, empty, empty
  level = floor * top
  rising = (env[1:-1] > env[:-2]) & (env[1:-1] >= env[2:]) & (env[1:-1] >= level)
  peaks = _nms(env, np.flatnonzero(rising) + 1, max(int(round(min_gap_s * sample_rate)), 1))
  times, strengths, pitches = [], [], []
  previous = -1
  for p in peaks:
    half = 0.5 * env[p]
    seg = env[previous + 1:p + 1]  # since the previous peak, up to this one
    quiet = np.flatnonzero(seg < min(level, half))
    if not len(quiet):
      continue  # no quiet since the previous peak (or the clip's start): not an onset
    start = quiet[-1]
    rise = start + int(np.argmax(seg[start:] >= half))  # first sample at half or above
    i = previous + rise  # the sample before the crossing
    t = _crossing(env, i, half) / sample_rate
    n0 = int(math.ceil(t * sample_rate))
    times.append(t)
    strengths.append(float(env[p]))
    pitches.append(pitch(wave[n0:n0 + int(round(pitch_s * sample_rate))], sample_rate))
    previous = p
  return (np.asarray(times, np.float64), np.asarray(strengths, np.float64),
          np.asarray(pitches, np.float64))


def pitch_to_shape(hz) -> int:
  """Index into SHAPE_PITCHES_HZ (the synthetic shapes) of the pitch nearest to `hz` in
  log-frequency; -1 for NaN (no pitch was read)."""
  if isinstance(hz, bool) or not isinstance(hz, numbers.Real):
    raise ValueError(f'hz must be a real number, got {hz!r}.')
  if math.isnan(hz):
    return -1
  if not math.isfinite(hz) or hz <= 0:
    raise ValueError(f'hz must be a finite frequency > 0 (or NaN for none), got {hz!r}.')
  table = np.log(np.asarray(SHAPE_PITCHES_HZ, np.float64))
  return int(np.argmin(np.abs(table - math.log(hz))))


# ----------------------------------------------------------------------------- matching


@dataclasses.dataclass
class Matches:
  """One-to-one pairs of visual events and audio onsets.

  offsets  float64 [V]: per visual event, audio minus visual time (s); NaN if unmatched
  audio    int64 [V]: the matched onset's index into the audio times; -1 if unmatched
  matched  visual events with an onset
  missed   visual events without one
  extra    onsets without a visual event
  """
  offsets: np.ndarray
  audio: np.ndarray
  matched: int
  missed: int
  extra: int


def match_events(visual_times, audio_times, max_offset_s: float = 0.1) -> Matches:
  """Pairs each visual event with the nearest free audio onset within `max_offset_s`:
  all pairs within reach, closest first, each event and onset used once."""
  v = np.asarray(visual_times, np.float64).reshape(-1)  # [V]
  a = np.asarray(audio_times, np.float64).reshape(-1)  # [A]
  if not (math.isfinite(max_offset_s) and max_offset_s > 0):
    raise ValueError(f'max_offset_s must be a finite number > 0, got {max_offset_s!r}.')
  if not (np.all(np.isfinite(v)) and np.all(np.isfinite(a))):
    raise ValueError('visual_times and audio_times must be finite (seconds).')
  offsets = np.full(len(v), np.nan)
  audio = np.full(len(v), -1, np.int64)
  if len(v) and len(a):
    diff = a[None, :] - v[:, None]  # [V, A]
    vi, ai = np.nonzero(np.abs(diff) <= max_offset_s)
    used = np.zeros(len(a), bool)
    for k in np.argsort(np.abs(diff[vi, ai]), kind='stable'):
      i, j = vi[k], ai[k]
      if audio[i] < 0 and not used[j]:
        audio[i], used[j], offsets[i] = j, True, diff[i, j]
  matched = int((audio >= 0).sum())
  return Matches(offsets=offsets, audio=audio, matched=matched, missed=len(v) - matched,
                 extra=len(a) - matched)


# ----------------------------------------------------------------------------- report


def _nan_median(values) -> float:
  values = np.asarray(values, np.float64)
  return float(np.median(values)) if len(values) else float('nan')


def _figures(matches: Sequence[Matches], pitches, onsets: int, shapes, within_s) -> dict:
  """Pooled figures of per-clip `matches`; pitches[i] are clip i's onset pitches and
  shapes[i] its shape index (or shapes None)."""
  offsets = np.concatenate([m.offsets[m.audio >= 0] for m in matches]) if matches else np.zeros(0)
  events = sum(len(m.offsets) for m in matches)
  matched = sum(m.matched for m in matches)
  hits = int((np.abs(offsets) <= within_s).sum())
  pitch_hits = pitch_total = 0
  if shapes is not None:
    for m, p, s in zip(matches, pitches, shapes):
      for j in m.audio[m.audio >= 0]:
        pitch_total += 1
        pitch_hits += pitch_to_shape(float(p[j])) == int(s)
  return {
      'events': int(events),
      'onsets': int(onsets),
      'matched': int(matched),
      'missed': int(events - matched),
      'extra': int(onsets - matched),
      'median_abs_offset_ms': 1e3 * _nan_median(np.abs(offsets)),
      'median_offset_ms': 1e3 * _nan_median(offsets),
      'share_within': hits / events if events else float('nan'),
      'pitch_accuracy': pitch_hits / pitch_total if pitch_total else float('nan'),
  }


def sync_report(videos, waves, fps, sample_rate, shapes=None, max_offset_s: float = 0.1,
                within_s: float = WITHIN_S, xcorr: bool = True, threshold: float = 60.0) -> dict:
  """How well each clip's audio lines up with its video, pooled over clips.

  Args:
    videos: uint8 [N, T, H, W, 3] (or float in [-1, 1]), or a sequence of N clips.
    waves: float [N, S], or a sequence of N waves; clip i's audio starts with frame 0.
    fps: frames per second of the videos.
    sample_rate: samples per second of the waves.
    shapes: None, or int [N] the clips' shape indices (SHAPES order) for pitch_accuracy.
    max_offset_s: the farthest an onset may lie from a visual event and still match it.
    within_s: the tolerance of share_within (40 ms: one frame at 24 fps).
    xcorr: also the median `xcorr_lag` over clips.
    threshold: the detector's foreground threshold.

  Returns:
    A dict: clips; events (visual), onsets (audio), matched, missed, extra;
    median_abs_offset_ms and median_offset_ms (signed, audio minus video) over matched
    events; share_within (events matched within `within_s`, of all visual events);
    within_ms; pitch_accuracy (matched onsets whose pitch names the clip's shape, NaN
    without shapes); xcorr_lag_ms (median over clips with a lag; NaN without); and
    'shuffled': the same figures with clip (i + 1) % N's audio against video i (None for
    fewer than 2 clips), the chance level. A figure with nothing to count is NaN.
  """
  fps = _check_rate('fps', fps)
  sample_rate = _check_rate('sample_rate', sample_rate)
  if len(videos) != len(waves):
    raise ValueError(f'videos and waves must hold one clip each: {len(videos)} videos, '
                     f'{len(waves)} waves.')
  n = len(videos)
  if shapes is not None:
    shapes = np.asarray(shapes).reshape(-1)
    if len(shapes) != n:
      raise ValueError(f'shapes must give one shape per clip: {len(shapes)} for {n} clips.')
  seen = [visual_events(v, fps, threshold)[0] for v in videos]
  heard = [audio_onsets(w, sample_rate) for w in waves]
  onsets = sum(len(h[0]) for h in heard)
  report = {'clips': n, **_figures(
      [match_events(s, h[0], max_offset_s) for s, h in zip(seen, heard)],
      [h[2] for h in heard], onsets, shapes, within_s)}
  report['within_ms'] = 1e3 * within_s
  if xcorr:
    lags = [xcorr_lag(v, w, fps, sample_rate) for v, w in zip(videos, waves)]
    report['xcorr_lag_ms'] = 1e3 * _nan_median([g for g in lags if math.isfinite(g)])
  report['shuffled'] = None
  if n >= 2:
    other = [(i + 1) % n for i in range(n)]
    report['shuffled'] = _figures(
        [match_events(seen[i], heard[j][0], max_offset_s) for i, j in enumerate(other)],
        [heard[j][2] for j in other], onsets, shapes, within_s)
  return report


def _ms(value, signed=False) -> str:
  if value is None or not math.isfinite(value):
    return 'n/a'
  return f'{value:+.1f} ms' if signed else f'{value:.1f} ms'


def _pct(value) -> str:
  return 'n/a' if value is None or not math.isfinite(value) else f'{100 * value:.1f}%'


def format_report(report: dict) -> str:
  """Log lines of a `sync_report`."""
  def body(r):
    return (f'events {r["events"]}, onsets {r["onsets"]}: matched {r["matched"]}, missed '
            f'{r["missed"]}, extra {r["extra"]}; median |offset| {_ms(r["median_abs_offset_ms"])} '
            f'(signed {_ms(r["median_offset_ms"], True)}), within {report["within_ms"]:g} ms '
            f'{_pct(r["share_within"])}, pitch names the shape {_pct(r["pitch_accuracy"])}')
  lines = [f'sync over {report["clips"]} clips: {body(report)}']
  if 'xcorr_lag_ms' in report:
    lines.append(f'  xcorr lag (median over clips): {_ms(report["xcorr_lag_ms"], True)}')
  shuffled = report.get('shuffled')
  lines.append('  shuffled control: ' + ('n/a (fewer than 2 clips)' if shuffled is None
                                         else body(shuffled)))
  return '\n'.join(lines)


# ----------------------------------------------------------------------------- lag


def motion_energy(frames, noise: float = 20.0) -> np.ndarray:
  """float64 [T]: |second difference| (px/frame^2) of the clip's centroid, frame by frame;
  0 at the first and last frame and next to frames without foreground.

  No detector: the centroid weights every pixel by its distance from the frame's
  background (the border's median RGB) less `noise` (0..255 units), so an anti-aliased
  edge counts by its coverage. At constant speed a bounce at time t* (frames) gives
  2 * speed * max(0, 1 - |k - t*|) at frame k: a hat around the bounce.
  """
  x = detect.to_uint8_range(frames)  # [T, H, W, 3]
  t, h, w, _ = x.shape
  border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1)  # [T, P, 3]
  background = np.median(border, axis=1)  # [T, 3]
  weight = np.maximum(np.linalg.norm(x - background[:, None, None, :], axis=-1) - noise, 0.0)
  total = weight.sum(axis=(1, 2), dtype=np.float64)  # [T]
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
  with np.errstate(invalid='ignore', divide='ignore'):
    c = np.stack([(weight * xs).sum(axis=(1, 2)) / total,
                  (weight * ys).sum(axis=(1, 2)) / total], axis=-1)  # [T, 2]
  c[total <= 0] = np.nan
  energy = np.zeros(t)
  if t >= 3:
    second = np.linalg.norm(c[2:] - 2.0 * c[1:-1] + c[:-2], axis=-1)  # [T - 2]
    energy[1:-1] = np.nan_to_num(second, nan=0.0)
  return energy


def onset_strength(wave, sample_rate, step_s: float = 0.001, smooth_s: float = 0.002,
                   floor: float = 0.2, power: float = 2.0) -> Tuple[np.ndarray, float]:
  """(strength [M], t0): how fast the sound gets louder, on a `step_s` grid.

  strength[m] = max(0, L(m + 1) - L(m)) ** power with L(m) = log(envelope + floor * peak)
  at time m * step_s: the rise of the log envelope over step m, centred at t0 + m * step_s
  seconds (t0 = step_s / 2). The floor keeps the quiet between bursts flat; the power
  favours steep rises over slow ones, so the small swells of a vocoder's decay (Griffin-
  Lim's, which its log envelope would otherwise count at a tenth of an onset) hardly
  count: measured on this project's vocoder (data/audio.py), power 2 and floor 0.2 take
  the xcorr lag's median error from +4.5 ms to 0.0 ms (tests/sync_test.py).
  """
  wave = _check_wave(wave)
  sample_rate = _check_rate('sample_rate', sample_rate)
  env = envelope(wave, sample_rate, smooth_s)  # [S]
  grid = np.arange(0.0, len(wave) / sample_rate, step_s)  # [M + 1] seconds
  top = float(env.max()) if len(env) else 0.0
  if len(grid) < 2 or top <= 0:
    return np.zeros(max(len(grid) - 1, 0)), 0.5 * step_s
  log_env = np.log(np.interp(grid * sample_rate, np.arange(len(env)), env) + floor * top)
  return np.maximum(np.diff(log_env), 0.0) ** power, 0.5 * step_s  # [M]


def xcorr_lag(frames, wave, fps, sample_rate, max_lag_s: float = 0.2,
              step_s: float = 0.001, min_energy: float = 0.5) -> float:
  """Lag (s, audio minus video) that best aligns the clip's motion with its sound.

  No events are detected. The visual signal is `motion_energy` at the frame times, a hat
  of half-width one frame around each bounce; the audio's `onset_strength` on a
  `step_s` grid, blurred by the same hat and shifted by a lag, predicts it. The score of
  a lag is the normalised correlation of prediction and measurement over the frames where
  the energy is defined (a least-squares fit up to scale, whose best lag falls between
  frames as the hats' sampled heights say); lags are tried every `step_s` within
  +-max_lag_s and the best is refined by a parabola through its neighbours' scores.
  Correlating the frame-rate energy interpolated onto the fine grid instead would peak
  on a frame and snap the lag to whole frames. The sub-frame time lives in the ratio of
  the two samples beside a bounce, so a bounce a few ms from a frame, whose second sample
  is small, is the least certain (its lag moves by up to ~5 ms with the jitter).

  NaN when no frame's energy reaches `min_energy` (px/frame^2; a bounce at speed v gives
  at least v at the frame nearest it, the centroid's jitter of a clean clip about 0.05)
  or no onset is in reach: a clip whose only bounces fall outside the frames (in the
  last frame's interval, say) would otherwise align its sound with that jitter.
  """
  fps = _check_rate('fps', fps)
  sample_rate = _check_rate('sample_rate', sample_rate)
  step_s = _check_rate('step_s', step_s)
  max_lag_s = _check_rate('max_lag_s', max_lag_s)
  energy = motion_energy(frames)  # [T]
  t = len(energy)
  strength, t0 = onset_strength(wave, sample_rate, step_s)  # [M]
  if t < 3 or not energy.max() >= min_energy or not strength.any():
    return float('nan')
  # The hat of one frame's half-width on the fine grid; blurred strength at t0 + m * step.
  half = int(math.ceil(1.0 / (fps * step_s)))
  kernel = np.maximum(0.0, 1.0 - np.abs(np.arange(-half, half + 1) * step_s * fps))
  blurred = np.convolve(strength, kernel, mode='same')  # [M]
  grid = t0 + step_s * np.arange(len(blurred))  # [M]
  lags = step_s * np.arange(-int(round(max_lag_s / step_s)), int(round(max_lag_s / step_s)) + 1)
  frames_t = np.arange(1, t - 1) / fps  # [T - 2] the frames with a defined energy
  predicted = np.interp(frames_t[:, None] + lags[None, :], grid, blurred,
                        left=0.0, right=0.0)  # [T - 2, L]
  measured = energy[1:-1]  # [T - 2]
  norm = np.linalg.norm(predicted, axis=0)  # [L]
  score = np.where(norm > 0, measured @ predicted / np.maximum(norm, 1e-300), 0.0)  # [L]
  best = int(np.argmax(score))
  if score[best] <= 0:
    return float('nan')
  delta = 0.0
  if 0 < best < len(score) - 1:
    s0, s1, s2 = score[best - 1:best + 2]
    denom = s0 - 2.0 * s1 + s2
    if denom < 0:
      delta = float(np.clip(0.5 * (s0 - s2) / denom, -0.5, 0.5))
  return float(lags[best] + delta * step_s)


def xcorr_lags(videos, waves, fps, sample_rate, max_lag_s: float = 0.2,
               step_s: float = 0.001, min_energy: float = 0.5) -> Tuple[np.ndarray, float]:
  """(lags_s [N], median_s): `xcorr_lag` of each clip with its own audio, and the median
  over the clips that have one (NaN if none)."""
  if len(videos) != len(waves):
    raise ValueError(f'videos and waves must hold one clip each: {len(videos)} videos, '
                     f'{len(waves)} waves.')
  lags = np.array([xcorr_lag(v, w, fps, sample_rate, max_lag_s, step_s, min_energy)
                   for v, w in zip(videos, waves)], np.float64)
  finite = lags[np.isfinite(lags)]
  return lags, _nan_median(finite)
