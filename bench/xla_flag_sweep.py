"""Runs ``bench/backbone.py`` (or ``bench/step.py``) once per XLA CPU flag set, in fresh
processes (XLA reads its flags once per process), and prints a table.

Usage::

  python bench/xla_flag_sweep.py [--script backbone] [--out bench/results/flags.json]
      [--only NAME,...] -- [arguments passed to the script, e.g. --batch 32]

The first flag set (``default``) saves its logits and gradients; every other run is
compared with them (relative L2 differences, printed and stored).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

FLAG_SETS = {
    'default': '',
    # XLA's own emitters (Eigen convolutions/matmuls) instead of YNNPACK.
    'eigen': '--xla_cpu_experimental_ynn_fusion_type=',
    # XNNPACK for individual convolutions and dots (YNNPACK off, it would take them first).
    'xnn': ('--xla_cpu_experimental_ynn_fusion_type= '
            '--xla_cpu_experimental_xnn_fusion_type=individual_convolution,individual_dot'),
    # YNNPACK for more op kinds (element-wise and reductions too).
    'ynn_all': ('--xla_cpu_experimental_ynn_fusion_type='
                'dot,eltwise,reduce,individual_convolution,individual_dot'),
    'onednn': ('--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_onednn=true '
               '--xla_cpu_experimental_onednn_custom_call=true '
               '--xla_cpu_experimental_onednn_fusion_type=dot,eltwise'),
    'fast_math': '--xla_cpu_enable_fast_math=true',
    'single_thread_eigen': '--xla_cpu_multi_thread_eigen=false',
    'xnn_graph_greedy': ('--xla_cpu_experimental_xnn_graph_fusion_mode='
                         'XNN_GRAPH_FUSION_MODE_GREEDY'),
}


def main():
  argv = sys.argv[1:]
  rest = []
  if '--' in argv:
    i = argv.index('--')
    argv, rest = argv[:i], argv[i + 1:]
  p = argparse.ArgumentParser()
  p.add_argument('--script', default='backbone')
  p.add_argument('--out', default='')
  p.add_argument('--only', default='')
  args = p.parse_args(argv)
  names = args.only.split(',') if args.only else list(FLAG_SETS)
  if names[0] != 'default':
    names = ['default'] + [n for n in names if n != 'default']
  here = os.path.dirname(os.path.abspath(__file__))
  tmp = tempfile.mkdtemp()
  ref = os.path.join(tmp, 'default.npz')
  results = {}
  for name in names:
    out = os.path.join(tmp, f'{name}.json')
    cmd = [
        sys.executable,
        os.path.join(here, f'{args.script}.py'), f'--xla-flags={FLAG_SETS[name]}', '--json', out
    ] + rest
    cmd += ['--save-outputs', ref] if name == 'default' else ['--compare', ref]
    print('$', ' '.join(cmd), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    print(r.stdout[-1500:], r.stderr[-1500:] if r.returncode else '', flush=True)
    if r.returncode == 0:
      with open(out) as f:
        results[name] = json.load(f)
  print(
      f"\n{'flags':22s} {'jax img/s':>10s} {'torch img/s':>12s} {'ratio':>7s} {'load':>5s}  numerics"
  )
  for name, r in results.items():
    if 'train' in r:  # bench/step.py writes per-part results
      r = dict(r, jax_images_per_s=r['train']['jax_images_per_s'],
               torch_images_per_s=r['train']['torch_images_per_s'],
               ratio=r['train']['ratio_jax_over_torch'], fusion_kinds=(r.get('jax_info') or
                                                                       {}).get('fusion_kinds'))
    print(f"{name:22s} {r['jax_images_per_s']:10.2f} {r['torch_images_per_s']:12.2f} "
          f"{r['ratio']:7.3f} {r['loadavg'][0]:5.1f}  {r.get('numerics')}  {r.get('fusion_kinds')}")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
