"""Attention patterns with tokens sharded over `sequence`: 8-device checks in a subprocess.

See attention_patterns_multidevice.py: each pattern's values and gradients, and
a VideoDiT with shifted windows, on data=2 x sequence=4 equal one device's, and
spatial attention on whole-frame shards compiles without collectives.
"""

import pytest

from tests import multidevice

MULTIDEVICE_CHECKS = (
    [f'pattern/data2_seq4/{name}'
     for name in ('spatial', 'temporal', 'windowed_shift', 'hierarchical')]
    + ['hlo/spatial_without_collectives', 'model/data2_seq4/windowed_shift'])


@pytest.fixture(scope='module')
def multidevice_results():
  return multidevice.run_checks('attention_patterns_multidevice.py')


def test_multidevice_runs_exactly_the_expected_checks(multidevice_results):
  assert sorted(multidevice_results) == sorted(MULTIDEVICE_CHECKS)


@pytest.mark.parametrize('name', MULTIDEVICE_CHECKS)
def test_multidevice(multidevice_results, name):
  assert multidevice_results.get(name) == 'ok', f'{name}:\n{multidevice_results.get(name)}'
