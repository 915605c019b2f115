"""A fatal error's cause as the last line a user sees.

`run(main)` is absl's `app.run(main)` with one change: an uncaught exception prints its
traceback, then one summary line (the exception's type and the first line of its message,
which in this project names the value, path or step and what to do), and the process
exits with status 1 at once; stdout and stderr are pointed at /dev/null before the two are
written (to a saved copy of stderr), so that no other thread prints after them. Exiting
through `os._exit` skips the interpreter's teardown,
where the asynchronous libraries under a run (Orbax's and TensorStore's threads, asyncio
event loops) print pages of shutdown tracebacks ("Event loop is closed") after the real
error. Saves already finished are on disk; the trainer closes its checkpointer on the
errors it raises itself (train/loop.py) before they reach here. In a multi-process run
the process first records its summary for the others (parallel/liveness.py), and when a
peer failed or went quiet, a `FATAL PeerLost: ...` line naming it follows the summary:
a lost peer is then the likely cause.
"""

import logging as std_logging
import os
import sys
import traceback

from absl import app
from absl import logging


def summary_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return f'FATAL {type(error).__name__}: {lines[0] if lines else "(no message)"}'


_failure_hooks = []


def on_failure(hook) -> None:
  """Registers hook(summary) -> text, called on an uncaught exception; its text follows
  the summary line (parallel/liveness.py registers one; nothing here imports it)."""
  if hook not in _failure_hooks:
    _failure_hooks.append(hook)


def exit_with(text: str) -> None:
  """Writes `text` as the last output of the process, then exits with status 1 at once."""
  logging.flush()
  std_logging.disable(std_logging.CRITICAL)
  sys.stdout.flush()
  sys.stderr.flush()
  # Other threads (a failing async save's asyncio callbacks) keep printing tracebacks
  # until the exit: point stdout and stderr at /dev/null first, and write the text to
  # a saved copy of stderr, so that nothing follows it.
  err = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 1)
  os.dup2(devnull, 2)
  if not text.endswith('\n'):
    text += '\n'
  os.write(err, text.encode('utf-8', errors='replace'))
  os._exit(1)  # pylint: disable=protected-access


def with_summary(main):
  """main(argv) wrapped so that an uncaught exception ends as described above."""

  def wrapped(argv):
    try:
      return main(argv)
    except (app.UsageError, SystemExit, KeyboardInterrupt):
      raise  # absl prints usage errors itself; exits and Ctrl-C keep their meaning
    except Exception as e:  # pylint: disable=broad-except
      summary = summary_line(e)
      text = ''.join(traceback.format_exception(e)) + summary + '\n'
      # In a multi-process run, parallel/liveness.py tells the others why this one stops
      # and names any process that failed or went quiet (a lost peer is the usual cause
      # of a collective's "connection closed"), so its line is printed last.
      for hook in _failure_hooks:
        text += hook(summary)
      exit_with(text)

  return wrapped


def run(main) -> None:
  app.run(with_summary(main))
