"""Analytic model FLOPs of one train step, from the resolved ModelSpec and the data shape.

Counted the way MFU is usually counted (PaLM appendix B; MaxText's
`calculate_tflops_training_per_device`):

  * every matmul weight costs 2 FLOPs per use forward and 4 backward (gradient of the
    input and of the weight), so 6 x params x uses for a train step;
  * token-wise weights (patch embedding, q/k/v/out projections, MLP, final projection) are
    used once per token; clip-wise weights (timestep MLP, adaLN projections) once per clip;
  * bidirectional attention costs QK^T and AV, 2 x N x D each per token per layer forward,
    so 12 x L x N x D per token for forward + backward (no causal halving); other attention
    patterns replace N by the keys each query attends to (H'W' spatial, T' temporal, the
    window size, the mean over head groups for hierarchical; shifted windows count whole
    windows, masked scores included), summed over the attention sub-layers;
  * text conditioning (model.conditioning='text'): each block's cross-attention has its
    query and output projections once per video token and its key and value projections
    once per caption token; the context projection and the built-in text encoder's
    layers run once per caption token; cross-attention scores cost 12 x L x D per video
    token per layer over the L caption slots (padding included: it is computed), the
    encoder's self-attention 12 x L x Dt per caption token per layer; with
    model.text.pooled, the pooled caption's two-layer MLP once per clip;
  * class tokens (model.class_tokens = K): the same cross-attention over K label tokens;
  * given frames (model.context_frames_max > 0) add the mask channel to the patch embedding;
  * the depthwise token convolution (model.mlp_conv) uses each of its kt kh kw D taps once
    per token, like a token-wise weight;
  * the pixel refiner (model.refiner_width = F > 0, kernel k taps) uses its k (C + Cin) F
    input and k F C output taps once per pixel, and its adaLN (2 F) once per clip;
  * the learned loss weighting (model.loss_uncertainty): its head's F weights once per clip;
  * self-conditioning (model.self_condition) adds the earlier estimate's C channels to the
    patch embedding, and its first, gradient-free forward pass on half the steps: a sixth
    of the step on average (a forward is a third of forward + backward);
  * synchronised audio (spec.audio, model/av_dit.py): a clip of T frames has
    Na = T x audio.mel_frames_per_frame / audio.patch audio tokens at the video's width.
    Each audio token uses the audio embedding (patch x mel_bins -> D), the audio final
    projection, and per layer its q/k/v/out projections and MLP (an audio DiTBlock in the
    'cross' design, the joint block's audio projections and audio MLP in 'joint'; no
    token convolution), and with class tokens its cross-attention's query and output;
    the audio stream's timestep MLP, adaLN and final adaLN run once per clip, its
    class-token key and value projections once per label token. Scores: 'cross' attends
    over the Na audio tokens in the audio blocks (12 x L x Na x D per audio token) and,
    per layer, both cross-attentions (video queries over audio keys and the reverse,
    12 x L x Na x D per video token and 12 x L x N x D per audio token), with their
    q/out projections on the querying stream's tokens and k/v on the other's (4 D^2
    per token of each stream per layer); 'joint' attends once over the N + Na tokens
    (12 x L x (N + Na) x D per token of either stream). `coupled=False` counts the pass
    where the streams do not meet (the modality guidance's): no cross-attention, each
    stream attending over its own tokens. A train step calls the model coupled; its
    'joint' blocks also compute the uncoupled attentions for the clips that modality
    dropout hides (a per-clip select), which is not counted, like remat recompute;
  * rematerialisation recompute is not counted (it is work, not model FLOPs), nor are
    element-wise ops, norms, softmax, the label-embedding gather or the optimizer.
"""

import dataclasses
from typing import Sequence

import numpy as np

from vdit_jax.model import attention_patterns
from vdit_jax.model import patching

# Forward + backward cost of one multiply-accumulate of a weight: 2 forward, 4 backward.
TRAIN_FLOPS_PER_MAC = 6
TIMESTEP_FREQ_DIM = 256  # embeddings.TimestepEmbedder.freq_dim


@dataclasses.dataclass(frozen=True)
class FlopCount:
  """FLOPs of one train step (forward + backward) over the whole global batch."""
  tokens_per_clip: int       # every token the model sees per clip: video + audio
  token_matmul_params: int   # weights applied once per (video) token
  clip_matmul_params: int    # weights applied once per clip (conditioning path)
  matmul: int                # 6 x (token params x tokens + clip params x clips
                             #      + context params x caption tokens
                             #      + audio token params x audio tokens
                             #      + pixel params x pixels)
  attention: int             # 12 x L x N x D per token (full attention), + text attention
                             # + the audio stream's (audio_attention)
  total: int
  context_matmul_params: int = 0  # text: weights applied once per caption token
  caption_tokens: int = 0         # text: L caption slots per clip
  pixel_matmul_params: int = 0    # model.refiner_width: weights applied once per pixel
  self_condition: int = 0         # model.self_condition: the first pass, per step on average
  video_tokens_per_clip: int = 0  # the video's tokens (T' H' W')
  audio_tokens_per_clip: int = 0  # spec.audio: Na audio tokens per clip (0 without audio)
  audio_token_matmul_params: int = 0  # spec.audio: weights applied once per audio token
  audio_attention: int = 0        # spec.audio: the part of `attention` the audio adds


def _check_shape(data_shape: Sequence[int], batch_size: int) -> None:
  if len(data_shape) != 4 or min(data_shape) <= 0:
    raise ValueError(f'data_shape={tuple(data_shape)} must be 4 positive ints (T, H, W, C).')
  if batch_size <= 0:
    raise ValueError(f'batch_size={batch_size} must be positive.')


def audio_tokens(spec, num_frames: int) -> int:
  """Audio tokens of a clip of `num_frames` video frames (0 when spec.audio is None)."""
  audio = getattr(spec, 'audio', None)
  if audio is None:
    return 0
  mel_frames = int(num_frames) * int(audio.mel_frames_per_frame)
  if mel_frames % int(audio.patch):
    raise ValueError(f'audio.patch={audio.patch} does not divide the {mel_frames} mel frames '
                     f'of {num_frames} video frames ({audio.mel_frames_per_frame} each).')
  return mel_frames // int(audio.patch)


def train_step_flops(spec, data_shape: Sequence[int], batch_size: int,
                     coupled: bool = True) -> FlopCount:
  """Model FLOPs of one train step on `batch_size` clips of shape (T, H, W, C).

  `spec` is a resolved `spec_lib.ModelSpec`; the counts follow VideoDiT's layers and, with
  spec.audio, AudioVideoDiT's (model/av_dit.py). `coupled` (audio only): False counts
  the model called with couple=False (the streams do not meet).
  """
  _check_shape(data_shape, batch_size)
  t, h, w, c = (int(x) for x in data_shape)
  patching.check_patch((t, h, w), spec.patch_size)
  d, f, depth = spec.width, spec.mlp_dim, spec.depth
  patch_dim = int(np.prod(spec.patch_size)) * c
  in_channels = c + (1 if spec.context_frames else 0)  # + the given-frames mask channel
  in_channels += c if spec.self_condition else 0  # + the earlier x0 estimate
  patch_dim_in = int(np.prod(spec.patch_size)) * in_channels
  grid = patching.token_grid((t, h, w), spec.patch_size)
  tokens = int(np.prod(grid))
  sublayers = attention_patterns.attention_sublayers(spec.pattern)  # 2: within_block

  per_block_token = 4 * d * d * sublayers + 2 * d * f  # q, k, v, out per sub-layer; fc1, fc2
  per_block_token += int(np.prod(spec.mlp_conv)) * d if spec.mlp_conv else 0  # depthwise taps
  token_params = patch_dim_in * d + depth * per_block_token + d * patch_dim  # embed, blocks, final
  clip_params = (TIMESTEP_FREQ_DIM * d + d * d   # timestep MLP
                 + depth * d * 6 * d             # adaLN (shift, scale, gate) x 2 per block
                 + depth * d * 3 * d * (sublayers - 1)  # adaLN of extra attention sub-layers
                 + d * 2 * d)                    # final adaLN (shift, scale)

  clips = int(batch_size)
  text = spec.text if spec.conditioning == 'text' else None
  # Context slots each block cross-attends to, per clip: the caption, or the label's tokens.
  caption_len = (int(text.max_length) if text is not None
                 else int(spec.class_tokens) if spec.conditioning == 'class' else 0)
  context_params, text_attention = 0, 0
  if caption_len:
    token_params += depth * 2 * d * d        # cross-attention query and output projections
    context_params = depth * 2 * d * d       # cross-attention key and value projections
    text_attention = 12 * depth * caption_len * d * tokens  # cross-attention scores, per clip
  if text is not None:
    if text.encoder == 'builtin':
      dt = int(text.width)
      context_params += dt * d + int(text.depth) * (4 * dt * dt + 2 * dt * int(text.mlp_dim))
      text_attention += 12 * int(text.depth) * caption_len * dt * caption_len  # per clip
    else:
      context_params += int(text.embed_dim) * d  # precomputed embeddings -> width
    if text.pooled:
      clip_params += 2 * d * d  # the pooled caption's MLP (model.text.pooled), once per clip

  if spec.loss_uncertainty:
    clip_params += TIMESTEP_FREQ_DIM  # the loss's log-variance head u(t), once per clip

  pixel_params = 0
  if spec.refiner_width:  # the pixel refiner: weights used once per pixel, adaLN per clip
    taps, fw = int(np.prod(spec.refiner_kernel)), int(spec.refiner_width)
    pixel_params = taps * fw * (c + in_channels) + taps * fw * c
    clip_params += d * 2 * fw
  audio = _audio_counts(spec, t, tokens, caption_len, coupled)
  token_params += audio.video_token_params
  clip_params += audio.clip_params
  context_params += audio.context_params
  matmul = TRAIN_FLOPS_PER_MAC * (token_params * tokens * clips + clip_params * clips
                                  + context_params * caption_len * clips
                                  + audio.token_params * audio.tokens * clips
                                  + pixel_params * t * h * w * clips)
  attention = (12 * attention_patterns.score_macs_per_token(spec.pattern, grid, depth, d)
               * tokens * clips + text_attention * clips + audio.attention * clips)
  # Self-conditioning's first pass: a forward (a third of the step) on half the steps.
  self_condition = (matmul + attention) // 6 if spec.self_condition else 0
  return FlopCount(tokens_per_clip=tokens + audio.tokens, token_matmul_params=token_params,
                   clip_matmul_params=clip_params, matmul=matmul, attention=attention,
                   total=matmul + attention + self_condition,
                   context_matmul_params=context_params, caption_tokens=caption_len,
                   pixel_matmul_params=pixel_params, self_condition=self_condition,
                   video_tokens_per_clip=tokens, audio_tokens_per_clip=audio.tokens,
                   audio_token_matmul_params=audio.token_params,
                   audio_attention=audio.attention * clips)


@dataclasses.dataclass(frozen=True)
class _AudioCounts:
  """What the audio stream adds to a count, per clip (all 0 without spec.audio)."""
  tokens: int = 0             # Na
  token_params: int = 0       # weights used once per audio token
  video_token_params: int = 0  # 'cross': the cross-attentions' weights used per video token
  clip_params: int = 0        # the audio stream's conditioning path, once per clip
  context_params: int = 0     # its class-token key/value projections, once per label token
  attention: int = 0          # forward + backward score FLOPs per clip (12 per MAC)


def _audio_counts(spec, num_frames: int, video_tokens: int, context_len: int,
                  coupled: bool) -> _AudioCounts:
  """The audio stream's share of AudioVideoDiT's FLOPs (see the module doc)."""
  if getattr(spec, 'audio', None) is None:
    return _AudioCounts()
  audio = spec.audio
  d, f, depth = spec.width, spec.mlp_dim, spec.depth
  n, na = video_tokens, audio_tokens(spec, num_frames)
  values = int(audio.patch) * int(audio.mel_bins)  # one audio token's features
  per_layer = 4 * d * d + 2 * d * f  # q, k, v, out; fc1, fc2 (an audio block / joint side)
  per_layer += 2 * d * d if context_len else 0  # the class tokens' query and output
  video_per_layer = 0
  cross = audio.design == 'cross' and coupled
  if cross:
    # video_from_audio: q, out on video tokens, k, v on audio tokens; audio_from_video
    # the reverse: 4 D^2 on each stream's tokens.
    per_layer += 4 * d * d
    video_per_layer = 4 * d * d
  clip_params = (TIMESTEP_FREQ_DIM * d + d * d  # the audio timestep MLP
                 + depth * d * 6 * d            # the audio adaLN per layer
                 + d * 2 * d)                   # the audio final adaLN
  if spec.loss_uncertainty:
    clip_params += TIMESTEP_FREQ_DIM  # the audio stream's u(t_audio)
  # Score MACs per clip and layer beyond the video's own N x N (q.k^T; A.V the same).
  if not coupled:
    pairs = na * na                      # each stream over its own tokens
  elif cross:
    pairs = na * na + 2 * n * na         # audio self-attention; both cross-attentions
  else:
    pairs = (n + na) ** 2 - n * n        # one attention over the N + Na tokens
  pairs += context_len * na              # the audio tokens' class-token cross-attention
  return _AudioCounts(tokens=na, token_params=values * d + depth * per_layer + d * values,
                      video_token_params=depth * video_per_layer, clip_params=clip_params,
                      context_params=depth * 2 * d * d if context_len else 0,
                      attention=12 * depth * d * pairs)
