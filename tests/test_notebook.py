"""The Colab notebook runs end to end and shows the demo's results.

``notebooks/demo.ipynb`` is executed with nbclient in a kernel on this interpreter
(a temporary kernelspec), with ``TWINS_SKIP_INSTALL=1`` (the checkout is importable,
so the install cell is skipped), a shortened demo (``TWINS_DEMO_FLAGS``) and a
temporary working directory (``TWINS_DEMO_WORKDIR``). Needs nbformat, nbclient and
ipykernel (requirements-test.txt)::

  python -m pytest -m slow tests/test_notebook.py
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
pytest.importorskip('ipykernel')

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / 'notebooks' / 'demo.ipynb'
KERNEL = 'twins-jax-test'
# Three classes per task at 16x16 (6 steps of 64 per epoch), one epoch per stage, PGD-1/2,
# two seeds per method.
DEMO_FLAGS = ('--config.source_classes=(0,1,2) --config.target_classes=(5,6,7) '
              '--config.source_epochs=1 --config.target_epochs=1 --config.image_size=16 '
              '--config.attack_steps=1 --config.eval_attack_steps=2 --config.seeds=(0,1)')


def _kernelspec(root: Path) -> None:
  """A kernelspec named KERNEL that starts ipykernel on this interpreter."""
  spec = root / 'kernels' / KERNEL
  spec.mkdir(parents=True)
  (spec / 'kernel.json').write_text(
      json.dumps({
          'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
          'display_name': 'twins-jax (test)', 'language': 'python'
      }))


def _outputs(nb) -> tuple[str, list[str], int]:
  """All text the notebook showed, its Markdown displays, and its number of PNGs."""
  texts, markdown, pngs = [], [], 0
  for cell in nb.cells:
    for out in cell.get('outputs', []):
      if out.output_type == 'stream':
        texts.append(out.text)
      elif out.output_type in ('display_data', 'execute_result'):
        data = out.get('data', {})
        if 'text/markdown' in data:
          markdown.append(data['text/markdown'])
        texts.append(data.get('text/plain', ''))
        pngs += 'image/png' in data
  return '\n'.join(texts), markdown, pngs


def test_demo_notebook_runs_and_shows_the_results(tmp_path, monkeypatch, request):
  cache = getattr(request.config, 'cache', None)
  cache_dir = cache.mkdir('twins_jax_xla_cache') if cache else tmp_path / 'jax_cache'
  workdir = tmp_path / 'demo'
  _kernelspec(tmp_path / 'jupyter')
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
  monkeypatch.setenv('JUPYTER_RUNTIME_DIR', str(tmp_path / 'runtime'))
  monkeypatch.setenv('IPYTHONDIR', str(tmp_path / 'ipython'))
  monkeypatch.setenv('TWINS_SKIP_INSTALL', '1')
  monkeypatch.setenv('TWINS_DEMO_WORKDIR', str(workdir))
  monkeypatch.setenv('TWINS_DEMO_FLAGS', f'{DEMO_FLAGS} --config.compilation_cache_dir={cache_dir}')
  # A plain single-device run, as in Colab (conftest.py simulates 8 devices for the tests).
  monkeypatch.setenv(
      'XLA_FLAGS', ' '.join(f for f in os.environ.get('XLA_FLAGS', '').split()
                            if not f.startswith('--xla_force_host_platform_device_count')))

  nb = nbformat.read(NOTEBOOK, as_version=4)
  # The kernel starts in notebooks/, as Jupyter starts it; the notebook moves to the root.
  client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=900,
                                   resources={'metadata': {'path': str(NOTEBOOK.parent)}})
  try:
    client.execute()
  finally:
    nbformat.write(nb, tmp_path / 'executed.ipynb')  # for a look after a failure

  text, markdown, pngs = _outputs(nb)
  assert f'skipping the install; working directory {ROOT}' in text
  assert 'main.py --config=configs/demo.py' in text
  tables = [m for m in markdown if '## TWINS demo' in m]
  assert tables, f'no results table among the displays; output:\n{text[-3000:]}'
  table = tables[0]
  assert table == (workdir / 'results.md').read_text()
  assert '| fine-tuning |' in table and '| twins_at |' in table and '| at |' in table
  assert 'digits (5, 6, 7)' in table  # the flags reached the demo
  assert pngs >= 1
  assert (workdir / 'effective_lr.png').exists()
  assert (workdir / 'twins_at_seed1' / 'curves_accuracy.png').exists()
