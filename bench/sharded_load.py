r"""Sharded safetensors loading across processes: what each process reads and holds.

python bench/sharded_load.py [--processes=4] [--devices_per_process=1] [--size_mb=512]
                             [--tensors=8] [--readers=direct,safe_open]

Writes a checkpoint of --tensors f32 tensors of [rows, 4096] (--size_mb in all, 2 shard
files and diffusers' index), then for each reader of `SafetensorsFolder` starts
--processes local processes of --devices_per_process fake CPU devices, joined by
jax.distributed (gloo). Each loads every tensor with `safetensors_load.load`, sharded over
all devices along its first axis; half the tensors go through `.transpose(1, 0)` (a torch
Linear weight becoming a Flax kernel), so those read columns of the stored tensor. Per
process it prints: its share of the checkpoint (the bytes its devices hold), the bytes it
read from the files (the folder's count), its peak RSS growth during the load (VmHWM
after minus VmRSS before, also as a multiple of the checkpoint: a process that held the
checkpoint whole would show >= 1) and the load's wall time. The files sit in the page
cache (just written), so the times are the loader's, not the disk's; most of a load's time
is the transposes' copies, and with --processes sharing few cores the times move with the
machine's load, while the bytes and RSS figures do not. Ends with one JSON line. A
measurement, not a test: it fails on no number.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

FLAGS = flags.FLAGS
flags.DEFINE_integer('processes', 4, 'Local processes (jax.distributed) that load together.')
flags.DEFINE_integer('devices_per_process', 1, 'Fake CPU devices per process.')
flags.DEFINE_integer('size_mb', 512, 'Checkpoint size in MiB (f32).')
flags.DEFINE_integer('tensors', 8, 'Tensors in the checkpoint, [rows, 4096] each.')
flags.DEFINE_list('readers', ['direct', 'safe_open'], 'SafetensorsFolder readers to compare.')
flags.DEFINE_string('tmpdir', None, 'Where to write the checkpoint (default: a temporary '
                    'folder, removed at the end).')
# One process of a measurement (set by the parent, not by hand).
flags.DEFINE_integer('worker', -1, 'This process\'s id among --processes (-1: the parent).')
flags.DEFINE_integer('port', 0, 'The coordinator\'s port on 127.0.0.1.')
flags.DEFINE_string('folder', None, 'The checkpoint folder.')
flags.DEFINE_string('reader', 'direct', 'The reader this process uses.')

COLUMNS = 4096


def _memory(field: str) -> int:
  """Bytes of /proc/self/status's VmRSS (now) or VmHWM (peak since exec; getrusage's
  ru_maxrss would carry the parent's peak over fork and exec)."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1]) * 1024
  raise ValueError(f'/proc/self/status has no field {field!r}.')


def worker():
  """Joins the others, loads the checkpoint, prints this process's figures as JSON."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from vdit_jax.parallel import safetensors_load as sl

  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(f'127.0.0.1:{FLAGS.port}', num_processes=FLAGS.processes,
                             process_id=FLAGS.worker)
  mesh = Mesh(np.array(jax.devices()), ('fsdp',))
  folder = sl.SafetensorsFolder(FLAGS.folder, reader=FLAGS.reader)
  recipes = {name: sl.source(folder, name) if k % 2 == 0
             else sl.source(folder, name).transpose(1, 0)
             for k, name in enumerate(folder.names())}
  rss_before = _memory('VmRSS')
  start = time.perf_counter()
  params = jax.block_until_ready(sl.load(recipes, NamedSharding(mesh, P('fsdp'))))
  seconds = time.perf_counter() - start
  peak = _memory('VmHWM')
  held = sum(shard.data.nbytes for a in params.values() for shard in a.addressable_shards)
  print(json.dumps({'process': FLAGS.worker, 'devices': jax.local_device_count(),
                    'bytes_held': held, 'bytes_read': folder.bytes_read,
                    'rss_growth': peak - rss_before, 'load_s': seconds}), flush=True)
  jax.distributed.shutdown()


def write_checkpoint(folder: str) -> int:
  """--tensors f32 tensors of [rows, COLUMNS] in 2 files and diffusers' index; returns the
  checkpoint's bytes."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file
  devices = FLAGS.processes * FLAGS.devices_per_process
  if COLUMNS % devices:
    raise ValueError(f'--processes x --devices_per_process = {devices} devices must divide '
                     f'{COLUMNS} (the tensors\' columns, sharded when transposed).')
  rows = FLAGS.size_mb * 2**20 // (4 * COLUMNS * FLAGS.tensors)
  rows = max(devices, rows - rows % devices)
  rng = np.random.default_rng(0)
  names = [f'blocks.{k}.weight' for k in range(FLAGS.tensors)]
  files = [f'diffusion_pytorch_model-{i + 1:05d}-of-00002.safetensors' for i in range(2)]
  weight_map, size = {}, 0
  for i, file_name in enumerate(files):
    part = {n: rng.standard_normal((rows, COLUMNS), dtype=np.float32) for n in names[i::2]}
    save_file(part, os.path.join(folder, file_name))
    weight_map.update({n: file_name for n in part})
    size += sum(t.nbytes for t in part.values())
  with open(os.path.join(folder, 'diffusion_pytorch_model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {'total_size': size}, 'weight_map': weight_map}, f)
  return size


def measure(folder: str, reader: str) -> list:
  """Each process's figures for one reader."""
  from vdit_jax.tools import launch_local  # pylint: disable=g-import-not-at-top
  port = launch_local.free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={FLAGS.devices_per_process}',
             PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get('PYTHONPATH')) if p))
  procs = [subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), f'--worker={i}', f'--port={port}',
       f'--processes={FLAGS.processes}', f'--folder={folder}', f'--reader={reader}'],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(FLAGS.processes)]
  rows = []
  for p in procs:
    out, _ = p.communicate(timeout=900)
    if p.returncode != 0:
      raise RuntimeError(f'a {reader} worker exited with {p.returncode}:\n{out[-3000:]}')
    rows.append(dict(json.loads(out.strip().splitlines()[-1]), reader=reader))
  return rows


def main(argv):
  del argv
  if FLAGS.worker >= 0:
    worker()
    return
  with tempfile.TemporaryDirectory(dir=FLAGS.tmpdir) as tmp:
    start = time.perf_counter()
    size = write_checkpoint(tmp)
    print(f'checkpoint: {FLAGS.tensors} f32 tensors, {size / 2**20:.0f} MiB '
          f'({time.perf_counter() - start:.1f} s to write); {FLAGS.processes} processes x '
          f'{FLAGS.devices_per_process} device(s)', flush=True)
    rows = []
    for reader in FLAGS.readers:
      for r in measure(tmp, reader):
        r['share'] = r['bytes_held'] / size
        r['rss_growth_over_checkpoint'] = r['rss_growth'] / size
        rows.append(r)
        print(f'{reader:9s} process {r["process"]}: share {r["bytes_held"] / 2**20:7.1f} MiB '
              f'({r["share"]:.3f}), bytes read {r["bytes_read"] / 2**20:7.1f} MiB, '
              f'peak RSS growth {r["rss_growth"] / 2**20:7.1f} MiB '
              f'({r["rss_growth_over_checkpoint"]:.2f} x checkpoint), '
              f'load {r["load_s"]:.2f} s', flush=True)
  print(json.dumps({'checkpoint_bytes': size, 'processes': FLAGS.processes,
                    'devices_per_process': FLAGS.devices_per_process, 'rows': rows}))


if __name__ == '__main__':
  app.run(main)
