"""Parity of twins_jax.autoattack with torchattacks' AutoAttack components (slow).

A reduced run of ``bench/autoattack_parity.py``: the same PGD-trained MLP on digits
(weights copied from JAX to PyTorch), Linf eps 0.2, 500 held-out digits; APGD-T and
FAB-T over 3 target classes instead of 9 and Square with 1000 queries instead of 5000
(also inside the suite). Square varies by ~0.4 pp (std) between seeds even on all 1797
digits, so its row is the mean of 3 seeds per side on all digits. Every row must agree
within 1 percentage point.

Run with ``pytest -m slow tests/test_autoattack_parity.py -s`` (several minutes on 2 CPU
cores, most of it in torchattacks).
"""

import importlib.util
import os
import sys

import pytest

pytest.importorskip('torch')

_BENCH = os.path.join(os.path.dirname(__file__), '..', 'bench', 'autoattack_parity.py')


def _bench():
  if 'autoattack_parity' in sys.modules:
    return sys.modules['autoattack_parity']
  spec = importlib.util.spec_from_file_location('autoattack_parity', _BENCH)
  mod = importlib.util.module_from_spec(spec)
  sys.modules['autoattack_parity'] = mod
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.slow
def test_parity_with_torchattacks_reduced():
  bench = _bench()
  try:
    bench._import_torchattacks()
  except ImportError:
    pytest.skip('torchattacks is not installed (pip install --no-deps torchattacks)')
  rows = bench.run_parity(n_test=500, eps=.2, norm='Linf', n_queries=1000, n_target_classes=3,
                          square_seeds=3, square_on_all=True, epochs=40)
  assert [r['attack'].split(' ')[0] for r in rows
         ] == ['APGD-CE', 'APGD-T', 'FAB-T', 'Square', 'AutoAttack']
  for r in rows:
    assert 20. <= r['ours'] <= 80., r
    assert abs(r['diff']) <= 1.0, r
