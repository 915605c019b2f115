r"""VAE decoding: compiler-reported memory of whole-clip vs chunked decoding, wall time of
both, and how far a spatially tiled decode is from an untiled one.

python bench/vae_decode.py [--vae=DIR | --base_dim=8] [--height=64] [--width=64] [--latent_frames=2,5,9]

For each clip length: XLA's temp + output bytes of one whole-clip `WanVAE.decode` call
(grows with the clip) and of one steady-state chunk of `vae.chunked.decode_latents`
(one latent frame: constant), then seconds per decode both ways (random-init params or
--vae's, one warm-up call first). Last, the max |tiled - untiled| of a decode of random
latents in 32-pixel tiles every 16.
Ends with one JSON line.
"""

import json
import time

from absl import app
from absl import flags
import jax
import numpy as np

from vdit_jax.vae import checkpoint
from vdit_jax.vae import chunked
from vdit_jax.vae.config import VAEConfig
from vdit_jax.vae.model import WanVAE

flags.DEFINE_string('vae', None, 'A VAE folder to use (default: random init at --base_dim).')
flags.DEFINE_integer('base_dim', 8, 'VAE width (Wan 2.1: 96).')
flags.DEFINE_integer('height', 64, 'Frame height in pixels.')
flags.DEFINE_integer('width', 64, 'Frame width in pixels.')
flags.DEFINE_list('latent_frames', ['2', '5', '9'], 'Clip lengths in latent frames.')
FLAGS = flags.FLAGS


def _bytes(compiled) -> int:
  stats = compiled.memory_analysis()
  return int(stats.temp_size_in_bytes + stats.output_size_in_bytes)


def _seconds(fn, *args) -> float:
  jax.block_until_ready(fn(*args))  # compile / warm up
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def main(argv):
  del argv
  if FLAGS.vae:
    cfg, params = checkpoint.load(FLAGS.vae)
  else:
    cfg = VAEConfig(base_dim=FLAGS.base_dim, num_res_blocks=1)
    params = checkpoint.init_params(cfg, jax.random.PRNGKey(0))
  model = WanVAE(cfg)
  whole = jax.jit(lambda p, z: model.apply({'params': p}, z, method=WanVAE.decode))
  h, w = FLAGS.height // cfg.spatial_factor, FLAGS.width // cfg.spatial_factor
  rng = np.random.RandomState(0)
  rows = []
  for t in (int(v) for v in FLAGS.latent_frames):
    z = rng.normal(size=(1, t, h, w, cfg.z_dim)).astype(np.float32)
    whole_bytes = _bytes(whole.lower(params, z).compile())
    # pylint: disable=protected-access
    _, cache = chunked._chunk_fn(cfg, 'decode', True)(params, None, z[:, :1])
    chunk_bytes = _bytes(chunked._chunk_fn(cfg, 'decode', False).lower(
        params, cache, z[:, 1:2]).compile())
    # pylint: enable=protected-access
    row = {'latent_frames': t, 'frames': 1 + cfg.temporal_factor * (t - 1),
           'whole_bytes': whole_bytes, 'chunk_bytes': chunk_bytes,
           'whole_s': _seconds(whole, params, z),
           'chunked_s': _seconds(lambda p, x: chunked.decode_latents(cfg, p, x), params, z)}
    rows.append(row)
    print(f'{row["frames"]:4d} frames of {FLAGS.height}x{FLAGS.width}: whole-clip decode '
          f'{whole_bytes / 2**20:8.1f} MiB, one chunk {chunk_bytes / 2**20:6.1f} MiB '
          f'({whole_bytes / chunk_bytes:.1f}x); {row["whole_s"]:.2f} s whole, '
          f'{row["chunked_s"]:.2f} s chunked', flush=True)
  z = rng.normal(size=(1, 2, h, w, cfg.z_dim)).astype(np.float32)
  untiled = chunked.decode_latents(cfg, params, z)
  tiled = chunked.decode_latents(cfg, params, z, tiling=chunked.Tiling(32, 32, 16, 16))
  tile_error = float(np.abs(tiled - untiled).max())
  print(f'tiled (32 px every 16) vs untiled decode: max |diff| {tile_error:.3g} '
        '(values in [-1, 1])', flush=True)
  print(json.dumps({'bench': 'vae_decode', 'vae': FLAGS.vae, 'base_dim': cfg.base_dim, 'height': FLAGS.height,
                    'width': FLAGS.width, 'rows': rows, 'tiled_max_abs_diff': tile_error}))


if __name__ == '__main__':
  app.run(main)
