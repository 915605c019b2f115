"""The model's spec: every hyper-parameter the DiT and its blocks read, frozen.

`from_config(config.model)` builds it from a complete model section (config/resolve.py
fills the defaults; nothing here has defaults of its own); `check_spec` names the first
field that breaks a rule. `dit.build_model(spec, ...)` and the blocks read only the spec.
"""

import dataclasses
import re
from typing import Optional, Tuple

import jax
import jax.numpy as jnp


from vdit_jax.model import attention
from vdit_jax.model import attention_patterns
from vdit_jax.model import embeddings
from vdit_jax.model import text as text_lib
from vdit_jax.model.blocks import CHECKPOINT_NAMES, MODULATIONS

# name -> (width, depth, heads); MLP is 4 x width. DiT's table plus two small ones.
VARIANTS = {
    'Mu': (128, 4, 4),
    'Ti': (192, 12, 3),
    'S': (384, 12, 6),
    'B': (768, 12, 12),
    'L': (1024, 24, 16),
    'XL': (1152, 28, 16),
}

REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'nothing_saveable': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'dots_with_no_batch_dims_saveable':
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'everything_saveable': jax.checkpoint_policies.everything_saveable,
}
# Keeps only the block activations named in model.remat_names (blocks.CHECKPOINT_NAMES)
# and recomputes the rest in the backward pass.
SAVE_NAMED = 'save_named'
REMAT_POLICY_NAMES = tuple(REMAT_POLICIES) + (SAVE_NAMED,)
POS_EMBEDS = ('sincos', 'rope')
CONDITIONINGS = ('class', 'text')  # model.conditioning
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def parse_variant(variant: str) -> dict:
  """'S/2' -> S sizes with patch (1, 2, 2); 'S/2x4x4' -> patch (2, 4, 4)."""
  m = re.fullmatch(r'([A-Za-z]+)/(\d+)(?:x(\d+)x(\d+))?', variant or '')
  if not m or m.group(1) not in VARIANTS:
    raise ValueError(
        f"model.variant={variant!r} is not NAME/P or NAME/PTxPHxPW with NAME one of "
        f"{sorted(VARIANTS)} (e.g. 'S/2', 'B/2x4x4').")
  width, depth, heads = VARIANTS[m.group(1)]
  if m.group(3):
    patch = (int(m.group(2)), int(m.group(3)), int(m.group(4)))
  else:
    patch = (1, int(m.group(2)), int(m.group(2)))
  return dict(width=width, depth=depth, num_heads=heads, mlp_dim=4 * width, patch_size=patch)


AUDIO_DESIGNS = ('cross', 'joint')  # audio.design (model/av_dit.py)


@dataclasses.dataclass(frozen=True)
class AudioModelSpec:
  """The audio stream of model/av_dit.py (config.audio, resolved).

  design: 'cross' (two streams of blocks joined by cross-attention in both directions at
  every layer, as LTX-2 and Ovi) or 'joint' (MM-DiT: per-modality projections, norms and
  MLPs, one attention over the video and audio tokens together).
  mel_bins: features per mel frame; patch: mel frames per audio token;
  mel_frames_per_frame: mel frames per video frame (sample_rate / fps / hop), which puts
  an audio token and a video token of the same instant at the same time position.
  """
  design: str = 'cross'
  mel_bins: int = 64
  patch: int = 4
  mel_frames_per_frame: int = 8


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Fully resolved model hyper-parameters (variant table + explicit overrides)."""
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: Tuple[int, int, int]
  pos_embed: str
  qk_norm: bool
  attention_impl: str
  scan_layers: bool
  remat_policy: str
  dtype: str
  param_dtype: str
  sequence_parallel: str = 'none'
  remat_names: Tuple[str, ...] = ()  # for remat_policy='save_named'
  pattern: attention_patterns.PatternSpec = attention_patterns.PatternSpec()
  conditioning: str = 'class'   # 'text': cross-attention to captions (model/text.py)
  text: Optional[text_lib.TextSpec] = None  # conditioning='text'
  context_frames: int = 0       # model.context_frames_max; > 0: a given-frames mask channel
  attention_block_q: Optional[int] = None   # blockwise / splash tiles; None: kernel default
  attention_block_kv: Optional[int] = None
  mlp_conv: Tuple[int, ...] = ()  # depthwise conv kernel (kt, kh, kw) at each MLP input
  class_tokens: int = 0         # conditioning='class': K label tokens read by cross-attention
  refiner_width: int = 0        # > 0: blocks.PixelRefiner after the unpatchify, F channels
  refiner_kernel: Tuple[int, ...] = (1, 3, 3)  # its convolutions' (kt, kh, kw)
  self_condition: bool = False  # its own previous x0 estimate as C more input channels
  loss_uncertainty: bool = False  # a learned log-variance u(t) that weighs the loss (EDM2)
  # Wan 2.1 as a configuration of this DiT (model/wan.py): RoPE layout, QK-norm over all
  # heads, one shared timestep projection, an affine cross-attention norm, I2V inputs.
  rope_style: str = 'halves'
  qk_norm_across_heads: bool = False
  modulation: str = 'per_block'
  cross_attn_norm_affine: bool = False
  image_embed_dim: int = 0      # > 0: image tokens [B, Li, E] for cross-attention (I2V)
  condition_channels: int = 0   # > 0: `cond` [B, T, H, W, this] more input channels (I2V)
  audio: Optional[AudioModelSpec] = None  # config.audio.enabled: the audio stream


def parse_remat_names(names) -> Tuple[str, ...]:
  """'attn_out, mlp_hidden' (or a sequence of names) -> ('attn_out', 'mlp_hidden')."""
  if names is None:
    return ()
  if isinstance(names, str):
    names = names.split(',')
  return tuple(n.strip() for n in names if n.strip())


def remat_policy(spec: 'ModelSpec'):
  """The jax.checkpoint policy of spec.remat_policy (None for 'none')."""
  if spec.remat_policy == SAVE_NAMED:
    return jax.checkpoint_policies.save_only_these_names(*spec.remat_names)
  return REMAT_POLICIES[spec.remat_policy]


def attention_impl(spec: 'ModelSpec') -> attention.AttentionImpl:
  """model.attention_impl with its tile sizes (attention_block_q / attention_block_kv)."""
  return attention.AttentionImpl(spec.attention_impl, spec.attention_block_q,
                                 spec.attention_block_kv)


def _as_tuple(value):
  return tuple(value) if isinstance(value, (tuple, list)) else value


def audio_spec_from_config(audio_cfg) -> Optional[AudioModelSpec]:
  """config.audio -> AudioModelSpec (None unless audio.enabled). The rates' own rules
  (integer mel frames per video frame) are data/audio.py's, checked by validate.py first."""
  if audio_cfg is None or not audio_cfg.enabled:
    return None
  per_frame = audio_cfg.sample_rate / audio_cfg.fps / audio_cfg.hop
  return AudioModelSpec(design=audio_cfg.design, mel_bins=int(audio_cfg.mel_bins),
                        patch=int(audio_cfg.patch),
                        mel_frames_per_frame=int(round(per_frame)))


def from_config(model_cfg, audio_cfg=None) -> ModelSpec:
  """A complete config.model section (config/resolve.py fills every default) -> ModelSpec,
  with config.audio's stream when `audio_cfg` is given and enabled.
  Explicit sizes (not None) override the variant's; mlp_dim None: 4 x width."""
  sizes = parse_variant(model_cfg.variant) if model_cfg.variant else {}
  for key in ('width', 'depth', 'num_heads', 'mlp_dim', 'patch_size'):
    if model_cfg[key] is not None:
      sizes[key] = model_cfg[key]
  missing = [k for k in ('width', 'depth', 'num_heads', 'patch_size') if k not in sizes]
  if missing:
    raise ValueError(f'model config needs a variant or explicit {missing}.')
  sizes.setdefault('mlp_dim', 4 * sizes['width'])
  return ModelSpec(
      width=int(sizes['width']), depth=int(sizes['depth']),
      num_heads=int(sizes['num_heads']), mlp_dim=int(sizes['mlp_dim']),
      patch_size=tuple(int(p) for p in sizes['patch_size']),
      pos_embed=model_cfg.pos_embed,
      qk_norm=bool(model_cfg.qk_norm),
      attention_impl=model_cfg.attention_impl,
      attention_block_q=model_cfg.attention_block_q,
      attention_block_kv=model_cfg.attention_block_kv,
      scan_layers=bool(model_cfg.scan_layers),
      remat_policy=model_cfg.remat_policy,
      dtype=model_cfg.dtype,
      param_dtype=model_cfg.param_dtype,
      sequence_parallel=model_cfg.sequence_parallel,
      remat_names=parse_remat_names(model_cfg.remat_names),
      pattern=attention_patterns.spec_from_config(model_cfg),
      conditioning=model_cfg.conditioning,
      text=(text_lib.spec_from_config(model_cfg.text)
            if model_cfg.conditioning == 'text' else None),
      context_frames=model_cfg.context_frames_max,
      mlp_conv=_as_tuple(model_cfg.mlp_conv or ()),
      class_tokens=model_cfg.class_tokens,
      refiner_width=model_cfg.refiner_width,
      refiner_kernel=_as_tuple(model_cfg.refiner_kernel),
      self_condition=model_cfg.self_condition,
      loss_uncertainty=model_cfg.loss_uncertainty,
      rope_style=model_cfg.rope_style,
      qk_norm_across_heads=model_cfg.qk_norm_across_heads,
      modulation=model_cfg.modulation,
      cross_attn_norm_affine=model_cfg.cross_attn_norm_affine,
      image_embed_dim=model_cfg.image_embed_dim,
      condition_channels=model_cfg.condition_channels,
      audio=audio_spec_from_config(audio_cfg))


def _odd_kernel(kernel) -> bool:
  """Whether `kernel` is a tuple of three odd positive ints (kt, kh, kw): a convolution
  kernel whose 'same' padding is symmetric."""
  return (isinstance(kernel, tuple) and len(kernel) == 3
          and all(isinstance(k, int) and not isinstance(k, bool) and k > 0 and k % 2
                  for k in kernel))


def check_spec(spec: ModelSpec) -> None:
  """Raises ValueError naming the first field that breaks a rule."""
  for key in ('width', 'depth', 'num_heads', 'mlp_dim'):
    if getattr(spec, key) <= 0:
      raise ValueError(f'model.{key}={getattr(spec, key)} must be positive.')
  if len(spec.patch_size) != 3 or min(spec.patch_size) <= 0:
    raise ValueError(f'model.patch_size={spec.patch_size} must be 3 positive ints (pt, ph, pw).')
  if spec.width % spec.num_heads:
    raise ValueError(f'model.width={spec.width} is not divisible by '
                     f'model.num_heads={spec.num_heads}.')
  if spec.mlp_conv != () and not _odd_kernel(spec.mlp_conv):
    raise ValueError(f'model.mlp_conv={spec.mlp_conv!r} must be () (no convolution) or three '
                     'odd positive ints (kt, kh, kw): the depthwise kernel over the token grid, '
                     "odd so that its 'same' padding is symmetric, e.g. (3, 3, 3).")
  if (isinstance(spec.refiner_width, bool) or not isinstance(spec.refiner_width, int)
      or spec.refiner_width < 0):
    raise ValueError(f'model.refiner_width={spec.refiner_width!r} must be an integer >= 0 '
                     '(0: no pixel refiner).')
  if spec.refiner_width and not _odd_kernel(spec.refiner_kernel):
    raise ValueError(f'model.refiner_kernel={spec.refiner_kernel!r} must be three odd '
                     "positive ints (kt, kh, kw), odd so that its 'same' padding is "
                     'symmetric, e.g. (1, 3, 3).')
  if not isinstance(spec.self_condition, bool):
    raise ValueError(f'model.self_condition={spec.self_condition!r} must be True or False.')
  if spec.self_condition and (spec.conditioning != 'class' or spec.context_frames):
    raise ValueError('model.self_condition=True is built for class-conditional models only: '
                     f'conditioning={spec.conditioning!r} and context_frames_max='
                     f'{spec.context_frames} need conditioning=\'class\' and 0.')
  if not isinstance(spec.loss_uncertainty, bool):
    raise ValueError(f'model.loss_uncertainty={spec.loss_uncertainty!r} must be True or False.')
  if spec.pos_embed not in POS_EMBEDS:
    raise ValueError(f'model.pos_embed={spec.pos_embed!r} is not one of {POS_EMBEDS}.')
  head_dim = spec.width // spec.num_heads
  if spec.pos_embed == 'sincos' and (spec.width % 2 or spec.width < 6):
    raise ValueError(f'model.width={spec.width} must be even and >= 6 for sincos positions.')
  if spec.pos_embed == 'rope' and (head_dim % 2 or head_dim < 6):
    raise ValueError(f'head dim {head_dim} (width/num_heads) must be even and >= 6 for 3-D RoPE.')
  attention.check_impl(attention_impl(spec), dtype=spec.dtype, head_dim=head_dim)
  if spec.sequence_parallel not in attention.SEQUENCE_PARALLEL:
    raise ValueError(f'model.sequence_parallel={spec.sequence_parallel!r} is not one of '
                     f'{attention.SEQUENCE_PARALLEL}.')
  if spec.remat_policy not in REMAT_POLICY_NAMES:
    raise ValueError(f'model.remat_policy={spec.remat_policy!r} is not one of '
                     f'{sorted(REMAT_POLICY_NAMES)}.')
  unknown = [n for n in spec.remat_names if n not in CHECKPOINT_NAMES]
  if unknown:
    raise ValueError(f'model.remat_names={",".join(spec.remat_names)!r} names {unknown}, '
                     f'which are not block activations; known names: {CHECKPOINT_NAMES}.')
  if spec.remat_policy == SAVE_NAMED and not spec.remat_names:
    raise ValueError(f"model.remat_policy='{SAVE_NAMED}' needs model.remat_names, a comma "
                     f'list of the activations to keep, from {CHECKPOINT_NAMES}.')
  if spec.remat_policy != SAVE_NAMED and spec.remat_names:
    raise ValueError(f'model.remat_names={",".join(spec.remat_names)!r} is only read by '
                     f"model.remat_policy='{SAVE_NAMED}', not {spec.remat_policy!r}.")
  for key in ('dtype', 'param_dtype'):
    if getattr(spec, key) not in DTYPES:
      raise ValueError(f'model.{key}={getattr(spec, key)!r} is not one of {sorted(DTYPES)}.')
  attention_patterns.check_spec(
      spec.pattern, num_heads=spec.num_heads, depth=spec.depth, scan_layers=spec.scan_layers,
      attention_impl=spec.attention_impl, sequence_parallel=spec.sequence_parallel)
  if spec.conditioning not in CONDITIONINGS:
    raise ValueError(f'model.conditioning={spec.conditioning!r} is not one of {CONDITIONINGS}.')
  if spec.conditioning == 'text':
    text_lib.check_spec(spec.text)
  if (isinstance(spec.context_frames, bool) or not isinstance(spec.context_frames, int)
      or spec.context_frames < 0):
    raise ValueError(f'model.context_frames_max={spec.context_frames!r} must be an integer '
                     '>= 0 (0: no given frames).')
  if spec.rope_style not in embeddings.ROPE_STYLES:
    raise ValueError(f'model.rope_style={spec.rope_style!r} is not one of '
                     f'{embeddings.ROPE_STYLES}.')
  if spec.rope_style != 'halves' and spec.pos_embed != 'rope':
    raise ValueError(f'model.rope_style={spec.rope_style!r} is read only with '
                     f"model.pos_embed='rope', not {spec.pos_embed!r}.")
  if spec.qk_norm_across_heads and not spec.qk_norm:
    raise ValueError('model.qk_norm_across_heads=True needs model.qk_norm=True.')
  if spec.modulation not in MODULATIONS:
    raise ValueError(f'model.modulation={spec.modulation!r} is not one of {MODULATIONS}.')
  for key in ('qk_norm_across_heads', 'cross_attn_norm_affine'):
    if not isinstance(getattr(spec, key), bool):
      raise ValueError(f'model.{key}={getattr(spec, key)!r} must be True or False.')
  for key in ('image_embed_dim', 'condition_channels'):
    value = getattr(spec, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ValueError(f'model.{key}={value!r} must be an integer >= 0 (0: none).')
  if spec.image_embed_dim and spec.conditioning != 'text':
    raise ValueError(f'model.image_embed_dim={spec.image_embed_dim} adds image tokens to the '
                     "text cross-attention, so it needs model.conditioning='text', not "
                     f'{spec.conditioning!r}.')
  if spec.audio is not None:
    check_audio_spec(spec)
  if (isinstance(spec.class_tokens, bool) or not isinstance(spec.class_tokens, int)
      or spec.class_tokens < 0):
    raise ValueError(f'model.class_tokens={spec.class_tokens!r} must be an integer >= 0 '
                     '(0: the class only in adaLN).')
  if spec.class_tokens and spec.conditioning != 'class':
    raise ValueError(f'model.class_tokens={spec.class_tokens} is read only with '
                     f"model.conditioning='class', not {spec.conditioning!r}: set it to 0.")


def check_audio_spec(spec: ModelSpec) -> None:
  """The audio stream's rules (model/av_dit.py), each naming the config field."""
  audio = spec.audio
  if audio.design not in AUDIO_DESIGNS:
    raise ValueError(f'audio.design={audio.design!r} is not one of {AUDIO_DESIGNS}.')
  for key in ('mel_bins', 'patch', 'mel_frames_per_frame'):
    value = getattr(audio, key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f'audio.{key}={value!r} must be a positive integer.')
  if spec.pos_embed != 'rope':
    raise ValueError("audio.enabled=True places audio and video tokens on one time axis with "
                     f"RoPE in seconds: set model.pos_embed='rope' (not {spec.pos_embed!r}).")
  if spec.context_frames or spec.self_condition:
    raise ValueError('audio.enabled=True takes no given frames and no self-conditioning: '
                     f'model.context_frames_max={spec.context_frames} and self_condition='
                     f'{spec.self_condition} need 0 and False.')
  if spec.image_embed_dim or spec.condition_channels or spec.refiner_width:
    raise ValueError('audio.enabled=True does not take image tokens, condition channels or '
                     'the pixel refiner: set model.image_embed_dim, condition_channels and '
                     'refiner_width to 0.')
  if spec.pattern.name != 'full':
    raise ValueError(f'audio.enabled=True needs model.attention_pattern=\'full\' (the audio '
                     f'tokens have no spatial grid), not {spec.pattern.name!r}.')
