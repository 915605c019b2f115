"""Multi-stage generation: a keyframe model samples a clip at a low frame rate, then an
interpolation model fills the frames between each run of consecutive keyframes.

    keyframe stage   prompt -> keyframes [B, Tk, H, W, C] at keyframe fps (sample.fps)
    interpolation    window w: keyframes w(K-1) .. w(K-1)+K-1 given at positions 0, r, ..., T-1
                     of a T-frame window (model.given_frames='keyframes', r = spacing);
                     the W*B windows are independent: sampled window_batch at a time
    stitch           window 0 whole, then each next window without its first frame (the
                     keyframe it shares with the previous one) -> full rate, r x keyframe fps
    subsample        every m-th full-rate frame, for fps = full rate / m (m divides r)

`generate(prompt, duration_s, fps, keyframe, interp, rng=...)` returns exactly
round(duration_s * fps) frames, or raises naming the values when that is not reachable
(`make_plan`). Rates come from the configs: each stage's sample.fps is the rate its
training clips stand for, and the interpolation model's keyframe spacing r must equal
their ratio (for synthetic data also the ratio of data.time_stride).

The optional third stage gives the finished clip its soundtrack (issue 30): an audio-video
model (configs/tiny_av.py) samples the sound of the given frames (audio.task 'v2a'):

    fit              frames resized to the AV model's H x W (data/transforms.py's
                     resize_and_crop: short side fitted, the rest centre-cropped)
    windows          the AV model hears T = its data.num_frames frames at a time: windows
                     start at frames 0, T, 2T, ... and the last one ends at frame N - 1
                     (it overlaps the one before when T does not divide N; a clip shorter
                     than T is padded with its last frame, its sound cut back to N frames)
    stitch           each window's wave (Griffin-Lim of its log-mel features), window 0
                     whole, each next one from its first frame the windows before did not
                     cover -> N * sample_rate / fps samples, in sync with the frames

The rates must agree: the AV model puts sample_rate / audio.fps samples under each frame, so
the video's fps must equal its audio.fps (`check_audio_stage` refuses any other rate rather
than put every sound off its frame). Windows are sampled independently, so a sound that
spans a window's edge is heard as two halves, and each window's phase is estimated on its
own (a click is possible at the seams, T / fps seconds apart). Joint generation of frames
and sound stays `--mode=sample` on the AV model's workdir.
"""

import dataclasses
import math
import numbers
from typing import Any, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdit_jax.data import audio as audio_lib
from vdit_jax.data import transforms
from vdit_jax.data import video_io
from vdit_jax.diffusion import conditioning as cond_lib
from vdit_jax.model import text as text_lib
from vdit_jax.generate import av_sampling
from vdit_jax.generate import conditional as generate_lib

_RATE_TOLERANCE = 1e-6
# generate's audio stage draws from fold_in(rng, 2); the video stages' keys (split(rng)) are
# the same with or without it, so are the frames.
_AUDIO_STREAM = 2


@dataclasses.dataclass(frozen=True)
class Stage:
  """One trained model, ready to sample: its config, model, diffusion and params."""
  config: Any
  model: Any
  diffusion: Any
  params: Any
  num_classes: int = 0
  mesh: Any = None   # None: sample outside any mesh (one device)
  rules: Tuple = ()
  # Jitted samplers by sample shape: every call of a shape after the first reuses its program.
  samplers: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class FramePlan:
  """How `generate` makes `num_frames` frames at `fps` from the two stages."""
  num_frames: int              # N, frames returned: round(duration_s * fps)
  fps: float
  keyframe_fps: float
  full_fps: float              # keyframe_fps * ratio
  ratio: int                   # r: full-rate frames per keyframe interval
  subsample: int               # m: full-rate frames per returned frame (m divides r)
  window: int                  # T: frames of an interpolation window
  positions: Tuple[int, ...]   # keyframe positions in a window: 0, r, ..., T-1
  num_windows: int             # W
  num_keyframes: int           # M = W (K-1) + 1 keyframes used, of the keyframe clip

  @property
  def full_frames(self) -> int:
    """Full-rate frames the windows make: W (T-1) + 1 (the first (N-1) m + 1 are kept)."""
    return self.num_windows * (self.window - 1) + 1

  def keyframe_indices(self) -> Tuple[int, ...]:
    """Indices of the returned frames that are keyframes (keyframe j is full-rate frame
    j r, returned frame j r / m)."""
    step = self.ratio // self.subsample
    return tuple(range(0, self.num_frames, step))


def _positive_number(name: str, value) -> float:
  if (isinstance(value, bool) or not isinstance(value, numbers.Real)
      or not math.isfinite(value) or value <= 0):
    raise ValueError(f'{name}={value!r} must be a finite number > 0.')
  return float(value)


def _integer_ratio(a: float, b: float) -> Optional[int]:
  """a / b when it is a whole number (to a relative 1e-6), else None."""
  q = a / b
  return int(round(q)) if abs(q - round(q)) <= _RATE_TOLERANCE * max(1.0, q) else None


def make_plan(duration_s, fps, *, keyframe_frames: int, keyframe_fps, window: int,
              positions, full_fps) -> FramePlan:
  """Checks that round(duration_s * fps) frames at `fps` are reachable and says how.

  keyframe_frames: frames of the keyframe model's clip, at keyframe_fps; window and
  positions: the interpolation model's window and its keyframe positions (0, r, ..., T-1),
  at full_fps = r * keyframe_fps. Raises ValueError naming the values that do not fit.
  """
  duration_s = _positive_number('duration_s', duration_s)
  fps = _positive_number('fps', fps)
  keyframe_fps = _positive_number('keyframe fps (keyframe config sample.fps)', keyframe_fps)
  full_fps = _positive_number('full fps (interpolation config sample.fps)', full_fps)
  positions = cond_lib.check_positions(positions, window)
  k = len(positions)
  ratio = positions[1] - positions[0] if k > 1 else 0
  if k < 2 or positions != tuple(range(0, window, ratio)) or positions[-1] != window - 1:
    raise ValueError(f'interpolation keyframe positions {positions} must be 0, r, 2r, ..., '
                     f'{window - 1} (evenly spaced, first and last frame of the '
                     f'{window}-frame window).')
  if _integer_ratio(full_fps, keyframe_fps) != ratio:
    raise ValueError(f'the interpolation model fills {ratio - 1} frames between keyframes, '
                     f'so its rate (sample.fps={full_fps:g}) must be {ratio} x the keyframe '
                     f"model's (sample.fps={keyframe_fps:g}), i.e. {ratio * keyframe_fps:g}.")
  reachable = [full_fps / m for m in range(1, ratio + 1) if ratio % m == 0]
  subsample = _integer_ratio(full_fps, fps)
  if subsample is None or ratio % subsample:
    raise ValueError(f'fps={fps:g} is not reachable: the interpolation model makes '
                     f'{full_fps:g} fps from keyframes at {keyframe_fps:g} fps, so fps must be '
                     f'{full_fps:g} / m for m dividing {ratio}: one of '
                     f'{[float(f"{r:g}") for r in reachable]}.')
  num_frames = int(round(duration_s * fps))
  if num_frames < 2:
    raise ValueError(f'duration_s={duration_s:g} at fps={fps:g} is round({duration_s * fps:g})'
                     f' = {num_frames} frame(s); a clip needs at least 2 '
                     f'(duration_s >= {1.5 / fps:g}).')
  span = window - 1                                       # full-rate frames per window step
  full_needed = (num_frames - 1) * subsample + 1
  num_windows = -(-(full_needed - 1) // span)             # ceil
  num_keyframes = num_windows * (k - 1) + 1
  if num_keyframes > keyframe_frames:
    max_windows = (keyframe_frames - 1) // (k - 1)
    max_frames = (max_windows * span) // subsample + 1
    raise ValueError(
        f'duration_s={duration_s:g} at fps={fps:g} is {num_frames} frames, which need '
        f'{num_keyframes} keyframes ({num_windows} interpolation windows of {window} frames); '
        f'the keyframe model makes {keyframe_frames} (its data.num_frames) at '
        f'{keyframe_fps:g} fps, enough for at most {max_frames} frames at fps={fps:g}: '
        f'duration_s <= {max_frames / fps:g}.')
  return FramePlan(num_frames=num_frames, fps=fps, keyframe_fps=keyframe_fps, full_fps=full_fps,
              ratio=ratio, subsample=subsample, window=window, positions=positions,
              num_windows=num_windows, num_keyframes=num_keyframes)


def check_stages(keyframe_config, interp_config) -> Tuple[int, ...]:
  """The two configs fit together; returns the interpolation window's keyframe positions."""
  if not generate_lib.is_keyframes(interp_config):
    raise ValueError("the interpolation stage needs a model trained with "
                     "model.given_frames='keyframes' and model.context_frames_max > 0 "
                     '(configs/tiny_interpolate.py); its config has given_frames='
                     f"{interp_config.model.given_frames!r}, "
                     f"context_frames_max={interp_config.model.context_frames_max}.")
  if generate_lib.is_keyframes(keyframe_config):
    raise ValueError("the keyframe stage generates from a prompt; its config has "
                     "model.given_frames='keyframes' (an interpolation model).")
  kd, idata = keyframe_config.data, interp_config.data
  for key in ('height', 'width', 'channels'):
    if kd[key] != idata[key]:
      raise ValueError(f'keyframe data.{key}={kd[key]} != interpolation data.{key}='
                       f'{idata[key]}: the interpolation model must take the keyframes as '
                       'they are.')
  window = int(idata.num_frames)
  positions = cond_lib.keyframe_positions(window, interp_config.model.keyframe_stride)
  ratio = positions[1] - positions[0]
  if kd.source == 'synthetic' and idata.source == 'synthetic':
    if _integer_ratio(float(kd.time_stride), float(idata.time_stride)) != ratio:
      raise ValueError(f'keyframe data.time_stride={kd.time_stride:g} must be {ratio} x the '
                       f'interpolation data.time_stride={idata.time_stride:g} (the '
                       f'interpolation model fills {ratio - 1} frames between keyframes), or '
                       'the two models learnt different motion per keyframe interval.')
  return positions


def plan_for(keyframe_config, interp_config, duration_s, fps) -> FramePlan:
  """`make_plan` with the frame counts and rates of the two stages' configs."""
  positions = check_stages(keyframe_config, interp_config)
  return make_plan(duration_s, fps, keyframe_frames=int(keyframe_config.data.num_frames),
                   keyframe_fps=keyframe_config.sample.fps,
                   window=int(interp_config.data.num_frames), positions=positions,
                   full_fps=interp_config.sample.fps)


def stitch(keyframes, window_fn, positions, window: int):
  """Fills the frames between keyframes [B, M, H, W, C], every window in one call.

  Window w is given keyframes w (K-1) .. w (K-1) + K - 1 at `positions` (K of them) of a
  `window`-frame clip; M - 1 must be a multiple of K - 1. window_fn(context [W*B, T, H, W,
  C], frame_mask bool [W*B, T]) -> [W*B, T, H, W, C] samples them (window-major rows:
  row w B + b is window w of clip b). Returns (full [B, W (T-1) + 1, H, W, C], windows [W, B, T, ...]).
  """
  keyframes = np.asarray(keyframes, np.float32)
  b, m = keyframes.shape[:2]
  k = len(positions)
  if keyframes.ndim != 5 or m < k or (m - 1) % (k - 1):
    raise ValueError(f'keyframes {keyframes.shape} must be [B, M, H, W, C] with M - 1 a '
                     f'multiple of {k - 1} (windows of {k} keyframes sharing one).')
  num_windows = (m - 1) // (k - 1)
  starts = np.arange(num_windows)[:, None] * (k - 1) + np.arange(k)[None]  # [W, K]
  given = keyframes[:, starts]                                 # [B, W, K, H, W, C]
  given = np.swapaxes(given, 0, 1).reshape((num_windows * b, k) + keyframes.shape[2:])
  context, mask = cond_lib.given_at(given, positions, window)  # [W*B, T, ...], [W*B, T]
  out = np.asarray(jax.device_get(window_fn(context, mask)), np.float32)
  if out.shape != context.shape:
    raise ValueError(f'window_fn returned {out.shape}, expected {context.shape}.')
  windows = out.reshape((num_windows, b) + out.shape[1:])      # [W, B, T, H, W, C]
  parts = [windows[0]] + [w[:, 1:] for w in windows[1:]]
  return np.concatenate(parts, axis=1), windows                # [B, W (T-1) + 1, ...]


def stage_condition(stage: Stage, prompt, batch: int) -> dict:
  """The condition of `batch` samples of a stage: a text model's prompt (a string, or a
  sequence of `batch` strings, one per sample; None: the null caption); a class model
  takes no prompt and samples with the null label."""
  cond = {}
  if not isinstance(prompt, (str, type(None))):
    prompt = list(prompt)
    if len(prompt) != batch:
      raise ValueError(f'{len(prompt)} prompts for {batch} samples: give one prompt, or '
                       'one per sample.')
  if generate_lib.is_text(stage.config):
    spec = stage.model.spec.text
    if prompt:
      prompts = [prompt] * batch if isinstance(prompt, str) else prompt
      generate_lib.check_prompts(stage.config, sorted(set(prompts)))
      ids, mask = text_lib.Tokenizer(spec.max_length).encode_batch(prompts)
      cond['text'] = {'tokens': jnp.asarray(ids), 'mask': jnp.asarray(mask)}
    else:
      cond['text'] = text_lib.null_text(spec, batch)
  elif prompt and not generate_lib.is_keyframes(stage.config):
    raise ValueError(f"prompt={prompt!r} needs a keyframe model with model.conditioning="
                     "'text' (configs/tiny_keyframes.py).")
  return cond


def sample_stage(stage: Stage, shape, cond, rng):
  """Samples [*shape] from a stage, inside its mesh when it has one."""
  shape = tuple(int(d) for d in shape)
  if shape not in stage.samplers:
    stage.samplers[shape] = jax.jit(generate_lib.make_sample_fn(
        stage.model, stage.diffusion, stage.config, stage.num_classes, shape))
  fn = stage.samplers[shape]
  if stage.mesh is None:
    return fn(stage.params, rng, cond)
  with jax.set_mesh(stage.mesh), nn.logical_axis_rules(stage.rules):
    return jax.block_until_ready(fn(stage.params, rng, cond))


def _check_count(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f'{name}={value!r} must be a positive integer.')
  return int(value)


@dataclasses.dataclass
class Result:
  video: np.ndarray        # [B, N, H, W, C] float32 in [-1, 1], N = plan.num_frames
  keyframes: np.ndarray    # [B, M, H, W, C] the keyframes the windows were given
  plan: FramePlan
  soundtrack: Optional['Soundtrack'] = None  # the audio stage's, when it ran


def generate(prompt: Optional[str], duration_s, fps, keyframe: Stage, interp: Stage, *,
             rng, num_samples: int = 1, window_batch: Optional[int] = None,
             audio: Optional[Stage] = None, audio_labels=None) -> Result:
  """prompt -> `num_samples` clips of exactly round(duration_s * fps) frames at `fps`.

  The keyframe model samples its whole clip (data.num_frames keyframes) toward the prompt;
  the first plan.num_keyframes are interpolated, `window_batch` windows per sampler call
  (default: the interpolation config's sample.num_samples; the last call padded, so
  every duration runs the same compiled sampler); every m-th full-rate frame is kept.
  The keyframes come back unchanged at plan.keyframe_indices() (the sampler re-imposes
  given frames exactly). With `audio` (an audio-video model's stage) the finished clips
  get their soundtrack (`soundtrack`, labels `audio_labels`) in Result.soundtrack; the
  frames are the same as without it (the audio stage draws from its own key).
  """
  plan = plan_for(keyframe.config, interp.config, duration_s, fps)
  _check_count('num_samples', num_samples)
  if audio is not None:  # before any sampling: the rates must agree
    check_audio_stage(audio.config, plan.fps)
  key_rng, interp_rng = jax.random.split(rng)
  kcfg = keyframe.config
  key_shape = generate_lib.sample_shape(kcfg, num_samples)
  cond = stage_condition(keyframe, prompt, num_samples)
  if int(kcfg.model.context_frames_max) > 0:  # an extension model: none given
    cond['context'] = jnp.zeros(key_shape, jnp.float32)
    cond['frame_mask'] = jnp.zeros(key_shape[:2], bool)
  keyframes = np.asarray(jax.device_get(sample_stage(keyframe, key_shape, cond, key_rng)),
                         np.float32)[:, :plan.num_keyframes]  # [B, M, H, W, C]

  full, _ = interpolate(interp, keyframes, rng=interp_rng, prompt=prompt,
                        window_batch=window_batch)
  video = full[:, :(plan.num_frames - 1) * plan.subsample + 1:plan.subsample]  # [B, N, ...]
  sound = None
  if audio is not None:
    sound = soundtrack(audio, video, plan.fps, rng=jax.random.fold_in(rng, _AUDIO_STREAM),
                       labels=audio_labels)
  return Result(video=video, keyframes=keyframes, plan=plan, soundtrack=sound)


def interpolate(interp: Stage, keyframes, *, rng, prompt=None,
                window_batch: Optional[int] = None):
  """Keyframes [B, M, H, W, C] at the keyframe rate -> (full-rate clips [B, (M-1) r + 1,
  H, W, C], windows [W, B, T, H, W, C]) with the interpolation stage, `window_batch`
  windows per sampler call (default sample.num_samples; the last call padded by
  repeating its last window). prompt: one for all clips, or one per clip (text models)."""
  positions = cond_lib.keyframe_positions(int(interp.config.data.num_frames),
                                          interp.config.model.keyframe_stride)
  keyframes = np.asarray(keyframes, np.float32)
  b = keyframes.shape[0]
  batch = _check_count('window_batch', window_batch or int(interp.config.sample.num_samples))
  num_windows = max(1, (keyframes.shape[1] - 1) // max(1, len(positions) - 1))
  rows = num_windows * b                                        # window-major: w * B + b
  if not isinstance(prompt, (str, type(None))):
    prompt = list(prompt)
    if len(prompt) != b:
      raise ValueError(f'{len(prompt)} prompts for {b} clips of keyframes: give one prompt, '
                       'or one per clip.')
  per_row = prompt if isinstance(prompt, (str, type(None))) else prompt * num_windows
  cond_all = stage_condition(interp, per_row, rows) if rows else {}
  shape = generate_lib.sample_shape(interp.config, batch)

  def window_fn(context, mask):  # [R, T, H, W, C], [R, T]: R windows, `batch` at a time
    out = []
    for i, start in enumerate(range(0, context.shape[0], batch)):
      take = np.minimum(np.arange(start, start + batch), context.shape[0] - 1)
      cond = {**jax.tree.map(lambda x: x[take], cond_all),
              'context': context[take], 'frame_mask': mask[take]}
      windows = sample_stage(interp, shape, cond, jax.random.fold_in(rng, i))
      out.append(np.asarray(jax.device_get(windows))[:context.shape[0] - start])
    return np.concatenate(out)  # [R, T, H, W, C]

  return stitch(keyframes, window_fn, positions, int(interp.config.data.num_frames))


def describe(plan: FramePlan) -> List[str]:
  """Human-readable lines of a plan, for logs."""
  return [f'{plan.num_frames} frames at {plan.fps:g} fps ({plan.num_frames / plan.fps:g} s)',
          f'{plan.num_keyframes} keyframes at {plan.keyframe_fps:g} fps -> '
          f'{plan.num_windows} interpolation windows of {plan.window} frames '
          f'(keyframes at {plan.positions}) -> {plan.full_frames} frames at '
          f'{plan.full_fps:g} fps' + (f', every {plan.subsample}th kept'
                                      if plan.subsample > 1 else '')]


# The audio stage: the finished clip's soundtrack (issue 30).


@dataclasses.dataclass(frozen=True)
class SoundtrackPlan:
  """How `soundtrack` covers `num_frames` frames with windows of the AV model's clip."""
  num_frames: int                # N: frames of the finished clip
  window: int                    # T: frames of the AV model's clip (its data.num_frames)
  starts: Tuple[int, ...]        # first frame of each window: 0, T, 2T, ..., N - T
  keep_from: Tuple[int, ...]     # per window, its first frame (in the window) whose sound
                                 # is kept: the first one the windows before left uncovered
  samples_per_frame: int         # sample_rate / fps

  @property
  def num_windows(self) -> int:
    return len(self.starts)

  @property
  def num_samples(self) -> int:
    """Samples of the stitched soundtrack: N * sample_rate / fps."""
    return self.num_frames * self.samples_per_frame

  def kept(self, w: int) -> Tuple[int, int]:
    """Frames [first, stop) of window w (window-relative) whose sound is kept."""
    return self.keep_from[w], min(self.window, self.num_frames - self.starts[w])


@dataclasses.dataclass
class Soundtrack:
  waves: np.ndarray        # [B, N * samples_per_frame] float32 in [-1, 1]
  sample_rate: int
  plan: SoundtrackPlan


def check_audio_stage(config, fps=None) -> audio_lib.AudioSpec:
  """The audio stage's config makes sound for RGB frames at `fps` (when given); returns its
  audio spec. Raises ValueError naming the value that does not fit."""
  if not config.audio.enabled:
    raise ValueError('the audio stage needs an audio-video model (config.audio.enabled=True, '
                     'configs/tiny_av.py); this config has audio.enabled=False: its model '
                     'makes no sound.')
  if config.data.channels != 3:
    raise ValueError(f'the audio stage hears RGB frames: its config has data.channels='
                     f'{config.data.channels}.')
  spec = audio_lib.AudioSpec.from_config(config.audio)
  if fps is not None:
    fps = _positive_number('fps', fps)
    if abs(fps - spec.fps) > _RATE_TOLERANCE * spec.fps:
      raise ValueError(
          f"the video is at fps={fps:g} but the audio model's clips are at audio.fps="
          f'{spec.fps:g}: it puts {spec.samples_per_frame} samples ({spec.sample_rate} Hz) '
          f'under each frame of a {spec.fps:g} fps clip, so a {fps:g} fps clip would be '
          f'heard as motion {spec.fps / fps:g}x as fast as it is, its sound lasting '
          f'{fps / spec.fps:g}x the video and every sound off its frame. Make the video at '
          f'{spec.fps:g} fps (--fps), or use an audio model trained at audio.fps={fps:g}.')
  return spec


def soundtrack_plan(num_frames: int, window: int, samples_per_frame: int) -> SoundtrackPlan:
  """Windows of `window` frames over `num_frames`: consecutive from frame 0, the last one
  ending at the last frame; a clip shorter than a window is one (padded) window."""
  n = _check_count('num_frames', num_frames)
  t = _check_count('window (the audio model\'s data.num_frames)', window)
  spf = _check_count('samples_per_frame', samples_per_frame)
  starts = list(range(0, max(n - t, 0) + 1, t))        # 0, T, 2T, ... while a window fits
  if starts[-1] + t < n:
    starts.append(n - t)                               # the last window, aligned to the end
  covered = [0] + [s + t for s in starts[:-1]]         # frames the windows before cover
  keep_from = tuple(c - s for c, s in zip(covered, starts))
  return SoundtrackPlan(num_frames=n, window=t, starts=tuple(starts), keep_from=keep_from,
                        samples_per_frame=spf)


def soundtrack_plan_for(config, num_frames: int, fps) -> SoundtrackPlan:
  """`soundtrack_plan` of an audio stage's config (checked: `check_audio_stage`) for a clip
  of `num_frames` frames at `fps`."""
  spec = check_audio_stage(config, fps)
  return soundtrack_plan(num_frames, int(config.data.num_frames), spec.samples_per_frame)


def stitch_soundtrack(video, window_fn, plan: SoundtrackPlan) -> np.ndarray:
  """The soundtrack of clips [B, N, H, W, C] from the sound of their windows.

  window_fn(frames [W*B, T, H, W, C]) -> waves [W*B, T * samples_per_frame] hears every
  window (window-major rows: row w B + b is window w of clip b; frames past a clip's end
  are its last frame). Returns waves [B, N * samples_per_frame]: each window's kept frames
  (plan.kept) in order, so sample k is the sound of frame k // samples_per_frame.
  """
  video = np.asarray(video)
  if video.ndim != 5 or video.shape[1] != plan.num_frames:
    raise ValueError(f'video {video.shape} must be [B, N={plan.num_frames}, H, W, C].')
  b, spf = video.shape[0], plan.samples_per_frame
  index = np.minimum(np.asarray(plan.starts)[:, None] + np.arange(plan.window)[None],
                     plan.num_frames - 1)                          # [W, T]
  frames = np.swapaxes(video[:, index], 0, 1)                      # [W, B, T, H, W, C]
  frames = frames.reshape((-1,) + frames.shape[2:])                # [W*B, T, H, W, C]
  waves = np.asarray(window_fn(frames), np.float32)
  want = (frames.shape[0], plan.window * spf)
  if waves.shape != want:
    raise ValueError(f'window_fn returned waves {waves.shape}, expected {want}.')
  waves = waves.reshape(plan.num_windows, b, -1)                   # [W, B, T * spf]
  parts = [waves[w][:, first * spf:stop * spf]
           for w, (first, stop) in enumerate(map(plan.kept, range(plan.num_windows)))]
  return np.concatenate(parts, axis=1)                             # [B, N * spf]


def fit_frames(video, height: int, width: int) -> np.ndarray:
  """Clips [B, N, h, w, 3] (float in [-1, 1], or uint8) -> float32 [B, N, height, width, 3]
  in [-1, 1]: resize_and_crop (data/transforms.py: the short side fitted, the other
  centre-cropped) when the size differs; float frames of the right size pass unchanged."""
  video = np.asarray(video)
  if video.ndim != 5 or video.shape[-1] != 3 or 0 in video.shape:
    raise ValueError(f'the audio stage takes RGB clips [B, N, H, W, 3], got {video.shape}.')
  if video.dtype != np.uint8 and video.shape[2:4] == (height, width):
    return video.astype(np.float32)
  frames = video if video.dtype == np.uint8 else video_io.to_uint8(video)  # [B, N, h, w, 3]
  if frames.shape[2:4] != (height, width):
    frames = np.stack([transforms.resize_and_crop(clip, height, width) for clip in frames])
  return frames.astype(np.float32) / 127.5 - 1.0                   # [B, N, height, width, 3]


def _audio_labels(stage: Stage, labels, batch: int) -> Tuple[np.ndarray, bool]:
  """(labels int32 [batch], guided): the given class ids, or the null label for all
  (unguided then: the label guidance has no class to guide toward)."""
  if labels is None:
    return np.full((batch,), max(stage.num_classes, 0), np.int32), False
  if stage.num_classes <= 0:
    raise ValueError(f'labels={labels!r} need a class-conditional audio model; this one has '
                     'no classes.')
  labels = np.asarray(labels).reshape(-1)
  if (labels.shape != (batch,) or not np.issubdtype(labels.dtype, np.integer)
      or labels.min() < 0 or labels.max() >= stage.num_classes):
    raise ValueError(f'labels={labels.tolist()} must be {batch} class ids (one per clip) in '
                     f'[0, {stage.num_classes}).')
  return labels.astype(np.int32), True


def _v2a_sampler(stage: Stage, batch: int, guided: bool):
  """The jitted 'v2a' sampler of `batch` windows (cached on the stage)."""
  key = ('v2a', batch, guided)
  if key not in stage.samplers:
    # Unguided: as a model without classes, so no null-label pass is run (labels stay given).
    num_classes = stage.num_classes if guided else 0
    stage.samplers[key] = jax.jit(av_sampling.make_sample_fn(
        stage.model, stage.diffusion, stage.config, num_classes, batch, task='v2a'))
  return stage.samplers[key]


def soundtrack(stage: Stage, video, fps, *, rng, labels=None,
               window_batch: Optional[int] = None) -> Soundtrack:
  """The soundtrack of clips [B, N, H, W, 3] (or one clip [N, H, W, 3]) at `fps`.

  `stage` is an audio-video model (config.audio.enabled; its audio.fps must equal `fps`).
  Frames are fitted to its H x W (`fit_frames`) and heard in windows of its data.num_frames
  (`soundtrack_plan`), `window_batch` windows per sampler call (default: its
  sample.num_samples; the last call padded), call i with jax.random.fold_in(rng, i); each
  window's log-mel features become a wave by Griffin-Lim (audio.griffin_lim_iters, seeded
  with the clip's index). Guidance: audio.modality_cfg_audio (toward the frames) and, with
  `labels` (class ids, one per clip), audio.cfg_scale; without labels every window is
  sampled with the null label. Returns waves [B, N * sample_rate / fps].
  """
  cfg = stage.config
  spec = check_audio_stage(cfg, fps)
  video = np.asarray(video)
  if video.ndim == 4:
    video = video[None]                                            # one clip
  video = fit_frames(video, int(cfg.data.height), int(cfg.data.width))  # [B, N, H, W, 3]
  b = video.shape[0]
  plan = soundtrack_plan_for(cfg, video.shape[1], fps)
  clip_labels, guided = _audio_labels(stage, labels, b)
  batch = _check_count('window_batch', window_batch or int(cfg.sample.num_samples))
  fn = _v2a_sampler(stage, batch, guided)
  num_samples = spec.num_samples(plan.window)

  def window_fn(frames):  # [R, T, H, W, 3] -> [R, T * spf], `batch` windows at a time
    rows = frames.shape[0]
    row_labels = np.tile(clip_labels, rows // b)                   # window-major rows
    features = []
    for i, start in enumerate(range(0, rows, batch)):
      take = np.minimum(np.arange(start, start + batch), rows - 1)
      args = (stage.params, jax.random.fold_in(rng, i), jnp.asarray(row_labels[take]))
      given = jnp.asarray(frames[take])
      if stage.mesh is None:
        _, out = fn(*args, video=given)
      else:
        with jax.set_mesh(stage.mesh), nn.logical_axis_rules(stage.rules):
          _, out = jax.block_until_ready(fn(*args, video=given))
      features.append(np.asarray(jax.device_get(out), np.float32)[:rows - start])
    features = np.concatenate(features)                            # [R, F, M]
    return np.stack([audio_lib.griffin_lim(f, spec, num_samples,
                                           iters=cfg.audio.griffin_lim_iters, seed=r % b)
                     for r, f in enumerate(features)])             # [R, T * spf]

  waves = stitch_soundtrack(video, window_fn, plan)                # [B, N * spf]
  return Soundtrack(waves=waves, sample_rate=spec.sample_rate, plan=plan)


def describe_soundtrack(plan: SoundtrackPlan, sample_rate: int) -> str:
  """One human-readable line of a soundtrack plan, for logs."""
  return (f'soundtrack: {plan.num_frames} frames heard in {plan.num_windows} window(s) of '
          f'{plan.window} frames starting at {list(plan.starts)} -> {plan.num_samples} '
          f'samples at {sample_rate} Hz')
