"""eval/sync.py: visual bounce times, audio onsets, their matching, the report and the
cross-correlation lag, on the synthetic audio-visual clips (data/synthetic.py with an
AudioSpec), whose bounce times are exact.

The figures in the docstrings were measured with this file's helpers on the clips named
there (16 fps, 16 kHz).
"""

import math

import numpy as np
import pytest

from vdit_jax.data import audio, synthetic
from vdit_jax.eval import sync

FPS = 16.0
RATE = 16000
FRAMES = 32  # 2 s clips: 2-3 bounces each at 32 x 32


def _source(num_frames=FRAMES, size=32, seed=7):
  return synthetic.SyntheticShapes(num_frames, size, size, num_examples=1000, seed=seed,
                                   audio=audio.AudioSpec(sample_rate=RATE, fps=FPS))


def _clips(n, seed=7, first=0):
  """n clips of `_source(seed=seed)` from index `first`: videos uint8 [N, T, H, W, 3],
  waves float32 [N, S], shapes int [N], and the examples."""
  source = _source(seed=seed)
  examples = [source[first + i] for i in range(n)]
  return (np.stack([e['video'] for e in examples]), np.stack([e['audio'] for e in examples]),
          np.array([int(e['shape']) for e in examples]), examples)


def _observable(times_s, num_frames=FRAMES):
  """The bounces a clip can show: with a frame before and after the turn (the exact time
  in frames within [1, T - 2]; a bounce in the last frame's interval sounds, unseen)."""
  frames = np.asarray(times_s) * FPS
  return times_s[(frames >= 1.0) & (frames <= num_frames - 2.0)]


def _shift(wave, seconds, rate=RATE):
  """The wave delayed by `seconds` (earlier if negative), zero-filled."""
  n = int(round(seconds * rate))
  out = np.roll(wave, n)
  if n > 0:
    out[:n] = 0
  elif n < 0:
    out[n:] = 0
  return out


def _vocoded(wave, iters=32):
  """The wave through the project's vocoder: its log-mel (data/audio.py), then Griffin-Lim
  from random phase. Fewer iterations smear the onsets more (4: the rise from 10% to 90%
  of the peak takes 9 ms at the median, up to 19 ms, against 2 ms clean)."""
  spec = audio.AudioSpec(sample_rate=RATE, fps=FPS)
  return audio.griffin_lim(audio.log_mel(wave, spec), spec, len(wave), iters=iters)


def test_visual_events_hit_the_exact_bounce_times():
  """Coverage-weighted centroids and the two fitted lines put every bounce within 3 ms of
  its exact time at 16 fps; the detector's own centroid (in half-pixel steps) does an
  order of magnitude worse. Measured on clips 0-59 of seed 7 at 32 x 32 (142 bounces seen):
  median 0.28 ms, 90% within 1.0 ms, max 2.6 ms (triangles; squares 1.6, circles 1.0);
  at 64 x 64: median 0.06 ms, max 1.1 ms. Detector centroids: median 4 ms, 90% within
  15 ms, max 41 ms."""
  errors, coarse = [], []
  for size, count in ((32, 45), (64, 8)):
    source = _source(size=size)
    for i in range(count):
      ex = source[i]
      want = ex['event_times']
      got, axes = sync.visual_events(ex['video'], FPS)
      m = sync.match_events(want, got, max_offset_s=0.1)
      assert m.extra == 0, (size, i, want, got)  # no bounce that is not one
      assert sync.match_events(_observable(want), got).missed == 0, (size, i, want, got)
      moving = 0 if ex['direction'] < 2 else 1  # right/left: x; down/up: y
      assert (axes == moving).all()
      errors.extend(m.offsets[m.audio >= 0])
      m = sync.match_events(want, sync.visual_events(ex['video'], FPS, refine=False)[0])
      coarse.extend(m.offsets[m.audio >= 0])
  errors = np.abs(errors) * 1e3  # ms
  assert len(errors) >= 120
  assert np.max(errors) < 3.0, np.max(errors)
  assert np.median(errors) < 0.5, np.median(errors)
  assert np.median(np.abs(coarse)) * 1e3 > 3 * np.median(errors)


def test_visual_events_skip_frames_without_the_object():
  ex = _source()[1]
  video = ex['video'].copy()
  want, _ = sync.visual_events(video, FPS)
  assert len(want) >= 2
  far = [k for k in range(2, FRAMES - 2) if np.min(np.abs(want * FPS - k)) > 3.0][0]
  video[far] = video[far, 0, 0]  # the object gone from one frame away from the bounces
  got, _ = sync.visual_events(video, FPS)
  np.testing.assert_allclose(got, want, atol=0.003)
  video[:] = video[0, 0, 0]  # no object anywhere
  times, axes = sync.visual_events(video, FPS)
  assert times.shape == (0,) and axes.shape == (0,)


def test_a_turn_away_from_the_border_is_not_a_bounce():
  # A square moving right then left in the middle of a 48 px frame, turning at x = 24.
  t = np.arange(16.0)
  cx = 24.0 - np.abs(t - 7.5) * 1.5  # [T]
  pix = np.arange(48) + 0.5
  sdf = np.maximum(np.abs(pix[None, None, :] - cx[:, None, None]),
                   np.abs(pix[None, :, None] - 24.0)) - 5.0  # [T, H, W]
  cover = np.clip(0.5 - sdf, 0.0, 1.0)[..., None]
  frames = np.rint(cover * np.array([230, 40, 40])).astype(np.uint8)  # [T, H, W, 3]
  assert sync.visual_events(frames, FPS)[0].shape == (0,)
  # Read as a bounce if the border did not matter: the turn at frame 7.5.
  times, axes = sync.visual_events(frames, FPS, edge_px=48.0)
  np.testing.assert_allclose(times * FPS, [7.5], atol=0.02)
  np.testing.assert_array_equal(axes, [0])


def test_audio_onsets_clean_and_through_the_vocoder():
  """Clean bursts (1 ms attack): onsets 0.47-0.51 ms after the exact bounce (the
  half-peak of the smoothed attack). Through the vocoder with 4 Griffin-Lim iterations
  (rises of 9-18 ms) the half-peak crossing lands within -3.8..+2.7 ms of the bounce
  (mean -0.4 ms; clips 0-19 of seed 7, 50 bounces),
  with no missed or extra onset: the swells of its smeared decay are weaker peaks within
  80 ms of the burst's (`min_gap_s`; 40 ms would count some of them)."""
  for vocoded in (False, True):
    _, waves, shapes, examples = _clips(10 if vocoded else 40)
    errors, swells = [], 0
    for wave, shape, ex in zip(waves, shapes, examples):
      if vocoded:
        wave = _vocoded(wave, iters=4)
        swells += sync.match_events(ex['event_times'],
                                    sync.audio_onsets(wave, RATE, min_gap_s=0.04)[0]).extra
      times, strengths, pitches = sync.audio_onsets(wave, RATE)
      m = sync.match_events(ex['event_times'], times, max_offset_s=0.1)
      assert (m.missed, m.extra) == (0, 0), (ex['event_times'], times)
      errors.extend(m.offsets)
      assert [sync.pitch_to_shape(float(p)) for p in pitches] == [shape] * len(times)
      np.testing.assert_allclose(pitches, synthetic.SHAPE_PITCHES_HZ[shape],
                                 rtol=0.1 if vocoded else 0.002)
      assert np.all(strengths > 0.05)
    errors = np.asarray(errors) * 1e3  # ms
    assert len(errors) >= 15
    if vocoded:
      assert np.max(np.abs(errors)) < 5.0, errors
      assert abs(np.mean(errors)) < 1.5, errors
      assert swells > 0
    else:
      assert np.all((errors > 0.3) & (errors < 0.7)), errors


def test_audio_onsets_of_silence_and_bad_input():
  for wave in (np.zeros(RATE), np.zeros(0), np.zeros(2)):
    times, strengths, pitches = sync.audio_onsets(wave, RATE)
    assert times.shape == strengths.shape == pitches.shape == (0,)
  # A burst already sounding at the first sample has no rise to time.
  wave = synthetic.render_bursts([0.0, 0.5], 1000.0, 0.3, RATE, RATE)
  np.testing.assert_allclose(sync.audio_onsets(wave[80:], RATE)[0], [0.5 - 80 / RATE],
                             atol=0.001)
  with pytest.raises(ValueError, match='must be 1-D'):
    sync.audio_onsets(np.zeros((2, 100)), RATE)
  with pytest.raises(ValueError, match='sample_rate must be a finite number > 0'):
    sync.audio_onsets(np.zeros(100), 0)
  with pytest.raises(ValueError, match='finite samples'):
    sync.audio_onsets(np.full(100, np.nan), RATE)


def test_pitch_to_shape():
  for shape, hz in enumerate(synthetic.SHAPE_PITCHES_HZ):
    assert sync.pitch_to_shape(hz) == shape
    assert sync.pitch_to_shape(hz * 1.3) == shape
    assert sync.pitch_to_shape(hz / 1.3) == shape
  assert sync.pitch_to_shape(100.0) == 0 and sync.pitch_to_shape(7000.0) == 2
  assert sync.pitch_to_shape(math.sqrt(500.0 * 1000.0) * 1.001) == 1  # the log midpoint
  assert sync.pitch_to_shape(math.sqrt(500.0 * 1000.0) * 0.999) == 0
  assert sync.pitch_to_shape(float('nan')) == -1
  with pytest.raises(ValueError, match='finite frequency > 0'):
    sync.pitch_to_shape(0.0)


def test_match_events_is_greedy_by_distance_and_one_to_one():
  m = sync.match_events([1.0, 1.05, 2.0, 3.0], [1.04, 1.09, 2.5, 3.02])
  np.testing.assert_allclose(m.offsets, [0.09, -0.01, np.nan, 0.02], atol=1e-12)
  np.testing.assert_array_equal(m.audio, [1, 0, -1, 3])
  assert (m.matched, m.missed, m.extra) == (3, 1, 1)
  m = sync.match_events([], [0.5])
  assert (m.matched, m.missed, m.extra, m.offsets.shape) == (0, 0, 1, (0,))
  m = sync.match_events([0.5], [])
  assert (m.matched, m.missed, m.extra) == (0, 1, 0)
  with pytest.raises(ValueError, match='max_offset_s must be a finite number > 0'):
    sync.match_events([0.5], [0.5], max_offset_s=0.0)


@pytest.mark.parametrize('offset_ms', [0.0, 25.0, 80.0])
def test_sync_report_recovers_an_injected_offset(offset_ms):
  videos, waves, shapes, examples = _clips(8)
  waves = np.stack([_shift(w, offset_ms / 1e3) for w in waves])
  report = sync.sync_report(videos, waves, FPS, RATE, shapes=shapes)
  assert report['events'] == sum(len(_observable(e['event_times'])) for e in examples) >= 12
  assert report['matched'] == report['events'] and report['missed'] == 0
  assert abs(report['median_abs_offset_ms'] - offset_ms) < 3.0, report
  assert abs(report['median_offset_ms'] - offset_ms) < 3.0, report
  assert report['share_within'] == (0.0 if offset_ms > 40 else 1.0)
  assert report['pitch_accuracy'] == 1.0
  assert abs(report['xcorr_lag_ms'] - offset_ms) < 3.0, report
  text = sync.format_report(report)
  assert 'median |offset|' in text and 'shuffled control' in text


def test_shuffled_control_scores_near_chance():
  """Each video against the next clip's audio: bounces and bursts are unrelated, so few
  meet within 40 ms: 10% of the 29 bounces of clips 0-11 of seed 7 (5% of the 96 of
  clips 0-39), against 100% with their own audio."""
  videos, waves, shapes, _ = _clips(12)
  report = sync.sync_report(videos, waves, FPS, RATE, shapes=shapes)
  assert report['share_within'] == 1.0
  shuffled = report['shuffled']
  assert shuffled['events'] == report['events'] and shuffled['onsets'] == report['onsets']
  assert shuffled['share_within'] <= 0.25, shuffled
  assert shuffled['missed'] >= 0.5 * shuffled['events'], shuffled
  assert shuffled['missed'] + shuffled['matched'] == shuffled['events']
  assert shuffled['pitch_accuracy'] < 0.8, shuffled


def test_missed_and_extra_counts():
  source = _source()
  ex = next(e for e in map(source.__getitem__, range(50))
            if len(_observable(e['event_times'])) >= 3)
  video, times = ex['video'][None], ex['event_times']
  seen = _observable(times)
  pitch = synthetic.SHAPE_PITCHES_HZ[ex['shape']]
  def report(bursts):
    wave = synthetic.render_bursts(np.sort(bursts), pitch, 0.3, RATE, len(ex['audio']))
    return sync.sync_report(video, wave[None], FPS, RATE, shapes=[ex['shape']], xcorr=False)
  full = report(times)
  unseen = len(times) - len(seen)  # bursts whose bounce the frames cannot show
  assert (full['events'], full['matched'], full['missed'], full['extra']) == (
      len(seen), len(seen), 0, unseen)
  dropped = report(np.delete(times, np.flatnonzero(times == seen[1])))
  assert (dropped['missed'], dropped['extra']) == (1, unseen)
  assert dropped['share_within'] == pytest.approx(1 - 1 / full['events'])
  edges = np.concatenate([[0.0], times, [FRAMES / FPS]])
  k = int(np.argmax(np.diff(edges)))
  added = report(np.append(times, 0.5 * (edges[k] + edges[k + 1])))  # far from any bounce
  assert (added['missed'], added['extra'], added['matched']) == (0, unseen + 1, len(seen))
  assert added['shuffled'] is None  # one clip: no other clip's audio


@pytest.mark.parametrize('lag_ms', [0.0, 25.0, 80.0, -40.0])
def test_xcorr_lag_recovers_an_injected_lag(lag_ms):
  """No detector, no event rule: per-clip errors within -1.8..+2.4 ms
  (median -0.2 ms; clips 20-59 of seed 7)."""
  videos, waves, _, _ = _clips(8, first=20)
  waves = np.stack([_shift(w, lag_ms / 1e3) for w in waves])
  lags, median = sync.xcorr_lags(videos, waves, FPS, RATE)
  assert lags.shape == (8,)
  np.testing.assert_allclose(lags * 1e3, lag_ms, atol=5.0)
  assert abs(median * 1e3 - lag_ms) < 2.0


def test_xcorr_lag_through_the_vocoder():
  """The project's vocoder (32 iterations): per-clip errors within
  -3.4..+2.2 ms (median +0.8 ms; clips 20-39 of seed 7)."""
  videos, waves, _, _ = _clips(6, first=20)
  waves = np.stack([_vocoded(_shift(w, 0.025)) for w in waves])
  lags, median = sync.xcorr_lags(videos, waves, FPS, RATE)
  np.testing.assert_allclose(lags * 1e3, 25.0, atol=5.0)
  assert abs(median * 1e3 - 25.0) < 2.0


def test_empty_inputs_give_nan_safe_reports():
  blank = np.full((1, 16, 32, 32, 3), 12, np.uint8)
  silent = np.zeros((1, RATE), np.float32)
  report = sync.sync_report(blank, silent, FPS, RATE, shapes=[0])
  assert {k: report[k] for k in ('clips', 'events', 'onsets', 'matched', 'missed', 'extra')} == {
      'clips': 1, 'events': 0, 'onsets': 0, 'matched': 0, 'missed': 0, 'extra': 0}
  for key in ('median_abs_offset_ms', 'median_offset_ms', 'share_within', 'pitch_accuracy',
              'xcorr_lag_ms'):
    assert math.isnan(report[key]), key
  assert 'n/a' in sync.format_report(report)
  assert math.isnan(sync.xcorr_lag(blank[0], silent[0], FPS, RATE))
  # Two clips: a bouncing object without sound, and sound without an object.
  ex = _source()[1]
  videos = np.stack([ex['video'], np.full_like(ex['video'], 12)])
  waves = np.stack([np.zeros_like(ex['audio']), ex['audio']])
  report = sync.sync_report(videos, waves, FPS, RATE)
  assert report['events'] == report['missed'] > 0
  assert report['extra'] == report['onsets'] == len(ex['event_times'])
  assert report['shuffled']['matched'] == report['events']  # the swap pairs them
  assert math.isnan(report['pitch_accuracy']) and math.isnan(report['xcorr_lag_ms'])
  empty = sync.sync_report(np.zeros((0, 4, 8, 8, 3), np.uint8), np.zeros((0, 100)), FPS, RATE)
  assert empty['clips'] == 0 and empty['events'] == 0 and empty['shuffled'] is None
  assert 'n/a' in sync.format_report(empty)
  with pytest.raises(ValueError, match='one clip each'):
    sync.sync_report(videos, waves[:1], FPS, RATE)
