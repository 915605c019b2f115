"""model/flops.py and train/mfu.py count the audio stream of the audio-video DiT
(model/av_dit.py, issue 30), both designs.

Oracles: the counted matmul weights are exactly the model's kernels (eval_shape of its
init), and the count of one forward pass matches XLA's own FLOPs of that forward
(`jax.jit(fn).lower(...).compile().cost_analysis()['flops']` on CPU) within TOLERANCE,
for the whole model and for what the audio stream adds to it (the same model called
without audio), coupled (the streams meet) and uncoupled (couple=False: the modality
guidance's pass).
"""

import dataclasses
import math

import jax
import numpy as np
import pytest

from configs import tiny_av
from vdit_jax.model import av_dit
from vdit_jax.model import flops as flops_lib
from vdit_jax.model import spec as spec_lib
from vdit_jax.train import mfu as mfu_lib

DESIGNS = ('cross', 'joint')
BATCH = 2
NUM_CLASSES = 12
# XLA counts every op: the analytic count leaves out element-wise work (norms, softmax,
# RoPE, adaLN modulation, gates, biases), so XLA's figure is a little higher; measured
# 2.2-2.9% above on these shapes (width 128). The bound catches a missing matmul or
# attention term of the audio stream (its cross-attentions are 20% of the model's FLOPs,
# the audio blocks more).
TOLERANCE = 0.05


def av_config(design: str):
  """configs/tiny_av.py (256 video tokens of width 128, 4 heads, class tokens, the token
  convolution) at depth 2 with 2 mel frames an audio token: 32 audio tokens a clip."""
  config = tiny_av.get_config('joint' if design == 'joint' else None)
  config.model.depth = 2
  config.audio.patch = 2
  return config


def av_spec(config) -> spec_lib.ModelSpec:
  return spec_lib.from_config(config.model, config.audio)


def _shape(config):
  d = config.data
  return (d.num_frames, d.height, d.width, d.channels)


def _inputs(config, spec):
  """(video, t, labels, audio) as ShapeDtypeStructs of BATCH clips."""
  f = config.data.num_frames * spec.audio.mel_frames_per_frame
  sds = jax.ShapeDtypeStruct
  return (sds((BATCH,) + _shape(config), np.float32), sds((BATCH,), np.float32),
          sds((BATCH,), np.int32), sds((BATCH, f, spec.audio.mel_bins), np.float32))


def _model_and_params(config):
  spec = av_spec(config)
  model = av_dit.build_model(spec, config.data.channels, NUM_CLASSES)
  params = jax.eval_shape(model.init, jax.random.key(0), *_inputs(config, spec))['params']
  return model, params


def _kernel_params(params) -> int:
  return sum(math.prod(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(params)
             if 'kernel' in jax.tree_util.keystr(path))


def _xla_forward_flops(model, params, inputs, **kwargs) -> float:
  """XLA's FLOPs of one forward pass (the compiled program's cost analysis, CPU)."""
  def forward(p, *args):
    return model.apply({'params': p}, *args, **kwargs)
  cost = jax.jit(forward).lower(params, *inputs).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
    cost = cost[0]
  return float(cost['flops'])


def _forward(count: flops_lib.FlopCount) -> float:
  """The forward pass of a train step's count: 2 of its 6 FLOPs per MAC."""
  return (count.matmul + count.attention) / 3


@pytest.mark.parametrize('design', DESIGNS)
def test_counted_weights_are_the_models_kernels(design):
  """Every matmul weight once: per video token, audio token, clip and label token."""
  config = av_config(design)
  _, params = _model_and_params(config)
  f = flops_lib.train_step_flops(av_spec(config), _shape(config), 1)
  assert (f.token_matmul_params + f.audio_token_matmul_params + f.clip_matmul_params
          + f.context_matmul_params) == _kernel_params(params)
  assert (f.video_tokens_per_clip, f.audio_tokens_per_clip) == (256, 32)
  assert f.tokens_per_clip == 288


def test_hand_count_of_the_audio_attention():
  """Scores per clip and layer, 12 D per query-key pair (forward + backward): 'cross' has
  the audio self-attention (Na^2) and both cross-attentions (2 N Na), 'joint' one attention
  over N + Na tokens, the same pairs beyond the video's N^2; both add the audio tokens'
  class-token cross-attention (K Na). Uncoupled: Na^2 + K Na."""
  n, na, k = 256, 32, 4
  for design in DESIGNS:
    spec = av_spec(av_config(design))
    d, depth = spec.width, spec.depth
    f = flops_lib.train_step_flops(spec, (8, 32, 32, 3), 3)
    assert f.audio_attention == 12 * depth * d * (na * na + 2 * n * na + k * na) * 3
    video = flops_lib.train_step_flops(dataclasses.replace(spec, audio=None), (8, 32, 32, 3), 3)
    assert f.attention - video.attention == f.audio_attention
    alone = flops_lib.train_step_flops(spec, (8, 32, 32, 3), 3, coupled=False)
    assert alone.audio_attention == 12 * depth * d * (na * na + k * na) * 3
  # The cross design's cross-attention projections: q, out on the querying stream's
  # tokens, k, v on the other's (4 D^2 a token of each stream a layer); the joint design
  # has none, and neither has them uncoupled.
  cross, joint = (flops_lib.train_step_flops(av_spec(av_config(x)), (8, 32, 32, 3), 1)
                  for x in DESIGNS)
  spec = av_spec(av_config('cross'))
  d, depth = spec.width, spec.depth
  assert cross.token_matmul_params - joint.token_matmul_params == depth * 4 * d * d
  assert cross.audio_token_matmul_params - joint.audio_token_matmul_params == depth * 4 * d * d


@pytest.fixture(scope='module')
def xla_video_only():
  """XLA's FLOPs of the AV model's forward without audio (the video model), by design."""
  out = {}
  for design in DESIGNS:
    config = av_config(design)
    model, params = _model_and_params(config)
    out[design] = _xla_forward_flops(model, params, _inputs(config, av_spec(config))[:3])
  return out


@pytest.mark.parametrize('coupled', [True, False], ids=['coupled', 'uncoupled'])
@pytest.mark.parametrize('design', DESIGNS)
def test_forward_count_matches_xla_cost_analysis(design, coupled, xla_video_only):
  config = av_config(design)
  spec = av_spec(config)
  model, params = _model_and_params(config)
  xla = _xla_forward_flops(model, params, _inputs(config, spec),
                           couple=None if coupled else False)
  counted = _forward(flops_lib.train_step_flops(spec, _shape(config), BATCH, coupled=coupled))
  video = _forward(flops_lib.train_step_flops(dataclasses.replace(spec, audio=None),
                                              _shape(config), BATCH))
  assert 1.0 <= xla / counted <= 1 + TOLERANCE, (xla, counted)
  # What the audio stream adds (its blocks or joint share, cross-attentions, embed, final).
  xla_audio = xla - xla_video_only[design]
  assert 1.0 <= xla_audio / (counted - video) <= 1 + TOLERANCE, (xla_audio, counted - video)


def test_model_flops_per_step_counts_the_configs_audio_stream():
  """train/mfu.py: the audio stream counts whether the caller's spec has it or not."""
  config = av_config('cross')
  with_audio = flops_lib.train_step_flops(av_spec(config), _shape(config),
                                          config.train.batch_size).total
  video_spec = spec_lib.from_config(config.model)  # no audio
  assert mfu_lib.model_flops_per_step(config, av_spec(config)) == with_audio
  assert mfu_lib.model_flops_per_step(config, video_spec) == with_audio
  config.audio.enabled = False
  video = mfu_lib.model_flops_per_step(config, video_spec)
  assert video == flops_lib.train_step_flops(video_spec, _shape(config),
                                             config.train.batch_size).total < with_audio


def test_audio_patch_must_divide_the_mel_frames():
  spec = av_spec(av_config('cross'))
  spec = dataclasses.replace(spec, audio=dataclasses.replace(spec.audio, patch=3))
  with pytest.raises(ValueError, match=r'audio.patch=3 does not divide the 64 mel frames'):
    flops_lib.train_step_flops(spec, (8, 32, 32, 3), 1)
