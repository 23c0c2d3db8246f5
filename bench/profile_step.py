"""Where the time of one TWINS training step goes, by op, JAX (XLA CPU) and PyTorch.

JAX: the step of ``bench/step.py`` (``make_train_step`` jitted with the state donated),
warmed up, then ``--steps`` steps under ``jax.profiler.trace``. Every event of XLA's CPU
runtime (one per HLO instruction it executes: a convolution, a dot, a fusion, a copy, the
PGD ``while`` loop and what it runs) is summed by instruction, and each instruction is put
in a kind by its HLO text (``convolution`` / ``dot`` / library fusion / loop fusion...)
and in a pass: ``pgd`` (inside the PGD loop body) or ``train`` (the rest). A
convolution is labelled forward, input gradient or weight gradient from its operands
(the weight gradient outputs the kernel's shape; the input gradient has a reversed
kernel, ``window={... rhs_reversal}``, or is the transposed dot of a patches product).

PyTorch: the reference step (``tests/torch_reference.py``) under ``torch.profiler``,
summed by ATen op (self CPU time).

Both profiles are wall-clock sums over the op's own events: with 2 threads some ops run
in parallel, so the sum can exceed the step time. Timings on a shared machine are noisy;
the load average is printed.

Usage::

  python bench/profile_step.py --resize 224 --batch 4 [--steps 1] [--conv-impl auto]
      [--no-torch] [--top 40] [--json OUT]
"""

from __future__ import annotations

import collections
import json
import os
import re
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from bench import common  # noqa: E402


def parse_args(argv=None):
  p = common.step_parser(__doc__)
  p.add_argument('--steps', type=int, default=1, help='profiled steps (after one warm-up)')
  p.add_argument('--conv-impl', default='auto')
  p.add_argument('--no-torch', action='store_true')
  p.add_argument('--no-jax', action='store_true')
  p.add_argument('--top', type=int, default=40)
  p.add_argument('--json', default='')
  return p.parse_args(argv)


# --- HLO text: instruction name -> (opcode, shape, computation, text) ----------------------

_INSTR = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (\S+?(?:\{[^}]*\})?) ([\w\-]+)\((.*)$')


def hlo_instructions(text: str) -> dict:
  """Every instruction of an HLO module's text: name -> dict(op, shape, comp, line)."""
  out, comp = {}, None
  for line in text.splitlines():
    m = re.match(r'^(?:ENTRY )?%?([\w.\-]+) (?:\(.*\) -> .*)?\{\s*$', line)
    if m:
      comp = m.group(1)
      continue
    m = _INSTR.match(line)
    if m:
      out[m.group(1)] = dict(op=m.group(3), shape=m.group(2), comp=comp, line=line.strip())
  return out


def loop_bodies(text: str) -> set:
  """Names of computations that are a ``while`` body, and of everything they call."""
  calls = collections.defaultdict(set)
  comp = None
  bodies = set()
  for line in text.splitlines():
    m = re.match(r'^(?:ENTRY )?%?([\w.\-]+) (?:\(.*\) -> .*)?\{\s*$', line)
    if m:
      comp = m.group(1)
      continue
    for c in re.findall(r'(?:calls|body|condition|to_apply|branch_computations)=\{?%?([\w.\-]+)',
                        line):
      calls[comp].add(c)
    b = re.search(r'body=%?([\w.\-]+)', line)
    if b:
      bodies.add(b.group(1))
  seen, todo = set(), list(bodies)
  while todo:
    c = todo.pop()
    if c in seen:
      continue
    seen.add(c)
    todo.extend(calls.get(c, ()))
  return seen


def _dims(shape: str):
  m = re.search(r'\[([\d,]*)\]', shape)
  return tuple(int(d) for d in m.group(1).split(',') if d) if m else ()


def classify(ins: dict, fused: dict) -> str:
  """A readable kind for one executed instruction: the op, or for a fusion its kind and
  the heavy ops inside it."""
  op, line = ins['op'], ins['line']
  if op != 'fusion':
    return op
  kind = re.search(r'"kind":"(__\w+)"', line)
  body = re.search(r'calls=%?([\w.\-]+)', line)
  inner = fused.get(body.group(1), []) if body else []
  core = sorted({o for o in inner if o in HEAVY})
  lib = kind.group(1).strip('_') if kind else re.search(r'kind=(\w+)', line).group(1)
  return f'fusion[{lib}]' + (f':{"+".join(core)}' if core else '')


HEAVY = ('convolution', 'dot', 'reduce', 'reduce-window', 'select-and-scatter', 'scatter', 'gather',
         'concatenate', 'pad', 'transpose', 'reverse')


def op_name(line: str) -> str:
  m = re.search(r'op_name="([^"]*)"', line)
  return m.group(1) if m else ''


def layer_of(name: str) -> str:
  """'.../transpose(jvp(ResNet))/layer1_0/conv2/dot_general' -> 'layer1_0/conv2'."""
  m = re.search(r'ResNet\)*/(.*)$', name)
  if not m:
    return ''
  parts = [
      p for p in m.group(1).split('/') if p and not p.startswith(('jit(', 'jvp(', 'transpose('))
  ]
  return '/'.join(parts[:-1])


def conv_pass(op: str, name: str, shape: str, kernels: dict) -> str:
  """'fwd', 'dx' or 'dw' for a convolution or a matrix product of a layer."""
  if 'transpose(' not in name:
    return 'fwd'
  numel = 1
  for d in _dims(shape):
    numel *= d
  return 'dw' if kernels.get(layer_of(name)) == numel else 'dx'


def profile_jax(args):
  sys.path.insert(0, ROOT)
  sys.path.insert(0, os.path.join(ROOT, 'tests'))
  from bench import step as bench_step
  step_args = bench_step.parse_args([
      '--arch', args.arch, '--resize', args.resize, '--batch',
      str(args.batch), '--method', args.method, '--attack-steps',
      str(args.attack_steps), '--no-eval', '--repeats', '1', '--steps-per-repeat',
      str(args.steps), '--conv-impl', args.conv_impl, '--no-torch'
  ])
  bench_step._setup_env(step_args)
  import jax
  import numpy as np
  from jax._src.lib import _profile_data

  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (args.batch, 32, 32, 3)).astype(np.float32)
  y = rng.integers(0, 10, args.batch).astype(np.int32)
  j = bench_step.run_jax(step_args, x, y)
  state = j['state']
  state, _ = j['train_round'](state, 0)  # a second warm-up
  text = j['compiled'].as_text()  # the compiled HLO of the step, to name the events
  kernels = {}  # layer path -> number of elements of its kernel (to tell dw from dx)
  for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]:
    keys = [getattr(k, 'key', str(k)) for k in path]
    if keys[-1] == 'kernel':
      kernels['/'.join(keys[:-1])] = int(np.prod(leaf.shape))
  with tempfile.TemporaryDirectory() as d:
    t0 = time.perf_counter()
    with jax.profiler.trace(d):
      state, dt = j['train_round'](state, 0)
    wall = time.perf_counter() - t0
    files = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if f.endswith('.xplane.pb')]
    data = _profile_data.ProfileData.from_file(files[0])
  return data, text, dt, wall, kernels


def summarize_jax(data, text, steps, kernels):
  ins = hlo_instructions(text)
  fused = collections.defaultdict(list)
  for i in ins.values():
    fused[i['comp']].append(i['op'])
  in_loop = loop_bodies(text)
  per_name, count = collections.Counter(), collections.Counter()
  for plane in data.planes:
    if not plane.name.startswith('/host:CPU'):
      continue
    for line in plane.lines:
      for ev in line.events:
        if ev.name in ins:
          per_name[ev.name] += ev.duration_ns / 1e9 / steps
          count[ev.name] += 1
  rows = []
  for name, t in per_name.items():
    i = ins[name]
    kind = classify(i, fused)
    if i['op'] in ('while', 'call', 'conditional'):
      continue  # containers: their contents are events of their own
    oname = op_name(i['line'])
    part = 'pgd' if i['comp'] in in_loop and '_uniform' not in oname else 'train'
    heavy = 'convolution' in kind or 'dot' in kind
    p = conv_pass(i['op'], oname, i['shape'], kernels) if heavy else ''
    if part == 'pgd' and p == 'dw':  # the attack never differentiates the weights
      p = 'dx'
    if 'transpose(' in oname and not p:
      p = 'bwd'
    rows.append(
        dict(name=name, seconds=t, calls=count[name] // steps, kind=kind, part=part, conv_pass=p,
             layer=layer_of(oname), shape=i['shape'], op_name=oname))
  rows.sort(key=lambda r: -r['seconds'])
  return rows


def profile_torch(args):
  sys.path.insert(0, ROOT)
  sys.path.insert(0, os.path.join(ROOT, 'tests'))
  import numpy as np
  import torch
  import torch_reference as ref
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  torch.manual_seed(0)
  resize = None if args.resize == 'none' else int(args.resize)
  model = getattr(ref, 'twin_' + args.arch)(num_classes=10, resize=resize)
  ref_args = ref.Args(epsilon=8 / 255, alpha=2 / 255, k=args.attack_steps, batch_size=args.batch,
                      num_classes=10, learning_rate=0.003, weight_decay=1e-5, lambda_twins=1.0)
  attack = ref.make_attack(model, ref_args)
  optimizer, scheduler = ref.make_optimizer(model, ref_args, milestones=(1000,))
  iteration = ref.ITERATIONS[args.method]
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (args.batch, 32, 32, 3)).astype(np.float32)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  yt = torch.from_numpy(rng.integers(0, 10, args.batch).astype(np.int64))
  iteration(model, attack, optimizer, scheduler, xt, yt, ref_args)
  t0 = time.perf_counter()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                              record_shapes=True) as prof:
    for _ in range(args.steps):
      iteration(model, attack, optimizer, scheduler, xt, yt, ref_args)
  wall = (time.perf_counter() - t0) / args.steps
  rows = []
  for e in prof.key_averages(group_by_input_shape=True):
    if e.self_cpu_time_total <= 0:
      continue
    rows.append(
        dict(name=e.key, seconds=e.self_cpu_time_total / 1e6 / args.steps,
             calls=e.count // args.steps, shapes=str(e.input_shapes)[:200]))
  rows.sort(key=lambda r: -r['seconds'])
  return rows, wall


def kind_group(r) -> str:
  k = r['kind']
  if 'convolution' in k:
    return 'lax.conv'
  if 'dot' in k:
    return 'matmul'
  if k.startswith('fusion[ynn'):
    return 'ynn elementwise/reduce'
  if k.startswith('fusion'):
    return 'XLA fusion' + (' (' + k.split(':')[1] + ')' if ':' in k else '')
  return k


def stage(layer: str) -> str:
  if layer == 'conv1':
    return 'stem'
  return layer.split('_')[0] + (' down' if 'downsample' in layer else '')


def by(rows, key):
  out = collections.Counter()
  for r in rows:
    out[key(r)] += r['seconds']
  return out.most_common()


def main(argv=None):
  args = parse_args(argv)
  res = dict(config=vars(args))
  if not args.no_jax:
    data, text, dt, wall, kernels = profile_jax(args)
    rows = summarize_jax(data, text, args.steps, kernels)
    step_s = dt[0]
    res['jax'] = dict(step_s=step_s, rows=rows)
    print(f'JAX step {step_s:.2f} s (under the profiler); sum of op events '
          f'{sum(r["seconds"] for r in rows if r["part"] != "loop"):.2f} s')
    print('  by part, op kind and pass:')
    for k, t in by(rows, lambda r: (r['part'], kind_group(r), r['conv_pass'])):
      print(f'    {t:7.3f} s {100 * t / step_s:5.1f}%  {" ".join(x for x in k if x)}')
    print('  convolutions (lax.conv and matrix products) by part, stage and pass:')
    heavy = [r for r in rows if r['conv_pass'] in ('fwd', 'dx', 'dw')]
    for k, t in sorted(by(heavy, lambda r: (r['part'], stage(r['layer']), r['conv_pass']))):
      print(f'    {t:7.3f} s {100 * t / step_s:5.1f}%  {" ".join(k)}')
    print(f'  top {args.top} ops:')
    for r in rows[:args.top]:
      print(f"    {r['seconds']:7.3f} s x{r['calls']:<3d} {r['part']:5s} {r['kind'][:28]:28s} "
            f"{r['conv_pass']:3s} {r['shape'][:34]:34s} {r['layer']}")
  if not args.no_torch:
    trows, twall = profile_torch(args)
    res['torch'] = dict(step_s=twall, rows=trows)
    print(f'PyTorch step {twall:.2f} s (under the profiler); sum of self CPU time '
          f'{sum(r["seconds"] for r in trows):.2f} s')
    for k, t in by(trows, lambda r: r['name'])[:args.top]:
      print(f'    {t:7.3f} s {100 * t / twall:5.1f}%  {k}')
  print(f'load average {os.getloadavg()}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(res, f, indent=1)


if __name__ == '__main__':
  main()
