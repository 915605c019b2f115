r"""Tiny audio-video DiT: shapes that bounce, each bounce a click, generated together.

python -m vdit_jax.main --config=configs/tiny_av.py --workdir=/tmp/vdit_tiny_av

The built-in synthetic clips with their soundtracks (issue 30): one shape moving along one
axis and bouncing off the frame's edges; each bounce (and only a bounce) sounds a short
percussive tone whose pitch says the shape (square 500 Hz, circle 1 kHz, triangle 2 kHz) and
whose loudness says the speed (data/synthetic.py). 8 frames of 32x32 at 16 fps (half a
second, the motion of 16 base frames: data.time_stride=2) and 8000 samples of 16 kHz audio
as 64 log-mel frames of 64 bands (hop 125 samples = 7.8 ms, 8 mel frames per video frame).

The model is configs/tiny.py's (Mu/2x4x4: 256 video tokens, depth 4, 4 heads, class tokens,
the token convolution) with an audio stream: 16 audio tokens of 4 mel frames (31 ms), its own
blocks, and cross-attention both ways at every layer (audio.design='cross', as LTX-2 / Ovi;
'joint' is MM-DiT's one attention over both). RoPE positions are in units of video tokens,
so an audio token and a video token of the same instant share their time phase. Each clip
trains one of the tasks (joint 80%, video->audio 10%, else a t per stream: audio.task_probs),
so one model samples joint and video->audio (audio.task; audio->video is learnt only from the
clips' own t per stream: give it a share of its own for that task); the sound is guided
toward the frames (audio.modality_cfg_audio=2). Trained with configs/tiny.py's recipe (flow, logit-normal t
shifted by 3, x0 output, the signal-scaled input, EDM2's loss uncertainty per stream, WSD at
2e-3). The end-of-training samples are mp4s with their sound, and wavs.

Variants (`--config=configs/tiny_av.py:VARIANT`):
- none: the joint audio-video model above.
- `joint`: audio.design='joint' (MM-DiT).
- `video_only`: the same clips, model and steps without the audio stream: the baseline
  that shows what the audio stream costs the video (docs/results.md, "Synchronised audio").
"""

from configs import tiny

VARIANTS = ('', 'joint', 'video_only')


def get_config(arg=None):
  variant = arg or ''
  if variant not in VARIANTS:
    raise ValueError(f'configs/tiny_av.py:{variant} is not a variant; choose from {VARIANTS} '
                     "('' is the cross-attention audio-video model).")
  config = tiny.get_config()
  config.model.pos_embed = 'rope'
  config.model.scan_layers = False
  config.data.num_frames = 8
  config.data.bounce = True           # bounces are the sound events
  config.data.time_stride = 2.0       # 2-5 px per frame: about one bounce per clip
  config.data.shape_size = (0.3, 0.45)
  config.sample.fps = 16
  config.sample.formats = 'mp4'
  config.audio.enabled = variant != 'video_only'
  config.audio.fps = 16.0
  config.audio.design = 'joint' if variant == 'joint' else 'cross'
  # 80% of the clips noisy in both streams at one t, 10% video->audio, the rest a t per
  # stream: against (0.5, 0.3, 0.1) the frames of joint samples hold one object in 0.98 of
  # frames (0.85) and the label's shape in 0.94 (0.63), the video-only baseline's 0.99 /
  # 0.94; bounces heard within 40 ms 0.89 (0.73); video->audio still 100% within 40 ms
  # (docs/results.md, "Synchronised audio").
  config.audio.task_probs = (0.8, 0.1, 0.0)
  # The sound guided toward the frames (modality guidance 2): joint bounces within 40 ms
  # 0.90 against 0.89, median offset 11.1 ms against 12.4.
  config.audio.modality_cfg_audio = 2.0
  return config
