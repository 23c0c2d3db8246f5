"""The AutoAttack ensemble (Croce & Hein, ICML 2020), as ``run_standard_evaluation``.

``standard``: APGD-CE (100 iterations, 1 restart), APGD-T (100 iterations, 9 target
classes, 1 restart each), FAB-T (100 iterations, 9 target classes, 1 restart), Square
(5000 queries, p_init 0.8). ``fast``: APGD-CE and APGD-T only.

Like the reference, each attack runs only on the points still robust: those are
gathered into fixed-size batches (the last one padded and masked, so no shape ever
changes and nothing recompiles), and a point stops being robust once an attack
returns an input that the model misclassifies; that input is kept. Every example's
randomness is derived from ``key``, the attack and the example's index in ``x``, so the
result for an example does not depend on the batch it lands in.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ._common import _typed, as_partial, check_norm, example_keys, flat_norm, predict
from .autopgd import apgd_core
from .fab_attack import fab_t_core
from .square_attack import square_core

ATTACK_IDS = {'apgd-ce': 0, 'apgd-t': 1, 'fab-t': 2, 'square': 3}
VERSIONS = {
    'standard': ('apgd-ce', 'apgd-t', 'fab-t', 'square'),
    'fast': ('apgd-ce', 'apgd-t'),
}


_predict = jax.jit(predict)


def _batched_predict(fn, x, bs):
  n = x.shape[0]
  out = np.empty((n,), np.int64)
  for start in range(0, n, bs):
    stop = min(start + bs, n)
    idx = np.arange(start, start + bs)
    idx[stop - start:] = start  # pad with a real example, ignored below
    out[start:stop] = np.asarray(_predict(fn, jnp.asarray(x[idx])))[:stop - start]
  return out


def autoattack(logits_fn: Callable, x, y, key, *, norm: str, eps: float,
               version: str = 'standard', batch_size: Optional[int] = None,
               progress=None, attacks: Optional[Sequence[str]] = None, n_iter: int = 100,
               n_restarts: int = 1, n_target_classes: int = 9, fab_n_iter: int = 100,
               n_queries: int = 5000, p_init: float = .8, rho: float = .75):
  """Runs AutoAttack and reports robust accuracy after each attack.

  Args:
    logits_fn: pure ``x -> logits`` (per-example independent, e.g. eval-mode BN). For
      big models pass ``jax.tree_util.Partial(apply_fn, params)`` so the parameters
      are traced arguments rather than compiled-in constants.
    x: ``(N, H, W, C)`` images in [0, 1]; y: ``(N,)`` int labels; key: one PRNG key.
    norm: 'Linf' or 'L2'; eps: radius.
    version: 'standard' or 'fast'; ``attacks`` overrides the list (names from
      'apgd-ce', 'apgd-t', 'fab-t', 'square').
    batch_size: fixed batch size (default ``min(N, 250)``, the reference's 250).
    progress: None/False (silent), True (print), or a callable receiving a string.
    n_iter, n_restarts, n_target_classes, fab_n_iter, n_queries, p_init, rho: attack
      settings; the defaults are the reference 'standard' ones (``n_restarts`` is the
      APGD-CE restarts; APGD-T, FAB-T and Square use one restart per target, as in the
      reference). ``n_target_classes`` is capped at ``n_classes - 1``.
  Returns:
    ``(x_adv, robust, accs)``: adversarial inputs (clean where no attack succeeded),
    the per-example robust mask (True only where the model classifies ``x_adv``
    correctly, so never for clean-misclassified points), and a dict of robust
    accuracies: ``'clean'`` then one entry per attack in order.
  """
  check_norm(norm)
  if attacks is None:
    if version not in VERSIONS:
      raise ValueError(f'version must be one of {tuple(VERSIONS)}, got {version!r}')
    attacks = VERSIONS[version]
  for a in attacks:
    if a not in ATTACK_IDS:
      raise ValueError(f'unknown attack {a!r}')
  if progress is True:
    log = print
  elif callable(progress):
    log = progress
  else:
    log = lambda _: None

  fn = as_partial(logits_fn)
  x_np = np.asarray(x, np.float32)
  y_np = np.asarray(y).astype(np.int32)
  n = x_np.shape[0]
  bs = int(batch_size) if batch_size else min(n, 250)
  key = _typed(key)
  if key.ndim != 0:
    raise ValueError('autoattack takes a single key')
  eps32 = jnp.float32(eps)

  t0 = time.time()
  pred = _batched_predict(fn, x_np, bs)
  robust = pred == y_np
  accs = {'clean': float(robust.mean())}
  log(f'clean accuracy: {accs["clean"]:.2%}')
  n_cls = int(jax.eval_shape(fn, jax.ShapeDtypeStruct((1,) + x_np.shape[1:], jnp.float32))
              .shape[-1])
  n_tc = max(1, min(int(n_target_classes), n_cls - 1))

  x_adv = x_np.copy()
  for name in attacks:
    idx = np.nonzero(robust)[0]
    if idx.size == 0:
      accs[name] = 0.
      continue
    attack_key = jax.random.fold_in(key, ATTACK_IDS[name])
    for start in range(0, idx.size, bs):
      chunk = idx[start:start + bs]
      m = chunk.size
      padded = np.concatenate([chunk, np.full((bs - m,), chunk[0], chunk.dtype)])
      active = np.arange(bs) < m
      xb = jnp.asarray(x_np[padded])
      yb = jnp.asarray(y_np[padded])
      keys = example_keys(attack_key, bs, index=jnp.asarray(padded, jnp.int32))
      act = jnp.asarray(active)
      if name == 'apgd-ce':
        adv_b, _ = apgd_core(fn, xb, yb, keys, act, eps32, norm=norm, loss='ce', n_iter=n_iter,
                             n_restarts=n_restarts, n_target_classes=1, rho=rho)
      elif name == 'apgd-t':
        adv_b, _ = apgd_core(fn, xb, yb, keys, act, eps32, norm=norm, loss='dlr-targeted',
                             n_iter=n_iter, n_restarts=1, n_target_classes=n_tc, rho=rho)
      elif name == 'fab-t':
        adv_b, _ = fab_t_core(fn, xb, yb, keys, act, eps32, norm=norm, n_iter=fab_n_iter,
                              n_restarts=1, n_target_classes=n_tc, alpha_max=.1, eta=1.05,
                              beta=.9)
      else:
        adv_b, _ = square_core(fn, xb, yb, keys, act, eps32, norm=norm, n_queries=n_queries,
                               n_restarts=1, p_init=p_init, rescale_schedule=False)
      pred_b = np.asarray(_predict(fn, adv_b))
      fooled = (active & (pred_b != y_np[padded]))[:m]
      adv_np = np.asarray(adv_b)[:m]
      x_adv[chunk[fooled]] = adv_np[fooled]
      robust[chunk[fooled]] = False
      log(f'{name} - batch {start // bs + 1}/{-(-idx.size // bs)} - {int(fooled.sum())} out of '
          f'{m} successfully perturbed')
    accs[name] = float(robust.mean())
    log(f'robust accuracy after {name.upper()}: {accs[name]:.2%} '
        f'(total time {time.time() - t0:.1f} s)')

  # A point counted robust must be classified correctly at the returned input.
  robust &= _batched_predict(fn, x_adv, bs) == y_np
  x_adv = jnp.asarray(x_adv)
  if progress:
    pert = np.asarray(flat_norm(x_adv - jnp.asarray(x_np), norm))
    log(f'max {norm} perturbation: {pert.max() if n else 0.:.5f}, '
        f'robust accuracy: {robust.mean():.2%}')
  return x_adv, jnp.asarray(robust), accs
