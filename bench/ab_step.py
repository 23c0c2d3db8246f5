"""Variants of the JAX TWINS step against each other and the PyTorch reference, in one process.

Each variant is the step of ``bench/step.py`` (``make_train_step`` jitted with the state
donated) traced under other :data:`twins_jax.speed.LEVERS` settings (or another
``--conv-impl``); all are compiled first, then every round runs each variant and the
PyTorch reference step once, in turn, so that they share the machine's conditions
(other processes' load moves all of them alike). Medians are reported, with each
variant's ratio to PyTorch and to the first variant, and the load average.

Usage::

  python bench/ab_step.py --resize 224 --batch 4 --rounds 5 \\
      --variant before=hwio_input_grad:0,upsampled_stem:0 --variant after= [--no-torch]
      [--json OUT]

``--variant NAME=LEVER:0|1,...`` (levers not named keep their default, on);
``NAME=impl:xla`` compiles with ``conv_impl='xla'`` instead.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from bench import common  # noqa: E402


def parse_args(argv=None):
  p = common.step_parser(__doc__)
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--steps-per-round', type=int, default=1)
  p.add_argument('--variant', action='append', default=[], help='NAME=LEVER:0|1,...')
  p.add_argument('--no-torch', action='store_true')
  p.add_argument('--json', default='')
  return p.parse_args(argv)


def parse_variant(text):
  name, _, spec = text.partition('=')
  settings, impl = {}, 'auto'
  for item in filter(None, spec.split(',')):
    key, _, value = item.partition(':')
    if key == 'impl':
      impl = value
    else:
      settings[key] = bool(int(value))
  return name, settings, impl


def main(argv=None):
  args = parse_args(argv)
  sys.path.insert(0, ROOT)
  sys.path.insert(0, os.path.join(ROOT, 'tests'))
  from bench import step as bench_step
  step_args = [
      '--arch', args.arch, '--resize', args.resize, '--batch',
      str(args.batch), '--method', args.method, '--attack-steps',
      str(args.attack_steps), '--no-eval', '--steps-per-repeat',
      str(args.steps_per_round)
  ]
  base = bench_step.parse_args(step_args)
  bench_step._setup_env(base)
  import numpy as np

  from twins_jax import speed
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (args.batch, 32, 32, 3)).astype(np.float32)
  y = rng.integers(0, 10, args.batch).astype(np.int32)
  variants = [parse_variant(v) for v in (args.variant or ['default='])]
  runs = {}
  for name, settings, impl in variants:
    with speed.levers(**settings):
      t0 = time.perf_counter()
      runs[name] = bench_step.run_jax(bench_step.parse_args(step_args + ['--conv-impl', impl]), x,
                                      y)
      print(
          f'{name}: {settings or "defaults"} conv_impl={impl}, compiled and warmed up in '
          f'{time.perf_counter() - t0:.0f} s', flush=True)
  torch = None if args.no_torch else bench_step.run_torch(base, x, y)
  times = {name: [] for name in runs}
  times['torch'] = []
  states = {name: r['state'] for name, r in runs.items()}
  i0 = 0
  for r in range(args.rounds):
    line = []
    for name, run in runs.items():
      states[name], (wall, _) = run['train_round'](states[name], i0 % 4)
      times[name].append(wall)
      line.append(f'{name} {args.batch / wall:.3f}')
    i0 += args.steps_per_round
    if torch:
      wall, _ = torch['train_round']()
      times['torch'].append(wall)
      line.append(f'torch {args.batch / wall:.3f}')
    print(f'  round {r}: ' + ', '.join(line) + f' img/s (load {os.getloadavg()[0]:.1f})',
          flush=True)
  for run in runs.values():
    run['check']()
  ips = {k: args.batch / float(np.median(v)) for k, v in times.items() if v}
  first = variants[0][0]
  print(f'{args.arch} resize={args.resize} batch={args.batch} {args.method}, medians of '
        f'{args.rounds} rounds:')
  for name, rate in ips.items():
    extra = ''
    if name != 'torch':
      extra = f'  x{rate / ips[first]:.3f} vs {first}'
      if 'torch' in ips:
        extra += f'  ratio to torch {rate / ips["torch"]:.3f}'
      extra += f"  recompiled: {runs[name]['info']['recompiled']}"
    print(f'  {name:12s} {rate:8.3f} img/s{extra}')
  load = os.getloadavg()
  print(f'  load average {load}')
  if args.json:
    res = dict(
        date=datetime.datetime.now().isoformat(timespec='seconds'),
        command='python bench/ab_step.py ' + ' '.join(argv if argv is not None else sys.argv[1:]),
        config=vars(args), variants={n: dict(levers=s, conv_impl=i) for n, s, i in variants},
        step_s=times, images_per_s=ips, loadavg=load)
    with open(args.json, 'w') as f:
      json.dump(res, f, indent=1)


if __name__ == '__main__':
  main()
