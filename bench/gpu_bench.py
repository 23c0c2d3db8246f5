"""The GPU benchmark: one command, offline, on one GPU, inside a time budget.

Runs on the lent GPU machine as it is (no network): its own JAX and PyTorch, plus the
few wheels ``bench/gpu_wheels.sh`` prepared (grain and what grain needs; only the input
pipeline section uses them). ``bench/gpu.sh`` installs those wheels and runs this.

Sections, each in its own process (XLA reads its flags once per process; JAX and PyTorch
never share the GPU; a section that crashes or overruns is recorded and the run goes on):

* ``jax``: the TWINS-AT training step (PGD-10 + update, ``step.make_train_step`` jitted by
  ``parallel.jit_train_step``, what ``main.py`` trains with) of ResNet-50 on 32x32 images
  upsampled to 224 inside the model (the reference's CIFAR setting), batch 128, in float32
  and bfloat16 (``models.create_model(..., dtype=jnp.bfloat16)``: bf16 compute, fp32
  master weights and BN statistics); the PGD-10 evaluation step (``step.make_eval_step``);
  a large matrix product in each dtype (the practical peak).
* ``torch``: the PyTorch reference step (``tests/torch_reference.py``, the authors' TWINS-AT
  iteration on the twin ResNet-50, proven equal to ours in float64) and its ``Trainer.test``
  evaluation, in float32 as the authors run it (NCHW) and at its best: AMP bf16
  (``torch.autocast``) with channels_last; ``cudnn.benchmark`` on in both.
* ``input``: the input pipeline's images/s (``data.train_pipeline``, grain), no model: CIFAR
  (an in-memory ``ArraySource`` of 32x32 uint8 images, which is what CIFAR decodes to: the
  PNG decoding a ``TfdsSource`` adds is not measured, and tensorflow-datasets is not needed;
  pad-4 crop and flip; the model upsamples to 224 on the GPU) and a folder of JPEGs written to
  local disk first (300-500 px, RandomResizedCrop 224 and flip), in-process and with one
  grain worker process per core. Each is compared with the training step's images/s.
* ``autoattack``: ``twins_jax.autoattack.autoattack`` per attack (default the 'fast' suite's
  APGD-CE and APGD-T, standard settings) on images whose labels are the model's own
  predictions, so that every image is attacked by the first run (APGD-CE's restart, APGD-T's
  first target); later runs attack only the points still robust, as in a real evaluation
  (``point_runs`` counts the points each run attacked). Called twice: the first call
  compiles the batch-size ladder, images/s comes from the second (or, without time for it,
  from the first minus its compilation).
* ``sweep`` (``--sweep``): named variants of the JAX training step (XLA GPU flags, batch,
  true fp32, BN folding; see VARIANTS), each in a fresh process, while time is left.

FLOPs: 2 per multiply-add of every convolution and the linear layer
(``common.analytic_forward_flops``, F = 8.17 GFLOP per image at 224); a PGD iteration is 2F,
a training forward+backward 3F: TWINS-AT with PGD-10 is 23F per image, the PGD-10
evaluation 22F, an APGD iteration 2F. "fp32" is each framework's default float32: both let
the convolutions use TF32 tensor cores on this GPU (XLA's default precision;
``torch.backends.cudnn.allow_tf32``); the ``fp32_exact`` variant measures JAX without.

A global deadline (``--budget`` seconds from the start) bounds the run: a section starts
only while time is left, gets at most its share, is stopped at its deadline (what it had
measured is kept), and the results are written after every section.

  python bench/gpu_bench.py [--budget 360] [--out-dir DIR | --out FILE.json] [--sweep default]
      [--sections jax,torch,input,autoattack] [--xla-flags '...'] [--batch 128] ...
  python bench/gpu_bench.py --dry-run       # every section on CPU with tiny settings
  python bench/gpu_bench.py --list-variants

Writes ``DIR/<device>.json`` (DIR: ``$OUT`` if set, else bench/results), the workers' stderr
next to it (``<device>.workers.log``), and prints a table last.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SECTIONS = ('jax', 'torch', 'input', 'autoattack')
# Largest share of the budget (seconds, full run) each section may take; time a section
# leaves unused goes to the next ones, and the sweep gets what is left at the end.
CAPS = {'jax': 150, 'torch': 75, 'input': 40, 'autoattack': 110}
KILL_GRACE_S = 20  # a worker past its deadline (a compilation cannot be interrupted)

# JAX training-step variants for --sweep (each a fresh process): dtype, XLA_FLAGS, extra
# environment, batch, BN folding for the attack. 'default' runs them in this order.
VARIANTS = {
    'bf16_lhs': dict(dtype='bfloat16', xla_flags='--xla_gpu_enable_latency_hiding_scheduler=true'),
    'bf16_b256': dict(dtype='bfloat16', batch=256),
    'bf16_autotune0': dict(dtype='bfloat16', xla_flags='--xla_gpu_autotune_level=0'),
    'bf16_no_cmd_buffer': dict(dtype='bfloat16', xla_flags='--xla_gpu_enable_command_buffer='),
    'bf16_fold_bn': dict(dtype='bfloat16', fold_bn=True),
    'fp32_exact': dict(dtype='float32', env={'JAX_DEFAULT_MATMUL_PRECISION': 'highest'}),
    'fp32_lhs': dict(dtype='float32', xla_flags='--xla_gpu_enable_latency_hiding_scheduler=true'),
}
DEFAULT_SWEEP = ('bf16_lhs', 'bf16_b256', 'bf16_autotune0', 'bf16_no_cmd_buffer', 'bf16_fold_bn',
                 'fp32_exact')
TORCH_MODES = {  # name: (autocast bf16, channels_last)
    'fp32': (False, False), 'fp32_cl': (False, True), 'amp_bf16': (True, False),
    'amp_bf16_cl': (True, True)
}
# Cheap XLA:CPU compilation for the dry run (tiny models; numbers are not the point there).
DRY_RUN_XLA_FLAGS = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'


def _settings(args) -> dict:
  """Everything the workers need, full-size or tiny (--dry-run)."""
  cores = os.cpu_count() or 1
  if args.dry_run:
    s = dict(arch='tiny_resnet', resize=None, image_size=32, batch=8, attack_steps=2, rounds=2,
             steps_per_round=1, eval_rounds=2, eval_steps_per_round=1, peak_n=256, conv_impl='xla',
             aa_images=8, aa_batch=4, aa_n_iter=2, aa_target_classes=2, aa_dtype='float32',
             input_batch=8, cifar_examples=256, folder_examples=24, input_steps=3,
             input_configs=[[0, 1], [2, 1]], torch_threads=min(2, cores), sweep_rounds=1,
             sweep_steps_per_round=1, need=dict(train=0, eval=0, attack=0))
  else:
    s = dict(arch='resnet50', resize=224, image_size=32, batch=128, attack_steps=10, rounds=3,
             steps_per_round=4, eval_rounds=3, eval_steps_per_round=2, peak_n=8192,
             conv_impl='auto', aa_images=128, aa_batch=64, aa_n_iter=100, aa_target_classes=9,
             aa_dtype='float32', input_batch=128, cifar_examples=10000, folder_examples=512,
             input_steps=24, input_configs=[[0, cores], [cores, 2]], torch_threads=cores,
             sweep_rounds=2, sweep_steps_per_round=3, need=dict(train=40, eval=25, attack=40))
  s.update(num_classes=10, method='twins_at', dry_run=bool(args.dry_run))
  for key in ('batch', 'attack_steps', 'rounds', 'steps_per_round', 'aa_images', 'aa_batch',
              'aa_n_iter', 'aa_target_classes', 'aa_dtype', 'input_batch', 'input_steps'):
    value = getattr(args, key, None)
    if value is not None:
      s[key] = value
  if args.aa_attacks:
    s['aa_attacks'] = args.aa_attacks.split(',')
  else:
    s['aa_attacks'] = ['apgd-ce', 'apgd-t']
  s['jax_dtypes'] = args.jax_dtypes.split(',')
  s['torch_modes'] = args.torch_modes.split(',')
  return s


# --------------------------------------------------------------------------------------------
# Shared by the parent and the workers.


class Clock:
  """Times relative to the run's start, and one deadline."""

  def __init__(self, t0: float, deadline: float):
    self.t0, self.deadline = t0, deadline

  def left(self) -> float:
    return self.deadline - time.time()

  def log(self, msg: str) -> None:
    print(f'[+{time.time() - self.t0:6.1f}s] {msg}', flush=True)


def _write_json(path: str, obj) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1, default=str)
  os.replace(tmp, path)


def _median(xs):
  xs = sorted(xs)
  n = len(xs)
  if not n:
    return float('nan')
  return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _rate(batch: int, step_s: list, flops_per_image: float) -> dict:
  m = _median(step_s)
  ips = batch / m
  return dict(images_per_s=ips, ms_per_step=1e3 * m, tflop_per_s=flops_per_image * ips / 1e12,
              step_s=step_s, batch=batch)


def passes(method: str, steps: int) -> tuple[int, int]:
  """Forward-equivalents per image: a training step and the PGD evaluation."""
  return 2 * steps + (3 if method == 'twins_at' else 6), 2 * steps + 2


# --------------------------------------------------------------------------------------------
# Workers (``--worker NAME``): each writes its result file after every part it measures.


class _Result:

  def __init__(self, path: str, clock: Clock):
    self.path, self.clock = path, clock
    self.data = dict(status='running', results={}, skipped=[], info={})
    self.save()

  def save(self):
    _write_json(self.path, self.data)

  def put(self, keys: tuple, value):
    d = self.data['results']
    for k in keys[:-1]:
      d = d.setdefault(k, {})
    d[keys[-1]] = value
    self.save()

  @contextlib.contextmanager
  def attempt(self, what: str):
    """Records an exception in ``what`` (an out-of-memory, say) and goes on with the rest."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      self.data.setdefault('errors', {})[what] = f'{type(e).__name__}: {e}'[:2000]
      self.save()
      self.clock.log(f'{what}: failed: {type(e).__name__}: {str(e)[:300]}')
      traceback.print_exc()

  def skip(self, what: str, need: float):
    self.clock.log(f'skipped {what}: {self.clock.left():.0f} s left, needs about {need:.0f} s')
    self.data['skipped'].append(what)
    self.save()


def _rounds(run_round, rounds: int, clock: Clock) -> list:
  """Up to ``rounds`` timings (seconds per step), at least one, fewer past the deadline."""
  out = []
  for _ in range(rounds):
    if out and clock.left() < 0:
      break
    out.append(run_round())
  return out


def jax_worker(spec: dict, res: _Result, clock: Clock) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from bench.step import measured_matmul_peak
  from twins_jax import models, parallel
  from twins_jax import step as step_lib

  device = jax.local_devices()[0]
  mesh = parallel.data_mesh([device])
  res.data['info'] = dict(jax=jax.__version__, backend=jax.default_backend(),
                          device_kind=device.device_kind, xla_flags=os.environ.get('XLA_FLAGS', ''),
                          matmul_precision=str(jax.config.jax_default_matmul_precision))
  res.save()
  clock.log(f"jax {jax.__version__} on {device.device_kind} ({jax.default_backend()}); "
            f"XLA_FLAGS={res.data['info']['xla_flags']!r}")
  need = dict(spec['need'])
  rng = np.random.default_rng(0)
  b, f_fwd = spec['batch'], spec['forward_flops']
  train_f, eval_f = (p * f_fwd for p in passes(spec['method'], spec['attack_steps']))
  x = rng.uniform(0, 1, (b, spec['image_size'], spec['image_size'], 3)).astype(np.float32)
  y = rng.integers(0, spec['num_classes'], b).astype(np.int32)
  batch = parallel.shard_batch({'image': x, 'label': y}, mesh)

  def peak_memory_gb():  # the process's peak so far (JAX cannot reset it)
    stats = device.memory_stats() or {}
    return stats['peak_bytes_in_use'] / 2**30 if 'peak_bytes_in_use' in stats else None

  # Training steps first (what matters most), then the matmul peaks, then the evaluations.
  trained = {}
  for dtype in spec['dtypes']:
    with res.attempt(f'{dtype} train'):
      if clock.left() < need['train']:
        res.skip(f'{dtype} train', need['train'])
        continue
      t = time.time()
      jdtype = jnp.bfloat16 if dtype == 'bfloat16' else jnp.float32
      model = models.create_model(spec['arch'], spec['num_classes'], resize=spec['resize'],
                                  dtype=jdtype, conv_impl=spec['conv_impl'])
      variables = models.init_variables(model, 0, image_size=spec['image_size'])
      tx, schedule = step_lib.make_optimizer(0.003, 1e-5, 0.9, (10**6,), 0.1)
      config = step_lib.StepConfig(method=spec['method'], steps=spec['attack_steps'],
                                   fold_bn_attack=bool(spec.get('fold_bn')))
      train_step = parallel.jit_train_step(step_lib.make_train_step(model, tx, config, schedule),
                                           mesh)
      state = parallel.replicate(step_lib.TrainState.create(variables, tx), mesh)
      keys = [jax.random.key(i) for i in range(1 + spec['rounds'] * spec['steps_per_round'])]
      setup_s = time.time() - t
      t = time.time()
      state, metrics = train_step(state, batch, keys[0])  # compiles, then runs one step
      jax.block_until_ready(state)
      first_s = time.time() - t
      clock.log(f'{dtype} train: model and state {setup_s:.1f} s, first step (compilation '
                f'included) {first_s:.1f} s, loss {float(metrics["loss"]):.3f}')
      need['train'] = setup_s + first_s + 5
      box = dict(state=state, i=1)

      def train_round():
        t = time.perf_counter()
        for _ in range(spec['steps_per_round']):
          box['state'], _ = train_step(box['state'], batch, keys[box['i']])
          box['i'] += 1
        jax.block_until_ready(box['state'])
        return (time.perf_counter() - t) / spec['steps_per_round']

      r = _rate(b, _rounds(train_round, spec['rounds'], clock), train_f)
      # Compilation: the first call less one step.
      r.update(compile_s=first_s - r['ms_per_step'] / 1e3, first_step_s=first_s, setup_s=setup_s,
               process_peak_memory_gb=peak_memory_gb(), flops_per_image=train_f)
      res.put((dtype, 'train'), r)
      clock.log(f'{dtype} train: {r["images_per_s"]:.1f} img/s, {r["ms_per_step"]:.1f} ms/step, '
                f'{r["tflop_per_s"]:.3g} TFLOP/s')
      trained[dtype] = (model, config, jax.device_get(box['state'].variables))
      del box, state, train_step

  if spec.get('peak'):
    for dtype in spec['dtypes']:
      with res.attempt(f'{dtype} matmul peak'):
        flops = measured_matmul_peak(dtype, n=spec['peak_n'], reps=10)
        res.put(('peak', dtype), dict(tflop_per_s=flops / 1e12, n=spec['peak_n']))
        clock.log(f'matmul {spec["peak_n"]}^3 {dtype}: {flops / 1e12:.3g} TFLOP/s')

  for dtype, (model, config, variables) in trained.items() if spec.get('eval') else ():
    with res.attempt(f'{dtype} eval'):
      if clock.left() < need['eval']:
        res.skip(f'{dtype} eval', need['eval'])
        continue
      t = time.time()
      eval_step = parallel.jit_eval_step(step_lib.make_eval_step(model, config), mesh)
      eval_vars = parallel.replicate(variables, mesh)
      eps = jnp.float32(config.eps)
      keys = [jax.random.key(i) for i in range(spec['eval_steps_per_round'])]
      jax.block_until_ready(eval_step(eval_vars, batch, keys[0], eps))
      first_s = time.time() - t
      need['eval'] = first_s + 5

      def eval_round():
        t = time.perf_counter()
        for key in keys:
          out = eval_step(eval_vars, batch, key, eps)
        jax.block_until_ready(out)
        return (time.perf_counter() - t) / len(keys)

      r = _rate(b, _rounds(eval_round, spec['eval_rounds'], clock), eval_f)
      r.update(compile_s=first_s - r['ms_per_step'] / 1e3, first_step_s=first_s,
               flops_per_image=eval_f)
      res.put((dtype, 'eval'), r)
      clock.log(f'{dtype} PGD-{spec["attack_steps"]} eval: {r["images_per_s"]:.1f} img/s '
                f'(first call {first_s:.1f} s)')


def torch_worker(spec: dict, res: _Result, clock: Clock) -> None:
  import numpy as np
  import torch

  import torch_reference as ref

  cuda = torch.cuda.is_available()
  if spec['require_cuda'] and not cuda:
    raise RuntimeError('PyTorch sees no GPU (torch.cuda.is_available() is False)')
  dev = torch.device('cuda' if cuda else 'cpu')
  if not cuda:
    torch.set_num_threads(spec['torch_threads'])
  torch.backends.cudnn.benchmark = True
  res.data['info'] = dict(torch=torch.__version__, device=str(dev),
                          device_name=torch.cuda.get_device_name() if cuda else 'cpu',
                          cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                          cudnn_benchmark=True, cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                          matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
  res.save()
  clock.log(f'torch {torch.__version__} on {res.data["info"]["device_name"]}')
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  b, f_fwd = spec['batch'], spec['forward_flops']
  train_f, eval_f = (p * f_fwd for p in passes(spec['method'], spec['attack_steps']))
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (b, 3, spec['image_size'], spec['image_size'])).astype(np.float32)
  y = rng.integers(0, spec['num_classes'], b).astype(np.int64)
  need = dict(spec['need'])
  for mode in spec['modes']:
    with res.attempt(mode):
      amp, channels_last = TORCH_MODES[mode]
      if clock.left() < need['train']:
        res.skip(f'{mode} train', need['train'])
        continue
      torch.manual_seed(0)
      if cuda:
        torch.cuda.reset_peak_memory_stats()
      model = getattr(ref, 'twin_' + spec['arch'])(num_classes=spec['num_classes'],
                                                   resize=spec['resize']).to(dev)
      xt, yt = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)
      if channels_last:
        model = model.to(memory_format=torch.channels_last)
        xt = xt.contiguous(memory_format=torch.channels_last)
      args = ref.Args(epsilon=8 / 255, alpha=2 / 255, k=spec['attack_steps'], batch_size=b,
                      num_classes=spec['num_classes'], learning_rate=0.003, weight_decay=1e-5,
                      lambda_twins=1.0)
      attack = ref.make_attack(model, args)
      opt, sched = ref.make_optimizer(model, args, milestones=(10**6,))
      iteration = ref.ITERATIONS[spec['method']]

      def autocast():
        if amp:
          return torch.autocast(dev.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

      def step():
        with autocast():
          return iteration(model, attack, opt, sched, xt, yt, args)

      def evaluate():
        with autocast():
          return ref.test(model, attack, [(xt, yt)], adv_test=True)

      t = time.time()
      report = step()  # warm-up: cuDNN benchmarks every convolution shape here
      sync()
      first_s = time.time() - t
      need['train'] = first_s + 5
      clock.log(f'{mode} train: first step {first_s:.1f} s, loss {report["loss"]:.3f}')

      def timed(fn, k):

        def run():
          t = time.perf_counter()
          for _ in range(k):
            fn()
          sync()
          return (time.perf_counter() - t) / k

        return run

      r = _rate(b, _rounds(timed(step, spec['steps_per_round']), spec['rounds'], clock), train_f)
      r.update(first_step_s=first_s, flops_per_image=train_f, autocast_bf16=amp,
               channels_last=channels_last,
               peak_memory_gb=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)
      res.put((mode, 'train'), r)
      clock.log(f'{mode} train: {r["images_per_s"]:.1f} img/s, {r["ms_per_step"]:.1f} ms/step, '
                f'{r["tflop_per_s"]:.3g} TFLOP/s')
      if spec.get('eval'):
        if clock.left() < need['eval']:
          res.skip(f'{mode} eval', need['eval'])
        else:
          t = time.time()
          evaluate()
          sync()
          need['eval'] = time.time() - t + 5
          r = _rate(
              b, _rounds(timed(evaluate, spec['eval_steps_per_round']), spec['eval_rounds'], clock),
              eval_f)
          r.update(flops_per_image=eval_f)
          res.put((mode, 'eval'), r)
          clock.log(f'{mode} PGD-{spec["attack_steps"]} eval: {r["images_per_s"]:.1f} img/s')
      del model, attack, opt, sched, xt, yt
      if cuda:
        torch.cuda.empty_cache()


def input_worker(spec: dict, res: _Result, clock: Clock) -> None:
  from pathlib import Path

  import numpy as np

  from bench.input_pipeline import build_folder
  from twins_jax import data

  shm = shutil.disk_usage('/dev/shm').total / 2**30 if os.path.isdir('/dev/shm') else None
  res.data['info'] = dict(cpus=os.cpu_count(), dev_shm_gb=shm)
  rng = np.random.default_rng(0)
  n = spec['cifar_examples']
  cifar = data.ArraySource(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                           np.arange(n) % 10, num_classes=10)
  t = time.time()
  root = build_folder(
      Path(spec['cache_dir']) / f'folder{spec["folder_examples"]}', spec['folder_examples'])
  clock.log(f'{spec["folder_examples"]} JPEGs written to {root} in {time.time() - t:.1f} s')
  workloads = {
      'cifar': (cifar, 'cifar', 32),
      'folder': (data.FolderSource(str(root)), 'imagenet', 224),
  }
  b = spec['batch']
  for name, (source, augment, size) in workloads.items():
    for workers, threads in spec['configs']:
      label = f'workers={workers},threads={threads}'
      if clock.left() < 0:
        res.skip(f'{name} {label}', 0)
        continue
      with res.attempt(f'{name} {label}'):  # e.g. too little shared memory for the workers
        r = _pipeline_rate(data, source, augment, size, b, workers, threads, spec['steps'], clock)
        res.put((name, label), r)
        clock.log(f'input {name} {label}: {r["images_per_s"]:.0f} img/s '
                  f'(first batch after {r["startup_s"]:.1f} s)')


def _pipeline_rate(data, source, augment, size, b, workers, threads, steps, clock) -> dict:
  """Images/s of ``data.train_pipeline``, after ``max(2, 2 * workers)`` warm-up batches."""
  warmup = max(2, 2 * workers)
  plan = data.TrainPlan(len(source), b)
  t = time.time()
  it = iter(
      data.train_pipeline(source, plan, seed=0, augment=augment, image_size=size,
                          num_steps=warmup + steps, worker_count=workers, threads=threads))
  try:
    next(it)
    startup_s = time.time() - t
    for _ in range(warmup - 1):
      next(it)
    t = time.perf_counter()
    images = 0
    for _ in range(steps):
      batch = next(it)
      images += len(batch['label'])
      if clock.left() < 0:
        break
    elapsed = time.perf_counter() - t
  finally:
    getattr(it, 'close', lambda: None)()
  return dict(images_per_s=images / elapsed, workers=workers, threads=threads, batch=b,
              images=images, seconds=elapsed, startup_s=startup_s, image_size=size, augment=augment,
              examples=len(source), shape=list(batch['image'].shape),
              dtype=str(batch['image'].dtype))


class _OutOfTime(Exception):
  pass


def autoattack_worker(spec: dict, res: _Result, clock: Clock) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from twins_jax import models
  from twins_jax.autoattack import autoattack

  device = jax.local_devices()[0]
  res.data['info'] = dict(jax=jax.__version__, device_kind=device.device_kind,
                          xla_flags=os.environ.get('XLA_FLAGS', ''))
  dtype = jnp.bfloat16 if spec['aa_dtype'] == 'bfloat16' else jnp.float32
  model = models.create_model(spec['arch'], spec['num_classes'], resize=spec['resize'], dtype=dtype,
                              conv_impl=spec['conv_impl'])
  variables = models.init_variables(model, 0, image_size=spec['image_size'])
  logits_fn = jax.tree_util.Partial(lambda v, x: model.apply(v, x, mode=models.EVAL), variables)
  n, bs = spec['aa_images'], spec['aa_batch']
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (n, spec['image_size'], spec['image_size'], 3)).astype(np.float32)
  predict = jax.jit(lambda fn, x: jnp.argmax(fn(x), -1))
  y = np.concatenate([np.asarray(predict(logits_fn, x[i:i + bs])) for i in range(0, n, bs)])
  f_fwd = spec['forward_flops']
  need = spec['need']['attack']
  for name in spec['aa_attacks']:
    with res.attempt(name):
      if clock.left() < need:
        res.skip(name, need)
        continue
      attacked = []  # points attacked by each run (restart or target class)

      def progress(msg):
        m = re.search(r' out of (\d+) successfully perturbed', msg)
        if m:
          attacked.append(int(m.group(1)))
        if clock.left() < 0:
          raise _OutOfTime()

      calls = []  # the first call compiles every batch size of the ladder; the second nothing
      accs = {}
      for call in range(2):
        if call and clock.left() < calls[0]['attack_s'] + 5:
          break
        stats = {}
        attacked.clear()
        t = time.time()
        try:
          _, _, accs = autoattack(logits_fn, x, y, jax.random.key(1 + call), norm='Linf',
                                  eps=8 / 255, attacks=[name], batch_size=bs,
                                  n_iter=spec['aa_n_iter'],
                                  n_target_classes=spec['aa_target_classes'], progress=progress,
                                  stats=stats)
        except _OutOfTime:
          break
        calls.append(
            dict(total_s=time.time() - t, attack_s=stats[name], compile_s=stats['compile'],
                 point_runs=sum(attacked)))
      if not calls:
        raise _OutOfTime()
      warm = len(calls) > 1
      last = calls[-1]
      attack_s = last['attack_s'] if warm else max(last['attack_s'] - last['compile_s'], 1e-9)
      ips = n / attack_s
      # Cost follows the points still robust: each run attacks only those (n_iter iterations,
      # a forward and a backward each).
      flops = 2 * spec['aa_n_iter'] * f_fwd * last['point_runs'] if name.startswith(
          'apgd') else None
      r = dict(images_per_s=ips, includes_compile=False, warm_call=warm, batch=bs, images=n,
               calls=calls, n_iter=spec['aa_n_iter'], target_classes=spec['aa_target_classes'],
               dtype=spec['aa_dtype'], point_runs=last['point_runs'], flops=flops,
               tflop_per_s=flops / attack_s / 1e12 if flops else None, accuracy=accs)
      res.put((name,), r)
      need = calls[0]['total_s'] + 5
      how = 'warm call' if warm else 'first call, compilation subtracted'
      clock.log(f'autoattack {name}: {ips:.2f} img/s ({how}; {last["point_runs"]} point-runs in '
                f'batches of up to {bs}; first call {calls[0]["total_s"]:.1f} s, '
                f'{calls[0]["compile_s"]:.1f} s of it compiling)')


WORKERS = {
    'jax': jax_worker, 'torch': torch_worker, 'input': input_worker, 'autoattack': autoattack_worker
}


def run_worker(argv) -> int:
  p = argparse.ArgumentParser()
  p.add_argument('--worker', required=True, choices=sorted(WORKERS))
  p.add_argument('--spec', required=True)
  p.add_argument('--result', required=True)
  p.add_argument('--t0', type=float, required=True)
  p.add_argument('--deadline', type=float, required=True)
  a = p.parse_args(argv)
  sys.path[:0] = [ROOT, os.path.join(ROOT, 'tests')]
  with open(a.spec) as f:
    spec = json.load(f)
  clock = Clock(a.t0, a.deadline)
  res = _Result(a.result, clock)
  WORKERS[a.worker](spec, res, clock)
  res.data['status'] = 'done'
  res.save()
  return 0


# --------------------------------------------------------------------------------------------
# The parent: runs the sections, writes the JSON, prints the table.


def _device_name(dry_run: bool) -> str:
  if dry_run:
    return 'cpu-dry-run'
  try:
    out = subprocess.run(['nvidia-smi', '--query-gpu=name', '--format=csv,noheader'],
                         capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
  except (OSError, subprocess.SubprocessError):
    out = []
  name = out[0] if out else platform.machine()
  return re.sub(r'[^A-Za-z0-9_.-]', '', name.replace(' ', '_')) or 'unknown'


def _nvidia_smi() -> str | None:
  try:
    return subprocess.run([
        'nvidia-smi', '--query-gpu=name,driver_version,memory.total,clocks.max.sm',
        '--format=csv,noheader'
    ], capture_output=True, text=True, timeout=30).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


class Runner:

  def __init__(self, args, settings):
    self.args, self.s = args, settings
    self.t0 = time.time()
    self.deadline = self.t0 + args.budget
    self.clock = Clock(self.t0, self.deadline)
    self.tmp = tempfile.mkdtemp(prefix='gpu_bench_')
    self.device = _device_name(args.dry_run)
    out_dir = args.out_dir or os.environ.get('OUT') or os.path.join(HERE, 'results')
    self.out = args.out or os.path.join(out_dir, f'{self.device}.json')
    os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)
    self.worker_log = os.path.splitext(self.out)[0] + '.workers.log'
    open(self.worker_log, 'w').close()
    from bench import common
    self.forward_flops = common.analytic_forward_flops(settings['arch'], settings['num_classes'],
                                                       settings['image_size'], settings['resize'])
    self.result = dict(
        schema=1, script='bench/gpu_bench.py', argv=sys.argv[1:],
        date=datetime.datetime.now().isoformat(timespec='seconds'), dry_run=args.dry_run,
        device=dict(name=self.device, nvidia_smi=None if args.dry_run else _nvidia_smi(),
                    cpus=os.cpu_count(), python=platform.python_version(),
                    platform=platform.platform()), budget_s=args.budget, settings=settings,
        forward_flops_per_image=self.forward_flops, sections={}, sweep={})

  def save(self):
    self.result['wall_s'] = time.time() - self.t0
    _write_json(self.out, self.result)

  def _env(self, xla_flags: str = '', extra_env: dict | None = None, cpu_only=False) -> dict:
    env = dict(os.environ)
    env['PYTHONUNBUFFERED'] = '1'
    env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    flags = ' '.join(f for f in (env.get('XLA_FLAGS', ''), xla_flags) if f).strip()
    if self.args.dry_run:
      flags = (flags + ' ' + DRY_RUN_XLA_FLAGS).strip()
    if flags:
      env['XLA_FLAGS'] = flags
    if cpu_only:
      env['JAX_PLATFORMS'] = 'cpu'
    env.update(extra_env or {})
    return env

  def run(self, name: str, worker: str, spec: dict, cap: float, env: dict) -> dict:
    """Runs one worker process; returns its record (status, results, error)."""
    left = self.deadline - time.time()
    if left < 5:
      self.clock.log(f'{name}: skipped, the budget is spent')
      return dict(status='skipped', reason='budget spent', results={})
    deadline = time.time() + min(cap, left)
    spec_path = os.path.join(self.tmp, f'{name}.spec.json')
    result_path = os.path.join(self.tmp, f'{name}.result.json')
    err_path = os.path.join(self.tmp, f'{name}.stderr')
    _write_json(spec_path, dict(spec, forward_flops=self.forward_flops))
    self.clock.log(f'{name}: start (at most {deadline - time.time():.0f} s)')
    cmd = [
        sys.executable,
        os.path.abspath(__file__), '--worker', worker, '--spec', spec_path, '--result', result_path,
        '--t0',
        repr(self.t0), '--deadline',
        repr(deadline)
    ]
    t = time.time()
    timed_out = False
    with open(err_path, 'w') as err:
      proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=None, stderr=err,
                              start_new_session=True)
      try:
        rc = proc.wait(timeout=max(1.0, deadline + KILL_GRACE_S - time.time()))
      except subprocess.TimeoutExpired:
        timed_out = True
        self.clock.log(f'{name}: past its deadline, stopping it (process group {proc.pid})')
        with contextlib.suppress(ProcessLookupError):
          os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    with open(err_path, errors='replace') as f:
      stderr = f.read()
    with open(self.worker_log, 'a') as f:
      f.write(f'===== {name} (rc {rc}) =====\n{stderr[-500_000:]}\n')
    try:
      with open(result_path) as f:
        rec = json.load(f)
    except (OSError, ValueError):
      rec = dict(results={}, skipped=[], info={})
    rec.update(seconds=time.time() - t, returncode=rc)
    if rc == 0 and rec.get('status') == 'done':
      rec['status'] = 'partial' if rec.get('skipped') or rec.get('errors') else 'ok'
      if rec.get('errors') and not rec.get('results'):
        rec['status'] = 'failed'
    else:
      rec['status'] = 'partial' if rec.get('results') else 'failed'
      last = _tail(stderr, 1) or '(no stderr)'
      rec['error'] = ('killed at its deadline' if timed_out else f'exit status {rc}') + ': ' + last
      rec['stderr_tail'] = _tail(stderr, 15)
      self.clock.log(f'{name}: {rec["status"]}: {rec["error"]}')
      print(rec['stderr_tail'], flush=True)
    self.clock.log(f'{name}: {rec["status"]} in {rec["seconds"]:.0f} s')
    return rec

  def jax_spec(self, **over) -> dict:
    s = self.s
    spec = dict(arch=s['arch'], num_classes=s['num_classes'], resize=s['resize'],
                image_size=s['image_size'], batch=s['batch'], method=s['method'],
                attack_steps=s['attack_steps'], rounds=s['rounds'],
                steps_per_round=s['steps_per_round'], eval_rounds=s['eval_rounds'],
                eval_steps_per_round=s['eval_steps_per_round'], peak_n=s['peak_n'],
                conv_impl=s['conv_impl'], need=s['need'], dtypes=s['jax_dtypes'], eval=True,
                peak=True)
    spec.update(over)
    return spec

  def main(self) -> dict:
    a, s = self.args, self.s
    self.clock.log(f'gpu_bench on {self.device}: budget {a.budget:.0f} s, sections '
                   f'{",".join(a.sections)}, sweep {",".join(a.sweep) or "none"}; '
                   f'writing {self.out}')
    caps = {k: (a.budget if a.dry_run else v) for k, v in CAPS.items()}
    secs = self.result['sections']
    for name in SECTIONS:
      if name not in a.sections:
        secs[name] = dict(status='not requested', results={})
        continue
      if name == 'jax':
        rec = self.run('jax', 'jax', self.jax_spec(), caps['jax'], self._env(a.xla_flags))
      elif name == 'torch':
        spec = self.jax_spec(modes=s['torch_modes'], require_cuda=not a.dry_run,
                             torch_threads=s['torch_threads'])
        rec = self.run('torch', 'torch', spec, caps['torch'], self._env())
      elif name == 'input':
        spec = dict(batch=s['input_batch'], steps=s['input_steps'], configs=s['input_configs'],
                    cifar_examples=s['cifar_examples'], folder_examples=s['folder_examples'],
                    cache_dir=a.cache_dir or os.path.join(self.tmp, 'data'))
        rec = self.run('input', 'input', spec, caps['input'], self._env(cpu_only=True))
      else:
        rec = self.run('autoattack', 'autoattack', self.jax_spec(**s), caps['autoattack'],
                       self._env(a.xla_flags))
      secs[name] = rec
      self.save()
    for variant in a.sweep:
      v = VARIANTS[variant]
      need = max(5.0, self._sweep_need())
      if self.deadline - time.time() < need:
        self.clock.log(f'sweep {variant}: skipped ({self.deadline - time.time():.0f} s left, '
                       f'needs about {need:.0f} s)')
        self.result['sweep'][variant] = dict(status='skipped', reason='budget spent', results={},
                                             variant=v)
        continue
      spec = self.jax_spec(dtypes=[v['dtype']], eval=False, peak=False,
                           batch=v.get('batch', s['batch']), fold_bn=v.get('fold_bn', False),
                           rounds=s['sweep_rounds'], steps_per_round=s['sweep_steps_per_round'],
                           need=dict(s['need'], train=0))
      env = self._env(' '.join(f for f in (a.xla_flags, v.get('xla_flags', '')) if f), v.get('env'))
      rec = self.run(f'sweep_{variant}', 'jax', spec, self.deadline - time.time(), env)
      rec['variant'] = v
      self.result['sweep'][variant] = rec
      self.save()
    self.result['summary'] = summarize(self.result)
    self.save()
    print_table(self.result)
    self.clock.log(f'done in {time.time() - self.t0:.0f} s; wrote {self.out} and '
                   f'{self.worker_log}')
    shutil.rmtree(self.tmp, ignore_errors=True)
    return self.result

  def _sweep_need(self) -> float:
    """About what one sweep variant takes: the main bf16 (else fp32) step's compilation."""
    if self.args.dry_run:
      return 0.0
    runs = self.result['sections'].get('jax', {}).get('results', {})
    for dtype in ('bfloat16', 'float32'):
      train = runs.get(dtype, {}).get('train')
      if train:
        return train['compile_s'] + train['first_step_s'] + 20
    return 60.0


def _tail(text: str, lines: int) -> str:
  return '\n'.join(text.strip().splitlines()[-lines:])


def _get(d, *keys):
  for k in keys:
    if not isinstance(d, dict) or k not in d:
      return None
    d = d[k]
  return d


def summarize(result: dict) -> dict:
  """Ratios and verdicts the table and BENCHMARKS.md quote."""
  secs = result['sections']
  jr = secs.get('jax', {}).get('results', {})
  tr = secs.get('torch', {}).get('results', {})
  out = {}

  def ratio(a, b):
    return a / b if a and b else None

  jf = _get(jr, 'float32', 'train', 'images_per_s')
  jb = _get(jr, 'bfloat16', 'train', 'images_per_s')
  tf = _get(tr, 'fp32', 'train', 'images_per_s')
  tb = max(
      [v for v in (_get(tr, m, 'train', 'images_per_s') for m in ('amp_bf16_cl', 'amp_bf16')) if v],
      default=None)
  t_best = max([v for v in (_get(tr, m, 'train', 'images_per_s') for m in tr) if v], default=None)
  out['train_ratio_jax_fp32_over_torch_fp32'] = ratio(jf, tf)
  out['train_ratio_jax_bf16_over_torch_amp_bf16'] = ratio(jb, tb)
  out['train_ratio_jax_best_over_torch_best'] = ratio(max([v for v in (jf, jb) if v], default=0),
                                                      t_best)
  peak = _get(jr, 'peak', 'bfloat16', 'tflop_per_s')
  bf16_tflops = _get(jr, 'bfloat16', 'train', 'tflop_per_s')
  out['train_bf16_fraction_of_measured_bf16_matmul_peak'] = ratio(bf16_tflops, peak)
  step_ips = max([v for v in (jf, jb) if v], default=None)
  out['step_images_per_s'] = step_ips
  inputs = {}
  for workload, configs in secs.get('input', {}).get('results', {}).items():
    for label, r in configs.items():
      inputs[f'{workload} {label}'] = dict(
          images_per_s=r['images_per_s'],
          exceeds_step=(r['images_per_s'] > step_ips) if step_ips else None)
  out['input_vs_step'] = inputs
  aa = secs.get('autoattack', {}).get('results', {})
  rates = [r['images_per_s'] for r in aa.values() if r.get('images_per_s')]
  if rates and len(rates) == len(aa):
    out['autoattack_fast_suite_images_per_s'] = 1 / sum(1 / r for r in rates)
  return out


def print_table(result: dict) -> None:
  secs, s = result['sections'], result['settings']
  rows = []

  def add(section, variant, r, note=''):
    if not r:
      return
    tf = r.get('tflop_per_s')
    rows.append(
        (section, variant, f'{r["images_per_s"]:.4g}',
         f'{r["ms_per_step"]:.4g}' if 'ms_per_step' in r else '', f'{tf:.3g}' if tf else '', note))

  def compiled(r):
    if not r:
      return ''
    mem = r.get('process_peak_memory_gb')
    return f'compile {r["compile_s"]:.0f} s' + (f', peak mem {mem:.1f} GiB' if mem else '')

  jr = secs.get('jax', {}).get('results', {})
  tr = secs.get('torch', {}).get('results', {})
  for dtype in s['jax_dtypes']:
    r = _get(jr, dtype, 'train')
    add('train step', f'JAX {dtype}', r, compiled(r))
  for mode in s['torch_modes']:
    r = _get(tr, mode, 'train')
    add('train step', f'PyTorch {mode}', r, f'first step {r["first_step_s"]:.0f} s' if r else '')
  for dtype in s['jax_dtypes']:
    add(f'PGD-{s["attack_steps"]} eval', f'JAX {dtype}', _get(jr, dtype, 'eval'))
  for mode in s['torch_modes']:
    add(f'PGD-{s["attack_steps"]} eval', f'PyTorch {mode}', _get(tr, mode, 'eval'))
  for dtype, r in jr.get('peak', {}).items():
    rows.append(('matmul peak', f'JAX {dtype} n={r["n"]}', '', '', f'{r["tflop_per_s"]:.3g}', ''))
  for name, r in secs.get('autoattack', {}).get('results', {}).items():
    add(
        'AutoAttack', f'{name} {r["dtype"]}', r,
        f'{r.get("point_runs", "?")} point-runs; {r["n_iter"]} iter x {r["target_classes"]} '
        f'target(s)' + ('' if r.get('warm_call', True) else '; first call minus compile'))
  summary = result.get('summary', {})
  for label, v in summary.get('input_vs_step', {}).items():
    r = secs['input']['results'][label.split()[0]][label.split()[1]]
    if v['exceeds_step'] is None:
      add('input', label, r, 'no training step measured to compare with')
    else:
      verdict = 'exceeds' if v['exceeds_step'] else 'BELOW'
      add('input', label, r, f'{verdict} the step ({summary["step_images_per_s"]:.0f} img/s)')
  for name, rec in result.get('sweep', {}).items():
    r = _get(rec, 'results', rec.get('variant', {}).get('dtype'), 'train')
    if r:
      add('sweep', name, r, compiled(r))
    else:
      rows.append(('sweep', name, '', '', '', rec.get('status', '')))
  header = ('section', 'variant', 'img/s', 'ms/step', 'TFLOP/s', 'notes')
  widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(6)]
  print(flush=True)
  for r in [header] + rows:
    print('  '.join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
  for name, sec in list(secs.items()) + [(f'sweep {k}', v) for k, v in result['sweep'].items()]:
    if sec.get('status') not in ('ok', 'not requested'):
      error = (sec.get('error') or '').splitlines()[:1]
      skipped = ['skipped: ' + ', '.join(sec['skipped'])] if sec.get('skipped') else []
      failed = [f'{k} failed: {v[:200]};' for k, v in sec.get('errors', {}).items()]
      print(f'{name}: {sec.get("status")}', *error, *failed, *skipped)
  for k, v in summary.items():
    if k != 'input_vs_step' and v is not None:
      print(f'{k} = {v:.4g}')
  print(flush=True)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--dry-run', action='store_true',
                 help='tiny settings on whatever device there is (CPU): checks every section')
  p.add_argument('--budget', type=float, default=None,
                 help='seconds for the whole run (default 360; dry run 600)')
  p.add_argument('--out', default='', help='the JSON file (default DIR/<device>.json)')
  p.add_argument('--out-dir', default='', help='default $OUT, else bench/results')
  p.add_argument('--sections', default=','.join(SECTIONS),
                 help=f'comma-separated, of {",".join(SECTIONS)}')
  p.add_argument('--sweep', default='',
                 help="comma-separated variant names (--list-variants), or 'default'")
  p.add_argument('--list-variants', action='store_true')
  p.add_argument('--xla-flags', default='', help='added to XLA_FLAGS of the JAX sections')
  p.add_argument('--jax-dtypes', default='float32,bfloat16')
  p.add_argument('--torch-modes', default='fp32,amp_bf16_cl', help=f'of {",".join(TORCH_MODES)}')
  p.add_argument('--batch', type=int, default=None)
  p.add_argument('--attack-steps', type=int, default=None)
  p.add_argument('--rounds', type=int, default=None)
  p.add_argument('--steps-per-round', type=int, default=None)
  p.add_argument('--aa-images', type=int, default=None)
  p.add_argument('--aa-batch', type=int, default=None)
  p.add_argument('--aa-n-iter', type=int, default=None)
  p.add_argument('--aa-target-classes', type=int, default=None)
  p.add_argument('--aa-dtype', default=None, choices=('float32', 'bfloat16'))
  p.add_argument('--aa-attacks', default='', help='default apgd-ce,apgd-t (the fast suite)')
  p.add_argument('--input-batch', type=int, default=None)
  p.add_argument('--input-steps', type=int, default=None)
  p.add_argument('--cache-dir', default='', help='where the JPEG folder is written (local disk)')
  args = p.parse_args(argv)
  if args.budget is None:
    args.budget = 600.0 if args.dry_run else 360.0
  args.sections = [x for x in args.sections.split(',') if x]
  bad = [x for x in args.sections if x not in SECTIONS]
  if bad:
    p.error(f'unknown sections {bad}; choose from {SECTIONS}')
  args.sweep = list(DEFAULT_SWEEP) if args.sweep == 'default' else [
      x for x in args.sweep.split(',') if x
  ]
  bad = [x for x in args.sweep if x not in VARIANTS]
  if bad:
    p.error(f'unknown variants {bad}; see --list-variants')
  bad = [x for x in args.jax_dtypes.split(',') if x not in ('float32', 'bfloat16')]
  if bad:
    p.error(f'unknown JAX dtypes {bad}; choose from float32, bfloat16')
  bad = [x for x in args.torch_modes.split(',') if x not in TORCH_MODES]
  if bad:
    p.error(f'unknown torch modes {bad}; choose from {tuple(TORCH_MODES)}')
  return args


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if '--worker' in argv:
    return run_worker(argv)
  args = parse_args(argv)
  if args.list_variants:
    for name, v in VARIANTS.items():
      print(f'{name:20s} {json.dumps(v)}{"  (default sweep)" if name in DEFAULT_SWEEP else ""}')
    return 0
  sys.path.insert(0, ROOT)
  Runner(args, _settings(args)).main()
  return 0


if __name__ == '__main__':
  sys.exit(main())
