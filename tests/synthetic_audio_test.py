"""Tests for the soundtrack of data/synthetic.py: one percussive burst per bounce."""

import math

import numpy as np
import pytest

from vdit_jax.data import audio, synthetic

SR = 16000
_CLIPS = [  # (num_frames, height, width, time_stride, fps)
    (16, 32, 32, 1.0, 16.0),
    (12, 24, 40, 1.0, 16.0),
    (24, 32, 32, 0.5, 32.0),
    (10, 48, 32, 2.0, 8.0),
]


def _source(num_frames, height, width, time_stride, fps, seed, **kwargs):
  return synthetic.SyntheticShapes(num_frames, height, width, num_examples=1000, seed=seed,
                                   time_stride=time_stride, audio=audio.AudioSpec(fps=fps),
                                   **kwargs)


def _amplitude(source, example):
  """0.35 * speed / fastest speed, from the event speeds (pixels per second)."""
  base = example['event_speeds'][0] / (source.time_stride * source.audio.fps)
  return 0.35 * base / (2.5 * min(source.height, source.width) / 32.0)


def _isolated(times, end):
  """Indices of events whose 80 ms burst overlaps no other and ends inside [0, end)."""
  keep = []
  for i, t in enumerate(times):
    before = i == 0 or t - times[i - 1] >= 0.08
    after = i == len(times) - 1 or times[i + 1] - t >= 0.08
    if before and after and t + 0.08 < end:
      keep.append(i)
  return keep


def _centroids(video, axis):
  """Coverage-weighted centre of the shape along `axis` (0: x, 1: y) per frame, in
  pixels; the background is the corner pixel, which the shape never reaches."""
  frames = video.astype(np.float64)  # [T, H, W, 3]
  weight = np.abs(frames - frames[:, :1, :1, :]).sum(axis=-1)  # [T, H, W]
  coords = np.arange(video.shape[2 - axis]) + 0.5
  profile = weight.sum(axis=1 + axis)  # [T, W] or [T, H]
  return (profile * coords).sum(axis=1) / profile.sum(axis=1)  # [T]


# ---------------------------------------------------------------------------- timing


@pytest.mark.parametrize('clip', _CLIPS)
def test_event_times_are_the_audio_onsets_and_nothing_else_sounds(clip):
  """For 2 seeds x 40 clips: silence before each isolated event, the first non-zero sample
  within one sample of the event time, the first samples equal to the burst evaluated at
  n / sample_rate - t_event (sub-sample start), and no sound > 80 ms after the last event
  nor anywhere before the first."""
  num_frames, _, _, _, fps = clip
  checked = 0
  for seed in (0, 1):
    source = _source(*clip, seed=seed)
    for idx in range(40):
      ex = source[idx]
      wave, times = ex['audio'], ex['event_times']
      assert wave.dtype == np.float32 and wave.shape == (source.audio.num_samples(num_frames),)
      assert times.dtype == np.float64 and ex['event_speeds'].dtype == np.float64
      assert times.shape == ex['event_speeds'].shape
      assert (np.diff(times) > 0).all() and (times >= 0).all() and (times < num_frames / fps).all()
      if times.size == 0:
        assert (wave == 0).all()
        continue
      assert (wave[:int(times[0] * SR)] == 0).all()
      assert (wave[int(math.ceil((times[-1] + 0.08) * SR)):] == 0).all()
      pitch = synthetic.SHAPE_PITCHES_HZ[ex['shape']]
      amplitude = _amplitude(source, ex)
      for i in _isolated(times, num_frames / fps):
        start = 0 if i == 0 else int(math.ceil((times[i - 1] + 0.08) * SR))
        onset = start + np.flatnonzero(wave[start:])[0]
        assert abs(onset - times[i] * SR) <= 1.0, (idx, onset, times[i] * SR)
        n = onset + np.arange(12)  # inside the 1 ms attack
        dt = n / SR - times[i]
        expected = amplitude * dt / 0.001 * np.sin(2 * np.pi * pitch * dt)
        np.testing.assert_allclose(wave[n], expected, rtol=1e-5, atol=1e-7)
        checked += 1
  assert checked >= 40


@pytest.mark.parametrize('seed', [0, 3])
def test_events_are_where_the_rendered_motion_turns_back(seed):
  """Re-renders each clip 8x finer in time (time_stride / 8: the same motion) and fits a
  line to the shape's centre between consecutive events: each stretch is straight
  (residual < 0.1 px, the centroid's quantisation noise, where a missed turn would leave
  > 1 px), consecutive lines meet at the event time (within 2 ms) and alternate
  direction, and their slope is the event speed (within 2%)."""
  coarse = _source(16, 32, 32, 1.0, 16.0, seed=seed)
  fine = _source(16 * 8 + 8, 32, 32, 1.0 / 8, 128.0, seed=seed)
  seen = 0
  for idx in range(25):
    ex, fine_ex = coarse[idx], fine[idx]
    times = ex['event_times']
    # The fine clip is the same motion, so the same events (and then a few more).
    np.testing.assert_allclose(fine_ex['event_times'][:len(times)], times, rtol=0, atol=1e-12)
    assert (fine_ex['event_times'][len(times):] >= 1.0).all()
    axis = 0 if synthetic.DIRECTIONS[ex['direction']] in ('right', 'left') else 1
    centre = _centroids(fine_ex['video'], axis)  # [T']
    t = np.arange(len(centre)) / 128.0  # [T'] seconds
    edges = np.concatenate([[0.0], fine_ex['event_times'], [np.inf]])
    lines = []
    for a, b in zip(edges[:-1], edges[1:]):
      inside = (t >= a) & (t <= b)
      if inside.sum() < 3:
        lines.append(None)
        continue
      slope, offset = np.polyfit(t[inside], centre[inside], 1)
      residual = centre[inside] - (offset + slope * t[inside])
      assert np.abs(residual).max() < 0.1, (idx, np.abs(residual).max())
      lines.append((slope, offset))
      if len(times) and inside.sum() >= 12:
        np.testing.assert_allclose(abs(slope), ex['event_speeds'][0], rtol=0.02)
    step = synthetic.direction_step(ex['direction'])[axis]
    assert lines[0][0] * step > 0  # first in the labelled direction
    for k, event in enumerate(fine_ex['event_times']):
      before, after = lines[k], lines[k + 1]
      if before is None or after is None:
        continue
      assert before[0] * after[0] < 0  # the velocity flips
      meet = (after[1] - before[1]) / (before[0] - after[0])
      assert abs(meet - event) < 0.002, (idx, meet, event)
      seen += 1
  assert seen >= 20


def test_no_bounce_no_sound():
  """bounce=False clips never reach a border: no events, digital silence."""
  for clip in _CLIPS[:2]:
    source = _source(*clip, seed=5, bounce=False)
    for idx in range(40):
      ex = source[idx]
      assert ex['event_times'].shape == (0,) and ex['event_speeds'].shape == (0,)
      assert ex['audio'].shape == (source.audio.num_samples(clip[0]),)
      assert (ex['audio'] == 0).all()


def test_same_motion_at_another_frame_rate_sounds_the_same():
  """time_stride 0.5 at 32 fps is the time_stride 1 motion at 16 fps, twice the frames:
  the same bounce times and the same samples."""
  slow = _source(8, 32, 32, 1.0, 16.0, seed=2)
  fast = _source(16, 32, 32, 0.5, 32.0, seed=2)
  for idx in range(20):
    a, b = slow[idx], fast[idx]
    np.testing.assert_allclose(a['event_times'], b['event_times'], rtol=0, atol=1e-12)
    np.testing.assert_allclose(a['audio'], b['audio'], rtol=0, atol=1e-6)
    np.testing.assert_allclose(a['event_speeds'], b['event_speeds'], rtol=1e-12)


# ---------------------------------------------------------------------------- pitch, loudness


def test_pitch_is_the_shapes():
  """The dominant frequency of every isolated burst (80 ms, zero-padded to 1 Hz bins) is
  its shape's pitch, within 2 Hz."""
  assert synthetic.SHAPE_PITCHES_HZ == (500.0, 1000.0, 2000.0)
  source = _source(16, 32, 32, 1.0, 16.0, seed=4)
  shapes = set()
  for idx in range(40):
    ex = source[idx]
    pitch = synthetic.SHAPE_PITCHES_HZ[ex['shape']]
    for i in _isolated(ex['event_times'], 1.0):
      first = int(math.ceil(ex['event_times'][i] * SR))
      burst = ex['audio'][first:first + int(0.08 * SR)]
      spectrum = np.abs(np.fft.rfft(burst, n=SR))  # [SR / 2 + 1], 1 Hz bins
      assert abs(np.argmax(spectrum) - pitch) <= 2, (idx, np.argmax(spectrum), pitch)
      shapes.add(int(ex['shape']))
  assert shapes == {0, 1, 2}


def test_louder_for_faster():
  """Each burst peaks at 0.35 * speed / fastest speed (the sampled sine peaks just after
  the 1 ms attack: 0.9-1.0 of it, the least at 2 kHz, 8 samples a period), so across
  clips the faster shape is the louder one."""
  source = _source(16, 32, 32, 1.0, 16.0, seed=6)
  speeds, peaks = [], []
  for idx in range(60):
    ex = source[idx]
    for i in _isolated(ex['event_times'], 1.0)[:1]:
      first = int(math.ceil(ex['event_times'][i] * SR))
      peak = np.abs(ex['audio'][first:first + int(0.08 * SR)]).max()
      assert 0.9 * _amplitude(source, ex) <= peak <= _amplitude(source, ex) * (1 + 1e-6)
      assert _amplitude(source, ex) <= 0.35
      speeds.append(ex['event_speeds'][i])
      peaks.append(peak)
  speeds, peaks = np.array(speeds), np.array(peaks)
  assert len(speeds) >= 30 and speeds.max() > 1.8 * speeds.min()
  faster = speeds[:, None] > 1.12 * speeds[None, :]  # [N, N] pairs clearly apart
  assert faster.sum() > 100
  assert (peaks[:, None] > peaks[None, :])[faster].all()


# ---------------------------------------------------------------------------- the clip


def test_deterministic_and_the_video_is_unchanged():
  """Same (seed, idx) -> identical arrays from a fresh source; every field of the video-only
  clip is byte-identical with audio on; different clips sound different."""
  for clip in _CLIPS:
    num_frames, height, width, time_stride, fps = clip
    one, two = _source(*clip, seed=9), _source(*clip, seed=9)
    plain = synthetic.SyntheticShapes(num_frames, height, width, num_examples=1000, seed=9,
                                      time_stride=time_stride)
    for idx in (0, 7, 999, -1):
      a, b, c = one[idx], two[idx], plain[idx]
      assert a.keys() == c.keys() | {'audio', 'event_times', 'event_speeds'}
      for key in a:
        assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes()
      for key in c:
        assert a[key].dtype == c[key].dtype and a[key].tobytes() == c[key].tobytes()
  source = _source(*_CLIPS[0], seed=9)
  waves = [source[i]['audio'] for i in range(10)]
  assert len({w.tobytes() for w in waves}) >= 8  # only clips with no bounce share silence


def test_repr_errors_and_config():
  spec = audio.AudioSpec()
  source = synthetic.SyntheticShapes(4, 16, 16, num_examples=4, audio=spec)
  assert repr(source).endswith(f', audio={spec!r})')
  assert 'audio' not in repr(synthetic.SyntheticShapes(4, 16, 16, num_examples=4))
  assert 'audio' not in synthetic.SyntheticShapes(4, 16, 16, num_examples=4)[0]
  with pytest.raises(ValueError, match=r"audio must be None or an audio.AudioSpec, got '16k'"):
    synthetic.SyntheticShapes(4, 16, 16, audio='16k')
  with pytest.raises(ValueError, match=r'hop=300 must divide the 1000 samples'):
    synthetic.SyntheticShapes(4, 16, 16, audio=audio.AudioSpec(hop=300))
  with pytest.raises(ValueError, match=r'sample_rate / fps = 16000 / 15.0'):
    synthetic.SyntheticShapes(4, 16, 16, audio=audio.AudioSpec(fps=15.0))

  from vdit_jax.config import defaults  # pylint: disable=g-import-not-at-top
  data = defaults.base_config().data
  data.num_frames, data.height, data.width = 4, 16, 16
  made = synthetic.from_data_config(data, num_examples=4, seed=3, audio=spec)
  direct = synthetic.SyntheticShapes(4, 16, 16, num_examples=4, seed=3, audio=spec,
                                     time_stride=data.time_stride, colours=data.colours,
                                     shape_size=data.shape_size, bounce=data.bounce,
                                     shape_weights=data.shape_weights)
  assert made.audio == spec and repr(made) == repr(direct)
  for key in ('audio', 'event_times', 'event_speeds', 'video'):
    np.testing.assert_array_equal(made[2][key], direct[2][key])
  assert synthetic.from_data_config(data, num_examples=4, seed=3).audio is None


def test_bounce_times_oracle():
  """bounce_times against a brute-force scan of the folded motion's direction changes."""
  rng = np.random.default_rng(0)
  for _ in range(200):
    lo, span = rng.uniform(2, 6), rng.uniform(3, 20)
    start = lo + rng.uniform(0, 1) * span
    velocity = rng.choice([-1, 1]) * rng.uniform(0.5, 4)
    duration = rng.uniform(1, 30)
    found = synthetic.bounce_times(start, velocity, lo, lo + span, duration)
    tau = np.linspace(0, duration, 200_001)  # [N]
    fold = synthetic._reflect  # pylint: disable=protected-access
    pos = fold(start + velocity * tau, lo, lo + span)  # [N]
    turns = np.flatnonzero(np.diff(np.sign(np.diff(pos))) != 0)  # sign of velocity flips
    scanned = tau[turns + 1]
    scanned = scanned[np.diff(scanned, prepend=-1.0) > 1e-3]  # one per turn
    assert len(found) == len(scanned)
    np.testing.assert_allclose(found, scanned, atol=2 * duration / 200_000)
  assert synthetic.bounce_times(5.0, 0.0, 2.0, 9.0, 10.0).shape == (0,)
  assert synthetic.bounce_times(5.0, 1.0, 5.0, 5.0, 10.0).shape == (0,)
  # Starting on a wall and moving away from it is no bounce.
  np.testing.assert_allclose(synthetic.bounce_times(2.0, 1.0, 2.0, 9.0, 20.0), [7.0, 14.0])
  np.testing.assert_allclose(synthetic.bounce_times(9.0, -1.0, 2.0, 9.0, 20.0), [7.0, 14.0])
