"""Data in a bucket: `data.path=gs://...` for the files and shards sources, and the tools
that write shards and latents to a bucket, against a real GCS emulator (gcs_emulator.py).

A module fixture writes a tiny class-folder dataset (4-frame 16x16 clips of the synthetic
source) to local disk and the same bytes to gs://BUCKET/videos:

    videos/a/clip0.mp4  clip1.gif
    videos/b/clip2.mp4  clip3.mp4  corrupt.mp4 (random bytes)

Every bucket result is compared with the same data read from local disk.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests import data_sources_test
from tests.gcs_emulator import gcs  # pylint: disable=unused-import  # the fixture
from vdit_jax.data import pipeline
from vdit_jax.data import shards
from vdit_jax.data import synthetic
from vdit_jax.data import video_files
from vdit_jax.data import video_io
from vdit_jax.parallel import paths
from vdit_jax.tools import encode_latents
from vdit_jax.tools import make_shards as make_shards_lib
from vdit_jax.vae import checkpoint
from vdit_jax.vae import latents as latents_lib
from vdit_jax.vae.config import VAEConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIPS = {'a/clip0.mp4': 0, 'a/clip1.gif': 1, 'b/clip2.mp4': 2, 'b/clip3.mp4': 3}
READABLE = sorted(CLIPS)
# One downsampling, in space only: 4 frames of 16x16 -> latents [4, 8, 8, 4].
VAE = dict(base_dim=8, z_dim=4, dim_mult=(1, 1), num_res_blocks=1,
           temporal_downsample=(False,), latents_mean=(0.1, -0.2, 0.3, 0.0),
           latents_std=(1.5, 2.0, 0.5, 1.0))


def _client_env(gcs):
  env = {k: v for k, v in os.environ.items() if k not in gcs.env}
  env.update(gcs.env)
  return env


def _upload_tree(local_root, url):
  for folder, _, files in os.walk(local_root):
    for name in files:
      local = os.path.join(folder, name)
      relative = os.path.relpath(local, local_root).replace(os.sep, '/')
      with open(local, 'rb') as f:
        paths.write_bytes(f'{url}/{relative}', f.read())


@pytest.fixture(scope='module')
def data(gcs, tmp_path_factory):
  """(local videos folder, its copy gs://.../videos, the bucket URL)."""
  root = tmp_path_factory.mktemp('gcs_data')
  videos = root / 'videos'
  source = synthetic.SyntheticShapes(4, 16, 16, num_examples=4, seed=0)
  for name, i in CLIPS.items():
    video_io.write_video(videos / name, source[i]['video'], fps=8)
  (videos / 'b' / 'corrupt.mp4').write_bytes(np.random.default_rng(0).bytes(2048))
  bucket = f'gs://{gcs.new_bucket()}'
  _upload_tree(videos, f'{bucket}/videos')
  return str(videos), f'{bucket}/videos', bucket


def _data_config(source, path, **overrides):
  return data_sources_test._data_config(  # pylint: disable=protected-access
      source, path, **dict(dict(crop='random'), **overrides))


def _batches(config, count=3):
  it = pipeline.make_dataset(config, batch_size=2, seed=3, process_index=0, process_count=1)
  return [next(it) for _ in range(count)]


def _assert_same_batches(got, want):
  for g, w in zip(got, want):
    assert sorted(g) == sorted(w)
    for key in w:
      np.testing.assert_array_equal(g[key], w[key], err_msg=key)


def test_files_source_in_a_bucket_equals_local(data):
  local, url, _ = data
  listing = video_files.list_videos(url)
  assert listing.class_names == ('a', 'b') and listing.root == url
  assert list(listing.relative) == READABLE + ['b/corrupt.mp4']
  assert list(listing.paths) == [f'{url}/{n}' for n in listing.relative]
  assert listing.labels == video_files.list_videos(local).labels == (0, 0, 1, 1, 1)
  assert video_files.list_videos(f'file://{local}').relative == listing.relative
  # Globs: glob's rules on the bucket's names, the same files as on disk.
  for pattern in ('*/*.mp4', '**/clip[0-2].*', 'b/*', 'a/**/*', '?/clip[!2]*'):
    got = video_files.list_videos(f'{url}/{pattern}').relative
    assert got == video_files.list_videos(os.path.join(local, pattern)).relative, pattern
  assert video_files.list_videos(f'{url}/**/*.gif').relative == ('a/clip1.gif',)

  source = video_files.VideoFiles(url, video_files.ClipSpec(4, 16, 16))
  assert [p.rsplit('/', 1)[-1] for p, _ in source.skipped] == ['corrupt.mp4']
  assert source.frame_counts == (4, 4, 4, 4)
  _assert_same_batches(_batches(_data_config('files', url)),
                       _batches(_data_config('files', local)))
  assert pipeline.num_classes(_data_config('files', url + '/')) == 2


def _read_all(directory):
  source = shards.ShardSource(directory)
  return [source[i] for i in range(len(source))]


def test_make_shards_to_a_bucket_reads_back_as_local(data, gcs, tmp_path):
  local, url, bucket = data
  out = f'{bucket}/shards'
  args = ['--num_shards=2', '--num_frames=4', '--height=16', '--width=16', '--num_workers=0']
  result = subprocess.run(
      [sys.executable, '-m', 'vdit_jax.tools.make_shards', f'--videos={url}', f'--out={out}',
       *args], cwd=REPO, env=_client_env(gcs), capture_output=True, text=True, timeout=300,
      check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'wrote 4 clips of [4, 16, 16, 3] in 2 shard(s), 2 class(es), 1 video(s)' in (
      result.stdout)
  local_out = str(tmp_path / 'shards')
  want = make_shards_lib.make_shards(local, local_out, num_shards=2, num_frames=4,
                                     height=16, width=16, num_workers=0, progress=None)
  index = shards.read_index(out)
  assert index['source'] == url and index['shards'] == want['shards']
  assert [s['path'] for s in index['skipped']] == [f'{url}/b/corrupt.mp4']
  assert paths.listdir(out) == sorted(['index.json'] + [s['name'] for s in index['shards']])
  for shard in index['shards']:  # the same bytes as the shards written locally
    assert paths.read_bytes(f'{out}/{shard["name"]}') == paths.read_bytes(
        os.path.join(local_out, shard['name']))
  got, records = _read_all(out), _read_all(local_out)
  assert [r['key'] for r in got] == READABLE
  _assert_same_batches(got, records)
  _assert_same_batches(_batches(_data_config('shards', out + '/')),
                       _batches(_data_config('shards', local_out)))

  # Without the C++ client's emulator variable array_record would wait on the real GCS:
  # refused when the config is checked, before anything compiles.
  with pytest.MonkeyPatch.context() as patch:
    patch.delenv('CLOUD_STORAGE_EMULATOR_ENDPOINT')
    with pytest.raises(ValueError, match='needs CLOUD_STORAGE_EMULATOR_ENDPOINT'):
      pipeline.num_classes(_data_config('shards', out))

  # A shard whose every video is skipped is left out and the rest renamed, in the bucket
  # too (5 videos in 5 shards: the last holds only corrupt.mp4); what an interrupted run
  # left (a shard with no index, a temporary) is removed.
  for leftover in (shards.shard_name(7, 9), '.tmp-shard-x.array_record'):
    paths.write_bytes(f'{out}/{leftover}', b'unfinished')
  index = make_shards_lib.make_shards(url, out, num_shards=5, num_frames=4, height=16,
                                      width=16, num_workers=0, overwrite=True, progress=None)
  assert [s['name'] for s in index['shards']] == [shards.shard_name(j, 4) for j in range(4)]
  assert paths.listdir(out) == sorted(['index.json'] + [s['name'] for s in index['shards']])
  _assert_same_batches(_read_all(out), records)
  with pytest.raises(ValueError, match='already holds shards'):
    make_shards_lib.make_shards(url, out, num_shards=2, num_frames=4, height=16, width=16,
                                num_workers=0, progress=None)


def test_encode_latents_to_a_bucket(data, tmp_path):
  local, _, bucket = data
  shard_dir = f'{bucket}/clips'
  make_shards_lib.make_shards(local, shard_dir, num_shards=1, num_frames=4, height=16,
                              width=16, num_workers=0, progress=None)
  cfg = VAEConfig(**VAE)
  params = checkpoint.init_params(cfg, jax.random.PRNGKey(0))
  vae_dir = checkpoint.save(f'{bucket}/vae/', cfg, params)
  assert vae_dir == f'{bucket}/vae' and paths.isfile(f'{vae_dir}/{checkpoint.INFO_NAME}')
  out = f'{bucket}/latents'
  index = encode_latents.encode_latents(shard_dir, vae_dir, out, num_shards=2, batch_size=4,
                                        progress=None)
  assert index['clip_shape'] == [4, 8, 8, 4] and index['vae']['path'] == vae_dir
  assert shards.read_index(out)['shards'] == index['shards']
  local_vae = checkpoint.save(tmp_path / 'vae', cfg, params)
  want = encode_latents.encode_latents(shard_dir, local_vae, str(tmp_path / 'latents'),
                                       num_shards=2, batch_size=4, progress=None)
  assert want['shards'] == index['shards']
  got, records = _read_all(out), _read_all(str(tmp_path / 'latents'))
  assert [r['key'] for r in got] == READABLE
  _assert_same_batches(got, records)

  # The VAE the index records is found and loads from the bucket.
  config = _data_config('shards', out, latents=True, num_frames=4, height=8, width=8,
                        channels=4)
  space = latents_lib.resolve(config)
  assert space.vae_path == vae_dir
  np.testing.assert_allclose(space.mean, VAE['latents_mean'])
  loaded_cfg, loaded = checkpoint.load(space.vae_path)
  assert loaded_cfg == cfg
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_missing_bucket_paths_name_the_config_value(data):
  _, url, bucket = data
  for path in (f'{bucket}/nope', 'gs://no-such-bucket-vdit/videos'):
    with pytest.raises(FileNotFoundError, match=f"data.path='{path}' does not exist"):
      pipeline.num_classes(_data_config('files', path))
    with pytest.raises(FileNotFoundError, match=f"data.path='{path}' does not exist"):
      pipeline.num_classes(_data_config('shards', path))
  with pytest.raises(FileNotFoundError, match=f"data.path='{url}' has no index.json"):
    pipeline.num_classes(_data_config('shards', url))
  with pytest.raises(FileNotFoundError, match='matches no video files'):
    video_files.list_videos(f'{url}/*/*.webm')
  with pytest.raises(ValueError, match='must name its bucket without wildcards'):
    video_files.list_videos('gs://*/videos/*.mp4')
  with pytest.raises(FileNotFoundError, match='No video file at'):
    video_io.read_frames(f'{url}/a/missing.mp4', [0])


def test_write_video_to_a_bucket(data):
  _, _, bucket = data
  frames = synthetic.SyntheticShapes(6, 16, 16, num_examples=1, seed=1)[0]['video']
  for ext in ('mp4', 'gif'):
    target = f'{bucket}/samples/step_1.{ext}'
    assert video_io.write_video(target, frames, fps=8) == target
    head = paths.read_bytes(target)[:8]
    assert head.startswith(b'GIF8') if ext == 'gif' else head[4:] == b'ftyp'
    back = video_io.read_video(target)
    assert back.shape == (6, 16, 16, 3) and video_io.count_frames(target) == 6
    error = np.abs(back.astype(np.float32) - frames.astype(np.float32)).mean()
    assert error < 3.0, (ext, error)
  assert paths.listdir(f'{bucket}/samples') == ['step_1.gif', 'step_1.mp4']  # no temporaries
