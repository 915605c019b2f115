"""The video diffusion transformer: tubelets -> DiT blocks -> tubelets."""

import dataclasses
import re
from typing import Any, Optional, Tuple

import flax.linen as nn
from absl import logging
import jax
import jax.numpy as jnp

from vdit_jax.model import attention
from vdit_jax.model import axes
from vdit_jax.model import embeddings
from vdit_jax.model import patching
from vdit_jax.model.blocks import DiTBlock, FinalLayer

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
POS_EMBEDS = ('sincos', 'rope')
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


def resolve_spec(model_cfg) -> ModelSpec:
  """Config -> ModelSpec. Explicit fields (not None) override the variant's."""
  sizes = parse_variant(model_cfg.variant) if model_cfg.get('variant') else {}
  for key in ('width', 'depth', 'num_heads', 'mlp_dim', 'patch_size'):
    if model_cfg.get(key) is not None:
      sizes[key] = model_cfg[key]
  missing = [k for k in ('width', 'depth', 'num_heads', 'patch_size') if k not in sizes]
  if missing:
    raise ValueError(f'model config needs a variant or explicit {missing}.')
  sizes.setdefault('mlp_dim', 4 * sizes['width'])
  return ModelSpec(
      width=int(sizes['width']), depth=int(sizes['depth']),
      num_heads=int(sizes['num_heads']), mlp_dim=int(sizes['mlp_dim']),
      patch_size=tuple(int(p) for p in sizes['patch_size']),
      pos_embed=model_cfg.get('pos_embed', 'sincos'),
      qk_norm=bool(model_cfg.get('qk_norm', True)),
      attention_impl=model_cfg.get('attention_impl', 'xla'),
      scan_layers=bool(model_cfg.get('scan_layers', True)),
      remat_policy=model_cfg.get('remat_policy', 'none'),
      dtype=model_cfg.get('dtype', 'float32'),
      param_dtype=model_cfg.get('param_dtype', 'float32'),
      sequence_parallel=model_cfg.get('sequence_parallel', 'none'))


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
  if spec.pos_embed not in POS_EMBEDS:
    raise ValueError(f'model.pos_embed={spec.pos_embed!r} is not one of {POS_EMBEDS}.')
  head_dim = spec.width // spec.num_heads
  if spec.pos_embed == 'sincos' and (spec.width % 2 or spec.width < 6):
    raise ValueError(f'model.width={spec.width} must be even and >= 6 for sincos positions.')
  if spec.pos_embed == 'rope' and (head_dim % 2 or head_dim < 6):
    raise ValueError(f'head dim {head_dim} (width/num_heads) must be even and >= 6 for 3-D RoPE.')
  if spec.attention_impl not in attention.ATTENTION_IMPLS:
    raise ValueError(f'model.attention_impl={spec.attention_impl!r} is not one of '
                     f'{attention.ATTENTION_IMPLS}.')
  if spec.sequence_parallel not in attention.SEQUENCE_PARALLEL:
    raise ValueError(f'model.sequence_parallel={spec.sequence_parallel!r} is not one of '
                     f'{attention.SEQUENCE_PARALLEL}.')
  if spec.remat_policy not in REMAT_POLICIES:
    raise ValueError(f'model.remat_policy={spec.remat_policy!r} is not one of '
                     f'{sorted(REMAT_POLICIES)}.')
  for key in ('dtype', 'param_dtype'):
    if getattr(spec, key) not in DTYPES:
      raise ValueError(f'model.{key}={getattr(spec, key)!r} is not one of {sorted(DTYPES)}.')


class VideoDiT(nn.Module):
  """Diffusion transformer over spacetime patches.

  __call__(video [B, T, H, W, C], t [B] float timesteps (0..1000 scale),
  labels [B] int in [0, num_classes], num_classes being the null label)
  -> prediction [B, T, H, W, C].
  """
  spec: ModelSpec
  channels: int
  num_classes: int

  @nn.compact
  def __call__(self, video, t, labels=None):
    spec = self.spec
    dtype, param_dtype = DTYPES[spec.dtype], DTYPES[spec.param_dtype]
    grid = patching.token_grid(video.shape[1:4], spec.patch_size)  # (T', H', W')
    x = patching.PatchEmbed(spec.width, spec.patch_size, dtype, param_dtype,
                            name='patch_embed')(video.astype(dtype))  # [B, N, D]
    rope = None
    if spec.pos_embed == 'sincos':
      x = x + embeddings.sincos_3d(grid, spec.width).astype(dtype)[None]
    else:
      rope = embeddings.rope_3d(grid, spec.width // spec.num_heads)  # 2 x [N, Dh/2]
    x = nn.with_logical_constraint(x, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED))

    c = embeddings.TimestepEmbedder(spec.width, dtype=dtype, param_dtype=param_dtype,
                                    name='t_embed')(t)  # [B, D]
    if self.num_classes > 0:
      if labels is None:
        labels = jnp.full((video.shape[0],), self.num_classes, jnp.int32)
      c = c + embeddings.LabelEmbedder(self.num_classes, spec.width, dtype, param_dtype,
                                       name='y_embed')(labels)  # [B, D]

    block = DiTBlock
    policy = REMAT_POLICIES[spec.remat_policy]
    if spec.remat_policy != 'none':
      block = nn.remat(DiTBlock, policy=policy, prevent_cse=not spec.scan_layers)
    kwargs = dict(num_heads=spec.num_heads, mlp_dim=spec.mlp_dim, qk_norm=spec.qk_norm,
                  attention_impl=spec.attention_impl, dtype=dtype, param_dtype=param_dtype,
                  sequence_parallel=spec.sequence_parallel)
    if spec.scan_layers:
      blocks = nn.scan(
          block, variable_axes={'params': 0}, split_rngs={'params': True},
          in_axes=(nn.broadcast, nn.broadcast), length=spec.depth,
          metadata_params={nn.PARTITION_NAME: axes.LAYERS})(**kwargs, name='blocks')
      x, _ = blocks(x, c, rope)
    else:
      for i in range(spec.depth):
        x, _ = block(**kwargs, name=f'blocks_{i}')(x, c, rope)

    x = FinalLayer(spec.patch_size[0] * spec.patch_size[1] * spec.patch_size[2] * self.channels,
                   dtype, param_dtype, name='final')(x, c)  # [B, N, P]
    out = patching.unpatchify(x, grid, spec.patch_size, self.channels)
    return out.astype(jnp.float32)  # [B, T, H, W, C]


def build_model(model_cfg, channels: int, num_classes: int) -> VideoDiT:
  spec = resolve_spec(model_cfg)
  check_spec(spec)
  patch_dim = spec.patch_size[0] * spec.patch_size[1] * spec.patch_size[2] * channels
  if spec.width < patch_dim:
    # Measured on the tiny config: width 128 with 4x4x4x3 = 192-value tubelets
    # plateaued at eps-MSE ~0.37 for every t (the missing 1/3 of the noise).
    logging.warning(
        'model.width=%d is smaller than the tubelet size pt*ph*pw*C=%d: the model cannot '
        'carry the whole noise through, and eps / v / flow losses plateau.', spec.width,
        patch_dim)
  return VideoDiT(spec=spec, channels=channels, num_classes=num_classes)
