"""Model FLOP/s utilisation (MFU): the analytic model FLOPs per second over the device peak.

  model_tflops_per_device = model FLOPs per step x steps/s / devices / 1e12
  mfu                     = model FLOPs/s per device / peak FLOP/s per device

Model FLOPs come from `model/flops.py` (forward + backward matmuls and attention of one
step over the global batch, no rematerialisation recompute), so MFU does not reward
recomputing (that would be hardware FLOPs utilisation).

Peaks: published dense (no sparsity) bf16 matmul FLOP/s per JAX device, matched on
`device.device_kind`. TPU v2/v3 show each TensorCore as a device (half a chip); v4 and
later show one device per chip. On CPU there is no datasheet figure: the peak is the
FLOP/s of a float32 matmul measured once per process, divided by the number of CPU
devices (fake CPU devices share the same cores). Unknown kinds get no MFU, only the
model TFLOP/s.
"""

import dataclasses
import functools
import re
import time
from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp

from vdit_jax.model import flops as flops_lib
from vdit_jax.model import spec as spec_lib

# Dense bf16 FLOP/s per JAX device, by exact device_kind (lower case), from the Cloud TPU
# system-architecture pages. 'TPU v5' is v5p and 'TPU v5 lite' v5e as JAX names them.
TPU_PEAK_BF16 = {
    'tpu v2': (22.5e12, 'TPU v2: 45 TFLOP/s per chip, 2 devices per chip'),
    'tpu v3': (61.5e12, 'TPU v3: 123 TFLOP/s per chip, 2 devices per chip'),
    'tpu v4': (275e12, 'TPU v4'),
    'tpu v5 lite': (197e12, 'TPU v5e'),
    'tpu v5e': (197e12, 'TPU v5e'),
    'tpu v5': (459e12, 'TPU v5p'),
    'tpu v5p': (459e12, 'TPU v5p'),
    'tpu v6 lite': (918e12, 'TPU v6e (Trillium)'),
    'tpu v6e': (918e12, 'TPU v6e (Trillium)'),
}
# GPUs: (regex searched in device_kind.lower(), dense bf16 FLOP/s, what), first match wins,
# from NVIDIA's datasheets (their "with sparsity" figures halved). Kinds look like
# 'NVIDIA A100-SXM4-80GB', 'NVIDIA H100 80GB HBM3', 'NVIDIA H100 PCIe', 'NVIDIA H200'.
GPU_PEAK_BF16 = (
    (r'\ba100\b', 312e12, 'NVIDIA A100'),
    (r'\bh100\b.*\bpcie\b', 756e12, 'NVIDIA H100 PCIe'),
    (r'\bh[12]00\b.*\bnvl\b', 835e12, 'NVIDIA H100/H200 NVL'),
    (r'\bg?h[12]00\b', 989e12, 'NVIDIA H100/H200 SXM'),
    (r'\bb200\b', 2250e12, 'NVIDIA B200'),
)

MATMUL_SIZE = 1024  # [S, S] x [S, S] float32: 2 S^3 = 2.1 GFLOP per product
MATMUL_REPEATS = 5


@dataclasses.dataclass(frozen=True)
class Peak:
  flops_per_device: float
  source: str


def table_peak(device_kind: str) -> Optional[Peak]:
  """The published dense bf16 peak per device for `device_kind`, or None if unknown."""
  kind = ' '.join(device_kind.lower().split())
  if kind in TPU_PEAK_BF16:
    flops, what = TPU_PEAK_BF16[kind]
  else:
    match = [(f, w) for pattern, f, w in GPU_PEAK_BF16 if re.search(pattern, kind)]
    if not match:
      return None
    flops, what = match[0]
  return Peak(flops, f'{what}: {flops / 1e12:g} TFLOP/s dense bf16 per device')


def _time_matmul(size: int, repeats: int, device) -> float:
  """Best wall time of one [size, size] float32 matmul on `device`, after a warm-up."""
  a = jax.device_put(jax.random.normal(jax.random.key(0), (size, size), jnp.float32), device)
  b = jax.device_put(jax.random.normal(jax.random.key(1), (size, size), jnp.float32), device)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()  # compile and warm up
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return best


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(platform: str = 'cpu', size: int = MATMUL_SIZE,
                          repeats: int = MATMUL_REPEATS) -> float:
  """FLOP/s of a float32 [size, size] matmul on the first `platform` device (best of
  `repeats`); measured once per process and argument set (about 0.1-0.5 s on a CPU)."""
  seconds = _time_matmul(size, repeats, jax.devices(platform)[0])
  return 2.0 * size ** 3 / seconds


def device_peak(devices: Optional[Sequence] = None) -> Optional[Peak]:
  """The peak FLOP/s per device that MFU is measured against (None: unknown device)."""
  devices = list(jax.devices() if devices is None else devices)
  kind = devices[0].device_kind
  if devices[0].platform == 'cpu':
    local = len(jax.local_devices(backend='cpu'))
    flops = measured_matmul_flops('cpu') / local
    return Peak(flops, f'CPU: measured {MATMUL_SIZE}x{MATMUL_SIZE} float32 matmul, '
                       f'{flops * local / 1e9:.1f} GFLOP/s over {local} CPU device(s)')
  return table_peak(kind)


def model_flops_per_step(config, spec) -> int:
  """Analytic model FLOPs of one train step on the config's global batch.

  With config.audio.enabled the audio stream is counted (model/flops.py): a spec built
  from config.model alone (no spec.audio) gets the config's audio stream first, so the
  count is the audio-video model's whichever spec the caller holds.
  """
  spec = with_audio(config, spec)
  d = config.data
  return flops_lib.train_step_flops(
      spec, (d.num_frames, d.height, d.width, d.channels), config.train.batch_size).total


def with_audio(config, spec):
  """`spec` with config.audio's stream when the config enables it and the spec lacks it."""
  if not config.audio.enabled or getattr(spec, 'audio', None) is not None:
    return spec
  return dataclasses.replace(spec, audio=spec_lib.audio_spec_from_config(config.audio))


def utilization(flops_per_step: float, steps_per_s: float, num_devices: int,
                peak: Optional[Peak]) -> Dict[str, float]:
  """{'model_tflops_per_device', and 'mfu' (a fraction) when the peak is known}."""
  per_device = flops_per_step * steps_per_s / num_devices  # FLOP/s
  out = {'model_tflops_per_device': per_device / 1e12}
  if peak is not None:
    out['mfu'] = per_device / peak.flops_per_device
  return out
