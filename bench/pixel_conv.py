r"""The pixel refiner's convolution (model.refiner_width, blocks._pixel_conv) three ways.

python bench/pixel_conv.py [--batch=8 --frames=8 --size=32 --width=32 --kernel=1,3,3]

Forward + backward (kernel gradients) of the refiner's two convolutions at
configs/tiny.py's shape: lax.conv_general_dilated in 3-D, a sum of shifted matmuls, and
lax.conv in 2-D over the B T frames (kernels of one frame only; what blocks._pixel_conv
runs for such kernels). Prints ms per call and each form's time over the 3-D one, measured
in the same run, then one JSON line. The 2-D form holds its input and output sharded over
the batch only: without that, under a data x sequence mesh its kernel gradient came out
twice the one-device value (BUILD_NOTES.md, "Recipe").
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vdit_jax.model import blocks  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_integer('batch', 8, 'Clips.')
flags.DEFINE_integer('frames', 8, 'Frames per clip.')
flags.DEFINE_integer('size', 32, 'Frame height and width.')
flags.DEFINE_integer('width', 32, 'Refiner channels.')
flags.DEFINE_list('kernel', ['1', '3', '3'], 'Kernel (kt, kh, kw).')
flags.DEFINE_integer('repeats', 20, 'Timed calls per form.')


def shifted_matmuls(x, kernel):
  kt, kh, kw = kernel.shape[:3]
  _, tt, hh, ww, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (kt // 2,) * 2, (kh // 2,) * 2, (kw // 2,) * 2, (0, 0)))
  out = 0.0
  for a in range(kt):
    for r in range(kh):
      for q in range(kw):
        out = out + jnp.einsum('bthwc,cd->bthwd',
                               padded[:, a:a + tt, r:r + hh, q:q + ww, :], kernel[a, r, q])
  return out


def conv_3d(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1, 1), 'SAME',
                                      dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'))


def main(_):
  kernel = tuple(int(k) for k in FLAGS.kernel)
  x = jax.random.normal(jax.random.key(0), (FLAGS.batch, FLAGS.frames, FLAGS.size, FLAGS.size,
                                            6))  # the output and the noisy input, 3 + 3
  k1 = 0.1 * jax.random.normal(jax.random.key(1), kernel + (6, FLAGS.width))
  k2 = 0.1 * jax.random.normal(jax.random.key(2), kernel + (FLAGS.width, 3))
  forms = {'lax 3-D conv': conv_3d,
           'shifted matmuls': shifted_matmuls}
  if kernel[0] == 1:
    forms['lax 2-D conv over frames (blocks._pixel_conv)'] = blocks._pixel_conv  # pylint: disable=protected-access
  out = {}
  for name, conv in forms.items():
    def loss(k1, k2, x, conv=conv):
      return jnp.sum(conv(jax.nn.gelu(conv(x, k1)), k2) ** 2)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    jax.block_until_ready(grad(k1, k2, x))
    t0 = time.perf_counter()
    for _ in range(FLAGS.repeats):
      jax.block_until_ready(grad(k1, k2, x))
    out[name] = (time.perf_counter() - t0) / FLAGS.repeats * 1e3
    np.testing.assert_allclose(conv(x, k1), conv_3d(x, k1), rtol=1e-4, atol=1e-4)
  base = out['lax 3-D conv']
  print(f'refiner convolutions, forward + backward, x {x.shape}, kernel {kernel}, '
        f'width {FLAGS.width} ({jax.devices()[0].platform}):')
  for name, ms in out.items():
    print(f'  {name:>46}: {ms:8.1f} ms  ({ms / base:.2f}x the 3-D form)')
  print(json.dumps({'ms': out, 'kernel': kernel, 'shape': list(x.shape)}))


if __name__ == '__main__':
  app.run(main)
