"""Collects ``bench/step.py --json`` results into one JSON file and a Markdown table.

Usage::

  python bench/report.py OUT.json RESULT.json [RESULT.json ...]

FLOP/s are recomputed from the analytic model FLOPs (``common.analytic_forward_flops``)
so that every row uses the same convention, whatever version of step.py wrote it.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))


def main(argv):
  from bench import common
  from bench.step import passes

  out, paths = argv[0], argv[1:]
  rows, runs = [], []
  for p in paths:
    with open(p) as f:
      r = json.load(f)
    c = r['config']
    resize = None if c['resize'] == 'none' else int(c['resize'])
    f_fwd = common.analytic_forward_flops(c['arch'], 10, c['image_size'], resize)
    train_f, eval_f = (n * f_fwd for n in passes(c['method'], c['attack_steps']))
    r['model_flops_per_image'] = dict(train=train_f, eval=eval_f)
    r['forward_flops_per_image'] = f_fwd
    for part, fl in (('train', train_f), ('eval', eval_f)):
      r[part]['jax_flops_per_s'] = fl * r[part]['jax_images_per_s']
      r[part]['torch_flops_per_s'] = fl * r[part]['torch_images_per_s']
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
    rows.append(
        f"| {c['resize']} | {c['batch']} | {c['method']} | {c['dtype']}"
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
