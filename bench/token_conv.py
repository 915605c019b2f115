r"""The depthwise token convolution (model.mlp_conv): shifted slices against lax's grouped conv.

python bench/token_conv.py                      # the tiny config's grid, widths 128 and 512
python bench/token_conv.py --grid=8,8,8 --widths=128 --repeats=5

For each width D: x [B, T', H', W', D] float32 and a (kt, kh, kw, D) kernel; the jitted
forward + backward (gradients of x and the kernel) of `model.blocks.TokenConv` (a sum of
shifted slices of the zero-padded grid) and of `jax.lax.conv_general_dilated` with
feature_group_count=D, which computes the same thing (checked here to 1e-4). Time is the
median of --repeats runs after one untimed warm-up. Also times one Dense D -> 4D forward +
backward on the same tokens, for scale (the MLP's fc1). Ratio printed from the same run:
grouped conv time / shifted-slices time. A measurement, not a test: it never fails on a
number. Last line: one JSON object.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from vdit_jax.model import blocks

FLAGS = flags.FLAGS
flags.DEFINE_list('grid', ['4', '8', '8'], "Token grid (T', H', W'): tiny's 8x32x32 clip.")
flags.DEFINE_list('kernel', ['3', '3', '3'], 'Kernel (kt, kh, kw), odd sizes.')
flags.DEFINE_list('widths', ['128', '512'], 'Channel counts D.')
flags.DEFINE_integer('batch', 8, 'Batch B.')
flags.DEFINE_integer('repeats', 5, 'Timed runs per case (median reported).')


def _time(fn, *args):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(FLAGS.repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _fwd_bwd(conv):
  def loss(x, k):
    return jnp.sum(jnp.square(conv(x, k)))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def main(_):
  grid = tuple(int(g) for g in FLAGS.grid)
  kernel_size = tuple(int(k) for k in FLAGS.kernel)
  n = int(np.prod(grid))
  rows = []
  for d in (int(w) for w in FLAGS.widths):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(FLAGS.batch, n, d)), jnp.float32)  # [B, N, D]
    k = jnp.asarray(rng.normal(size=kernel_size + (d,)) * 0.1, jnp.float32)  # [kt, kh, kw, D]
    module = blocks.TokenConv(kernel_size, grid)
    slices = lambda x, k: module.apply({'params': {'kernel': k}}, x)

    def grouped(x, k, d=d):
      out = jax.lax.conv_general_dilated(
          x.reshape((x.shape[0],) + grid + (d,)), k[:, :, :, None, :], (1, 1, 1), 'SAME',
          dimension_numbers=('NTHWC', 'THWIO', 'NTHWC'), feature_group_count=d)
      return out.reshape(x.shape)

    err = float(jnp.max(jnp.abs(jax.jit(slices)(x, k) - jax.jit(grouped)(x, k))))
    if err > 1e-4:
      raise SystemExit(f'the two convolutions differ by {err} at D={d}')
    w = jnp.asarray(rng.normal(size=(d, 4 * d)) / np.sqrt(d), jnp.float32)
    dense = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.square(x @ w)), argnums=(0, 1)))
    row = {'width': d, 'tokens': n, 'batch': FLAGS.batch, 'kernel': list(kernel_size),
           'slices_s': _time(_fwd_bwd(slices), x, k), 'grouped_s': _time(_fwd_bwd(grouped), x, k),
           'dense_d_4d_s': _time(dense, x, w), 'max_abs_diff': err}
    row['grouped_over_slices'] = row['grouped_s'] / row['slices_s']
    rows.append(row)
    print(f"D={d:4d} N={n} B={FLAGS.batch} kernel={kernel_size}: shifted slices "
          f"{row['slices_s'] * 1e3:8.2f} ms, lax grouped conv {row['grouped_s'] * 1e3:8.2f} ms "
          f"({row['grouped_over_slices']:.1f}x), Dense D->4D {row['dense_d_4d_s'] * 1e3:7.2f} ms"
          ' (forward + backward)')
  print(json.dumps({'device': jax.devices()[0].device_kind, 'rows': rows}))


if __name__ == '__main__':
  app.run(main)
