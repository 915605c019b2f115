"""TensorBoard event files with no TensorFlow (and no protobuf) dependency.

An event file is a sequence of TFRecords, each holding one serialised `Event` proto:

  record = uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)

(little-endian; masked_crc(x) = rotate_right(crc32c(x), 15) + 0xa282ead8). The few proto
messages TensorBoard needs for scalars, images and text are hand-encoded below (field numbers
from tensorflow/core/util/event.proto and framework/summary.proto, tensor.proto,
tensor_shape.proto), and PNGs are written with zlib + struct. Everything is readable by
TensorBoard's own loaders (tests/tensorboard_test.py reads it with its EventAccumulator).

The train loop uses `TrainBoard`: WORKDIR/tensorboard/events.out.tfevents.*, written by
process 0 only when `config.train.tensorboard` is true:
  - text `config` at start (the run's config as a JSON code block),
  - scalars `train/<key>` for every key of every metrics.jsonl record,
  - image `samples` when samples are written: a frame grid, one row per sample clip and
    one column per frame.
A resumed run starts a new file with a SessionLog START at the step after the restored one,
so TensorBoard drops the points that the earlier run logged past its last checkpoint.
"""

import os
import secrets
import socket
import struct
import time
import zlib
from typing import Mapping, Optional

import jax
import numpy as np

from vdit_jax.data import video_io
from vdit_jax.parallel import paths

LOG_DIRNAME = 'tensorboard'
FILE_VERSION = 'brain.Event:2'

# Proto wire types and the enum values used below.
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5
_DT_STRING = 7  # tensorflow.DataType
_DATA_CLASS_TENSOR = 2  # tensorboard SummaryMetadata.DataClass
_SESSION_START = 1  # tensorflow.SessionLog.SessionStatus


# ---------------------------------------------------------------------------------------
# CRC32C (Castagnoli) and TFRecord framing.

def _crc32c_table():
  table = []
  for n in range(256):
    c = n
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C of `data` (reflected polynomial 0x82F63B78); crc32c(b'123456789') == 0xE3069283."""
  crc = 0xFFFFFFFF
  table = _CRC32C_TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: length, its masked CRC, the data, the data's masked CRC."""
  header = struct.pack('<Q', len(data))
  return (header + struct.pack('<I', masked_crc32c(header)) + data
          + struct.pack('<I', masked_crc32c(data)))


# ---------------------------------------------------------------------------------------
# Protobuf encoding of the messages used.

def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # negative int64 -> two's complement, as protobuf does
  out = bytearray()
  while True:
    bits = n & 0x7F
    n >>= 7
    if n:
      out.append(bits | 0x80)
    else:
      out.append(bits)
      return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint(field << 3 | wire_type)


def _int_field(field: int, value: int) -> bytes:
  return _key(field, _VARINT) + _varint(int(value))


def _bytes_field(field: int, value) -> bytes:
  value = value.encode('utf-8') if isinstance(value, str) else bytes(value)
  return _key(field, _BYTES) + _varint(len(value)) + value


def _double_field(field: int, value: float) -> bytes:
  return _key(field, _FIXED64) + struct.pack('<d', float(value))


def _float_field(field: int, value: float) -> bytes:
  return _key(field, _FIXED32) + struct.pack('<f', float(value))


def _event(step: int, *, summary_values=(), file_version: Optional[str] = None,
           session_log: Optional[bytes] = None, wall_time: Optional[float] = None) -> bytes:
  """Event{wall_time=1, step=2, file_version=3 | summary=5 | session_log=7}."""
  out = _double_field(1, time.time() if wall_time is None else wall_time) + _int_field(2, step)
  if file_version is not None:
    out += _bytes_field(3, file_version)
  if summary_values:
    out += _bytes_field(5, b''.join(_bytes_field(1, v) for v in summary_values))  # Summary.value
  if session_log is not None:
    out += _bytes_field(7, session_log)
  return out


def _scalar_value(tag: str, value: float) -> bytes:
  """Summary.Value{tag=1, simple_value=2}."""
  return _bytes_field(1, tag) + _float_field(2, value)


def _image_value(tag: str, png: bytes, height: int, width: int, channels: int) -> bytes:
  """Summary.Value{tag=1, image=4: Image{height=1, width=2, colorspace=3, encoded=4}}."""
  image = (_int_field(1, height) + _int_field(2, width) + _int_field(3, channels)
           + _bytes_field(4, png))
  return _bytes_field(1, tag) + _bytes_field(4, image)


def _text_value(tag: str, text: str) -> bytes:
  """Summary.Value{tag=1, metadata=9, tensor=8}: a scalar DT_STRING tensor for the text plugin.

  SummaryMetadata{plugin_data=1: PluginData{plugin_name=1, content=2}, data_class=4};
  TensorProto{dtype=1, tensor_shape=2 (no dims: a scalar), string_val=8}.
  """
  plugin = _bytes_field(1, 'text') + _bytes_field(2, b'')  # TextPluginData{version=0}
  metadata = _bytes_field(1, plugin) + _int_field(4, _DATA_CLASS_TENSOR)
  tensor = _int_field(1, _DT_STRING) + _bytes_field(2, b'') + _bytes_field(8, text)
  return _bytes_field(1, tag) + _bytes_field(9, metadata) + _bytes_field(8, tensor)


# ---------------------------------------------------------------------------------------
# PNG.

def encode_png(image) -> bytes:
  """uint8 [H, W, C] (C = 1 grey, 3 RGB, 4 RGBA) -> PNG bytes (8 bits, no interlace)."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f'encode_png expects uint8 [H, W, C] with C in (1, 3, 4), got '
                     f'{image.dtype} {image.shape}.')
  height, width, channels = image.shape
  if height == 0 or width == 0:
    raise ValueError(f'encode_png got an empty image of shape {image.shape}.')
  colour_type = {1: 0, 3: 2, 4: 6}[channels]
  rows = image.reshape(height, width * channels)  # [H, W*C]
  raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1)  # filter byte 0 per row

  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack('>I', len(data)) + kind + data
            + struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF))

  header = struct.pack('>IIBBBBB', width, height, 8, colour_type, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header)
          + chunk(b'IDAT', zlib.compress(raw.tobytes(), 6)) + chunk(b'IEND', b''))


def frame_grid(videos, *, pad: int = 1, min_tile: int = 64) -> np.ndarray:
  """[N, T, H, W, C] clips in [-1, 1] -> uint8 [N*H' + (N-1)*pad, T*W' + (T-1)*pad, C].

  Row n is clip n, column t its frame t; tiles are upscaled (nearest) by
  max(1, min_tile // H) so that small clips stay visible.
  """
  videos = video_io.to_uint8(np.asarray(jax.device_get(videos)))  # [N, T, H, W, C]
  if videos.ndim != 5:
    raise ValueError(f'frame_grid expects videos [N, T, H, W, C], got shape {videos.shape}.')
  n, t, h, w, c = videos.shape
  scale = max(1, min_tile // h)
  frames = videos.reshape(n * t, 1, h, w, c)  # [N*T, 1, H, W, C]: one "clip" per frame
  return video_io.make_grid(frames, ncols=t, pad=pad, scale=scale)[0]  # [H', W', C]


# ---------------------------------------------------------------------------------------
# Writers.

class EventFileWriter:
  """Appends events to a new events.out.tfevents.* file in `logdir`.

  Locally each event reaches the file at once. In a bucket (objects cannot be appended
  to) the file is rewritten whole at most every `flush_interval_s` seconds and at
  `close`, and a file past `max_remote_bytes` is closed and a new one started (the
  reader takes every file of the folder), so no rewrite grows without bound.
  """

  def __init__(self, logdir: str, flush_interval_s: float = 60.0,
               max_remote_bytes: int = 16 << 20):
    self.logdir = paths.normalize(logdir)
    self.flush_interval_s = flush_interval_s
    self.max_remote_bytes = max_remote_bytes
    self._file = None
    self._open()

  def _open(self) -> None:
    stem = f'events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}'
    if paths.is_remote(self.logdir):
      # No exclusive create in a bucket: the random part keeps two writers apart.
      self.path = paths.join(self.logdir, f'{stem}.{secrets.token_hex(4)}')
    else:
      os.makedirs(self.logdir, exist_ok=True)
      index = 0
      while True:  # a name no other writer holds (several writers in one second and process)
        self.path = os.path.join(self.logdir, f'{stem}.{index}')
        try:
          os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
          break
        except FileExistsError:
          index += 1
    self._file = paths.GrowingFile(self.path, self.flush_interval_s)
    self._file.append(tfrecord(_event(0, file_version=FILE_VERSION)))

  def _write(self, event: bytes) -> None:
    if self._file.remote and self._file.size >= self.max_remote_bytes:
      self._file.close()
      self._open()
    self._file.append(tfrecord(event))

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """One event holding a simple_value (float32) per tag."""
    if values:
      self._write(_event(step, summary_values=[
          _scalar_value(tag, value) for tag, value in values.items()]))

  def image(self, step: int, tag: str, image) -> None:
    """uint8 [H, W, C] image, stored as PNG."""
    image = np.asarray(image)
    png = encode_png(image)
    self._write(_event(step, summary_values=[_image_value(tag, png, *image.shape)]))

  def text(self, step: int, tag: str, markdown: str) -> None:
    self._write(_event(step, summary_values=[_text_value(tag, markdown)]))

  def session_start(self, step: int) -> None:
    """SessionLog START: readers drop the points of earlier files at steps >= `step`."""
    self._write(_event(step, session_log=_int_field(1, _SESSION_START)))

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def config_markdown(config) -> str:
  """The config as a fenced JSON block (the text plugin renders Markdown)."""
  return '```json\n' + config.to_json_best_effort(indent=2) + '\n```'


def _is_number(value) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


class TrainBoard:
  """The train loop's TensorBoard hooks; they do nothing unless enabled and on process 0."""

  def __init__(self, workdir: str, enabled: bool):
    self.logdir = paths.join(workdir, LOG_DIRNAME)
    self._writer = (EventFileWriter(self.logdir)
                    if enabled and jax.process_index() == 0 else None)

  @property
  def enabled(self) -> bool:
    return self._writer is not None

  def start(self, config, step: int, resumed: bool) -> None:
    """The config text at `step`; after a resume, a session start at step + 1 first."""
    if self._writer is None:
      return
    if resumed:
      self._writer.session_start(step + 1)
    self._writer.text(step, 'config', config_markdown(config))

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if self._writer is not None:
      self._writer.scalars(step, {f'train/{k}': float(v) for k, v in values.items()
                                  if _is_number(v)})

  def samples(self, step: int, videos) -> None:
    """videos [N, T, H, W, C] in [-1, 1] -> image `samples` (rows clips, columns frames);
    clips that are not frames (C not 1 or 3: undecoded latents) have no image."""
    if self._writer is not None and np.shape(videos)[-1] in (1, 3):
      self._writer.image(step, 'samples', frame_grid(videos))

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
