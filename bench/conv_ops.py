"""Where the backbone's time goes: one convolution's forward, input gradient and weight
gradient, JAX (XLA CPU) against PyTorch, for the convolution shapes of ResNet-50.

Each op is timed alone (jitted in JAX; ``torch.nn.grad``-free autograd calls in
PyTorch), alternating, medians; the CPU time per call (``time.process_time``) is
reported too, which on one thread (``taskset -c 0``) is immune to other load.

Usage::

  taskset -c 0 python bench/conv_ops.py [--batch 32] [--resize none] [--repeats 5]
      [--xla-flags=...] [--layout nhwc|im2col]
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def resnet50_convs(resize):
  """(name, H_in, C_in, C_out, k, stride, count) of ResNet-50's convolutions."""
  s = 32 if resize is None else resize
  out = [('stem7x7', s, 3, 64, 7, 2, 1)]
  h = s // 4
  cin = 64
  for i, (n, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
    for j in range(n):
      stride = 2 if (i > 0 and j == 0) else 1
      out.append((f'l{i + 1}_1x1a', h, cin, planes, 1, 1, 1))
      out.append((f'l{i + 1}_3x3', h, planes, planes, 3, stride, 1))
      h2 = h // stride
      out.append((f'l{i + 1}_1x1b', h2, planes, planes * 4, 1, 1, 1))
      if j == 0:
        out.append((f'l{i + 1}_down', h, cin, planes * 4, 1, stride, 1))
      cin, h = planes * 4, h2
  merged = {}
  for name, *rest in out:
    key = (name, *rest[:-1])
    merged[key] = merged.get(key, 0) + 1
  return [(*k, c) for k, c in merged.items()]


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--resize', default='none')
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--xla-flags', default='')
  p.add_argument('--only', default='')
  p.add_argument('--json', default='', help='write the per-shape medians (CPU s per call) here')
  p.add_argument(
      '--impl', default='xla', choices=('xla', 'matmul', 'hwio', 'auto'),
      help="JAX convolution: lax.conv ('xla'), speed.matmul_conv ('matmul'), "
      "lax.conv with speed.hwio_input_grad ('hwio') or conv_impl='auto''s choice "
      'per pass (speed.conv_passes)')
  args = p.parse_args()
  if args.xla_flags:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + args.xla_flags).strip()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import torch.nn.functional as F

  torch.set_num_threads(len(os.sched_getaffinity(0)))
  resize = None if args.resize == 'none' else int(args.resize)
  rng = np.random.default_rng(0)
  rows = []
  tot = {'jax': np.zeros(3), 'torch': np.zeros(3)}
  for name, h, cin, cout, k, stride, count in resnet50_convs(resize):
    if args.only and name not in args.only.split(','):
      continue
    n = args.batch
    x = rng.standard_normal((n, h, h, cin)).astype(np.float32)
    w = rng.standard_normal((k, k, cin, cout)).astype(np.float32) * 0.05
    pad = k // 2

    def conv(x, w):
      from twins_jax import speed
      impls = dict(xla=('xla',) * 3, matmul=('matmul',) * 3, hwio=('xla', 'hwio', 'xla'))
      ho = (h + 2 * pad - k) // stride + 1
      return speed.conv(x, w, stride, pad,
                        impls.get(args.impl) or speed.conv_passes(k, ho, ho, cout))

    y, vjp = jax.vjp(conv, x, w)
    g = jnp.asarray(rng.standard_normal(y.shape).astype(np.float32))
    fwd = jax.jit(conv)
    dx = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    dw = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
    xj, wj = jnp.asarray(x), jnp.asarray(w)
    jfns = [lambda: fwd(xj, wj), lambda: dx(xj, wj, g), lambda: dw(xj, wj, g)]

    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).requires_grad_(True)
    gt = torch.from_numpy(np.asarray(g).transpose(0, 3, 1, 2).copy())
    conv_t = lambda x, w: F.conv2d(x, w, stride=stride, padding=pad)
    x_nograd, w_nograd = xt.detach(), wt.detach()

    def t_fwd():
      with torch.no_grad():
        return conv_t(x_nograd, w_nograd)

    def t_dx():
      return torch.autograd.grad(conv_t(xt, w_nograd), xt, gt)[0]

    def t_dw():
      return torch.autograd.grad(conv_t(x_nograd, wt), wt, gt)[0]

    tfns = [t_fwd, t_dx, t_dw]
    # torch's dx/dw include a forward; subtract the forward's time below.
    for f in jfns:
      jax.block_until_ready(f())
    for f in tfns:
      f()
    reps = max(1, int(2e8 / max(1, 2 * n * (h // stride)**2 * cin * cout * k * k)))
    reps = min(reps, 50)
    res = {'jax': [[], [], []], 'torch': [[], [], []]}
    for _ in range(args.repeats):
      for i in range(3):
        c0 = time.process_time()
        for _ in range(reps):
          out = jfns[i]()
        jax.block_until_ready(out)
        res['jax'][i].append((time.process_time() - c0) / reps)
        c0 = time.process_time()
        for _ in range(reps):
          tfns[i]()
        res['torch'][i].append((time.process_time() - c0) / reps)
    med = {k: np.array([np.median(v) for v in vs]) for k, vs in res.items()}
    med['torch'][1:] = np.maximum(med['torch'][1:] - med['torch'][0], 1e-9)
    for kk in tot:
      tot[kk] += med[kk] * count
    flops = 2 * n * (h // stride)**2 * cin * cout * k * k
    rows.append((name, h, cin, cout, k, stride, count, flops, med['jax'], med['torch']))
    print(
        f'{name:10s} h={h:3d} {cin:4d}->{cout:4d} k{k} s{stride} x{count}  ' +
        '  '.join(f'{part}: jax {med["jax"][i] * 1e3:7.2f} torch {med["torch"][i] * 1e3:7.2f} ms'
                  f' ({med["jax"][i] / med["torch"][i]:4.1f}x)'
                  for i, part in enumerate(('fwd', 'dx', 'dw'))), flush=True)
  print('TOTAL (x count): ' +
        '  '.join(f'{part}: jax {tot["jax"][i] * 1e3:.1f} ms torch {tot["torch"][i] * 1e3:.1f} ms'
                  for i, part in enumerate(('fwd', 'dx', 'dw'))))
  print(f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r} load {os.getloadavg()}')
  if args.json:
    import json
    keys = ('name', 'h', 'cin', 'cout', 'k', 'stride', 'count', 'flops')
    out = [
        dict(zip(keys, r[:8]), jax=dict(zip(('fwd', 'dx', 'dw'), map(float, r[8]))),
             torch=dict(zip(('fwd', 'dx', 'dw'), map(float, r[9])))) for r in rows
    ]
    with open(args.json, 'w') as f:
      json.dump(dict(args=vars(args), load=os.getloadavg(), rows=out), f, indent=1)


if __name__ == '__main__':
  main()
