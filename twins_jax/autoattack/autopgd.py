"""Auto-PGD (Croce & Hein, ICML 2020): APGD-CE, APGD-DLR and APGD-T (targeted DLR).

Follows the reference ``autoattack/autopgd_base.py``:

* start at a random point of the eps-sphere (Linf: uniform noise scaled to Linf norm
  eps; L2: Gaussian noise scaled to L2 norm eps), clipped to [0, 1];
* step size starts at ``2 * eps``; momentum 0.75 (none on the first step);
* checkpoints: the first after ``p1 = max(int(0.22 n_iter), 1)`` iterations, then the
  window shrinks by ``max(int(0.03 n_iter), 1)`` down to ``max(int(0.06 n_iter), 1)``;
* at a checkpoint the step size of an example is halved and its iterate reset to its
  best point when the loss increased in at most ``rho * k`` of the last ``k`` steps,
  or when the step size was not reduced at the previous checkpoint and the best loss
  did not improve since;
* APGD-T targets the ``t``-th most likely class (t = 2 .. n_target_classes + 1) with
  the targeted DLR loss, every target class run only on points still robust;
* restarts run only on points still robust.

Every loop is a ``lax`` loop: compile time does not depend on ``n_iter``.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from ._common import (TINY, as_partial, bcast, check_norm, example_keys, flat_norm, fold_all,
                      normal_per_example, normalize, uniform_per_example, where_ex)

LOSSES = ('ce', 'dlr', 'dlr-targeted')


def ce_loss(logits, y, y_target=None):
  del y_target
  logz = jax.nn.logsumexp(logits, axis=-1)
  return logz - jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]


def dlr_loss(logits, y, y_target=None):
  """Untargeted DLR loss (to be maximised)."""
  del y_target
  top, idx = lax.top_k(logits, 3)
  zy = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
  ind = (idx[:, 0] == y).astype(logits.dtype)
  return -(zy - top[:, 1] * ind - top[:, 0] * (1. - ind)) / (top[:, 0] - top[:, 2] + TINY)


def dlr_targeted_loss(logits, y, y_target):
  """Targeted DLR loss (to be maximised); needs at least four classes."""
  top, _ = lax.top_k(logits, 4)
  zy = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
  zt = jnp.take_along_axis(logits, y_target[:, None], axis=-1)[:, 0]
  return -(zy - zt) / (top[:, 0] - .5 * (top[:, 2] + top[:, 3]) + TINY)


_LOSS_FNS = {'ce': ce_loss, 'dlr': dlr_loss, 'dlr-targeted': dlr_targeted_loss}


def _loss_fn(loss, n_cls):
  """The loss by name, or for a traced index into :data:`LOSSES` a ``lax.switch`` over
  them: APGD-CE and APGD-T then share one compiled program (their cost is the model's
  forward and backward pass, the same for every loss). Losses that need more classes
  than the model has are replaced by CE in the switch (never selected: the suite
  checks the class count)."""
  if isinstance(loss, str):
    return _LOSS_FNS[loss]
  need = {'ce': 1, 'dlr': 3, 'dlr-targeted': 4}
  branches = [_LOSS_FNS[name] if n_cls >= need[name] else ce_loss for name in LOSSES]
  return lambda logits, y, y_target: lax.switch(loss, branches, logits, y, y_target)


def _project(x_new, x, eps, norm):
  if norm == 'Linf':
    return jnp.clip(jnp.clip(x_new, x - eps, x + eps), 0., 1.)
  d = x_new - x
  scale = jnp.minimum(eps, flat_norm(d, 'L2'))
  return jnp.clip(x + normalize(d, 'L2') * bcast(scale, d), 0., 1.)


def apgd_empty_state(x, n_iter, xp=jnp):
  """A placeholder for :func:`apgd_step`'s state before iteration -1 (which ignores it):
  the right shapes and dtypes. ``xp``: ``jnp`` inside a trace, ``np`` on the host."""
  n = x.shape[0]
  vec = xp.zeros((n,), x.dtype)
  flags = xp.zeros((n,), bool)
  return dict(x_adv=x, x_adv_old=x, grad=x, x_best=x, grad_best=x, loss_best=vec, x_best_adv=x,
              acc=flags, step=vec, loss_steps=xp.zeros((n, n_iter), x.dtype), k=xp.int32(0),
              counter3=xp.int32(0), loss_best_last=vec, reduced_last=flags)


def apgd_step(fn, x, y, y_target, keys, eps, state, i, *, norm, loss, n_iter, rho):
  """Iteration ``i`` (traced) of an APGD run: ``i = -1`` evaluates the random start
  (and ignores ``state``), ``i = 0 .. n_iter - 1`` take a step. Returns the new state.

  One iteration per call lets the suite drive the loop from the host: XLA:CPU runs a
  model's forward and backward pass inside a ``while`` loop about 1.6x slower than
  the same computation as a program of its own (measured on a small ResNet), and the
  iteration is nothing but that pass. ``loss``: a name from :data:`LOSSES` or a
  traced index into it.
  """
  n = x.shape[0]
  n_iter_2 = max(int(0.22 * n_iter), 1)
  n_iter_min = max(int(0.06 * n_iter), 1)
  size_decr = max(int(0.03 * n_iter), 1)
  first = i < 0

  def loss_and_grad(xa):

    def total(xa):
      logits = fn(xa)
      li = _loss_fn(loss, logits.shape[-1])(logits, y, y_target)
      return li.sum(), (logits, li)

    (_, (logits, li)), g = jax.value_and_grad(total, has_aux=True)(xa)
    return logits, li, g

  def start():
    if norm == 'Linf':
      t = uniform_per_example(keys, x.shape[1:], -1., 1.)
    else:
      t = normal_per_example(keys, x.shape[1:])
    return jnp.clip(x + eps * normalize(t, norm), 0., 1.)

  def move():
    x_adv = state['x_adv']
    grad2 = x_adv - state['x_adv_old']
    a = jnp.where(i > 0, .75, 1.).astype(x.dtype)
    step = bcast(state['step'], x)
    if norm == 'Linf':
      z = _project(x_adv + step * jnp.sign(state['grad']), x, eps, norm)
    else:
      z = _project(x_adv + step * normalize(state['grad'], 'L2'), x, eps, norm)
    return _project(x_adv + (z - x_adv) * a + grad2 * (1. - a), x, eps, norm)

  # One call site of the model's gradient for the start and the steps alike.
  x_adv = lax.cond(first, start, move)
  logits, li, grad = loss_and_grad(x_adv)
  ok = jnp.argmax(logits, -1) == y

  def init():
    return dict(x_adv=x_adv, x_adv_old=x_adv, grad=grad, x_best=x_adv, grad_best=grad, loss_best=li,
                x_best_adv=x_adv, acc=ok, step=jnp.full(
                    (n,), 2. * eps, x.dtype), loss_steps=jnp.zeros(
                        (n, n_iter), x.dtype), k=jnp.int32(n_iter_2), counter3=jnp.int32(0),
                loss_best_last=li, reduced_last=jnp.ones((n,), bool))

  def update():
    c = state
    acc = c['acc'] & ok
    x_best_adv = where_ex(~ok, x_adv, c['x_best_adv'])
    loss_steps = c['loss_steps'].at[:, i].set(li)  # (examples, iterations)
    imp = li > c['loss_best']
    x_best = where_ex(imp, x_adv, c['x_best'])
    grad_best = where_ex(imp, grad, c['grad_best'])
    loss_best = jnp.where(imp, li, c['loss_best'])

    counter3 = c['counter3'] + 1
    k = c['k']
    check = counter3 == k
    # Oscillation test over the last k steps; index -1 wraps to the last row,
    # exactly like the reference's Python indexing at the first checkpoint.
    cs = jnp.arange(n_iter)
    cur = loss_steps[:, (i - cs) % n_iter]
    prev = loss_steps[:, (i - cs - 1) % n_iter]
    n_incr = jnp.sum((cur > prev) & (cs < k)[None, :], axis=1)
    fl = n_incr <= k * rho
    fl = fl | (~c['reduced_last'] & (c['loss_best_last'] >= loss_best))
    apply = check & fl
    return dict(x_adv=where_ex(apply, x_best,
                               x_adv), x_adv_old=c['x_adv'], grad=where_ex(apply, grad_best, grad),
                x_best=x_best, grad_best=grad_best, loss_best=loss_best, x_best_adv=x_best_adv,
                acc=acc, step=jnp.where(apply, c['step'] / 2., c['step']), loss_steps=loss_steps,
                k=jnp.where(check, jnp.maximum(k - size_decr, n_iter_min),
                            k), counter3=jnp.where(check, 0, counter3),
                loss_best_last=jnp.where(check, loss_best, c['loss_best_last']),
                reduced_last=jnp.where(check, fl, c['reduced_last']))

  return lax.cond(first, init, update)


def apgd_single_run(fn, x, y, y_target, keys, eps, *, norm, loss, n_iter, rho):
  """One run of APGD from a random start. Returns ``(x_best, acc, loss_best, x_best_adv)``.

  ``acc[i]`` is False iff some iterate (the start included) was misclassified;
  ``x_best_adv`` is then the last such iterate, else the random start.
  """
  step = partial(apgd_step, fn, x, y, y_target, keys, eps, norm=norm, loss=loss, n_iter=n_iter,
                 rho=rho)
  c = lax.fori_loop(-1, n_iter, lambda i, c: step(c, i), apgd_empty_state(x, n_iter))
  return c['x_best'], c['acc'], c['loss_best'], c['x_best_adv']


def apgd_run(fn, x, y, y_target, keys, acc, eps, j, *, norm, loss, n_iter, rho):
  """Run ``j`` of APGD on the points ``acc`` (keys folded with ``j``). Returns
  ``(adv, fooled)``; ``adv`` is the last misclassified iterate where ``fooled``."""
  _, acc_run, _, adv_run = apgd_single_run(fn, x, y, y_target, fold_all(keys, j), eps, norm=norm,
                                           loss=loss, n_iter=n_iter, rho=rho)
  return adv_run, acc & ~acc_run


def target_labels(order, j, n_restarts):
  """APGD-T's / FAB-T's target of run ``j``: the class ranked ``j // n_restarts + 2`` by
  the clean logits (``order``: their ascending argsort)."""
  n_cls = order.shape[-1]
  tc = j // n_restarts + 2
  return jnp.take_along_axis(order,
                             jnp.broadcast_to(n_cls - tc, order.shape[:1])[:, None], axis=-1)[:, 0]


def _check_loss(loss, n_target_classes, n_cls):
  if loss == 'dlr-targeted':
    if not 1 <= n_target_classes <= n_cls - 1:
      raise ValueError(f'n_target_classes must be in [1, {n_cls - 1}], got {n_target_classes}')
    if n_cls < 4:
      raise ValueError('the targeted DLR loss needs at least 4 classes')
  if loss == 'dlr' and n_cls < 3:
    raise ValueError('the DLR loss needs at least 3 classes')


@partial(jax.jit,
         static_argnames=('norm', 'loss', 'n_iter', 'n_restarts', 'n_target_classes', 'rho'))
def apgd_core(fn, x, y, keys, active, eps, *, norm, loss, n_iter, n_restarts, n_target_classes,
              rho):
  """Batched APGD on the points ``active`` and correctly classified.

  Returns ``(x_adv, robust)``: ``robust`` is False for inactive, clean-misclassified
  and successfully attacked points; ``x_adv`` equals ``x`` where no adversarial point
  was found. Every run is computed on the whole batch (skipped only once nothing is
  left): :func:`twins_jax.autoattack.autoattack` instead runs :func:`apgd_batch_step` on
  the points still robust.
  """
  logits0 = fn(x)
  acc = active & (jnp.argmax(logits0, -1) == y)
  targeted = loss == 'dlr-targeted'
  _check_loss(loss, n_target_classes, logits0.shape[-1])
  order = jnp.argsort(logits0, axis=-1)
  n_outer = n_target_classes if targeted else 1

  def body(j, state):

    def run(state):
      adv, acc = state
      y_t = target_labels(order, j, n_restarts) if targeted else y
      adv_run, fooled = apgd_run(fn, x, y, y_t, keys, acc, eps, j, norm=norm, loss=loss,
                                 n_iter=n_iter, rho=rho)
      return where_ex(fooled, adv_run, adv), acc & ~fooled

    return lax.cond(jnp.any(state[1]), run, lambda s: s, state)

  adv, acc = lax.fori_loop(0, n_outer * n_restarts, body, (x, acc))
  return adv, acc


@partial(jax.jit, static_argnames=('norm', 'n_iter', 'rho'))
def apgd_batch_step(fn, x, y, y_target, index, key, eps, j, loss_id, state, i, *, norm, n_iter,
                    rho):
  """:func:`apgd_step` ``i`` of run ``j`` with the loss ``LOSSES[loss_id]`` on one batch
  of the suite. ``i``, ``j`` and ``loss_id`` are traced: APGD-CE and every target,
  restart and iteration of APGD-T share one compiled program per batch size. Example
  keys are ``fold_in(key, index)``, folded with ``j``. ``y_target`` comes from the
  suite's clean logits, so there is no clean forward pass here."""
  keys = fold_all(example_keys(key, x.shape[0], index), j)
  return apgd_step(fn, x, y, y_target, keys, eps, state, i, norm=norm, loss=loss_id, n_iter=n_iter,
                   rho=rho)


def apgd(logits_fn: Callable, x, y, key, *, norm: str = 'Linf', eps: float, loss: str = 'ce',
         n_iter: int = 100, n_restarts: int = 1, n_target_classes: int = 9, rho: float = .75,
         active=None):
  """APGD (``loss='ce'`` or ``'dlr'``) or APGD-T (``loss='dlr-targeted'``).

  Args:
    logits_fn: pure function ``x -> logits`` (batch-independent per example). Pass a
      ``jax.tree_util.Partial(apply_fn, params)`` to have the parameters traced as
      arguments rather than compiled in as constants.
    x: images ``(N, H, W, C)`` in [0, 1]. y: int labels ``(N,)``.
    key: a single PRNG key (folded with each example's index) or one key per example.
    norm: 'Linf' or 'L2'. eps: radius of the threat model.
    loss: 'ce', 'dlr' or 'dlr-targeted' (APGD-T over ``n_target_classes`` targets).
    n_iter: iterations per run. n_restarts: random restarts (per target class for
      APGD-T). rho: the step-size checkpoint threshold.
    active: optional bool mask ``(N,)``; inactive points are left untouched.
  Returns:
    adversarial images: inside the eps-ball and [0, 1]; the clean image where the
    attack failed (or the point was misclassified to begin with).
  """
  return apgd_with_robust(logits_fn, x, y, key, norm=norm, eps=eps, loss=loss, n_iter=n_iter,
                          n_restarts=n_restarts, n_target_classes=n_target_classes, rho=rho,
                          active=active)[0]


def apgd_with_robust(logits_fn, x, y, key, *, norm='Linf', eps, loss='ce', n_iter=100, n_restarts=1,
                     n_target_classes=9, rho=.75, active=None):
  """Like :func:`apgd` but returns ``(x_adv, robust_mask)``."""
  check_norm(norm)
  if loss not in LOSSES:
    raise ValueError(f'loss must be one of {LOSSES}, got {loss!r}')
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.int32)
  n = x.shape[0]
  active = jnp.ones((n,), bool) if active is None else jnp.asarray(active, bool)
  if loss != 'dlr-targeted':
    n_target_classes = 1  # unused; keeps the jit cache key canonical
  return apgd_core(as_partial(logits_fn), x, y, example_keys(key, n), active, jnp.float32(eps),
                   norm=norm, loss=loss, n_iter=int(n_iter), n_restarts=int(n_restarts),
                   n_target_classes=int(n_target_classes), rho=float(rho))


def apgd_t(logits_fn: Callable, x, y, key, *, norm: str = 'Linf', eps: float, n_iter: int = 100,
           n_restarts: int = 1, n_target_classes: int = 9, rho: float = .75, active=None):
  """APGD-T: APGD on the targeted DLR loss, for the 2nd .. (n_target_classes+1)-th
  most likely classes in turn (each only on points still robust)."""
  return apgd(logits_fn, x, y, key, norm=norm, eps=eps, loss='dlr-targeted', n_iter=n_iter,
              n_restarts=n_restarts, n_target_classes=n_target_classes, rho=rho, active=active)
