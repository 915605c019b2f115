r"""Attention implementations: forward + backward time and compiled memory against length.

python bench/attention.py                       # 2k..32k tokens, xla and blockwise
python bench/attention.py --tokens=2048,4096 --block_q=512 --block_kv=1024 --repeats=5

For each implementation and token count N: q, k, v [B, N, K, Dh] (default B=1, width 384 =
K 6 x Dh 64, float32) and the jitted forward + backward (`jax.vjp` of the attention, all
three gradients). `temp` is the compiled program's scratch memory and `total` adds its
arguments and outputs (`compile().memory_analysis()`); time is the median of --repeats runs
after one untimed warm-up run. xla is timed only while its float32 logits B*K*N^2*4 bytes stay
under --xla_logits_cap_gib (its memory is still compiled and reported above the cap);
blockwise runs at every size. cudnn needs an NVIDIA GPU and splash a TPU (on CPU splash runs
interpreted, a correctness tool only), so neither runs here.

Ratios printed from the same run: blockwise temp memory per doubling of N, blockwise time /
xla time where both ran, and whether the largest N fits --fit_gib in total. A measurement,
not a test: it never fails on a number. On a shared machine times move with the load. Last
line: one JSON object.
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

from vdit_jax.model import attention

FLAGS = flags.FLAGS
flags.DEFINE_list('tokens', ['2048', '4096', '8192', '16384', '32768'], 'Token counts N.')
flags.DEFINE_list('impls', ['xla', 'blockwise'], 'Implementations to measure.')
flags.DEFINE_integer('batch', 1, 'Batch B.')
flags.DEFINE_integer('heads', 6, 'Heads K.')
flags.DEFINE_integer('head_dim', 64, 'Head dim Dh.')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'q/k/v dtype.')
flags.DEFINE_integer('block_q', None, 'blockwise query tile (default: the kernel default).')
flags.DEFINE_integer('block_kv', None, 'blockwise key/value tile (default: the kernel default).')
flags.DEFINE_integer('repeats', 3, 'Timed runs per case (median reported).')
flags.DEFINE_float('xla_logits_cap_gib', 1.0,
                   'Skip timing xla where its float32 logits B*K*N^2*4 exceed this.')
flags.DEFINE_float('fit_gib', 4.0, 'Memory target for the largest N (total compiled bytes).')

GIB = 2.0**30


def fwd_bwd(impl):
  """(q, k, v, dout) -> (out, dq, dk, dv) for one implementation."""
  def attn(q, k, v):
    return attention.dot_product_attention(q, k, v, impl)

  def f(q, k, v, dout):
    out, vjp = jax.vjp(attn, q, k, v)
    return (out,) + vjp(dout)

  return jax.jit(f)


def measure(impl, n, time_it: bool):
  shape = (FLAGS.batch, n, FLAGS.heads, FLAGS.head_dim)  # [B, N, K, Dh]
  dtype = jnp.dtype(FLAGS.dtype)
  spec = jax.ShapeDtypeStruct(shape, dtype)
  t0 = time.perf_counter()
  compiled = fwd_bwd(impl).lower(spec, spec, spec, spec).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  row = {'impl': impl.name, 'tokens': n, 'compile_s': round(compile_s, 2),
         'temp_bytes': mem.temp_size_in_bytes,
         'total_bytes': (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                         + mem.output_size_in_bytes - mem.alias_size_in_bytes),
         'time_s': None, 'skipped': None}
  if not time_it:
    return row
  keys = jax.random.split(jax.random.key(n), 4)
  q, k, v, dout = (jax.random.normal(key, shape, dtype) for key in keys)
  jax.block_until_ready(compiled(q, k, v, dout))  # warm-up
  times = []
  for _ in range(FLAGS.repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(q, k, v, dout))
    times.append(time.perf_counter() - t0)
  row['time_s'] = round(float(np.median(times)), 4)
  return row


def main(argv):
  del argv
  tokens = [int(t) for t in FLAGS.tokens]
  rows = []
  for name in FLAGS.impls:
    impl = attention.AttentionImpl(name, FLAGS.block_q, FLAGS.block_kv)
    if name in ('cudnn', 'splash'):
      print(f'{name}: skipped, needs {"an NVIDIA GPU" if name == "cudnn" else "a TPU"}.')
      continue
    for n in tokens:
      logits = FLAGS.batch * FLAGS.heads * n * n * 4
      time_it = not (name == 'xla' and logits > FLAGS.xla_logits_cap_gib * GIB)
      row = measure(impl, n, time_it)
      if not time_it:
        row['skipped'] = (f'xla logits {logits / GIB:.2f} GiB > --xla_logits_cap_gib='
                          f'{FLAGS.xla_logits_cap_gib}: compiled only')
      rows.append(row)
      t = 'skipped' if row['time_s'] is None else f'{row["time_s"]:.3f}'
      print(f'{name:10s} N={n:6d}  temp {row["temp_bytes"] / GIB:8.3f} GiB  total '
            f'{row["total_bytes"] / GIB:8.3f} GiB  time {t:>8s} s  (compile '
            f'{row["compile_s"]:.1f} s){"  " + row["skipped"] if row["skipped"] else ""}',
            flush=True)

  by = {(r['impl'], r['tokens']): r for r in rows}
  summary = {'mem_ratio_per_doubling': {}, 'time_ratio_blockwise_over_xla': {}}
  print('\nblockwise temp memory per doubling of N, and time blockwise / xla:')
  for a, b in zip(tokens, tokens[1:]):
    ra, rb = by.get(('blockwise', a)), by.get(('blockwise', b))
    if ra and rb and b == 2 * a and ra['temp_bytes']:
      ratio = rb['temp_bytes'] / ra['temp_bytes']
      summary['mem_ratio_per_doubling'][f'{a}->{b}'] = round(ratio, 3)
      xa, xb = by.get(('xla', a)), by.get(('xla', b))
      xr = xb['temp_bytes'] / xa['temp_bytes'] if xa and xb and xa['temp_bytes'] else None
      print(f'  N {a:6d} -> {b:6d}: blockwise x{ratio:.2f}'
            + (f', xla x{xr:.2f}' if xr else ''))
  for n in tokens:
    rb, rx = by.get(('blockwise', n)), by.get(('xla', n))
    if rb and rx and rb['time_s'] and rx['time_s']:
      ratio = rb['time_s'] / rx['time_s']
      summary['time_ratio_blockwise_over_xla'][str(n)] = round(ratio, 3)
      print(f'  N {n:6d}: blockwise {rb["time_s"]:.3f} s / xla {rx["time_s"]:.3f} s = '
            f'{ratio:.2f}')
  largest = by.get(('blockwise', max(tokens)))
  if largest:
    fits = largest['total_bytes'] <= FLAGS.fit_gib * GIB
    summary['largest_fits'] = {'tokens': max(tokens), 'total_gib': round(
        largest['total_bytes'] / GIB, 3), 'fit_gib': FLAGS.fit_gib, 'fits': fits}
    print(f'  blockwise N={max(tokens)} fwd+bwd total {largest["total_bytes"] / GIB:.3f} GiB '
          f'{"<=" if fits else ">"} {FLAGS.fit_gib} GiB')
  print(json.dumps({
      'bench': 'attention', 'backend': jax.default_backend(), 'dtype': FLAGS.dtype,
      'batch': FLAGS.batch, 'heads': FLAGS.heads, 'head_dim': FLAGS.head_dim,
      'blocks': attention.AttentionImpl('blockwise', FLAGS.block_q,
                                        FLAGS.block_kv).blocks('blockwise'),
      'repeats': FLAGS.repeats,
      'rows': rows, **summary}))


if __name__ == '__main__':
  app.run(main)
