"""Collects ``bench/step.py --json`` results into one JSON file and a Markdown table.

Usage::

  python bench/report.py OUT.json RESULT.json [RESULT.json ...]

FLOPs and FLOP/s are the analytic ones ``bench/step.py`` wrote (``common.analytic_forward_flops``).
"""

from __future__ import annotations

import json
import os
import sys


def main(argv):
  out, paths = argv[0], argv[1:]
  rows, runs = [], []
  for p in paths:
    with open(p) as f:
      r = json.load(f)
    c = r['config']
    train_f = r['model_flops_per_image']['train']
    r['source'] = os.path.basename(p)
    runs.append(r)
    tr, ev = r['train'], r['eval']
    lever = []
    if c.get('conv_impl', 'auto') != 'auto':
      lever.append(f"conv_impl={c['conv_impl']}")
    if c.get('fold_bn'):
      lever.append('fold-bn')
    if not c.get('donate', True):
      lever.append('no-donate')
    rows.append(f"| {c['resize']} | {c['batch']} | {c['method']} | {c['dtype']}"
                f"{' ' + ' '.join(lever) if lever else ''} | {tr['jax_images_per_s']:.2f} | "
                f"{tr['torch_images_per_s']:.2f} | **{tr['ratio_jax_over_torch']:.2f}** | "
                f"{ev['jax_images_per_s']:.2f} | {ev['torch_images_per_s']:.2f} | "
                f"{ev['ratio_jax_over_torch']:.2f} | {train_f / 1e9:.1f} | "
                f"{tr['jax_flops_per_s'] / 1e9:.0f} / {tr['torch_flops_per_s'] / 1e9:.0f} | "
                f"{r['loadavg'][0]:.1f} |")
  header = ('| resize | batch | method | dtype | train JAX img/s | train torch img/s | ratio | '
            'PGD-10 eval JAX img/s | eval torch img/s | eval ratio | GFLOP/img (train) | '
            'GFLOP/s JAX / torch | load |\n|' + '---|' * 13)
  table = header + '\n' + '\n'.join(rows)
  print(table)
  with open(out, 'w') as f:
    json.dump({'runs': runs, 'table_markdown': table}, f, indent=1)


if __name__ == '__main__':
  main(sys.argv[1:])
