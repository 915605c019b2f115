"""Multi-head self-attention with QK-normalisation.

softmax(norm(Q) norm(K)^T / sqrt(Dh)) V, where norm is an RMSNorm over each
head's features with a learnable scale. Every attention call goes through
`dot_product_attention`, the one seam the kernels (xla, blockwise, cuDNN, splash,
chosen by model.attention_impl) and sequence parallelism plug into. The layer with the
q/k/v projections is `blocks.Attention`; patterns (attention_patterns.py) regroup tokens
and call `dot_product_attention` here.
"""

import dataclasses
import functools
from typing import Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from vdit_jax.parallel import axes
from vdit_jax.model import blockwise_attention
from vdit_jax.model import splash_attention
from vdit_jax.parallel import sequence_attention

# Kernels behind dot_product_attention (config key model.attention_impl).
ATTENTION_IMPLS = ('auto', 'xla', 'cudnn', 'blockwise', 'splash')
SEQUENCE_PARALLEL = sequence_attention.SEQUENCE_PARALLEL
# Tile sizes (model.attention_block_q / attention_block_kv) when the config leaves them
# None: {kernel: (block_q, block_kv)}.
DEFAULT_BLOCKS = {
    'blockwise': (blockwise_attention.DEFAULT_BLOCK_Q, blockwise_attention.DEFAULT_BLOCK_KV),
    'splash': (splash_attention.DEFAULT_BLOCK_Q, splash_attention.DEFAULT_BLOCK_KV),
}
CUDNN_DTYPES = ('bfloat16', 'float16')
CUDNN_MAX_HEAD_DIM = 256  # 128 before Hopper; cuDNN also needs Dh % 8 == 0
GPU_PLATFORMS = ('gpu', 'cuda')  # jax platform names of NVIDIA GPUs
# auto on GPU without cuDNN: xla while q_tokens * kv_tokens <= this squared, blockwise above
# (float32 logits of one batch element and head: 64 MiB at 4096^2, 4 GiB at 32768^2).
AUTO_BLOCKWISE_MIN_TOKENS = 4096
# auto on CPU: blockwise from this many tokens squared. Measured (bench/train_step.py, fp32):
# the tiny config's 512-token step 0.74 s vs xla 0.83 s; the bench config's 2,048-token step
# 13.3 s vs 16.1 s at half the peak RSS: the [K, N, N] logits and probabilities that xla
# writes out and reads back cost more than the tiles of the online softmax.
AUTO_CPU_BLOCKWISE_MIN_TOKENS = 512
# auto on TPU: splash from this many tokens (shorter sequences fill too little of a tile).
AUTO_SPLASH_MIN_TOKENS = 256


@dataclasses.dataclass(frozen=True)
class AttentionImpl:
  """An attention kernel and its tile sizes (None: the kernel's DEFAULT_BLOCKS).

  `key()` is the one-string form ('xla', 'blockwise', 'blockwise:128x512',
  'splash:x1024' ...) that travels through the model's modules as
  `attention_impl`, so that code comparing it with plain names ('xla',
  'cudnn') keeps working.
  """
  name: str = 'xla'
  block_q: Optional[int] = None
  block_kv: Optional[int] = None

  def key(self) -> str:
    if self.name in ('xla', 'cudnn') or (self.block_q is None and self.block_kv is None):
      return self.name
    blocks = ['' if b is None else str(b) for b in (self.block_q, self.block_kv)]
    return f'{self.name}:{blocks[0]}x{blocks[1]}'

  def blocks(self, kernel: str) -> Tuple[int, int]:
    """(block_q, block_kv) for `kernel` ('blockwise' | 'splash'), defaults filled in."""
    default_q, default_kv = DEFAULT_BLOCKS[kernel]
    return (default_q if self.block_q is None else self.block_q,
            default_kv if self.block_kv is None else self.block_kv)

  @classmethod
  def parse(cls, impl: Union[str, 'AttentionImpl']) -> 'AttentionImpl':
    """'NAME' or 'NAME:[BQ]x[BKV]' (or an AttentionImpl) -> AttentionImpl."""
    if isinstance(impl, AttentionImpl):
      return impl
    name, _, blocks = str(impl).partition(':')
    if name not in ATTENTION_IMPLS:
      raise ValueError(f'attention_impl={impl!r} is not one of {ATTENTION_IMPLS}.')
    if not blocks:
      return cls(name)
    try:
      block_q, block_kv = (int(b) if b else None for b in blocks.split('x'))
    except ValueError:
      raise ValueError(f"attention_impl={impl!r}: the blocks after ':' must read BQxBKV, "
                       "e.g. 'blockwise:512x1024' (either may be left out).") from None
    return cls(name, block_q, block_kv)


def check_impl(impl: Union[str, AttentionImpl], *, dtype: str = 'float32',
               head_dim: Optional[int] = None, platform: Optional[str] = None) -> None:
  """Raises ValueError when `impl` cannot run: unknown name, bad blocks, cuDNN without
  bf16/fp16 or a suitable head dim, and, when `platform` (a jax platform name such as
  'cpu', 'gpu', 'tpu') is given, cuDNN off NVIDIA GPUs or splash off TPUs."""
  impl = AttentionImpl.parse(impl)
  if impl.name not in ATTENTION_IMPLS:
    raise ValueError(f'model.attention_impl={impl.name!r} is not one of {ATTENTION_IMPLS}.')
  for name, block in (('attention_block_q', impl.block_q), ('attention_block_kv', impl.block_kv)):
    if block is not None and (isinstance(block, bool) or not isinstance(block, int)
                              or block <= 0):
      raise ValueError(f"model.{name}={block!r} must be a positive integer or None (the "
                       "kernel's default).")
  if impl.name == 'splash':
    splash_attention.check_block_sizes(*impl.blocks('splash'))
    if platform is not None and platform != 'tpu':
      raise ValueError(
          f"model.attention_impl='splash' is a TPU kernel, but the devices are {platform!r}; "
          "use 'auto', 'xla' or 'blockwise' (on CPU splash runs only interpreted, in tests).")
  if impl.name == 'cudnn':
    if dtype not in CUDNN_DTYPES:
      raise ValueError(f"model.attention_impl='cudnn' needs model.dtype in {CUDNN_DTYPES} "
                       f"(cuDNN flash attention has no float32 kernel), not {dtype!r}; use "
                       "'auto', 'xla' or 'blockwise' for float32.")
    if head_dim is not None and (head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM):
      raise ValueError(f"model.attention_impl='cudnn' needs a head dim (width / num_heads) "
                       f'that is a multiple of 8 and <= {CUDNN_MAX_HEAD_DIM} (128 before '
                       f'Hopper), not {head_dim}.')
    if platform is not None and platform not in GPU_PLATFORMS:
      raise ValueError(f"model.attention_impl='cudnn' needs NVIDIA GPUs, but the devices are "
                       f"{platform!r}; use 'auto' to pick a kernel for them.")


def choose_impl(platform: str, dtype, q_tokens: int, kv_tokens: int, head_dim: int) -> str:
  """What 'auto' runs for q [B, q_tokens, K, head_dim] and k/v [B, kv_tokens, K, head_dim].

  - TPU: 'splash' when q and k/v have one length of at least AUTO_SPLASH_MIN_TOKENS,
    else 'xla'.
  - NVIDIA GPU with bfloat16/float16 inputs and a head dim that is a multiple of 8 and
    <= 128: 'cudnn'.
  - CPU: 'blockwise' from AUTO_CPU_BLOCKWISE_MIN_TOKENS^2 query x key tokens, else 'xla'.
  - Otherwise (GPU in float32): 'xla' while q_tokens * kv_tokens is at most
    AUTO_BLOCKWISE_MIN_TOKENS^2, 'blockwise' above, where the logits dominate memory.
  """
  if platform == 'tpu' and q_tokens == kv_tokens >= AUTO_SPLASH_MIN_TOKENS:
    return 'splash'
  if (platform in GPU_PLATFORMS and jnp.dtype(dtype).name in CUDNN_DTYPES
      and head_dim % 8 == 0 and head_dim <= 128):
    return 'cudnn'
  if platform == 'cpu' and q_tokens * kv_tokens >= AUTO_CPU_BLOCKWISE_MIN_TOKENS**2:
    return 'blockwise'
  if platform != 'tpu' and q_tokens * kv_tokens > AUTO_BLOCKWISE_MIN_TOKENS**2:
    return 'blockwise'
  return 'xla'


def rms_normalize(x: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
  """x / rms(x) over the last axis, statistics in float32."""
  x32 = x.astype(jnp.float32)
  inv = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (x32 * inv).astype(x.dtype)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis with a learnable per-feature scale (init 1)."""
  logical_axis: str = axes.HEAD_DIM
  eps: float = 1e-6
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [..., F]
    scale = self.param(
        'scale', nn.with_logical_partitioning(nn.initializers.ones, (self.logical_axis,)),
        (x.shape[-1],), self.param_dtype)
    return rms_normalize(x, self.eps) * scale.astype(x.dtype)


class HeadsRMSNorm(nn.Module):
  """RMSNorm of q or k [B, N, K, Dh] over all heads at once (K * Dh features, one mean
  square per token), with a learnable scale [K, Dh] (init 1): Wan's QK-norm
  ("rms_norm_across_heads", model.qk_norm_across_heads), which diffusers applies to the
  whole projection before splitting it into heads."""
  eps: float = 1e-6
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, N, K, Dh]
    scale = self.param(
        'scale', nn.with_logical_partitioning(nn.initializers.ones, (axes.HEADS, axes.HEAD_DIM)),
        x.shape[-2:], self.param_dtype)  # [K, Dh]
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=(-2, -1), keepdims=True) + self.eps)
    return (x32 * inv).astype(x.dtype) * scale.astype(x.dtype)  # [B, N, K, Dh]


def qk_norm_layer(across_heads: bool, param_dtype, name: str) -> nn.Module:
  """The QK-norm of one side: per head (RMSNorm over Dh) or across heads (HeadsRMSNorm)."""
  if across_heads:
    return HeadsRMSNorm(param_dtype=param_dtype, name=name)
  return RMSNorm(param_dtype=param_dtype, name=name)


def _run_impl(name: str, impl: AttentionImpl, local: bool, q, k, v):
  """One concrete kernel; `local`: already per device (inside a shard_map)."""
  if name == 'xla':
    return jax.nn.dot_product_attention(q, k, v, implementation='xla')
  if name == 'blockwise':
    block_q, block_kv = impl.blocks('blockwise')
    return blockwise_attention.blockwise_attention(q, k, v, block_q=block_q, block_kv=block_kv)
  if name == 'cudnn':
    check_impl(impl, dtype=jnp.dtype(q.dtype).name, head_dim=q.shape[-1],
               platform=jax.default_backend())
    return jax.nn.dot_product_attention(q, k, v, implementation='cudnn')
  if name == 'splash':
    fn = splash_attention.local_splash_attention if local else splash_attention.splash_attention
    block_q, block_kv = impl.blocks('splash')
    return fn(q, k, v, block_q=block_q, block_kv=block_kv)
  raise ValueError(f'attention_impl={name!r} is not one of {ATTENTION_IMPLS}.')


def _attend(impl: AttentionImpl, local: bool, q, k, v):
  if impl.name != 'auto':
    return _run_impl(impl.name, impl, local, q, k, v)
  shapes = (q.dtype, q.shape[1], k.shape[1], q.shape[-1])
  backend = jax.default_backend()
  here = choose_impl(backend, *shapes)
  tpu = choose_impl('tpu', *shapes)
  if backend == 'tpu' or tpu == here:
    return _run_impl(here, impl, local, q, k, v)
  # The program may be lowered for TPU on another host (AOT, tools/plan.py): let the
  # lowering platform pick. Splash tiles must be multiples of the lane width.
  lanes = splash_attention.LANES
  tpu_impl = AttentionImpl('splash', *(max(lanes, b // lanes * lanes)
                                       for b in impl.blocks('splash')))
  return lax.platform_dependent(
      q, k, v, tpu=functools.partial(_run_impl, tpu, tpu_impl, local),
      default=functools.partial(_run_impl, here, impl, local))


def dot_product_attention(q, k, v, impl: Union[str, AttentionImpl] = 'xla',
                          sequence_parallel: str = 'none'):
  """q [B, N, K, Dh], k/v [B, M, K, Dh] -> [B, N, K, Dh]; scale 1/sqrt(Dh).

  `impl` (model.attention_impl; 'NAME' or 'NAME:BQxBKV' with the blockwise/splash
  tile sizes, see AttentionImpl):
  - 'xla': jax.nn.dot_product_attention(implementation='xla'); holds the [B, K, N, M]
    logits (and their gradient in the backward pass).
  - 'blockwise': online softmax over query/key tiles in pure JAX
    (model/blockwise_attention.py); memory linear in tokens, any backend and dtype.
  - 'cudnn': cuDNN flash attention; NVIDIA GPUs, bfloat16/float16 only.
  - 'splash': the Pallas TPU splash kernel (model/splash_attention.py); interpreted
    off TPU (slow, for tests).
  - 'auto': by backend, dtype and length, as `choose_impl` says: splash on TPU,
    cudnn on NVIDIA GPUs for bfloat16/float16, else xla up to
    AUTO_BLOCKWISE_MIN_TOKENS^2 query x key tokens and blockwise above. Decided when
    tracing, except TPU vs the host's backend, decided when lowering
    (lax.platform_dependent), so an AOT compile for a TPU topology on a CPU host
    gets splash.

  `sequence_parallel` other than 'none' splits the tokens over the mesh axis
  `sequence` of the mesh in context (see parallel/sequence_attention.py); its
  all_gather and ulysses strategies run `impl` on each device's share, ring its
  own online softmax.
  """
  impl = AttentionImpl.parse(impl)
  if sequence_parallel != 'none':
    # A Pallas kernel per device (splash, or auto's pick on TPU) needs shard_map's
    # type checks off; ring runs its own softmax and keeps them.
    pallas = impl.name in ('splash', 'auto') and sequence_parallel != 'ring'
    return sequence_attention.sequence_parallel_attention(
        q, k, v, strategy=sequence_parallel,
        attention_fn=functools.partial(_attend, impl, False),
        local_attention_fn=functools.partial(_attend, impl, True), check_vma=not pallas)
  return _attend(impl, False, q, k, v)
