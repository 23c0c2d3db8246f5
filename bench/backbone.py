"""ResNet forward+backward throughput, JAX against PyTorch: the lever microbenchmark.

One training-mode forward and backward (batch-statistics BN, cross-entropy, gradient of
every parameter, no optimizer) of a plain ResNet, timed in alternation with the same
network in plain PyTorch (``tests/torch_reference.py``). Used to measure XLA CPU flags
on the backbone alone, where the gap to PyTorch starts; ``bench/step.py`` measures the
whole TWINS step.

Usage::

  python bench/backbone.py [--arch resnet50] [--resize none] [--batch 64]
      [--dtype float32] [--repeats 5] [--steps-per-repeat 3] [--no-torch]
      [--xla-flags "--xla_cpu_..."] [--save-outputs F.npz] [--compare F.npz] [--json OUT]

``--xla-flags`` is appended to ``XLA_FLAGS`` before JAX is imported (the flags are read
once per process). ``--save-outputs`` writes the logits and the gradient of a fixed
batch (fixed weights: seed 0); ``--compare`` reads such a file written under other
flags and prints the relative differences, to check that a flag keeps the numerics.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--arch', default='resnet50')
  p.add_argument('--resize', default='none', help="'none' or a size (224)")
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--steps-per-repeat', type=int, default=3)
  p.add_argument('--no-torch', action='store_true')
  p.add_argument('--conv-impl', default='auto', choices=('auto', 'xla', 'matmul'))
  p.add_argument('--xla-flags', default='')
  p.add_argument('--save-outputs', default='')
  p.add_argument('--compare', default='')
  p.add_argument('--f64', action='store_true',
                 help='compute in float64 (a reference for --compare; implies --no-torch)')
  p.add_argument('--json', default='')
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.xla_flags:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + args.xla_flags).strip()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))
  import time

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from bench import common
  from twins_jax import models

  resize = None if args.resize == 'none' else int(args.resize)
  dtype = jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32
  model = models.create_model(args.arch, 10, resize=resize, twin=False, dtype=dtype,
                              conv_impl=args.conv_impl)
  variables = models.init_variables(model, 0)
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (args.batch, 32, 32, 3)).astype(np.float32)
  if args.f64:  # the same weights and images, computed in float64
    args.no_torch = True
    jax.config.update('jax_enable_x64', True)
    model = models.create_model(args.arch, 10, resize=resize, twin=False, dtype=jnp.float64,
                                param_dtype=jnp.float64, conv_impl=args.conv_impl)
    variables = jax.tree.map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), variables)
    x = x.astype(np.float64)
  y = rng.integers(0, 10, args.batch).astype(np.int32)

  def loss_fn(params, batch_stats, x, y):
    logits, upd = model.apply({'params': params, 'batch_stats': batch_stats}, x, mode='train',
                              mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (logits, upd['batch_stats'])

  grad_fn = jax.jit(jax.grad(loss_fn, has_aux=True))
  params, stats = variables['params'], variables['batch_stats']
  xj, yj = jnp.asarray(x), jnp.asarray(y)
  compiled = grad_fn.lower(params, stats, xj, yj).compile()
  flops = common.xla_flops(compiled)
  kinds = common.fusion_kinds(compiled)

  def run_jax(n):
    out = None
    for _ in range(n):
      out = compiled(params, stats, xj, yj)
    jax.block_until_ready(out)
    return out

  out = run_jax(1)  # warm-up
  grads, (logits, _) = out
  if args.save_outputs:
    flat = {
        jax.tree_util.keystr(k): np.asarray(v, np.float32)
        for k, v in jax.tree_util.tree_leaves_with_path(grads)
    }
    np.savez(args.save_outputs, logits=np.asarray(logits, np.float32), **flat)
  numerics = None
  if args.compare:
    ref = np.load(args.compare)
    flat = {
        jax.tree_util.keystr(k): np.asarray(v, np.float32)
        for k, v in jax.tree_util.tree_leaves_with_path(grads)
    }
    rel = lambda a, b: float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
    g = [rel(flat[k], ref[k]) for k in flat]
    numerics = dict(logits_rel=rel(np.asarray(logits, np.float32), ref['logits']),
                    grad_rel_max=max(g), grad_rel_median=float(np.median(g)))
    print(f'numerics vs {args.compare}: {numerics}')

  torch_fn = None
  if not args.no_torch:
    import torch
    import torch.nn.functional as F
    import torch_reference as ref_lib
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    tm = getattr(ref_lib, args.arch)(num_classes=10, resize=resize)
    tm.train()
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    yt = torch.from_numpy(y.astype(np.int64))

    def torch_fn(n):
      for _ in range(n):
        tm.zero_grad(set_to_none=True)
        F.cross_entropy(tm(xt), yt).backward()

    torch_fn(1)  # warm-up

  k = args.steps_per_repeat
  t_jax, t_torch, c_jax, c_torch = [], [], [], []
  for _ in range(args.repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    run_jax(k)
    t_jax.append((time.perf_counter() - t0) / k)
    c_jax.append((time.process_time() - c0) / k)
    if torch_fn is not None:
      t0, c0 = time.perf_counter(), time.process_time()
      torch_fn(k)
      t_torch.append((time.perf_counter() - t0) / k)
      c_torch.append((time.process_time() - c0) / k)

  med = lambda t: float(np.median(t)) if t else float('nan')
  ips_jax = args.batch / med(t_jax)
  ips_torch = args.batch / med(t_torch) if t_torch else float('nan')
  res = dict(arch=args.arch, resize=args.resize, batch=args.batch, dtype=args.dtype,
             conv_impl=args.conv_impl, xla_flags=os.environ.get('XLA_FLAGS', ''),
             jax_images_per_s=ips_jax, torch_images_per_s=ips_torch, ratio=ips_jax / ips_torch,
             jax_times_s=t_jax, torch_times_s=t_torch, jax_cpu_s_per_image=med(c_jax) / args.batch,
             torch_cpu_s_per_image=med(c_torch) / args.batch if c_torch else None,
             xla_flops_per_image=flops / args.batch if flops else None,
             jax_flops_per_s=flops / med(t_jax) if flops else None, fusion_kinds=kinds,
             numerics=numerics, loadavg=os.getloadavg())
  print(f"jax {ips_jax:.1f} img/s  torch {ips_torch:.1f} img/s  ratio {ips_jax / ips_torch:.3f}  "
        f"cpu-s/img jax {med(c_jax) / args.batch:.4f} torch {med(c_torch) / args.batch:.4f}  "
        f"XLA GFLOP/img {flops / args.batch / 1e9 if flops else float('nan'):.3f}  "
        f"fusions {kinds}  load {os.getloadavg()[0]:.1f}")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(res, f, indent=1)
  return res


if __name__ == '__main__':
  main()
