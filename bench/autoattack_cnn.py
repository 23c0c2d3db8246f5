"""AutoAttack on a PGD-trained convolutional ResNet: twins_jax.autoattack against torchattacks.

Adversarially trains (PGD, Linf) a small torchvision-layout ResNet (7x7/2 stem, BN,
3x3/2 max pool, one basic block per stage, widths 8-16-32-64: the layout of our
``tiny_resnet``) on sklearn's digits upsampled to 32x32x3 (no download), copies the
weights into the same network written in plain PyTorch (self-contained here), checks
that both give the same logits, then runs the standard AutoAttack suite (Linf) on the
same test images in both libraries with the reference settings (as
``bench/autoattack_parity.py``) and prints a per-stage table: robust accuracy and
seconds after clean, APGD-CE, APGD-T, FAB-T and Square; ours on the first call
(compilation included) and on a warm second call with another key, against
torchattacks.

The MLP of ``bench/autoattack_parity.py`` hid two costs that a CNN exposes: attacking
padded full batches when only a few points are still robust, and FAB's exact
projection (a sort over every input dimension per iteration) which dwarfs a tiny MLP's
forward pass but not a CNN's.

``--devices 2`` splits the CPU into two XLA devices (``--xla_force_host_platform_device_count``)
and passes a 1-D mesh over them to ``autoattack``: every batch is then sharded over the two
cores. XLA:CPU runs these small convolutions on about one core per device, while PyTorch
uses both of its threads, so this is the matched setting on a 2-core machine.

Usage::

  python bench/autoattack_cnn.py [--n 200] [--eps 0.1] [--devices 1] [--buckets 4]
      [--cache /tmp/aa_cnn.npz] [--torch-seeds 1] [--no-torch]
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _devices_from_argv(argv):
  for i, a in enumerate(argv):
    if a == '--devices' and i + 1 < len(argv):
      return int(argv[i + 1])
    if a.startswith('--devices='):
      return int(a.split('=', 1)[1])
  return 1


if __name__ == '__main__' and _devices_from_argv(sys.argv) > 1:  # before JAX starts
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_'
                             f'device_count={_devices_from_argv(sys.argv)}').strip()

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from twins_jax import autoattack as aa  # noqa: E402
from twins_jax import models  # noqa: E402

WIDTHS = (8, 16, 32, 64)
STAGES = ('clean', 'apgd-ce', 'apgd-t', 'fab-t', 'square')

# ----------------------------------------------------------------------------- data


def load_digits_32(n_test=200, seed=0):
  """Digits as ``(N, 32, 32, 3)`` float32 in [0, 1] (8x8 upsampled 4x, nearest, grey
  replicated to 3 channels); the last ``n_test`` of a fixed shuffle are the test set."""
  from sklearn.datasets import load_digits
  d = load_digits()
  x = (d.images / 16.).astype(np.float32)
  x = np.repeat(np.repeat(x, 4, axis=1), 4, axis=2)
  x = np.repeat(x[..., None], 3, axis=3)
  y = d.target.astype(np.int32)
  perm = np.random.default_rng(seed).permutation(len(y))
  x, y = x[perm], y[perm]
  return (x[:-n_test], y[:-n_test]), (x[-n_test:], y[-n_test:])


# ----------------------------------------------------------------------------- JAX model


def create(conv_impl='auto'):
  """Our ``tiny_resnet`` as a plain (non-twin) net: torchvision layout at 1/8 width."""
  return models.create_model('tiny_resnet', 10, twin=False, conv_impl=conv_impl)


def _pgd(loss_fn, x, key, eps, steps):
  alpha = 2.5 * eps / steps
  xa = jnp.clip(x + jax.random.uniform(key, x.shape, minval=-eps, maxval=eps), 0., 1.)

  def body(_, xa):
    g = jax.grad(loss_fn)(xa)
    return jnp.clip(jnp.clip(xa + alpha * jnp.sign(g), x - eps, x + eps), 0., 1.)

  return jax.lax.fori_loop(0, steps, body, xa)


def train(x, y, *, eps=.1, epochs=15, pgd_steps=5, batch=128, lr=3e-3, seed=0, verbose=True):
  """PGD adversarial training, Linf (the attack sees eval-mode BN, the update train-mode
  BN, as in Madry et al.'s code). Returns the variables."""
  model = create()
  variables = models.init_variables(model, seed)
  params, stats = variables['params'], variables['batch_stats']
  steps_per_epoch = len(y) // batch
  opt = optax.adam(optax.cosine_decay_schedule(lr, epochs * steps_per_epoch))
  opt_state = opt.init(params)
  key = jax.random.PRNGKey(seed)

  @jax.jit
  def step(params, stats, opt_state, xb, yb, key):

    def adv_loss(xa):
      logits = model.apply({'params': params, 'batch_stats': stats}, xa, mode=models.EVAL)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).sum()

    xb = _pgd(adv_loss, xb, key, eps, pgd_steps)

    def loss(p):
      logits, upd = model.apply({'params': p, 'batch_stats': stats}, xb, mode=models.TRAIN,
                                mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), upd

    (l, upd), g = jax.value_and_grad(loss, has_aux=True)(params)
    u, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, u), upd['batch_stats'], opt_state, l

  rng = np.random.default_rng(seed)
  for ep in range(epochs):
    perm = rng.permutation(len(y))
    for i in range(steps_per_epoch):
      idx = perm[i * batch:(i + 1) * batch]
      key, sub = jax.random.split(key)
      params, stats, opt_state, l = step(params, stats, opt_state, jnp.asarray(x[idx]),
                                         jnp.asarray(y[idx]), sub)
    if verbose:
      print(f'  epoch {ep + 1}/{epochs}: adversarial loss {float(l):.3f}', flush=True)
  return {'params': params, 'batch_stats': stats}


def logits_fn_for(variables, conv_impl='auto'):
  """The eval-mode net as a ``Partial``: the variables are traced, not compiled in."""
  model = create(conv_impl)
  return jax.tree_util.Partial(lambda v, x: model.apply(v, x, mode=models.EVAL), variables)


# ----------------------------------------------------------------------------- torch model


def torch_model(variables):
  """The same network in plain PyTorch (input NCHW in [0, 1], normalised inside), eval
  mode, weights copied from the JAX variables."""
  import torch
  from torch import nn as tnn

  def conv(cin, cout, k, s):
    return tnn.Conv2d(cin, cout, k, s, k // 2, bias=False)

  class TBlock(tnn.Module):

    def __init__(self, cin, planes, stride):
      super().__init__()
      self.conv1, self.bn1 = conv(cin, planes, 3, stride), tnn.BatchNorm2d(planes)
      self.conv2, self.bn2 = conv(planes, planes, 3, 1), tnn.BatchNorm2d(planes)
      self.down = None
      if stride != 1 or cin != planes:
        self.down = tnn.Sequential(conv(cin, planes, 1, stride), tnn.BatchNorm2d(planes))

    def forward(self, x):
      out = torch.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      return torch.relu(out + (x if self.down is None else self.down(x)))

  class TNet(tnn.Module):

    def __init__(self, n_classes=10):
      super().__init__()
      self.register_buffer('mean', torch.tensor(models.IMAGENET_MEAN).view(1, 3, 1, 1))
      self.register_buffer('std', torch.tensor(models.IMAGENET_STD).view(1, 3, 1, 1))
      self.conv1, self.bn1 = conv(3, WIDTHS[0], 7, 2), tnn.BatchNorm2d(WIDTHS[0])
      self.pool = tnn.MaxPool2d(3, 2, 1)
      cin, layers = WIDTHS[0], []
      for i, w in enumerate(WIDTHS):
        layers.append(TBlock(cin, w, 1 if i == 0 else 2))
        cin = w
      self.layers = tnn.ModuleList(layers)
      self.fc = tnn.Linear(cin, n_classes)

    def forward(self, x):
      x = (x - self.mean) / self.std
      x = self.pool(torch.relu(self.bn1(self.conv1(x))))
      for layer in self.layers:
        x = layer(x)
      return self.fc(x.mean((2, 3)))

  p, s = variables['params'], variables['batch_stats']
  net = TNet(p['fc']['kernel'].shape[1])

  def t(a):
    return torch.from_numpy(np.array(a, np.float32))

  def set_conv(tc, kernel):  # HWIO -> OIHW
    tc.weight.copy_(t(np.transpose(np.asarray(kernel), (3, 2, 0, 1))))

  def set_bn(tb, pp, ss):
    tb.weight.copy_(t(pp['scale']))
    tb.bias.copy_(t(pp['bias']))
    tb.running_mean.copy_(t(ss['mean']))
    tb.running_var.copy_(t(ss['var']))

  with torch.no_grad():
    set_conv(net.conv1, p['conv1']['kernel'])
    set_bn(net.bn1, p['bn1'], s['bn1'])
    for i, layer in enumerate(net.layers):
      lp, ls = p[f'layer{i + 1}_0'], s[f'layer{i + 1}_0']
      set_conv(layer.conv1, lp['conv1']['kernel'])
      set_bn(layer.bn1, lp['bn1'], ls['bn1'])
      set_conv(layer.conv2, lp['conv2']['kernel'])
      set_bn(layer.bn2, lp['bn2'], ls['bn2'])
      if layer.down is not None:
        set_conv(layer.down[0], lp['downsample_0']['kernel'])
        set_bn(layer.down[1], lp['downsample_1'], ls['downsample_1'])
    net.fc.weight.copy_(t(np.asarray(p['fc']['kernel']).T))
    net.fc.bias.copy_(t(p['fc']['bias']))
  return net.eval()


def load_or_train(cache, xtr, ytr, train_eps, epochs, seed, verbose=True):
  """Trains once and keeps the variables in ``cache`` (an .npz; None: always train)."""
  if cache and os.path.exists(cache):
    data = np.load(cache)
    template = jax.eval_shape(lambda: models.init_variables(create(), seed))
    treedef = jax.tree_util.tree_structure(template)
    return jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(data[f'a{i}']) for i in range(treedef.num_leaves)])
  t = time.time()
  variables = train(xtr, ytr, eps=train_eps, epochs=epochs, seed=seed, verbose=verbose)
  if verbose:
    print(f'trained in {time.time() - t:.1f} s')
  if cache:
    leaves = jax.tree_util.tree_leaves(variables)
    np.savez(cache, **{f'a{i}': np.asarray(a) for i, a in enumerate(leaves)})
  return variables


# ----------------------------------------------------------------------------- the suites


def run_torch(tm, x, y, eps, n_queries=5000, seed=0):
  """torchattacks' standard AutoAttack (reference settings, see ``autoattack_parity``),
  timed per component. Returns ``{stage: (robust accuracy, seconds)}`` and x_adv."""
  import torch
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from autoattack_parity import torch_attacks
  suite = torch_attacks(tm, 'Linf', eps, n_queries, 9, seed=seed)['AutoAttack']
  xt = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))
  yt = torch.from_numpy(np.asarray(y, np.int64))
  times = []
  for atk in suite._autoattack.attacks:

    def timed(images, labels, _f=atk.forward):
      t = time.time()
      out = _f(images, labels)
      times.append(time.time() - t)
      return out

    atk.forward = timed
  records = []
  suite._autoattack._accumulate_multi_atk_records = True
  suite._autoattack._update_multi_atk_records = lambda r: records.extend(r)
  t, c = time.time(), time.process_time()
  with torch.no_grad():
    clean = float((tm(xt).argmax(1) == yt).float().mean())
  t_clean = time.time() - t
  xa = suite(xt, yt)
  cpu = time.process_time() - c
  with torch.no_grad():
    final = float((tm(xa).argmax(1) == yt).float().mean())
  out = {'clean': (clean, t_clean)}
  n = len(y)
  for i, name in enumerate(STAGES[1:]):
    if i < len(times):
      out[name] = (records[i + 1] / n, times[i])
    else:  # MultiAttack stops once nothing is left
      out[name] = (0., 0.)
  out['total'] = (final, t_clean + sum(times))
  out['cpu'] = (float('nan'), cpu)
  return out, xa


def run_ours(fn, x, y, eps, key, mesh=None, batch_size=None, n_buckets=4, n_queries=5000):
  """Our standard suite; returns ``{stage: (robust accuracy, seconds)}`` (``'total'``
  included, ``'compile'``: seconds of it spent compiling) and x_adv."""
  stats = {}
  t, c = time.time(), time.process_time()
  xa, robust, accs = aa.autoattack(fn, x, y, key, norm='Linf', eps=eps, version='standard',
                                   batch_size=batch_size, mesh=mesh, n_buckets=n_buckets,
                                   n_queries=n_queries, stats=stats)
  total, cpu = time.time() - t, time.process_time() - c
  out = {name: (accs[name], stats[name]) for name in STAGES}
  out['total'] = (float(np.mean(np.asarray(robust))), total)
  out['compile'] = (float('nan'), stats['compile'])
  out['cpu'] = (float('nan'), cpu)
  return out, xa


def print_table(columns, n):
  """``columns``: ``[(title, {stage: (acc, s)})]``."""
  names = [c[0] for c in columns]
  w = max(12, *(len(t) for t in names))
  print(f'| {"stage":<8} |' + ''.join(f' {t:>{w}} |' for t in names))
  print('|' + '-' * 10 + '|' + ''.join('-' * (w + 2) + '|' for _ in names))
  for stage in STAGES + ('total', 'compile', 'cpu'):
    cells = []
    for _, col in columns:
      if stage not in col:
        cells.append('')
        continue
      acc, s = col[stage]
      cells.append(f'{s:.1f} s' if np.isnan(acc) else f'{100 * acc:.1f}% {s:6.1f} s')
    print(f'| {stage:<8} |' + ''.join(f' {c:>{w}} |' for c in cells))
  print(f'({n} test images; robust accuracy after each stage and wall-clock seconds spent in '
        'it; compile: the part of the seconds spent compiling; cpu: CPU seconds of the whole '
        'suite, all threads)')


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--n', type=int, default=200, help='test images')
  ap.add_argument('--eps', type=float, default=.1, help='Linf radius of the attack')
  ap.add_argument('--train-eps', type=float, default=.1)
  ap.add_argument('--epochs', type=int, default=15)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--devices', type=int, default=1, help='XLA CPU devices (a mesh over them)')
  ap.add_argument('--batch', type=int, default=None, help='largest batch (default min(n, 250))')
  ap.add_argument('--buckets', type=int, default=4, help='batch sizes in the ladder')
  ap.add_argument('--queries', type=int, default=5000, help='Square queries')
  ap.add_argument('--cache', default=None, help='.npz to keep the trained weights in')
  ap.add_argument('--torch-seeds', type=int, default=1)
  ap.add_argument('--torch-threads', type=int, default=None, help='default: all cores')
  ap.add_argument('--warm', type=int, default=1, help='warm calls of ours (other keys)')
  ap.add_argument('--no-torch', action='store_true')
  a = ap.parse_args()

  (xtr, ytr), (xte, yte) = load_digits_32(a.n, a.seed)
  variables = load_or_train(a.cache, xtr, ytr, a.train_eps, a.epochs, a.seed)
  fn = logits_fn_for(variables)
  logits = np.asarray(fn(jnp.asarray(xte)))
  print(f'JAX devices: {jax.device_count()} ({jax.devices()[0].platform}); clean accuracy '
        f'{np.mean(logits.argmax(1) == yte):.1%}; Linf eps {a.eps}; {a.n} test images')
  columns = []
  if not a.no_torch:
    import torch
    torch.set_num_threads(a.torch_threads or os.cpu_count() or 1)
    tm = torch_model(variables)
    with torch.no_grad():
      lt = tm(torch.from_numpy(np.ascontiguousarray(np.transpose(xte, (0, 3, 1, 2))))).numpy()
    print(f'max |logit difference| JAX vs PyTorch: {np.abs(lt - logits).max():.2e}')

  mesh = None
  if a.devices > 1:
    from twins_jax import parallel
    mesh = parallel.data_mesh()
  # Interleaved (ours, torch, ours, torch, ...) so that a change in the machine's load
  # hits both sides.
  key = jax.random.PRNGKey(a.seed)
  first, _ = run_ours(fn, xte, yte, a.eps, key, mesh, a.batch, a.buckets, a.queries)
  columns.append(('ours, 1st call', first))
  torch_seeds = [] if a.no_torch else list(range(a.seed, a.seed + a.torch_seeds))
  for r in range(max(a.warm, len(torch_seeds))):
    if r < len(torch_seeds):
      out, _ = run_torch(tm, xte, yte, a.eps, a.queries, seed=torch_seeds[r])
      columns.append((f'torchattacks s{torch_seeds[r]}', out))
    if r < a.warm:
      warm, _ = run_ours(fn, xte, yte, a.eps, jax.random.fold_in(key, 1 + r), mesh, a.batch,
                         a.buckets, a.queries)
      columns.append((f'ours, warm {r + 1}', warm))
  print_table(columns, a.n)
  if not a.no_torch:
    t_torch = np.median([c[1]['total'][1] for c in columns if c[0].startswith('torch')])
    t_warm = np.median([c[1]['total'][1] for c in columns if c[0].startswith('ours, warm')])
    print(f'speed (median seconds, torchattacks / ours): warm {t_torch / t_warm:.2f}x, '
          f'first call {t_torch / first["total"][1]:.2f}x')


if __name__ == '__main__':
  main()
