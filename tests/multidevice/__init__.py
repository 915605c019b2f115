"""Check scripts that run under several fake CPU devices, one topic each.

The suite itself runs with one device; the device count must be set before jax starts, so
each script here runs in a fresh process (tests/conftest.py: `run_checks`, and the
`multidevice` fixture behind each topic's parametrised tests) and prints one JSON line
{check name: 'ok' | failure text} as its last stdout line. Each also runs by hand:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice/sharding.py
"""

import re
import traceback

import jax

# configs_test.py's names for the runner (tests/configs_multidevice.py is its script).
from tests.conftest import CPU_COLLECTIVE_TIMEOUT_FLAGS  # pylint: disable=unused-import
from tests.conftest import run_checks as run_checks_with_args  # pylint: disable=unused-import


def all_gather_shapes(hlo: str) -> list:
  """Result shapes (tuples of dims) of every all-gather in compiled HLO text."""
  shapes = []
  for line in hlo.splitlines():
    m = re.search(r'all-gather(?:-start)?\(', line)
    if m:
      shapes += [tuple(int(d) for d in dims.split(',') if d)
                 for dims in re.findall(r'[a-z]+\d*\[([\d,]*)\]', line[:m.start()])]
  return shapes


def path_specs(tree) -> dict:
  """{'a/b/c': PartitionSpec} of each leaf of a tree of sharded arrays or shardings."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path): leaf.spec
          for path, leaf in flat}


def outcomes(checks, results=None) -> dict:
  """{name: 'ok' | the failure's traceback tail} of running each callable of `checks`
  ({name: fn}) in order, added to `results`: what each script prints as its JSON line."""
  results = {} if results is None else results
  for name, check in checks.items():
    try:
      check()
      results[name] = 'ok'
    except Exception:  # pylint: disable=broad-except
      results[name] = traceback.format_exc()[-2000:]
  return results
