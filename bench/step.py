"""Throughput of the full TWINS training step (PGD + update), JAX against the PyTorch reference.

JAX: ``step.make_train_step`` jitted by ``parallel.jit_train_step`` on a mesh of every
local device (the state donated, the batch sharded), exactly what ``main.py`` trains
with. PyTorch: the official training iteration rebuilt in ``tests/torch_reference.py``
(``ITERATIONS[method]``), the step the parity tests prove we equal (the official twin-BN
ResNet, SGD with momentum and coupled weight decay),
``torch.set_num_threads`` = the cores this process may use. Both start from random
weights (the throughput does not depend on the values), see the same batch, and run
alternately: ``--repeats`` rounds of ``--steps-per-repeat`` steps of each, after one
warm-up step each; the medians are reported. The same is done for the PGD evaluation
(clean forward, PGD, adversarial forward of the Adaptive Net in eval mode; PyTorch: the
official ``Trainer.test``).

FLOPs: ``model`` FLOPs are analytic: F, the FLOPs of one forward per image (2 per
multiply-add of every convolution and the linear layer, ``common.analytic_forward_flops``),
times the passes a step makes:
a PGD iteration is a forward and an input-gradient backward (2F), a training
forward+backward is 3F (input and weight gradients), so TWINS-AT is (2 * steps + 3) F,
TWINS-TRADES (2 * steps + 6) F and the PGD evaluation (2 * steps + 2) F. Achieved FLOP/s
= model FLOPs per image * images/s, for both implementations (same arithmetic).
XLA's own cost analysis of the compiled step is printed too; it counts the PGD loop's
body once, so the script also adds the other iterations back.

Usage::

  python bench/step.py --arch resnet50 --resize none --batch 32 --method twins_at
      [--dtype float32|bfloat16] [--attack-steps 10] [--repeats 5] [--steps-per-repeat 2]
      [--eval/--no-eval] [--no-torch] [--fold-bn] [--conv-impl auto|xla|matmul]
      [--no-donate] [--devices all|1]
      [--xla-flags "..."] [--default-xla-flags/--no-default-xla-flags] [--json OUT]

XLA flags: ``--xla-flags`` is appended to ``XLA_FLAGS`` before JAX is imported (XLA
reads them once per process, so they cannot change later); ``XLA_FLAGS`` in the
environment works too. By default the CPU flags of ``twins_jax.xla_flags`` are applied
(see BENCHMARKS.md); ``--no-default-xla-flags`` measures XLA's own defaults.
The last line printed is ``ratio_jax_over_torch=<x>`` (training step, images/s).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--arch', default='resnet50')
  p.add_argument('--resize', default='none', help="'none' (32x32 inputs) or a size, e.g. 224")
  p.add_argument('--image-size', type=int, default=32, help='input images (before resize)')
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--method', default='twins_at', choices=('twins_at', 'twins_trades'))
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  p.add_argument('--attack-steps', type=int, default=10)
  p.add_argument('--num-classes', type=int, default=10)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--steps-per-repeat', type=int, default=2)
  p.add_argument('--eval', dest='eval', action='store_true', default=True)
  p.add_argument('--no-eval', dest='eval', action='store_false')
  p.add_argument('--no-torch', action='store_true', help='JAX only')
  p.add_argument('--no-jax', action='store_true',
                 help='PyTorch only (e.g. from a separate PyTorch environment)')
  p.add_argument('--measure-peak', action='store_true',
                 help='also time a large matmul (the practical peak) on the JAX device')
  p.add_argument('--torch-device', default='cpu', help="'cpu' or 'cuda' for the reference")
  p.add_argument('--conv-impl', default='auto', choices=('auto', 'xla', 'matmul'),
                 help="speed.CONV_IMPLS: 'auto' (default), 'xla' (lax.conv everywhere)")
  p.add_argument('--fold-bn', action='store_true',
                 help='fold the eval-mode BN into the convolutions during the attack')
  p.add_argument('--no-donate', action='store_true',
                 help="don't donate the training state's buffers to the step (lever off)")
  p.add_argument('--devices', default='all', help="'all' local devices or a number")
  p.add_argument('--xla-flags', default='', help='appended to XLA_FLAGS before importing JAX')
  p.add_argument('--default-xla-flags', dest='default_xla_flags', action='store_true', default=True)
  p.add_argument('--no-default-xla-flags', dest='default_xla_flags', action='store_false')
  p.add_argument('--save-outputs', default='', help=argparse.SUPPRESS)
  p.add_argument('--compare', default='', help=argparse.SUPPRESS)
  p.add_argument('--json', default='', help='write the results here')
  return p.parse_args(argv)


def _setup_env(args):
  sys.path.insert(0, ROOT)
  sys.path.insert(0, os.path.join(ROOT, 'tests'))
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if args.default_xla_flags:
    from twins_jax import xla_flags
    xla_flags.apply()
  if args.xla_flags:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + args.xla_flags).strip()


def _median(ts):
  import numpy as np
  return float(np.median(ts)) if ts else float('nan')


def forward_flops_per_image(model, variables, image_size):
  """F: XLA's FLOP count of one unoptimised eval forward, per image."""
  import jax
  import jax.numpy as jnp
  n = 2
  x = jnp.zeros((n, image_size, image_size, 3), jnp.float32)
  lowered = jax.jit(lambda v, x: model.apply(v, x, mode='eval')).lower(variables, x)
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost['flops']) / n


def passes(method, steps):
  """Forward-equivalents per image of a training step and of the PGD evaluation."""
  train = 2 * steps + (3 if method == 'twins_at' else 6)
  return train, 2 * steps + 2


def run_jax(args, x, y):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from bench import common
  from twins_jax import models, parallel
  from twins_jax import step as step_lib

  resize = None if args.resize == 'none' else int(args.resize)
  dtype = jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32
  model = models.create_model(args.arch, args.num_classes, resize=resize, twin=True, dtype=dtype,
                              conv_impl=args.conv_impl)
  t0 = time.perf_counter()
  variables = models.init_variables(model, 0, image_size=args.image_size)
  devices = jax.local_devices()
  if args.devices != 'all':
    devices = devices[:int(args.devices)]
  mesh = parallel.data_mesh(devices)
  parallel.check_batch_size(args.batch, mesh)

  tx, schedule = step_lib.make_optimizer(0.003, 1e-5, 0.9, (1000,), 0.1)
  extra = dict(fold_bn_attack=True) if args.fold_bn else {}
  config = step_lib.StepConfig(method=args.method, steps=args.attack_steps, **extra)
  train_step = parallel.jit_train_step(step_lib.make_train_step(model, tx, config, schedule), mesh,
                                       donate=not args.no_donate)
  state = parallel.replicate(step_lib.TrainState.create(variables, tx), mesh)
  batch = parallel.shard_batch({'image': x, 'label': y}, mesh)
  n_keys = 2 + args.repeats * args.steps_per_repeat
  keys = [jax.random.key(i) for i in range(n_keys)]

  compiled = train_step.lower(state, batch, keys[0]).compile()
  compile_s = time.perf_counter() - t0
  xla_flops = common.xla_flops(compiled)
  kinds = common.fusion_kinds(compiled)
  f_fwd = common.analytic_forward_flops(args.arch, args.num_classes, args.image_size, resize)
  xla_f_fwd = forward_flops_per_image(model, variables, args.image_size)

  # Warm-up through the jitted function (as training calls it): it must compile once
  # and then never again.
  state, metrics = train_step(state, batch, keys[0])
  jax.block_until_ready(state)
  outputs = {}
  if args.save_outputs or args.compare:
    outputs = {k: np.asarray(v, np.float32) for k, v in metrics.items()}
  cache_after_warmup = train_step._cache_size()

  def train_round(state, i0):
    t, c = time.perf_counter(), time.process_time()
    for i in range(args.steps_per_repeat):
      state, _ = train_step(state, batch, keys[1 + i0 + i])  # no host sync inside
    jax.block_until_ready(state)
    k = args.steps_per_repeat
    return state, ((time.perf_counter() - t) / k, (time.process_time() - c) / k)

  eval_round = None
  if args.eval:
    eval_config = step_lib.StepConfig(method=args.method, steps=args.attack_steps)
    eps = jnp.float32(eval_config.eps)
    eval_step = parallel.jit_eval_step(step_lib.make_eval_step(model, eval_config), mesh)
    eval_vars = jax.device_get(state.variables)
    eval_vars = parallel.replicate(eval_vars, mesh)
    jax.block_until_ready(eval_step(eval_vars, batch, keys[0], eps))

    def eval_round():
      t, c = time.perf_counter(), time.process_time()
      for i in range(args.steps_per_repeat):
        out = eval_step(eval_vars, batch, keys[i], eps)
      jax.block_until_ready(out)
      k = args.steps_per_repeat
      return (time.perf_counter() - t) / k, (time.process_time() - c) / k

  info = dict(compile_s=compile_s,
              xla_flops_per_image=(xla_flops / args.batch if xla_flops else None),
              forward_flops_per_image=f_fwd, xla_forward_flops_per_image=xla_f_fwd,
              fusion_kinds=kinds, devices=[str(d) for d in devices], backend=jax.default_backend(),
              device_kind=devices[0].device_kind)

  def check_no_recompile():
    info['recompiled'] = train_step._cache_size() != cache_after_warmup

  return dict(state=state, train_round=train_round, eval_round=eval_round, info=info,
              outputs=outputs, check=check_no_recompile, compiled=compiled)


def run_torch(args, x, y):
  import numpy as np
  import torch

  import torch_reference as ref

  device = torch.device(args.torch_device)
  if device.type == 'cpu':
    torch.set_num_threads(len(os.sched_getaffinity(0)))
  else:
    torch.backends.cudnn.benchmark = True
  torch.manual_seed(0)
  resize = None if args.resize == 'none' else int(args.resize)
  # The official twin-BN ResNet (AdvResNet) and the official training iteration / test().
  model = getattr(ref, 'twin_' + args.arch)(num_classes=args.num_classes, resize=resize)
  model.to(device)
  ref_args = ref.Args(epsilon=8 / 255, alpha=2 / 255, k=args.attack_steps, batch_size=args.batch,
                      num_classes=args.num_classes, learning_rate=0.003, weight_decay=1e-5,
                      lambda_twins=1.0)
  attack = ref.make_attack(model, ref_args)
  optimizer, scheduler = ref.make_optimizer(model, ref_args, milestones=(1000,))
  iteration = ref.ITERATIONS[args.method]
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(device)
  yt = torch.from_numpy(y.astype(np.int64)).to(device)
  if args.dtype == 'bfloat16' and args.no_jax:
    print('note: the PyTorch reference step runs in float32 (it has no bfloat16 mode)')
  sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)

  def step():  # random start: the official float32 CPU draw, moved to the device
    return iteration(model, attack, optimizer, scheduler, xt, yt, ref_args)

  def evaluate():  # Trainer.test: clean and PGD (no random start), Adaptive Net in eval mode
    record = []
    ref.test(model, attack, [(xt, yt)], adv_test=True, record=record)
    return record[0]

  step()  # warm-up
  if args.eval:
    evaluate()
  sync()

  def timed(fn):

    def run():
      t, c = time.perf_counter(), time.process_time()
      for _ in range(args.steps_per_repeat):
        fn()
      sync()
      k = args.steps_per_repeat
      return (time.perf_counter() - t) / k, (time.process_time() - c) / k

    return run

  train_round, eval_round = timed(step), timed(evaluate)

  return dict(
      train_round=train_round, eval_round=eval_round if args.eval else None,
      info=dict(torch=torch.__version__, threads=torch.get_num_threads(), device=str(device)))


def cpu_name():
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


# Nominal dense peak FLOP/s by accelerator (vendor data sheets), for the GPU report.
NOMINAL_PEAK = {  # device_kind substring: (bf16, fp32 without tensor cores)
    'H200': (989e12, 67e12), 'H100 80GB HBM3': (989e12, 67e12), 'H100 PCIe': (756e12, 51e12),
    'H100': (989e12, 67e12), 'A100': (312e12, 19.5e12), 'L40S': (362e12, 91.6e12),
    'L4': (121e12, 30.3e12),
}


def nominal_peak(device_kind: str):
  for key, peak in NOMINAL_PEAK.items():
    if key in device_kind:
      return dict(zip(('bfloat16', 'float32'), peak))
  return None


def measured_matmul_peak(dtype_name: str, n: int = 8192, reps: int = 10) -> float:
  """FLOP/s of a large square matrix product on the default JAX device."""
  import jax
  import jax.numpy as jnp
  dtype = jnp.bfloat16 if dtype_name == 'bfloat16' else jnp.float32
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  jax.block_until_ready(f(a))
  t = time.perf_counter()
  for _ in range(reps):
    out = f(a)
  jax.block_until_ready(out)
  return 2 * n**3 * reps / (time.perf_counter() - t)


def torch_forward_flops_per_image(args) -> float:
  """F counted on the PyTorch model (convolutions and linear layers, 2 FLOPs per MAC)."""
  import torch
  import torch_reference as ref
  resize = None if args.resize == 'none' else int(args.resize)
  model = getattr(ref, args.arch)(num_classes=args.num_classes, resize=resize).eval()
  total = [0]

  def hook(mod, inp, out):
    if isinstance(mod, torch.nn.Conv2d):
      k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
      total[0] += 2 * out.numel() * k
    elif isinstance(mod, torch.nn.Linear):
      total[0] += 2 * out.numel() * mod.in_features

  for m in model.modules():
    if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
      m.register_forward_hook(hook)
  with torch.no_grad():
    model(torch.zeros(1, 3, args.image_size, args.image_size))
  return float(total[0])


def main(argv=None):
  args = parse_args(argv)
  if args.no_jax and args.no_torch:
    raise SystemExit('Nothing to measure: --no-jax and --no-torch.')
  if not args.no_jax:
    _setup_env(args)
  else:
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, 'tests'))
  import numpy as np

  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (args.batch, args.image_size, args.image_size, 3)).astype(np.float32)
  y = rng.integers(0, args.num_classes, args.batch).astype(np.int32)

  j = None if args.no_jax else run_jax(args, x, y)
  t = None if args.no_torch else run_torch(args, x, y)

  state = j['state'] if j else None
  times = {k: [] for k in ('jt', 'tt', 'je', 'te')}  # (wall, cpu) seconds per step
  i0 = 0
  for r in range(args.repeats):  # alternate JAX and PyTorch
    if j:
      state, dt = j['train_round'](state, i0)
      i0 += args.steps_per_repeat
      times['jt'].append(dt)
    if t:
      times['tt'].append(t['train_round']())
    if args.eval:
      if j:
        times['je'].append(j['eval_round']())
      if t:
        times['te'].append(t['eval_round']())
    print(
        f'  round {r}:' + (f" jax {args.batch / times['jt'][-1][0]:.2f} img/s" if j else '') +
        (f" torch {args.batch / times['tt'][-1][0]:.2f} img/s" if t else '') +
        f' (load {os.getloadavg()[0]:.1f})', flush=True)
  if j:
    j['check']()
  jt, tt, je, te = ([w for w, _ in times[k]] for k in ('jt', 'tt', 'je', 'te'))
  cpu = {k: _median([c for _, c in v]) / args.batch if v else None for k, v in times.items()}

  b = args.batch
  train_passes, eval_passes = passes(args.method, args.attack_steps)
  f_fwd = j['info']['forward_flops_per_image'] if j else torch_forward_flops_per_image(args)
  model_flops = dict(train=train_passes * f_fwd, eval=eval_passes * f_fwd)
  ips = lambda ts: b / _median(ts) if ts else float('nan')
  jax_version = None
  if j:
    import jax
    jax_version = jax.__version__
  res = dict(
      date=datetime.datetime.now().isoformat(timespec='seconds'),
      machine=dict(cpu=cpu_name(), cores=len(os.sched_getaffinity(0)),
                   platform=platform.platform()),
      command='python bench/step.py ' + ' '.join(argv if argv is not None else sys.argv[1:]),
      config=dict(arch=args.arch, resize=args.resize, image_size=args.image_size, batch=b,
                  method=args.method, dtype=args.dtype, attack_steps=args.attack_steps,
                  fold_bn=args.fold_bn, conv_impl=args.conv_impl, donate=not args.no_donate,
                  repeats=args.repeats, steps_per_repeat=args.steps_per_repeat),
      xla_flags=os.environ.get('XLA_FLAGS', ''), jax=jax_version, jax_info=j['info'] if j else None,
      torch_info=t['info'] if t else None,
      train=dict(jax_images_per_s=ips(jt), torch_images_per_s=ips(tt), jax_step_s=jt,
                 torch_step_s=tt, jax_cpu_s_per_image=cpu['jt'], torch_cpu_s_per_image=cpu['tt']),
      eval=dict(jax_images_per_s=ips(je), torch_images_per_s=ips(te), jax_step_s=je,
                torch_step_s=te, jax_cpu_s_per_image=cpu['je'], torch_cpu_s_per_image=cpu['te']),
      forward_flops_per_image=f_fwd, model_flops_per_image=model_flops, loadavg=os.getloadavg())
  for part in ('train', 'eval'):
    r = res[part]
    r['ratio_jax_over_torch'] = r['jax_images_per_s'] / r['torch_images_per_s']
    r['jax_flops_per_s'] = model_flops[part] * r['jax_images_per_s']
    r['torch_flops_per_s'] = model_flops[part] * r['torch_images_per_s']

  if j and args.measure_peak:
    peak = measured_matmul_peak(args.dtype)
    nominal = nominal_peak(j['info']['device_kind'])
    res['peak'] = dict(measured_matmul_flops_per_s=peak, nominal=nominal)
    res['train']['jax_fraction_of_measured_peak'] = res['train']['jax_flops_per_s'] / peak
    if nominal:
      res['train']['jax_fraction_of_nominal_peak'] = (res['train']['jax_flops_per_s'] /
                                                      nominal[args.dtype])

  if j and args.save_outputs:
    np.savez(args.save_outputs, **j['outputs'])
  if j and args.compare:
    ref = np.load(args.compare)
    res['numerics'] = {
        k: float(abs(v - ref[k]) / max(abs(ref[k]), 1e-12)) for k, v in j['outputs'].items()
        if k in ref
    }

  print(f"{args.arch} resize={args.resize} batch={b} {args.method} {args.dtype} "
        f"PGD-{args.attack_steps}{' fold-bn' if args.fold_bn else ''} conv_impl={args.conv_impl}")
  if j:
    xf = j['info']['xla_flops_per_image']
    print(f"  XLA_FLAGS={res['xla_flags']!r}; {j['info']['backend']} {j['info']['device_kind']}")
    print(f"  compile {j['info']['compile_s']:.0f} s; library fusions "
          f"{j['info']['fusion_kinds']}; recompiled during timing: {j['info']['recompiled']}")
    if xf:
      # XLA's cost analysis counts the body of the PGD fori_loop once.
      res['jax_info']['xla_flops_per_image_all_iterations'] = xf + (args.attack_steps - 1) * (
          2 * j['info']['xla_forward_flops_per_image'])
      print(f"  XLA cost analysis {xf / 1e9:.3f} GFLOP per image (train step, PGD loop body "
            f"counted once; with all {args.attack_steps} iterations "
            f"{res['jax_info']['xla_flops_per_image_all_iterations'] / 1e9:.3f})")
  print(f"  model FLOPs per image: forward {f_fwd / 1e9:.4f} GFLOP; train step "
        f"{model_flops['train'] / 1e9:.3f} GFLOP ({train_passes} F); PGD eval "
        f"{model_flops['eval'] / 1e9:.3f} GFLOP ({eval_passes} F)")
  for part, name in (('train', 'training step'), ('eval', f'PGD-{args.attack_steps} eval')):
    r = res[part]
    if part == 'eval' and not args.eval:
      continue
    print(f"  {name:16s} jax {r['jax_images_per_s']:8.2f} img/s "
          f"({r['jax_flops_per_s'] / 1e9:8.1f} GFLOP/s)   torch {r['torch_images_per_s']:8.2f} "
          f"img/s ({r['torch_flops_per_s'] / 1e9:8.1f} GFLOP/s)   ratio "
          f"{r['ratio_jax_over_torch']:.3f}")
    if r['jax_cpu_s_per_image'] and r['torch_cpu_s_per_image']:
      print(f"  {'':16s} CPU time per image: jax {r['jax_cpu_s_per_image']:.4f} s, torch "
            f"{r['torch_cpu_s_per_image']:.4f} s (ratio torch/jax "
            f"{r['torch_cpu_s_per_image'] / r['jax_cpu_s_per_image']:.3f})")
  if 'peak' in res:
    print(f"  matmul peak measured {res['peak']['measured_matmul_flops_per_s'] / 1e12:.1f} "
          f"TFLOP/s ({args.dtype}); training step at "
          f"{100 * res['train']['jax_fraction_of_measured_peak']:.1f}% of it" +
          (f", {100 * res['train']['jax_fraction_of_nominal_peak']:.1f}% of nominal "
           f"{res['peak']['nominal'][args.dtype] / 1e12:.0f} TFLOP/s"
           if res['peak']['nominal'] else ''))
  print(f"  load average {res['loadavg']}")
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(res, f, indent=1)
  print(f"ratio_jax_over_torch={res['train']['ratio_jax_over_torch']:.4f}")
  return res


if __name__ == '__main__':
  main()
