"""Parity of twins_jax.autoattack against torchattacks' AutoAttack components.

Adversarially trains (PGD, Linf) a small MLP on sklearn's 8x8 digits in JAX, copies the
weights into the same network in plain PyTorch, then runs APGD-CE, APGD-T, FAB-T,
Square and the standard AutoAttack suite in both libraries with matched settings on
the same held-out digits, and prints a table of robust accuracies and timings.

Matched settings (the reference ``fra31/auto-attack`` 'standard' ones): APGD 100
iterations, 1 restart, rho 0.75; APGD-T 100 iterations over 9 target classes; FAB-T
100 iterations over 9 target classes, alpha_max 0.1, eta 1.05, beta 0.9; Square 5000
queries, p_init 0.8, unrescaled schedule. torchattacks' own defaults differ (10 steps
for APGD/APGD-T/FAB, rescaled Square schedule), so they are set explicitly, and inside
``torchattacks.AutoAttack`` the component attacks are adjusted after construction.

Usage::

  python bench/autoattack_parity.py [--n 500] [--eps 0.2] [--norm Linf] [--queries 5000]
      [--targets 9] [--square-seeds 1] [--square-all]

torchattacks 3.5.1 imports without torchvision; if a version needs it, a stub module is
inserted into ``sys.modules`` before the import (see ``_import_torchattacks``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax.linen as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from twins_jax import autoattack as aa  # noqa: E402

HIDDEN = 256


class MLP(nn.Module):
  """64 -> 256 -> 256 -> 10, ReLU. Input NHWC, flattened in (h, w, c) order."""
  hidden: int = HIDDEN
  n_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden)(x))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.n_classes)(x)


def load_digits_split(n_test=500, seed=0):
  """Digits as ``(N, 8, 8, 1)`` float32 in [0, 1]; the last ``n_test`` of a fixed
  shuffle are the test set."""
  from sklearn.datasets import load_digits
  d = load_digits()
  x = (d.images / 16.).astype(np.float32)[..., None]
  y = d.target.astype(np.int32)
  perm = np.random.default_rng(seed).permutation(len(y))
  x, y = x[perm], y[perm]
  return (x[:-n_test], y[:-n_test]), (x[-n_test:], y[-n_test:])


def _pgd(apply, params, x, y, key, eps, steps):
  alpha = 2.5 * eps / steps

  def loss(xa):
    return optax.softmax_cross_entropy_with_integer_labels(apply(params, xa), y).sum()

  xa = jnp.clip(x + jax.random.uniform(key, x.shape, minval=-eps, maxval=eps), 0., 1.)

  def body(_, xa):
    g = jax.grad(loss)(xa)
    return jnp.clip(jnp.clip(xa + alpha * jnp.sign(g), x - eps, x + eps), 0., 1.)

  return jax.lax.fori_loop(0, steps, body, xa)


def train(x, y, *, eps=0.15, epochs=40, pgd_steps=7, batch=128, lr=2e-3, seed=0, hidden=HIDDEN):
  """PGD adversarial training (eps=0: standard training). Returns (model, params)."""
  model = MLP(hidden=hidden)
  key = jax.random.PRNGKey(seed)
  params = model.init(key, jnp.zeros((1,) + x.shape[1:]))
  opt = optax.adam(lr)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, xb, yb, key):
    if eps > 0:
      xb = _pgd(model.apply, params, xb, yb, key, eps, pgd_steps)

    def loss(p):
      return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, xb), yb).mean()

    g = jax.grad(loss)(params)
    upd, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, upd), opt_state

  rng = np.random.default_rng(seed)
  n = len(y)
  for ep in range(epochs):
    perm = rng.permutation(n)
    for i in range(0, n - batch + 1, batch):
      idx = perm[i:i + batch]
      key, sub = jax.random.split(key)
      params, opt_state = step(params, opt_state, jnp.asarray(x[idx]), jnp.asarray(y[idx]), sub)
  return model, params


def logits_fn_for(model, params):
  return jax.tree_util.Partial(model.apply, params)


# ----------------------------------------------------------------------------- torch side


def _import_torchattacks():
  try:
    import torchattacks  # noqa: F401
  except ModuleNotFoundError as e:  # pragma: no cover - only if a version imports torchvision
    if 'torchvision' not in str(e):
      raise
    stub = types.ModuleType('torchvision')
    stub.transforms = types.ModuleType('torchvision.transforms')
    sys.modules['torchvision'] = stub
    sys.modules['torchvision.transforms'] = stub.transforms
    import torchattacks  # noqa: F401
  return sys.modules['torchattacks']


def torch_model(params):
  """The same MLP in plain PyTorch (input NCHW), weights copied from JAX."""
  import torch

  class TorchMLP(torch.nn.Module):

    def __init__(self, hidden, n_classes):
      super().__init__()
      self.l0 = torch.nn.Linear(64, hidden)
      self.l1 = torch.nn.Linear(hidden, hidden)
      self.l2 = torch.nn.Linear(hidden, n_classes)

    def forward(self, x):
      x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # flatten in (h, w, c) order
      x = torch.relu(self.l0(x))
      x = torch.relu(self.l1(x))
      return self.l2(x)

  p = params['params']
  hidden = p['Dense_0']['kernel'].shape[1]
  n_classes = p['Dense_2']['kernel'].shape[1]
  m = TorchMLP(hidden, n_classes)
  with torch.no_grad():
    for tl, name in [(m.l0, 'Dense_0'), (m.l1, 'Dense_1'), (m.l2, 'Dense_2')]:
      tl.weight.copy_(torch.from_numpy(np.asarray(p[name]['kernel']).T.copy()))
      tl.bias.copy_(torch.from_numpy(np.asarray(p[name]['bias']).copy()))
  return m.eval()


def torch_attacks(model, norm, eps, n_queries, n_target_classes=9, seed=0):
  """torchattacks' components with the reference settings. torchattacks derives the
  number of target classes from ``n_classes`` (``n_classes - 1`` targets)."""
  ta = _import_torchattacks()
  n_cls = n_target_classes + 1
  attacks = {
      'APGD-CE': ta.APGD(model, norm=norm, eps=eps, steps=100, n_restarts=1, loss='ce', seed=seed,
                         rho=.75),
      'APGD-T': ta.APGDT(model, norm=norm, eps=eps, steps=100, n_restarts=1, seed=seed, rho=.75,
                         n_classes=n_cls),
      'FAB-T': ta.FAB(model, norm=norm, eps=eps, steps=100, n_restarts=1, alpha_max=.1, eta=1.05,
                      beta=.9, seed=seed, multi_targeted=True, n_classes=n_cls),
      'Square': ta.Square(model, norm=norm, eps=eps, n_queries=n_queries, n_restarts=1, p_init=.8,
                          loss='margin', resc_schedule=False, seed=seed),
  }
  suite = ta.AutoAttack(model, norm=norm, eps=eps, version='standard', n_classes=n_cls, seed=seed)
  for atk in suite._autoattack.attacks:
    name = type(atk).__name__
    if name in ('APGD', 'APGDT', 'FAB'):
      atk.steps = 100
    elif name == 'Square':
      atk.rescale_schedule = False
      atk.n_queries = n_queries
  attacks['AutoAttack'] = suite
  return attacks


# ----------------------------------------------------------------------------- comparison


def run_parity(*, n_test=500, eps=0.2, norm='Linf', n_queries=5000, n_target_classes=9,
               square_seeds=1, square_on_all=False, train_eps=0.15, epochs=40, seed=0,
               attacks=('APGD-CE', 'APGD-T', 'FAB-T', 'Square', 'AutoAttack'), verbose=True):
  """Returns a list of dict rows: attack, ours, theirs (robust accuracy in %), diff (pp),
  t_ours (s, first call incl. compilation), t_ours_warm (s, second call, other key),
  t_theirs (s).

  Square's result varies by about 1 pp (std) between seeds on 500 digits, so
  ``square_seeds > 1`` averages that many seeds on each side (times are per seed), and
  ``square_on_all`` attacks all 1797 digits instead of the test split.
  """
  import torch
  torch.set_num_threads(max(1, os.cpu_count() or 1))
  (xtr, ytr), (xte, yte) = load_digits_split(n_test, seed)
  t0 = time.time()
  model, params = train(xtr, ytr, eps=train_eps, epochs=epochs, seed=seed)
  fn = logits_fn_for(model, params)
  tm = torch_model(params)
  if verbose:
    print(f'trained in {time.time() - t0:.1f} s')

  def data(all_points):
    xs, ys = (np.concatenate([xtr, xte]), np.concatenate([ytr, yte])) if all_points else (xte, yte)
    return (jnp.asarray(xs), jnp.asarray(ys),
            torch.from_numpy(np.transpose(xs, (0, 3, 1, 2)).copy()),
            torch.from_numpy(ys.astype(np.int64)))

  x, y, xt, yt = data(False)
  clean = float(jnp.mean(jnp.argmax(fn(x), -1) == y))
  with torch.no_grad():
    clean_t = float((tm(xt).argmax(1) == yt).float().mean())
    max_logit_diff = float(np.abs(tm(xt).numpy() - np.asarray(fn(x))).max())
  if verbose:
    print(f'clean accuracy: ours {clean:.2%}, torch {clean_t:.2%}, '
          f'max |logit diff| {max_logit_diff:.2e}; {norm} eps={eps}, {len(yte)} points')

  def our_attack(name, x, y, k):
    if name == 'APGD-CE':
      return aa.apgd(fn, x, y, k, norm=norm, eps=eps, loss='ce')
    if name == 'APGD-T':
      return aa.apgd_t(fn, x, y, k, norm=norm, eps=eps, n_target_classes=n_target_classes)
    if name == 'FAB-T':
      return aa.fab_t(fn, x, y, k, norm=norm, eps=eps, n_target_classes=n_target_classes)
    if name == 'Square':
      return aa.square(fn, x, y, k, norm=norm, eps=eps, n_queries=n_queries)
    return aa.autoattack(fn, x, y, k, norm=norm, eps=eps, version='standard',
                         batch_size=min(len(y), 500), n_queries=n_queries,
                         n_target_classes=n_target_classes)[0]

  rows = []
  for name in attacks:
    seeds = list(range(seed, seed + (square_seeds if name == 'Square' else 1)))
    x, y, xt, yt = data(square_on_all and name == 'Square')
    a_ours, a_theirs, t_first, t_warm, t_theirs = [], [], 0., 0., 0.
    for i, s in enumerate(seeds):
      t = time.time()
      xa = jax.block_until_ready(our_attack(name, x, y, jax.random.PRNGKey(s)))
      dt = time.time() - t
      if i == 0:
        t_first = dt
        t = time.time()
        jax.block_until_ready(our_attack(name, x, y, jax.random.PRNGKey(s + 1000)))
        t_warm = time.time() - t
      a_ours.append(100. * float(jnp.mean(jnp.argmax(fn(xa), -1) == y)))
      pert = np.asarray(
          jnp.max(jnp.abs(xa - x), axis=(
              1, 2, 3)) if norm == 'Linf' else jnp.sqrt(jnp.sum((xa - x)**2, axis=(1, 2, 3))))
      assert pert.max() <= eps + 1e-5 and float(xa.min()) >= 0 and float(xa.max()) <= 1, name
      atk = torch_attacks(tm, norm, eps, n_queries, n_target_classes, seed=s)[name]
      t = time.time()
      xt_adv = atk(xt, yt)
      t_theirs += (time.time() - t) / len(seeds)
      with torch.no_grad():
        a_theirs.append(100. * float((tm(xt_adv).argmax(1) == yt).float().mean()))
    row = dict(attack=name + (f' (mean of {len(seeds)} seeds)' if len(seeds) > 1 else ''),
               ours=float(np.mean(a_ours)), theirs=float(np.mean(a_theirs)),
               diff=float(np.mean(a_ours) - np.mean(a_theirs)), t_ours=t_first, t_ours_warm=t_warm,
               t_theirs=t_theirs, n=len(y), ours_all=a_ours, theirs_all=a_theirs)
    rows.append(row)
    if verbose:
      print(f'  {row["attack"]}: ours {a_ours} theirs {a_theirs}', flush=True)
  if verbose:
    print_table(rows, clean)
  return rows


def print_table(rows, clean=None):
  if clean is not None:
    print(f'clean accuracy {100 * clean:.1f}%')
  w = max(11, max(len(r['attack']) for r in rows) + 1)
  hdr = (f'| {"attack":<{w}}| {"points":>6} | {"ours %":>7} | {"torchattacks %":>14} | '
         f'{"diff pp":>7} | {"ours s (1st, incl. jit)":>23} | {"ours s (warm)":>13} | '
         f'{"torchattacks s":>14} |')
  print(hdr)
  print('|' + '|'.join('-' * (len(c)) for c in hdr.split('|')[1:-1]) + '|')
  for r in rows:
    print(f'| {r["attack"]:<{w}}| {r["n"]:>6} | {r["ours"]:>7.2f} | {r["theirs"]:>14.2f} | '
          f'{r["diff"]:>+7.2f} | {r["t_ours"]:>23.1f} | {r["t_ours_warm"]:>13.1f} | '
          f'{r["t_theirs"]:>14.1f} |')


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--n', type=int, default=500)
  ap.add_argument('--eps', type=float, default=0.2)
  ap.add_argument('--norm', default='Linf', choices=('Linf', 'L2'))
  ap.add_argument('--queries', type=int, default=5000)
  ap.add_argument('--targets', type=int, default=9, help='target classes of APGD-T / FAB-T')
  ap.add_argument('--square-seeds', type=int, default=1)
  ap.add_argument('--square-all', action='store_true', help='Square on all 1797 digits')
  ap.add_argument('--train-eps', type=float, default=0.15)
  ap.add_argument('--epochs', type=int, default=40)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--attacks', default='APGD-CE,APGD-T,FAB-T,Square,AutoAttack')
  a = ap.parse_args()
  run_parity(n_test=a.n, eps=a.eps, norm=a.norm, n_queries=a.queries, n_target_classes=a.targets,
             square_seeds=a.square_seeds, square_on_all=a.square_all, train_eps=a.train_eps,
             epochs=a.epochs, seed=a.seed, attacks=tuple(a.attacks.split(',')))


if __name__ == '__main__':
  main()
