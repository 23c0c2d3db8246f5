"""Targeted FAB attack (FAB-T; Croce & Hein, ICML 2020), Linf and L2.

Follows the reference ``autoattack/fab_base.py`` / ``fab_projections.py``, targeted
variant as used by AutoAttack: for the target classes ranked 2 .. n_target_classes+1
by the clean logits, each only on points still robust,

* linearise the difference of the target and true logits at the current iterate,
* project the iterate and the clean point onto the linearised decision hyperplane
  (exact projection inside the [0, 1] box),
* move to a convex combination of both projections, with bias ``alpha`` towards the
  clean point (``alpha <= alpha_max``), extrapolated by ``eta``,
* when the iterate is adversarial, keep it if it is the closest found so far and pull
  it back towards the clean point by ``beta``.

A point counts as broken only if the closest adversarial point lies within ``eps``.
Restarts beyond the first start from a random point at distance ``eps / 2``.
"""

from __future__ import annotations

from functools import partial
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from ._common import (as_partial, bcast, check_norm, example_keys, flat_norm, fold_all,
                      normal_per_example, uniform_per_example, where_ex)
from .autopgd import target_labels


def _take(a, idx):
  return jnp.take_along_axis(a, idx[:, None], axis=1)[:, 0]


def _ordered(v):
  """float32 -> int32 with the same order (negative floats flipped), for bisecting over
  the representable floats of a range."""
  i = lax.bitcast_convert_type(v, jnp.int32)
  return jnp.where(i < 0, i ^ jnp.int32(0x7fffffff), i)


def _unordered(i):
  return lax.bitcast_convert_type(jnp.where(i < 0, i ^ jnp.int32(0x7fffffff), i), jnp.float32)


def projection_linf(t, w, b):
  """Minimal Linf step ``d`` (per row) with ``w.(t+d) = b`` and ``t+d`` in [0, 1].

  The reference sorts ``p`` (every coordinate's distance to the box face it moves
  towards) and binary-searches the sorted cumulative sums for the last index ``k``
  with ``b - (sb[k] - s[k] p_(k)) > 0``. That quantity depends on ``k`` only through
  the value ``v = p_(k)``: it is ``g(v) = b0 + sum_j |w_j| max(p_j - v, 0)``, which
  decreases in ``v`` and is the same for tied values. So the search is a bisection on
  ``v`` over the floats between min(p) and max(p) (32 halvings of their bit patterns
  reach adjacent floats), and ``sb[k]``, ``s[k]`` are sums over ``p_j >= v``. Same
  result as the sorted search (up to float rounding of the sums), without the sort:
  XLA:CPU's sort of 3072 floats per row made this 13x slower and FAB-T several times
  slower than PyTorch on a convolutional net.
  """
  sign = jnp.where(jnp.sum(w * t, 1) - b >= 0, 1., -1.).astype(w.dtype)
  w = w * sign[:, None]
  b = b * sign
  a = (w < 0).astype(w.dtype)
  nz = (w != 0).astype(w.dtype)
  d = (a - t) * nz
  p = a - t * (2 * a - 1)
  b = b - jnp.sum(w * t, 1)
  b0 = jnp.sum(w * d, 1)
  aw = jnp.abs(w)
  awp = aw * p  # = -w d
  s_all = jnp.sum(aw, 1)
  sb_all = jnp.sum(awp, 1) + b0
  p_min, p_max = jnp.min(p, 1), jnp.max(p, 1)
  # Branches of the reference: c_l, the hyperplane lies beyond the box corner
  # (b > g(min p)); c2, the step stops inside (g(max p) = b0 < b); else no solution.
  c_l = b - (sb_all - s_all * p_min) > 0
  c2 = (b - b0 > 0) & ~c_l

  def body(_, lohi):
    lo, hi = lohi
    mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2), no overflow
    g = b0 + jnp.sum(aw * jnp.maximum(p - _unordered(mid)[:, None], 0.), 1)
    ok = g < b
    return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

  # Invariant for c2 rows: g(lo) >= b > g(hi); ends with hi = the smallest float v
  # with g(v) < b, so {p_j >= hi} are the coordinates before the reference's lb + 1.
  _, hi = lax.fori_loop(0, 32, body, (_ordered(p_min), _ordered(p_max)))
  sel = p >= _unordered(hi)[:, None]
  s_lb = jnp.sum(jnp.where(sel, aw, 0.), 1)
  sb_lb = jnp.sum(jnp.where(sel, awp, 0.), 1) + b0

  lmbd_l = jnp.maximum((b - sb_all) / (-s_all), 0.)[:, None]
  d_l = (2 * a - 1) * lmbd_l
  lmbd_2 = jnp.maximum((b - sb_lb) / (-s_lb), 0.)[:, None]
  d_2 = jnp.minimum(lmbd_2, d) * a + jnp.maximum(-lmbd_2, d) * (1 - a)
  d = jnp.where(c_l[:, None], d_l, jnp.where(c2[:, None], d_2, d))
  return d * nz


def projection_l2(t, w, b):
  """Minimal L2 step ``d`` (per row) with ``w.(t+d) = b`` and ``t+d`` in [0, 1]."""
  n_rows, dim = w.shape
  big = 1e12
  c = jnp.sum(w * t, 1) - b
  sign = jnp.where(c < 0, -1., 1.).astype(w.dtype)
  w = w * sign[:, None]
  c = c * sign
  small = jnp.abs(w) < 1e-8
  r = jnp.clip(jnp.maximum(t / w, (t - 1) / w), -big, big)
  r = jnp.where(small, big, r)
  r = jnp.where(r == -big, big, r)
  indr = jnp.argsort(r, axis=1)
  rs = jnp.take_along_axis(r, indr, 1)
  rs2 = jnp.concatenate([rs[:, 1:], jnp.zeros((n_rows, 1), w.dtype)], 1)
  rs = jnp.where(rs == big, 0., rs)
  rs2 = jnp.where(rs2 == big, 0., rs2)
  w3s = jnp.take_along_axis(w**2, indr, 1)
  w5 = jnp.sum(w3s, 1, keepdims=True)
  ws = w5 - jnp.cumsum(w3s, 1)
  d = -(r * w) * (~small).astype(w.dtype)
  s = jnp.concatenate([-w5 * rs[:, :1], jnp.cumsum((-rs2 + rs) * ws, 1) - w5 * rs[:, :1]], 1)
  c4 = s[:, 0] + c < 0
  c3 = jnp.sum(d * w, 1) + c > 0
  c2 = ~(c4 | c3)

  lb = jnp.zeros((n_rows,), w.dtype)
  ub = jnp.full((n_rows,), dim - 1, w.dtype)
  for _ in range(math.ceil(math.log2(dim))):
    mid = jnp.floor((lb + ub) / 2)
    cc = _take(s, mid.astype(jnp.int32)) + c > 0
    lb = jnp.where(cc, mid, lb)
    ub = jnp.where(cc, ub, mid)
  lb = lb.astype(jnp.int32)

  d_4 = -(c / w5[:, 0])[:, None] * w
  ws_lb = _take(ws, lb)
  alpha = (_take(s, lb) + c) / ws_lb + _take(rs, lb)
  alpha = jnp.where(ws_lb == 0, 0., alpha)[:, None]
  c5 = (alpha > r).astype(w.dtype)
  d_2 = d * c5 - alpha * w * (1 - c5)
  d = jnp.where(c4[:, None], d_4, jnp.where(c2[:, None], d_2, d))
  return d * (~small).astype(w.dtype)


def fab_empty_state(x, xp=jnp):
  """A placeholder for :func:`fab_step`'s state before iteration 0 (which ignores it);
  nothing found yet."""
  return x, x, xp.full(x.shape[:1], 1e10, x.dtype)


def fab_step(fn, x, y, y_target, keys, eps, rand_start, state, i, *, norm, alpha_max, eta, beta):
  """Iteration ``i`` (traced) of a targeted FAB run; ``i = 0`` starts the run (from a
  random point at distance ``eps / 2`` if ``rand_start``) and ignores ``state``.
  ``state = (x1, adv, res2)``: the iterate, the closest adversarial point found (the
  clean image while none) and its distance (1e10 while none). One iteration per call
  lets the suite drive the loop from the host (see :func:`autopgd.apgd_step`)."""
  n = x.shape[0]
  proj = projection_linf if norm == 'Linf' else projection_l2
  x0 = x.reshape(n, -1)

  def start():
    if norm == 'Linf':
      t = uniform_per_example(keys, x.shape[1:], -1., 1.)
    else:
      t = normal_per_example(keys, x.shape[1:])
    t = t / bcast(flat_norm(t, norm), t)
    x1_rand = jnp.clip(x + jnp.minimum(1e10, eps) * t * .5, 0., 1.)
    return jnp.where(rand_start, x1_rand, x), x, jnp.full((n,), 1e10, x.dtype)

  x1, adv, res2 = lax.cond(i == 0, start, lambda: tuple(state))

  def total(xx):
    z = fn(xx)
    diffy = -(_take(z, y) - _take(z, y_target))
    return diffy.sum(), diffy

  (_, df), dg = jax.value_and_grad(total, has_aux=True)(x1)
  w = dg.reshape(n, -1)
  b = -df + jnp.sum(w * x1.reshape(n, -1), 1)
  d3 = proj(jnp.concatenate([x1.reshape(n, -1), x0], 0), jnp.concatenate([w, w], 0),
            jnp.concatenate([b, b], 0))
  d1 = d3[:n].reshape(x.shape)
  d2 = d3[n:].reshape(x.shape)
  a0 = jnp.maximum(flat_norm(d3, norm), 1e-8)
  a1, a2 = a0[:n], a0[n:]
  alpha = bcast(jnp.minimum(jnp.maximum(a1 / (a1 + a2), 0.), alpha_max), x)
  x1 = jnp.clip((x1 + eta * d1) * (1 - alpha) + (x + d2 * eta) * alpha, 0., 1.)
  is_adv = jnp.argmax(fn(x1), -1) != y
  dist = flat_norm(x1 - x, norm)
  better = is_adv & (dist < res2)
  adv = where_ex(better, x1, adv)
  res2 = jnp.where(better, dist, res2)
  x1 = where_ex(is_adv, x + (x1 - x) * beta, x1)
  return x1, adv, res2


def fab_targeted_single_run(fn, x, y, y_target, keys, eps, rand_start, *, norm, n_iter, alpha_max,
                            eta, beta):
  """One targeted FAB run. Returns ``(adv, res2)``: the closest adversarial point
  found (the clean image where none was found) and its distance (1e10 where none; it
  was misclassified when it was recorded, so no forward pass is needed to check it)."""
  step = partial(fab_step, fn, x, y, y_target, keys, eps, rand_start, norm=norm,
                 alpha_max=alpha_max, eta=eta, beta=beta)
  _, adv, res2 = lax.fori_loop(0, n_iter, lambda i, s: step(s, i), fab_empty_state(x))
  return adv, res2


def fab_t_run(fn, x, y, y_target, keys, acc, eps, j, *, norm, n_iter, n_restarts, alpha_max, eta,
              beta):
  """Run ``j`` of FAB-T against ``y_target``, from a random start unless it is the
  target's first restart (``j % n_restarts == 0``). Returns ``(adv, fooled)``:
  ``fooled`` only among ``acc``, and only where the adversarial point lies within
  ``eps``."""
  adv, res2 = fab_targeted_single_run(fn, x, y, y_target, fold_all(keys, j), eps, j % n_restarts
                                      > 0, norm=norm, n_iter=n_iter, alpha_max=alpha_max, eta=eta,
                                      beta=beta)
  return adv, acc & (res2 <= eps)


def _check_targets(n_target_classes, n_cls):
  if not 1 <= n_target_classes <= n_cls - 1:
    raise ValueError(f'n_target_classes must be in [1, {n_cls - 1}], got {n_target_classes}')


@partial(
    jax.jit, static_argnames=('norm', 'n_iter', 'n_restarts', 'n_target_classes', 'alpha_max',
                              'eta', 'beta'))
def fab_t_core(fn, x, y, keys, active, eps, *, norm, n_iter, n_restarts, n_target_classes,
               alpha_max, eta, beta):
  """Batched FAB-T on the points ``active`` and correctly classified; returns
  ``(x_adv, robust)``. Every run is computed on the whole batch (skipped only once
  nothing is left): :func:`twins_jax.autoattack.autoattack` instead runs
  :func:`fab_t_batch_step` on the points still robust, from the host."""
  logits0 = fn(x)
  acc = active & (jnp.argmax(logits0, -1) == y)
  _check_targets(n_target_classes, logits0.shape[-1])
  order = jnp.argsort(logits0, axis=-1)

  def body(j, state):

    def run(state):
      adv, acc = state
      y_t = target_labels(order, j, n_restarts)
      adv_curr, fooled = fab_t_run(fn, x, y, y_t, keys, acc, eps, j, norm=norm, n_iter=n_iter,
                                   n_restarts=n_restarts, alpha_max=alpha_max, eta=eta, beta=beta)
      return where_ex(fooled, adv_curr, adv), acc & ~fooled

    return lax.cond(jnp.any(state[1]), run, lambda s: s, state)

  return lax.fori_loop(0, n_target_classes * n_restarts, body, (x, acc))


@partial(jax.jit, static_argnames=('norm', 'alpha_max', 'eta', 'beta'))
def fab_t_batch_step(fn, x, y, y_target, index, key, eps, j, rand_start, state, i, *, norm,
                     alpha_max, eta, beta):
  """:func:`fab_step` ``i`` of run ``j`` on one batch of the suite; ``i`` and ``j`` are
  traced, so every target and iteration shares one compiled program per batch size.
  Example keys are ``fold_in(key, index)``, folded with ``j``; ``y_target`` comes from
  the suite's clean logits."""
  keys = fold_all(example_keys(key, x.shape[0], index), j)
  return fab_step(fn, x, y, y_target, keys, eps, rand_start, state, i, norm=norm,
                  alpha_max=alpha_max, eta=eta, beta=beta)


def fab_t(logits_fn: Callable, x, y, key, *, norm: str = 'Linf', eps: float, n_iter: int = 100,
          n_restarts: int = 1, n_target_classes: int = 9, alpha_max: float = .1, eta: float = 1.05,
          beta: float = .9, active=None):
  """Targeted FAB (FAB-T) with AutoAttack's standard settings as defaults.

  Arguments as for :func:`twins_jax.autoattack.apgd`. Returns adversarial images: the
  minimal adversarial point found where it lies within ``eps`` (so inside the ball and
  [0, 1]), else the clean image.
  """
  return fab_t_with_robust(logits_fn, x, y, key, norm=norm, eps=eps, n_iter=n_iter,
                           n_restarts=n_restarts, n_target_classes=n_target_classes,
                           alpha_max=alpha_max, eta=eta, beta=beta, active=active)[0]


def fab_t_with_robust(logits_fn, x, y, key, *, norm='Linf', eps, n_iter=100, n_restarts=1,
                      n_target_classes=9, alpha_max=.1, eta=1.05, beta=.9, active=None):
  """Like :func:`fab_t` but returns ``(x_adv, robust_mask)``."""
  check_norm(norm)
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.int32)
  n = x.shape[0]
  active = jnp.ones((n,), bool) if active is None else jnp.asarray(active, bool)
  return fab_t_core(as_partial(logits_fn), x, y, example_keys(key, n), active, jnp.float32(eps),
                    norm=norm, n_iter=int(n_iter), n_restarts=int(n_restarts),
                    n_target_classes=int(n_target_classes), alpha_max=float(alpha_max),
                    eta=float(eta), beta=float(beta))
