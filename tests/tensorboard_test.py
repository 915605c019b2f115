"""TensorBoard event files from train/tensorboard.py (tensorboardX's records, written through
parallel.paths), read back with TensorBoard's own loaders."""

import glob
import io
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.util import tensor_util

from configs import tiny
from tests.gcs_emulator import gcs  # pylint: disable=unused-import  # the fixture
from vdit_jax.config import validate
from vdit_jax.parallel import paths
from vdit_jax.train import loop
from vdit_jax.train import metrics as metrics_lib
from vdit_jax.train import tensorboard

_ALL = {event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0,
        event_accumulator.TENSORS: 0}


def _accumulator(logdir):
  acc = event_accumulator.EventAccumulator(logdir, size_guidance=_ALL)
  acc.Reload()
  return acc


def test_records_are_tensorboardx_framing_through_paths(tmp_path):
  # tensorboardX frames the records (its RecordWriter, its CRC-32C); the file they land in
  # is this module's, and tensorboardX's own gs:// and s3:// writers stay registered.
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  writer = tensorboard.EventFileWriter(str(tmp_path))
  writer.scalars(1, {'a': 1.0})
  data = open(writer.path, 'rb').read()  # written at once, before any flush or close
  length = struct.unpack('<Q', data[:8])[0]
  assert struct.unpack('<I', data[8:12])[0] == record_writer.masked_crc32c(data[:8])
  assert struct.unpack('<I', data[12 + length:16 + length])[0] == record_writer.masked_crc32c(
      data[12:12 + length])
  writer.close()
  assert [e.step for e in event_file_loader.EventFileLoader(writer.path).Load()] == [0, 1]
  ours = record_writer.REGISTERED_FACTORIES[tensorboard._PREFIX]  # pylint: disable=protected-access
  assert not isinstance(record_writer.REGISTERED_FACTORIES['gs'], type(ours))
  assert not isinstance(record_writer.REGISTERED_FACTORIES['s3'], type(ours))


def test_writer_in_a_bucket_through_paths(gcs, tmp_path):
  """Event files in a bucket (the GCS emulator, reached by etils.epath like every other
  file of a run): rewritten on flush and close, a new file past max_remote_bytes."""
  logdir = f'gs://{gcs.new_bucket()}/run/tensorboard'
  writer = tensorboard.EventFileWriter(logdir, flush_interval_s=3600, max_remote_bytes=300)
  first = writer.path
  written = len(paths.read_bytes(first))  # the file version, uploaded at the first append
  writer.text(0, 'config', 'x' * 200)
  assert len(paths.read_bytes(first)) == written  # not yet: at most every flush_interval_s
  writer.flush()
  assert len(paths.read_bytes(first)) > written + 200
  for step in (1, 2, 3):
    writer.scalars(step, {'loss': float(step)})
  writer.close()
  names = paths.listdir(logdir)
  assert len(names) == 2 and os.path.basename(first) in names  # rolled over past 300 bytes
  # TensorBoard reads a folder's files in name order: the first file sorts first, even when
  # both were started within one second (the random part alone sorted them half the time).
  assert sorted(names)[0] == os.path.basename(first)
  for name in names:
    (tmp_path / name).write_bytes(paths.read_bytes(paths.join(logdir, name)))
  acc = _accumulator(str(tmp_path))
  assert [(e.step, e.value) for e in acc.Scalars('loss')] == [(1, 1.0), (2, 2.0), (3, 3.0)]
  assert acc.Tensors('config')[0].tensor_proto.string_val == [b'x' * 200]


def test_png_round_trip_exact():
  rng = np.random.default_rng(0)
  for channels in (1, 3, 4):
    image = rng.integers(0, 256, (7, 11, channels), dtype=np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(tensorboard.encode_png(image))))
    np.testing.assert_array_equal(decoded.reshape(image.shape), image)
  with pytest.raises(ValueError, match='uint8'):
    tensorboard.encode_png(np.zeros((4, 4, 3), np.float32))


def test_writer_events_read_by_tensorboard_loader(tmp_path):
  writer = tensorboard.EventFileWriter(str(tmp_path))
  writer.scalars(5, {'a': 0.1, 'b': -3.0})
  writer.text(0, 'note', 'hello *world*')
  writer.close()
  # EventFileLoader passes events through TensorBoard's read-time compat layer (the path
  # its UI backend takes): simple_values come out as the scalars plugin's tensors.
  events = list(event_file_loader.EventFileLoader(writer.path).Load())
  assert events[0].file_version == tensorboard.FILE_VERSION
  assert events[1].step == 5
  values = {v.tag: tensor_util.make_ndarray(v.tensor) for v in events[1].summary.value}
  assert values == {'a': np.float32(0.1), 'b': -3.0}
  assert events[1].summary.value[0].metadata.plugin_data.plugin_name == 'scalars'
  text = events[2].summary.value[0]
  assert text.metadata.plugin_data.plugin_name == 'text'
  assert text.tensor.string_val == [b'hello *world*']


def test_session_start_drops_points_past_the_restart(tmp_path):
  first = tensorboard.EventFileWriter(str(tmp_path))
  for step in (1, 2, 3, 4):
    first.scalars(step, {'loss': float(step)})
  first.close()
  second = tensorboard.EventFileWriter(str(tmp_path))  # resumed from a checkpoint at step 2
  assert second.path != first.path
  second.session_start(3)
  second.scalars(3, {'loss': 30.0})
  second.close()
  points = [(e.step, e.value) for e in _accumulator(str(tmp_path)).Scalars('loss')]
  assert points == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_disabled_board_writes_nothing(tmp_path):
  board = tensorboard.TrainBoard(str(tmp_path), enabled=False)
  board.start(tiny.get_config(), 0, resumed=False)
  board.scalars(1, {'loss': 1.0})
  board.samples(1, np.zeros((1, 2, 4, 4, 3), np.float32))
  board.close()
  assert not os.path.exists(os.path.join(tmp_path, tensorboard.LOG_DIRNAME))


def test_tensorboardx_is_imported_by_the_first_writer_only():
  """Its import takes seconds (google-cloud-storage, and torch where installed): a run
  without TensorBoard, or a process other than 0, does not pay for it."""
  code = ('import sys; from vdit_jax.train import tensorboard; '
          "tensorboard.TrainBoard(sys.argv[1], enabled=False).close(); "
          "print('tensorboardX' in sys.modules)")
  out = subprocess.run([sys.executable, '-c', code, '/nonexistent'], capture_output=True,
                       text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.stdout.strip() == 'False', out.stderr


def test_config_key_must_be_a_bool():
  config = tiny.get_config()
  assert config.train.tensorboard is True  # on by default
  config.train.tensorboard = None
  with pytest.raises(ValueError, match='config.train.tensorboard=None must be True or False'):
    validate.validate_config(config, 1)


def _small_config():
  config = tiny.get_config()
  config.model.variant = None
  config.model.width = 48
  config.model.depth = 1
  config.model.num_heads = 2
  config.model.mlp_dim = 64
  config.model.patch_size = (1, 4, 4)
  config.data.num_frames = 3
  config.data.height = 16
  config.data.width = 16
  config.train.batch_size = 2
  config.train.num_steps = 2
  config.train.warmup_steps = 1
  config.train.log_every = 1
  config.checkpoint.every_steps = 1
  config.checkpoint.async_save = False
  config.sample.num_steps = 2
  config.sample.num_samples = 2
  config.sample.formats = 'gif'
  config.train.tensorboard = True
  return config


def test_train_run_writes_scalars_samples_and_config(tmp_path):
  workdir = str(tmp_path)
  config = _small_config()
  loop.train_and_evaluate(config, workdir)

  logdir = os.path.join(workdir, tensorboard.LOG_DIRNAME)
  assert len(glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))) == 1
  acc = _accumulator(logdir)

  # Scalars: every key of every metrics.jsonl record, at float32 precision, exactly.
  records = metrics_lib.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  assert [r['step'] for r in records] == [1, 2]
  keys = sorted(k for k in records[-1] if k != 'step')
  assert {'loss', 'grad_norm', 'learning_rate', 'wall_s'} <= set(keys)
  assert sorted(acc.Tags()['scalars']) == sorted(f'train/{k}' for k in keys)
  for key in keys:
    want = [(r['step'], np.float32(r[key])) for r in records if key in r]
    got = [(e.step, np.float32(e.value)) for e in acc.Scalars(f'train/{key}')]
    assert got == want, key

  # The final samples as one frame grid: rows = 2 clips, columns = 3 frames, 16 px tiles
  # upscaled x4, 1 px between tiles.
  (image,) = acc.Images('samples')
  assert image.step == 2
  assert (image.height, image.width) == (2 * 64 + 1, 3 * 64 + 2)
  pixels = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))
  assert pixels.shape == (image.height, image.width, 3)
  assert pixels.std() > 0  # not a blank picture

  # The config as text at the start.
  texts = acc.Tensors('config')
  assert [t.step for t in texts] == [0]
  assert acc.SummaryMetadata('config').plugin_data.plugin_name == 'text'
  text = texts[-1].tensor_proto.string_val[0].decode()
  assert text == tensorboard.config_markdown(config)
  assert json.loads(text.removeprefix('```json\n').removesuffix('\n```')) == json.loads(
      config.to_json_best_effort())
