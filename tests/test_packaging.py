"""The package as pip installs it: pyproject.toml against the requirements files, the console
scripts, and the imports the declared dependencies must cover. (Building it into a fresh
virtual environment needs the network and minutes; the README's commands do that.)"""

import ast
import importlib
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip('tomllib')  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / 'pyproject.toml').read_text())
PROJECT = PYPROJECT['project']


def canonical(name: str) -> str:
  return re.sub(r'[-_.]+', '-', name).lower()


def requirement_lines(path: Path) -> list[str]:
  """The requirement lines of a requirements file (no comments, no ``-r`` includes)."""
  lines = [line.split('#', 1)[0].strip() for line in path.read_text().splitlines()]
  return [line for line in lines if line and not line.startswith('-')]


def pins(lines) -> dict:
  out = {}
  for line in lines:
    name, _, version = line.partition('==')
    assert version, f'{line!r} is not pinned with =='
    out[canonical(name)] = version
  return out


def test_build_system_and_package():
  assert PYPROJECT['build-system']['build-backend'] == 'setuptools.build_meta'
  assert any(r.startswith('setuptools') for r in PYPROJECT['build-system']['requires'])
  assert PYPROJECT['tool']['setuptools']['packages']['find']['include'] == ['twins_jax*']
  # setuptools' find only sees folders that are packages: every folder of code has one.
  for folder in {p.parent for p in (ROOT / 'twins_jax').rglob('*.py')}:
    assert (folder / '__init__.py').is_file(), folder


def test_dependency_pins_equal_the_requirements_files():
  assert pins(PROJECT['dependencies']) == pins(requirement_lines(ROOT / 'requirements.txt'))
  extras = PROJECT['optional-dependencies']
  test_only = pins(requirement_lines(ROOT / 'requirements-test.txt'))
  assert pins(extras['test']) == test_only
  for extra in ('hf', 'port'):  # the same versions as the tests use
    for name, version in pins(extras[extra]).items():
      assert test_only[name] == version, (extra, name)
  assert set(pins(extras['hf'])) == {'huggingface-hub'}
  assert {'torch', 'dill', 'safetensors'} <= set(pins(extras['port']))


@pytest.mark.parametrize('script', ['twins-jax-port', 'twins-jax-predict', 'twins-jax-export'])
def test_console_scripts_resolve(script, capsys):
  target = PROJECT['scripts'][script]
  module, _, attr = target.partition(':')
  main = getattr(importlib.import_module(module), attr)
  assert callable(main)
  with pytest.raises(SystemExit) as e:
    main(['--help'])
  assert e.value.code == 0
  assert 'usage:' in capsys.readouterr().out


def _third_party_imports() -> set:
  names = set()
  for path in (ROOT / 'twins_jax').rglob('*.py'):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        names |= {a.name.split('.')[0] for a in node.names}
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names.add(node.module.split('.')[0])
  return {n for n in names if n not in sys.stdlib_module_names and n != 'twins_jax'}


def _closure(names) -> set:
  """The installed distributions ``names`` bring along (their requirements, recursively)."""
  seen, todo = set(), [canonical(n) for n in names]
  while todo:
    name = todo.pop()
    if name in seen:
      continue
    seen.add(name)
    try:
      requires = importlib.metadata.requires(name) or []
    except importlib.metadata.PackageNotFoundError:
      continue
    for r in requires:
      if 'extra ==' not in r:
        todo.append(canonical(re.match(r'[A-Za-z0-9_.\-]+', r).group(0)))
  return seen


def test_every_imported_package_is_installed_by_the_declared_dependencies():
  """What twins_jax imports comes with ``dependencies`` (or, for the optional features, an
  extra); a module that only happens to be installed here would break a fresh install."""
  declared = [r.partition('==')[0] for r in PROJECT['dependencies']]
  optional = [
      r.partition('==')[0] for e in ('hf', 'port') for r in PROJECT['optional-dependencies'][e]
  ]
  available = _closure(declared) | _closure(optional)
  distributions = importlib.metadata.packages_distributions()
  missing = []
  for module in sorted(_third_party_imports()):
    dists = distributions.get(module)
    if not dists:
      pytest.skip(f'{module} is not installed here')
    if not any(canonical(d) in available for d in dists):
      missing.append(f'{module} ({", ".join(dists)})')
  assert not missing, f'imported but not declared in pyproject.toml: {missing}'
