"""The video diffusion transformer: tubelets -> DiT blocks -> tubelets."""

import functools

import flax.linen as nn
from absl import logging
import jax.numpy as jnp

from vdit_jax.model import attention_patterns
from vdit_jax.parallel import axes
from vdit_jax.model import embeddings
from vdit_jax.model import patching
from vdit_jax.model import spec as spec_lib
from vdit_jax.model import text as text_lib
from vdit_jax.model import blocks as blocks_lib
from vdit_jax.model.blocks import BlockCycle, DiTBlock, FinalLayer, PixelRefiner

LOSS_LOG_VARIANCE = 'loss_log_variance'  # the sown u(t) [B] (model.loss_uncertainty)


class VideoDiT(nn.Module):
  """Diffusion transformer over spacetime patches.

  __call__(video [B, T, H, W, C], t [B] float timesteps (0..1000 scale),
  labels [B] int in [0, num_classes], num_classes being the null label)
  -> prediction [B, T, H, W, C].

  spec.conditioning='text': `text` ({'tokens' | 'embed', 'mask'}, see model/text.py;
  None = no caption) feeds a cross-attention sub-layer in every block, and labels are
  ignored. spec.context_frames > 0: `frame_mask` bool [B, T] (None = none given) marks
  the given frames, which `video` holds clean; it enters as one more input channel
  (C + 1), the output keeps C (diffusion/conditioning.py). spec.self_condition: `x0_prev`
  [B, T, H, W, C] (None = zeros), the model's own earlier x0 estimate of this clip (Chen
  et al. 2022, self-conditioning), enters as C more input channels.

  Block parameters: 'blocks' stacked over depth (scan_layers) or 'blocks_{i}'.
  Attention patterns whose even and odd blocks differ (spec.pattern.period 2:
  alternating factorised, shifted windows) scan as 'blocks/block_0' and
  'blocks/block_1', each stacked over depth / 2 (model/attention_patterns.py).
  """
  spec: spec_lib.ModelSpec
  channels: int
  num_classes: int

  @nn.compact
  def __call__(self, video, t, labels=None, text=None, frame_mask=None, x0_prev=None,
               cond=None, image=None):
    spec = self.spec
    dtype, param_dtype = spec_lib.DTYPES[spec.dtype], spec_lib.DTYPES[spec.param_dtype]
    if spec.self_condition:  # the earlier x0 estimate: C more channels (zeros: none yet)
      if x0_prev is None:
        x0_prev = jnp.zeros(video.shape, video.dtype)
      if x0_prev.shape != video.shape:
        raise ValueError(f'x0_prev {x0_prev.shape} must have the shape of video {video.shape}.')
      video = jnp.concatenate([video, x0_prev.astype(video.dtype)], axis=-1)  # [B, T, H, W, 2C]
    elif x0_prev is not None:
      raise ValueError('x0_prev is given but model.self_condition is False.')
    if spec.context_frames > 0:  # given frames: one more channel, 1 on the given frames
      if frame_mask is None:
        frame_mask = jnp.zeros(video.shape[:2], bool)
      if frame_mask.shape != video.shape[:2]:
        raise ValueError(f'frame_mask {frame_mask.shape} must be [B, T]={video.shape[:2]}.')
      mask = jnp.broadcast_to(frame_mask[:, :, None, None, None].astype(video.dtype),
                              video.shape[:4] + (1,))  # [B, T, H, W, 1]
      video = jnp.concatenate([video, mask], axis=-1)  # [B, T, H, W, C + 1]
    if spec.condition_channels:  # Wan I2V: the first-frame latents and their mask
      if cond is None:
        cond = jnp.zeros(video.shape[:4] + (spec.condition_channels,), video.dtype)
      if cond.shape != video.shape[:4] + (spec.condition_channels,):
        raise ValueError(f'cond {cond.shape} must be [B, T, H, W, model.condition_channels='
                         f'{spec.condition_channels}] beside video {video.shape}.')
      video = jnp.concatenate([video, cond.astype(video.dtype)], axis=-1)
    elif cond is not None:
      raise ValueError('cond is given but model.condition_channels is 0.')
    grid = patching.token_grid(video.shape[1:4], spec.patch_size)  # (T', H', W')
    attention_patterns.check_grid(spec.pattern, grid)
    x = patching.PatchEmbed(spec.width, spec.patch_size, dtype, param_dtype,
                            name='patch_embed')(video.astype(dtype))  # [B, N, D]
    rope = None
    if spec.pos_embed == 'sincos':
      x = x + embeddings.sincos_3d(grid, spec.width).astype(dtype)[None]
    else:
      rope = embeddings.rope_3d(grid, spec.width // spec.num_heads,
                                style=spec.rope_style)  # 2 x [N, Dh/2]
    x = nn.with_logical_constraint(x, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED))

    c = embeddings.TimestepEmbedder(spec.width, dtype=dtype, param_dtype=param_dtype,
                                    name='t_embed')(t)  # [B, D]
    if spec.loss_uncertainty:  # read by the loss only (apply with mutable=['intermediates'])
      self.sow('intermediates', LOSS_LOG_VARIANCE,
               embeddings.LossLogVariance(param_dtype=param_dtype, name='loss_logvar')(t))
    if image is not None and not spec.image_embed_dim:
      raise ValueError('image tokens are given but model.image_embed_dim is 0.')
    context = None
    if spec.conditioning == 'text':  # (context [B, L, D], mask [B, L]) for cross-attention
      context = text_lib.TextConditioner(spec.text, spec.width, dtype, param_dtype,
                                         name='text')(text, video.shape[0])
      if spec.text.pooled:  # the caption also drives adaLN, next to the timestep
        c = c + text_lib.PooledText(spec.width, dtype, param_dtype, name='text_pool')(*context)
      if spec.image_embed_dim:  # Wan I2V: image tokens beside the caption's
        if image is None:  # no image: one all-zero image token (init, text-only calls)
          image = jnp.zeros((video.shape[0], 1, spec.image_embed_dim), dtype)
        if image.ndim != 3 or image.shape[-1] != spec.image_embed_dim:
          raise ValueError(f'model.image_embed_dim={spec.image_embed_dim} needs image tokens '
                           f'[B, Li, {spec.image_embed_dim}], got '
                           f'{None if image is None else image.shape}.')
        context = context + (text_lib.ImageEmbedder(spec.width, dtype, param_dtype,
                                                    name='image_embed')(image),)
    elif self.num_classes > 0:
      if labels is None:
        labels = jnp.full((video.shape[0],), self.num_classes, jnp.int32)
      c = c + embeddings.LabelEmbedder(self.num_classes, spec.width, dtype, param_dtype,
                                       name='y_embed')(labels)  # [B, D]
      if spec.class_tokens:  # the class also as tokens that every block cross-attends to
        context = embeddings.LabelTokens(self.num_classes, spec.class_tokens, spec.width,
                                         dtype, param_dtype, name='y_tokens')(labels)

    block = DiTBlock
    if spec.remat_policy != 'none':
      block = nn.remat(DiTBlock, policy=spec_lib.remat_policy(spec), prevent_cse=not spec.scan_layers)
    kwargs = dict(num_heads=spec.num_heads, mlp_dim=spec.mlp_dim, qk_norm=spec.qk_norm,
                  attention_impl=spec_lib.attention_impl(spec).key(), dtype=dtype,
                  param_dtype=param_dtype, sequence_parallel=spec.sequence_parallel,
                  pattern=spec.pattern, grid=grid, mlp_conv=spec.mlp_conv,
                  modulation=spec.modulation, qk_norm_across_heads=spec.qk_norm_across_heads,
                  rope_pairs=spec.rope_style == 'wan',
                  cross_norm_affine=spec.cross_attn_norm_affine)
    block_c = c  # [B, D]
    if spec.modulation == 'shared':  # one projection for every block: [B, 6, D]
      block_c = jnp.stack(blocks_lib.AdaLN(spec.width, 6, dtype, param_dtype,
                                           name='adaln')(c), axis=1)
    if spec.scan_layers:
      period = spec.pattern.period  # 2: even and odd blocks differ; scan pairs of blocks
      body, body_kwargs = block, kwargs
      if period > 1:
        body = BlockCycle
        body_kwargs = dict(make_block=functools.partial(block, **kwargs), period=period)
      blocks = nn.scan(
          body, variable_axes={'params': 0}, split_rngs={'params': True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=spec.depth // period,
          metadata_params={nn.PARTITION_NAME: axes.LAYERS})(**body_kwargs, name='blocks')
      x, _ = blocks(x, block_c, rope, context)
    else:
      for i in range(spec.depth):
        x, _ = block(**kwargs, layer=i, name=f'blocks_{i}')(x, block_c, rope, context)

    x = FinalLayer(spec.patch_size[0] * spec.patch_size[1] * spec.patch_size[2] * self.channels,
                   dtype, param_dtype, spec.modulation, name='final')(x, c)  # [B, N, P]
    out = patching.unpatchify(x, grid, spec.patch_size, self.channels)
    if spec.refiner_width:  # pixel-resolution residual path that also sees the input
      out = PixelRefiner(spec.refiner_width, spec.refiner_kernel, dtype, param_dtype,
                         name='refiner')(out, video, c)
    return out.astype(jnp.float32)  # [B, T, H, W, C]


def build_model(spec: spec_lib.ModelSpec, channels: int, num_classes: int) -> VideoDiT:
  """The DiT of `spec` (checked here) for `channels`-channel clips and `num_classes` labels."""
  spec_lib.check_spec(spec)
  patch_dim = spec.patch_size[0] * spec.patch_size[1] * spec.patch_size[2] * channels
  if spec.width < patch_dim:
    # Measured on the tiny config: width 128 with 4x4x4x3 = 192-value tubelets
    # plateaued at eps-MSE ~0.37 for every t (the missing 1/3 of the noise).
    logging.warning(
        'model.width=%d is smaller than the tubelet size pt*ph*pw*C=%d: the model cannot '
        'carry the whole noise through, and eps / v / flow losses plateau.', spec.width,
        patch_dim)
  return VideoDiT(spec=spec, channels=channels, num_classes=num_classes)
