"""docs/fidelity.md points at our code by ``file:line``: every such reference still holds
the code quoted after it (so the table cannot drift from the code)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / 'docs' / 'fidelity.md'
# `twins_jax/objectives.py:88` `(adv_f, adv_a), stats = split_forward(...)`
REFERENCE = re.compile(r'`((?:twins_jax|configs|tests)/[\w/]+\.py):(\d+)` `([^`]+)`')


def references():
  return [(m.group(1), int(m.group(2)), m.group(3)) for m in REFERENCE.finditer(DOC.read_text())]


def test_every_reference_to_our_code_holds_the_quoted_code():
  refs = references()
  assert len(refs) >= 35
  wrong = []
  for path, line, code in refs:
    lines = (ROOT / path).read_text().splitlines()
    if not (0 < line <= len(lines) and code.strip() in lines[line - 1]):
      found = [i + 1 for i, l in enumerate(lines) if code.strip() in l]
      wrong.append(f'{path}:{line} does not hold `{code}` (found at lines {found})')
  assert not wrong, '\n'.join(wrong)


def test_every_row_has_an_official_reference_and_a_status():
  rows = [l for l in DOC.read_text().splitlines() if re.match(r'\| \d+ \|', l)]
  assert len(rows) >= 38
  for row in rows:
    cells = [c.strip() for c in row.strip('|').split('|')]
    assert len(cells) == 5, row
    assert re.match(r'(same|\*\*deviation\*\*)([ ;:,]|$)', cells[4]), row
    assert cells[2], row
