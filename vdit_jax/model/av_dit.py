"""The audio-video DiT: one model over a clip's frames and its soundtrack (issue 30).

A clip [B, T, H, W, C] becomes video tokens as in VideoDiT; its log-mel frames [B, F, M]
(data/audio.py) become audio tokens, `audio.patch` mel frames each (patching.AudioEmbed).
Both streams share one time axis: RoPE positions are in units of video tokens, and an audio
token centred on the instant of a video token gets that token's time coordinate
(embeddings.audio_positions), so the same instant has the same time phase in both.

Each stream has its own timestep (t for the video, t_audio for the audio): one model
samples both from noise (joint), audio for a clean video (t = 0: video-to-audio) or video
for a clean soundtrack (t_audio = 0: audio-to-video). The class label drives both streams'
adaLN and, with model.class_tokens, both cross-attend to its tokens; a text model's
caption (model.conditioning='text') is cross-attended by both streams.

spec.audio.design picks how the streams meet, at every layer:
- 'cross' (LTX-2, Ovi): a video block and an audio block (each a DiTBlock of its own), then
  cross-attention in both directions (`AVCrossAttention`: video queries read audio keys and
  the reverse, RoPE on both sides), output projections zero-initialised.
- 'joint' (MM-DiT, SD3): `JointBlock`: per-stream adaLN, q/k/v projections, QK-norms,
  output projections and MLPs; one attention over the video and audio tokens together.

`couple` turns the meeting off per clip (modality dropout in training; the uncoupled pass
of the modality guidance when sampling, diffusion/av.py): where it is 0 a stream sees only
itself. With no audio at all (audio=None) the model is the video model: its video path has
VideoDiT's parameter names and computes VideoDiT's function with model.scan_layers=False
(tests/av_dit_test.py), so a video-only checkpoint's params start its video half.

Layers are unrolled (validate.py asks for model.scan_layers=False): the two streams'
blocks differ per layer in what they read, and the depth of the models this serves keeps
the compile short.
"""

from typing import Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from vdit_jax.model import attention
from vdit_jax.model import blocks as blocks_lib
from vdit_jax.model import dit
from vdit_jax.model import embeddings
from vdit_jax.model import patching
from vdit_jax.model import spec as spec_lib
from vdit_jax.model import text as text_lib
from vdit_jax.parallel import axes

AUDIO_LOSS_LOG_VARIANCE = 'audio_loss_log_variance'  # the audio stream's sown u(t_a) [B]
_QKV = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_HEADS, axes.ACT_KV)


def _norm(dtype):
  return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype)


def _gate(couple, branch):
  """branch [B, N, D] kept where couple [B] is 1 (None / True: everywhere)."""
  if couple is None or couple is True:
    return branch
  if couple is False:
    return jnp.zeros_like(branch)
  return branch * jnp.asarray(couple, branch.dtype)[:, None, None]


class Projections(nn.Module):
  """The q/k/v and output projections of one stream, with blocks.Attention's parameter
  names (query_kernel [D, K, Dh], ..., q_norm, k_norm, out_kernel [K, Dh, D]), so that a
  JointBlock's video side holds a DiTBlock's 'attn' params.

  mode 'qkv': x [B, N, D] (rope: tables at its positions) -> q, k, v [B, N, K, Dh];
  mode 'out': x [B, N, K, Dh] (attention output) -> [B, N, D]."""
  num_heads: int
  qk_norm: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  qk_norm_across_heads: bool = False
  rope_pairs: bool = False

  @nn.compact
  def __call__(self, x, rope=None, mode: str = 'qkv'):
    if mode == 'out':
      k_, dh = x.shape[-2:]
      kernel = self.param('out_kernel', nn.with_logical_partitioning(
          nn.initializers.xavier_uniform(in_axis=(-3, -2), out_axis=-1),
          (axes.HEADS, axes.HEAD_DIM, axes.EMBED)), (k_, dh, k_ * dh), self.param_dtype)
      bias = self.param('out_bias', nn.with_logical_partitioning(
          nn.initializers.zeros, (axes.EMBED,)), (k_ * dh,), self.param_dtype)
      return (jnp.einsum('bnkh,khd->bnd', x, kernel.astype(self.dtype))
              + bias.astype(self.dtype))  # [B, N, D]
    width = x.shape[-1]
    head_dim = width // self.num_heads
    kernel_in = nn.initializers.xavier_uniform(in_axis=-3, out_axis=(-2, -1))

    def proj(name):
      kernel = self.param(name + '_kernel', nn.with_logical_partitioning(
          kernel_in, (axes.EMBED, axes.HEADS, axes.HEAD_DIM)),
          (width, self.num_heads, head_dim), self.param_dtype)
      bias = self.param(name + '_bias', nn.with_logical_partitioning(
          nn.initializers.zeros, (axes.HEADS, axes.HEAD_DIM)),
          (self.num_heads, head_dim), self.param_dtype)
      return (jnp.einsum('bnd,dkh->bnkh', x.astype(self.dtype), kernel.astype(self.dtype))
              + bias.astype(self.dtype))  # [B, N, K, Dh]

    q, k, v = proj('query'), proj('key'), proj('value')
    if self.qk_norm:
      q = attention.qk_norm_layer(self.qk_norm_across_heads, self.param_dtype, 'q_norm')(q)
      k = attention.qk_norm_layer(self.qk_norm_across_heads, self.param_dtype, 'k_norm')(k)
    if rope is not None:
      q = embeddings.apply_rope(q, *rope, pairs=self.rope_pairs)
      k = embeddings.apply_rope(k, *rope, pairs=self.rope_pairs)
    return tuple(nn.with_logical_constraint(a, _QKV) for a in (q, k, v))


class AVCrossAttention(nn.Module):
  """One direction of the 'cross' design: x [B, N, D] reads context [B, M, D] (the other
  stream). Pre-norm without modulation, QK-norm, RoPE on the queries at x's positions and
  on the keys at the context's (one time axis: a query attends most where the instants
  agree), output projection zero-initialised (identity at init). Returns the branch."""
  num_heads: int
  qk_norm: bool = True
  attention_impl: str = 'xla'
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  rope_pairs: bool = False

  @nn.compact
  def __call__(self, x, context, rope_x, rope_context):
    width = x.shape[-1]
    head_dim = width // self.num_heads
    h, c = _norm(self.dtype)(x), _norm(self.dtype)(context)
    kernel_in = nn.initializers.xavier_uniform(in_axis=-3, out_axis=(-2, -1))

    def proj(name, inputs):
      kernel = self.param(name + '_kernel', nn.with_logical_partitioning(
          kernel_in, (axes.EMBED, axes.HEADS, axes.HEAD_DIM)),
          (width, self.num_heads, head_dim), self.param_dtype)
      return jnp.einsum('bnd,dkh->bnkh', inputs.astype(self.dtype),
                        kernel.astype(self.dtype))  # [B, N, K, Dh]

    q, k, v = proj('query', h), proj('key', c), proj('value', c)
    if self.qk_norm:
      q = attention.RMSNorm(param_dtype=self.param_dtype, name='q_norm')(q)
      k = attention.RMSNorm(param_dtype=self.param_dtype, name='k_norm')(k)
    q = embeddings.apply_rope(q, *rope_x, pairs=self.rope_pairs)
    k = embeddings.apply_rope(k, *rope_context, pairs=self.rope_pairs)
    q = nn.with_logical_constraint(q, _QKV)
    # The other stream's keys whole on every device (GSPMD gathers them when the
    # sequence is split): the short side of a cross-attention.
    kv_names = (axes.ACT_BATCH, None, axes.ACT_HEADS, axes.ACT_KV)
    k = nn.with_logical_constraint(k, kv_names)
    v = nn.with_logical_constraint(v, kv_names)
    out = attention.dot_product_attention(q, k, v, self.attention_impl)  # [B, N, K, Dh]
    kernel = self.param('out_kernel', nn.with_logical_partitioning(
        nn.initializers.zeros, (axes.HEADS, axes.HEAD_DIM, axes.EMBED)),
        (self.num_heads, head_dim, width), self.param_dtype)
    return jnp.einsum('bnkh,khd->bnd', out, kernel.astype(self.dtype))  # [B, N, D]


class AVCross(nn.Module):
  """Both directions of one 'cross' layer, from the streams as they enter it."""
  num_heads: int
  qk_norm: bool = True
  attention_impl: str = 'xla'
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  rope_pairs: bool = False

  @nn.compact
  def __call__(self, x, a, rope, rope_a, couple=None):
    kw = dict(num_heads=self.num_heads, qk_norm=self.qk_norm,
              attention_impl=self.attention_impl, dtype=self.dtype,
              param_dtype=self.param_dtype, rope_pairs=self.rope_pairs)
    to_video = AVCrossAttention(**kw, name='video_from_audio')(x, a, rope, rope_a)
    to_audio = AVCrossAttention(**kw, name='audio_from_video')(a, x, rope_a, rope)
    return x + _gate(couple, to_video), a + _gate(couple, to_audio)


class JointBlock(nn.Module):
  """The 'joint' design's layer (MM-DiT): each stream modulates, projects and QK-norms
  its own tokens; one attention runs over [video tokens; audio tokens]; each stream
  projects its share back, then reads the class tokens (with context) and runs its own
  MLP. The video side has DiTBlock's parameter names ('adaln', 'attn', 'cross_attn',
  'mlp'), the audio side the same with 'audio_' in front. With a=None it is DiTBlock.

  couple: None / True (the streams attend to each other), False (each only to itself),
  or a float [B] of 0 / 1 per clip (both computed, each clip takes its own)."""
  num_heads: int
  mlp_dim: int
  qk_norm: bool = True
  attention_impl: str = 'xla'
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  sequence_parallel: str = 'none'
  grid: Optional[Tuple[int, int, int]] = None
  mlp_conv: Tuple[int, ...] = ()
  qk_norm_across_heads: bool = False
  rope_pairs: bool = False

  @nn.compact
  def __call__(self, x, a, c, c_a, rope, rope_a, context=None, couple=None):
    x = nn.with_logical_constraint(x, blocks_lib.TOKENS)
    width = x.shape[-1]
    proj_kw = dict(num_heads=self.num_heads, qk_norm=self.qk_norm, dtype=self.dtype,
                   param_dtype=self.param_dtype, qk_norm_across_heads=self.qk_norm_across_heads,
                   rope_pairs=self.rope_pairs)
    attend = lambda q, k, v: nn.with_logical_constraint(attention.dot_product_attention(
        q, k, v, self.attention_impl, self.sequence_parallel), _QKV)
    mods = blocks_lib.AdaLN(width, 6, self.dtype, self.param_dtype, name='adaln')(c)
    shift1, scale1, gate1, shift2, scale2, gate2 = mods
    h = checkpoint_name(blocks_lib.modulate(_norm(self.dtype)(x), shift1, scale1), 'attn_in')
    proj_v = Projections(**proj_kw, name='attn')
    qv, kv, vv = proj_v(h, rope)
    if a is None:
      out_v, out_a = attend(qv, kv, vv), None
    else:
      a = nn.with_logical_constraint(a, blocks_lib.TOKENS)
      mods_a = blocks_lib.AdaLN(width, 6, self.dtype, self.param_dtype, name='audio_adaln')(c_a)
      shift1a, scale1a, gate1a, shift2a, scale2a, gate2a = mods_a
      h_a = blocks_lib.modulate(_norm(self.dtype)(a), shift1a, scale1a)
      proj_a = Projections(**proj_kw, name='audio_attn')
      qa, ka, va = proj_a(h_a, rope_a)
      n = x.shape[1]
      if couple is not False:
        joint = attend(*(jnp.concatenate(p, axis=1) for p in ((qv, qa), (kv, ka), (vv, va))))
        out_v, out_a = joint[:, :n], joint[:, n:]  # [B, N, K, Dh], [B, Na, K, Dh]
      if couple is False or (couple is not None and couple is not True):
        sep_v, sep_a = attend(qv, kv, vv), attend(qa, ka, va)
        if couple is False:
          out_v, out_a = sep_v, sep_a
        else:
          keep = jnp.asarray(couple, jnp.float32)[:, None, None, None] > 0
          out_v, out_a = jnp.where(keep, out_v, sep_v), jnp.where(keep, out_a, sep_a)
    x = x + gate1[:, None, :] * checkpoint_name(proj_v(out_v, mode='out'), 'attn_out')
    if context is not None:
      x = x + text_lib.CrossAttention(self.num_heads, self.qk_norm, self.dtype,
                                          self.param_dtype, self.qk_norm_across_heads,
                                          name='cross_attn')(x, *context)
    h = checkpoint_name(blocks_lib.modulate(_norm(self.dtype)(x), shift2, scale2), 'mlp_in')
    h = blocks_lib.Mlp(self.mlp_dim, self.dtype, self.param_dtype, self.mlp_conv, self.grid,
                       name='mlp')(h)
    x = nn.with_logical_constraint(x + gate2[:, None, :] * checkpoint_name(h, 'mlp_out'),
                                   blocks_lib.TOKENS)
    if a is None:
      return x, None
    a = a + gate1a[:, None, :] * proj_a(out_a, mode='out')
    if context is not None:
      a = a + text_lib.CrossAttention(self.num_heads, self.qk_norm, self.dtype,
                                          self.param_dtype, self.qk_norm_across_heads,
                                          name='audio_cross_attn')(a, *context)
    h_a = blocks_lib.modulate(_norm(self.dtype)(a), shift2a, scale2a)
    h_a = blocks_lib.Mlp(self.mlp_dim, self.dtype, self.param_dtype, name='audio_mlp')(h_a)
    return x, nn.with_logical_constraint(a + gate2a[:, None, :] * h_a, blocks_lib.TOKENS)


class AudioVideoDiT(nn.Module):
  """Diffusion transformer over a clip's video and audio tokens (see the module doc).

  __call__(video [B, T, H, W, C], t [B] (0..1000 scale), labels [B] int in
  [0, num_classes] (num_classes: the null label), audio [B, F, M] log-mel features or
  None, t_audio [B] (None: t), couple (None | bool | float [B]), text (model.conditioning
  ='text': {'tokens' | 'embed', 'mask'} as VideoDiT takes it; None = no caption))
  -> prediction [B, T, H, W, C] when audio is None, else (video prediction, audio
  prediction [B, F, M]).
  """
  spec: spec_lib.ModelSpec
  channels: int
  num_classes: int

  @nn.compact
  def __call__(self, video, t, labels=None, audio=None, t_audio=None, couple=None, text=None):
    spec = self.spec
    audio_spec = spec.audio
    dtype, param_dtype = spec_lib.DTYPES[spec.dtype], spec_lib.DTYPES[spec.param_dtype]
    b = video.shape[0]
    grid = patching.token_grid(video.shape[1:4], spec.patch_size)  # (T', H', W')
    head_dim = spec.width // spec.num_heads
    x = patching.PatchEmbed(spec.width, spec.patch_size, dtype, param_dtype,
                            name='patch_embed')(video.astype(dtype))  # [B, N, D]
    rope = embeddings.rope_3d(grid, head_dim, style=spec.rope_style)  # 2 x [N, Dh/2]
    x = nn.with_logical_constraint(x, blocks_lib.TOKENS)
    c = embeddings.TimestepEmbedder(spec.width, dtype=dtype, param_dtype=param_dtype,
                                    name='t_embed')(t)  # [B, D]
    if spec.loss_uncertainty:
      self.sow('intermediates', dit.LOSS_LOG_VARIANCE,
               embeddings.LossLogVariance(param_dtype=param_dtype, name='loss_logvar')(t))
    y = None
    context = None
    if spec.conditioning == 'text':  # captions: both streams cross-attend to them
      context = text_lib.TextConditioner(spec.text, spec.width, dtype, param_dtype,
                                         name='text')(text, b)  # ([B, L, D], [B, L])
      if spec.text.pooled:
        y = text_lib.PooledText(spec.width, dtype, param_dtype, name='text_pool')(*context)
        c = c + y
    elif self.num_classes > 0:
      if labels is None:
        labels = jnp.full((b,), self.num_classes, jnp.int32)
      y = embeddings.LabelEmbedder(self.num_classes, spec.width, dtype, param_dtype,
                                   name='y_embed')(labels)  # [B, D]
      c = c + y
      if spec.class_tokens:
        context = embeddings.LabelTokens(self.num_classes, spec.class_tokens, spec.width,
                                         dtype, param_dtype, name='y_tokens')(labels)

    a = c_a = rope_a = None
    if audio is not None:
      if audio.ndim != 3 or audio.shape[0] != b or audio.shape[-1] != audio_spec.mel_bins:
        raise ValueError(f'audio must be log-mel features [B={b}, F, audio.mel_bins='
                         f'{audio_spec.mel_bins}], got {audio.shape}.')
      frames = video.shape[1] * audio_spec.mel_frames_per_frame
      if audio.shape[1] != frames:
        raise ValueError(f'audio has {audio.shape[1]} mel frames; {video.shape[1]} video frames '
                         f'at {audio_spec.mel_frames_per_frame} mel frames each need {frames}.')
      a = patching.AudioEmbed(spec.width, audio_spec.patch, dtype, param_dtype,
                              name='audio_embed')(audio.astype(dtype))  # [B, Na, D]
      a = nn.with_logical_constraint(a, blocks_lib.TOKENS)
      positions = embeddings.audio_positions(a.shape[1], grid, audio_spec.patch,
                                             audio_spec.mel_frames_per_frame,
                                             spec.patch_size[0])  # [Na, 3]
      rope_a = embeddings.rope_at(positions, head_dim, style=spec.rope_style)
      t_audio = t if t_audio is None else t_audio
      c_a = embeddings.TimestepEmbedder(spec.width, dtype=dtype, param_dtype=param_dtype,
                                        name='audio_t_embed')(t_audio)  # [B, D]
      if y is not None:
        c_a = c_a + y
      if spec.loss_uncertainty:
        self.sow('intermediates', AUDIO_LOSS_LOG_VARIANCE,
                 embeddings.LossLogVariance(param_dtype=param_dtype,
                                            name='audio_loss_logvar')(t_audio))

    impl = spec_lib.attention_impl(spec).key()
    policy = spec_lib.remat_policy(spec) if spec.remat_policy != 'none' else None
    maybe_remat = (lambda cls: nn.remat(cls, policy=policy)) if policy is not None else (
        lambda cls: cls)
    block_kw = dict(num_heads=spec.num_heads, mlp_dim=spec.mlp_dim, qk_norm=spec.qk_norm,
                    attention_impl=impl, dtype=dtype, param_dtype=param_dtype,
                    sequence_parallel=spec.sequence_parallel,
                    qk_norm_across_heads=spec.qk_norm_across_heads,
                    rope_pairs=spec.rope_style == 'wan')
    for i in range(spec.depth):
      if audio_spec.design == 'joint':
        x, a_new = maybe_remat(JointBlock)(**block_kw, grid=grid, mlp_conv=spec.mlp_conv,
                                           name=f'blocks_{i}')(x, a, c, c_a, rope, rope_a,
                                                               context, couple)
        a = a_new if a is not None else None
        continue
      x, _ = maybe_remat(blocks_lib.DiTBlock)(**block_kw, grid=grid, mlp_conv=spec.mlp_conv,
                                              name=f'blocks_{i}')(x, c, rope, context)
      if a is None:
        continue
      a, _ = maybe_remat(blocks_lib.DiTBlock)(**block_kw, grid=(a.shape[1], 1, 1),
                                              name=f'audio_blocks_{i}')(a, c_a, rope_a, context)
      if couple is False:  # the uncoupled pass: the streams do not meet
        continue
      x, a = AVCross(spec.num_heads, spec.qk_norm, impl, dtype, param_dtype,
                     spec.rope_style == 'wan', name=f'av_cross_{i}')(x, a, rope, rope_a, couple)

    x = blocks_lib.FinalLayer(
        spec.patch_size[0] * spec.patch_size[1] * spec.patch_size[2] * self.channels,
        dtype, param_dtype, name='final')(x, c)  # [B, N, P]
    out = patching.unpatchify(x, grid, spec.patch_size, self.channels).astype(jnp.float32)
    if a is None:
      return out  # [B, T, H, W, C]
    a = blocks_lib.FinalLayer(audio_spec.patch * audio_spec.mel_bins, dtype, param_dtype,
                              name='audio_final')(a, c_a)  # [B, Na, pa M]
    audio_out = patching.audio_unpatchify(a, audio_spec.patch, audio_spec.mel_bins)
    return out, audio_out.astype(jnp.float32)  # [B, T, H, W, C], [B, F, M]


def build_model(spec: spec_lib.ModelSpec, channels: int, num_classes: int) -> AudioVideoDiT:
  """The audio-video DiT of `spec` (spec.audio set; checked here)."""
  spec_lib.check_spec(spec)
  if spec.audio is None:
    raise ValueError('av_dit.build_model needs spec.audio (config.audio.enabled=True).')
  return AudioVideoDiT(spec=spec, channels=channels, num_classes=num_classes)
