"""TensorBoard event files, written by tensorboardX and stored through `parallel.paths`.

tensorboardX supplies the event-file format with no TensorFlow: its copies of TensorBoard's
protos (`Event`, `Summary`, `SessionLog`, the text plugin's data) and its `RecordWriter`,
which frames each serialised event as a TFRecord (length, data, their masked CRC-32Cs).
What it hands on are bytes; they go to a `paths.GrowingFile`, so event files live wherever
the run's other files do (a local folder, or a bucket through etils.epath, with its
credentials and, in tests, its emulator). tensorboardX's own gs:// writer is not used: it
uploads with its own google-cloud-storage client, and rewrites the whole object at every
flush with no size limit (see BUILD_NOTES.md, dependencies). Its writer is reached through
tensorboardX's registry of writer factories, under this module's prefix. tensorboardX is
imported by the first writer, not with this module: the import takes about 1 s (its
record_writer imports google-cloud-storage), 3.7 s where torch is installed (its writer
imports torch when it can), and a run without TensorBoard, or a process other than 0,
needs none of it.

The train loop uses `TrainBoard`: WORKDIR/tensorboard/events.out.tfevents.*, written by
process 0 only when `config.train.tensorboard` is true:
  - text `config` at start (the run's config as a JSON code block),
  - scalars `train/<key>` for every key of every metrics.jsonl record,
  - image `samples` when samples are written: a frame grid, one row per sample clip and
    one column per frame (a PNG, encoded by Pillow).
A resumed run starts a new file with a SessionLog START at the step after the restored one,
so TensorBoard drops the points that the earlier run logged past its last checkpoint.
"""

import io
import os
import secrets
import socket
import threading
import time
import types
from typing import Mapping

import jax
import numpy as np

from vdit_jax.data import video_io
from vdit_jax.parallel import paths

LOG_DIRNAME = 'tensorboard'
FILE_VERSION = 'brain.Event:2'


# ---------------------------------------------------------------------------------------
# Where tensorboardX's RecordWriter puts its bytes: a paths.GrowingFile.

_PREFIX = 'vdit-paths'  # tensorboardX picks a writer factory by the text before the first ':'


class _GrowingFileSink:
  """The file object a RecordWriter writes to: a record's pieces are gathered, and each
  `flush` (which EventFileWriter asks for after every record) appends them to the file."""

  def __init__(self, growing: paths.GrowingFile):
    self.file = growing
    self._pending = []

  def write(self, data: bytes) -> None:
    self._pending.append(bytes(data))

  def flush(self) -> None:
    if self._pending:
      self.file.append(b''.join(self._pending))
      self._pending = []

  def close(self) -> None:
    self.flush()
    self.file.close()


class _GrowingFileFactory:
  """tensorboardX's writer factory: `open('vdit-paths:<path>')` gives the sink of the
  GrowingFile that `expect` registered for <path>."""

  def __init__(self):
    self._lock = threading.Lock()
    self._expected = {}

  def expect(self, growing: paths.GrowingFile) -> str:
    with self._lock:
      self._expected[growing.path] = growing
    return f'{_PREFIX}:{growing.path}'

  def open(self, path: str) -> _GrowingFileSink:
    with self._lock:
      return _GrowingFileSink(self._expected.pop(path[len(_PREFIX) + 1:]))

  def directory_check(self, path: str) -> None:
    del path  # EventFileWriter makes local folders itself; buckets have none


_FACTORY = _GrowingFileFactory()
_IMPORT_LOCK = threading.Lock()
_TBX = None


def _tbx() -> types.SimpleNamespace:
  """tensorboardX's modules used here (imported, and the factory registered, once)."""
  global _TBX
  with _IMPORT_LOCK:
    if _TBX is None:
      # pylint: disable=g-import-not-at-top
      from tensorboardX import record_writer
      from tensorboardX.proto import event_pb2
      from tensorboardX.proto import plugin_text_pb2
      from tensorboardX.proto import summary_pb2
      from tensorboardX.proto import tensor_pb2
      from tensorboardX.proto import tensor_shape_pb2
      # pylint: enable=g-import-not-at-top
      record_writer.register_writer_factory(_PREFIX, _FACTORY)
      _TBX = types.SimpleNamespace(
          record_writer=record_writer, event_pb2=event_pb2, plugin_text_pb2=plugin_text_pb2,
          summary_pb2=summary_pb2, tensor_pb2=tensor_pb2, tensor_shape_pb2=tensor_shape_pb2)
    return _TBX


# ---------------------------------------------------------------------------------------
# Events and summaries (tensorboardX's protos).

def _event(step: int, *, summary=None, session_log=None):
  """An Event at `step` holding a Summary or a SessionLog."""
  event = _tbx().event_pb2.Event(wall_time=time.time(), step=int(step))
  if summary is not None:
    event.summary.CopyFrom(summary)
  if session_log is not None:
    event.session_log.CopyFrom(session_log)
  return event


def _text_value(tag: str, text: str):
  """The text plugin's value: a scalar DT_STRING tensor (rendered as Markdown; the [1]
  tensor of tensorboardX's `summary.text` would be shown as a table), under `tag` itself
  (`summary.text` appends '/text_summary')."""
  tbx = _tbx()
  content = tbx.plugin_text_pb2.TextPluginData(version=0).SerializeToString()
  plugin = tbx.summary_pb2.SummaryMetadata.PluginData(plugin_name='text', content=content)
  tensor = tbx.tensor_pb2.TensorProto(
      dtype='DT_STRING', string_val=[text.encode('utf-8')],
      tensor_shape=tbx.tensor_shape_pb2.TensorShapeProto())  # no dims: a scalar
  return tbx.summary_pb2.Summary.Value(
      tag=tag, metadata=tbx.summary_pb2.SummaryMetadata(plugin_data=plugin), tensor=tensor)


def encode_png(image) -> bytes:
  """uint8 [H, W, C] (C = 1 grey, 3 RGB, 4 RGBA) -> PNG bytes, by Pillow (lossless)."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f'encode_png expects uint8 [H, W, C] with C in (1, 3, 4), got '
                     f'{image.dtype} {image.shape}.')
  if image.shape[0] == 0 or image.shape[1] == 0:
    raise ValueError(f'encode_png got an empty image of shape {image.shape}.')
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("TensorBoard images need Pillow: pip install 'vdit_jax[video]'") from e
  out = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(out, format='PNG')
  return out.getvalue()


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

  tensorboardX's RecordWriter frames each event; its bytes reach a `paths.GrowingFile`.
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
    self._records = None
    self._rollovers = 0  # this writer's files so far; orders its names within one second
    self._open()

  def _open(self) -> None:
    stem = f'events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}'
    if paths.is_remote(self.logdir):
      # No exclusive create in a bucket: the random part keeps two writers apart. The
      # count before it sorts a rolled-over file after its predecessor even within one
      # second (TensorBoard reads a folder's files in name order, and only forward).
      self.path = paths.join(
          self.logdir, f'{stem}.{self._rollovers:04d}.{secrets.token_hex(4)}')
      self._rollovers += 1
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
    self._records = _tbx().record_writer.RecordWriter(_FACTORY.expect(self._file))
    self._add(_tbx().event_pb2.Event(wall_time=time.time(), step=0, file_version=FILE_VERSION))

  def _add(self, event) -> None:
    self._records.write(event.SerializeToString())
    self._records.flush()  # the record's bytes to the GrowingFile

  def _write(self, event) -> None:
    if self._file.remote and self._file.size >= self.max_remote_bytes:
      self._records.close()
      self._open()
    self._add(event)

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """One event holding a simple_value (float32) per tag."""
    summary_pb2 = _tbx().summary_pb2
    if values:
      self._write(_event(step, summary=summary_pb2.Summary(value=[
          summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
          for tag, value in values.items()])))

  def image(self, step: int, tag: str, image) -> None:
    """uint8 [H, W, C] image, stored as PNG."""
    image = np.asarray(image)
    png = encode_png(image)
    height, width, channels = image.shape
    summary_pb2 = _tbx().summary_pb2
    self._write(_event(step, summary=summary_pb2.Summary(value=[summary_pb2.Summary.Value(
        tag=tag, image=summary_pb2.Summary.Image(
            height=height, width=width, colorspace=channels, encoded_image_string=png))])))

  def text(self, step: int, tag: str, markdown: str) -> None:
    self._write(_event(step, summary=_tbx().summary_pb2.Summary(
        value=[_text_value(tag, markdown)])))

  def session_start(self, step: int) -> None:
    """SessionLog START: readers drop the points of earlier files at steps >= `step`."""
    event_pb2 = _tbx().event_pb2
    self._write(_event(step, session_log=event_pb2.SessionLog(
        status=event_pb2.SessionLog.START)))

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._records.close()


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
