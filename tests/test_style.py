"""One code style across the package, the tests, the benchmarks and the presets.

Google style at 2-space indentation and 100 columns, formatted by yapf (``[tool.yapf]`` in
pyproject.toml), single-quoted strings and no unused imports (ruff, ``[tool.ruff]``). To
fix what this reports: ``yapf -i -r twins_jax tests bench configs main.py`` and
``ruff check --fix twins_jax tests bench configs main.py``.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted(
    str(p.relative_to(ROOT))
    for pattern in ('twins_jax/**/*.py', 'tests/*.py', 'bench/*.py', 'configs/*.py', 'main.py')
    for p in ROOT.glob(pattern))


def _run(*args):
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, capture_output=True, text=True)


def test_every_file_is_formatted():
  assert len(FILES) > 50
  out = _run('yapf', '--diff', *FILES)
  assert out.returncode == 0, f'yapf would reformat:\n{out.stdout[:4000]}{out.stderr[:2000]}'


def test_quotes_and_imports():
  out = _run('ruff', 'check', '--no-cache', *FILES)
  assert out.returncode == 0, out.stdout[:4000] + out.stderr[:2000]
