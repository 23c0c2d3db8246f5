"""Square attack (Andriushchenko et al., ECCV 2020), Linf and L2, margin loss.

Follows the reference ``autoattack/square.py``:

* Linf: start from vertical stripes ``x + eps * (+-1 per column and channel)``; each
  query adds ``+-2 eps`` (one sign per channel) on a random square window of side
  ``s = max(round(sqrt(p * H * W)), 1)`` and projects back to the ball and [0, 1];
* L2: start from a grid of ``H // 5`` sized windows each holding the ``eta`` pattern
  with a random sign per channel, scaled to L2 norm eps; each query moves the mass of
  a second random window into a first one, which gets a fresh ``eta`` pattern
  (odd side ``s >= 3``), and rescales the whole perturbation to norm eps;
* ``p`` starts at ``p_init`` and halves after queries 10, 50, 200, 500, 1000, 2000,
  4000, 6000, 8000 (AutoAttack uses this schedule unrescaled);
* a query is kept when it lowers the margin loss or misclassifies; only points not
  yet misclassified are queried; restarts only on points still robust.

Deviation, on purpose: the PyTorch reference draws one window position (and sign, and
``eta`` orientation) per query for the whole batch; here every example draws its own,
as in the original Square Attack code, so that an example's result does not depend on
the rest of its batch. Each example's sequence of random queries has the same law.
"""

from __future__ import annotations

from functools import partial
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from ._common import (TINY, as_partial, bcast, check_norm, example_keys, flat_norm, fold_all,
                      normalize, uniform_per_example, where_ex)

_THRESHOLDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
N_STAGES = len(_THRESHOLDS) + 1


def margin(logits, y):
  """``z_y - max_{j != y} z_j`` (the attack succeeds when it is <= 0)."""
  zy = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
  others = jnp.where(jax.nn.one_hot(y, logits.shape[-1], dtype=bool), -jnp.inf, logits)
  return zy - jnp.max(others, axis=-1)


def p_stage(it, n_queries, rescale_schedule):
  """Index ``k`` of the schedule ``p = p_init / 2**k`` at (0-based) query ``it``."""
  if rescale_schedule:
    it = (it.astype(jnp.float32) / n_queries * 10000).astype(jnp.int32)
  return jnp.sum(it > jnp.asarray(_THRESHOLDS, jnp.int32))


def window_sides(p_init, h, w, c, norm):
  """Window side per schedule stage, computed with the reference's float arithmetic."""
  n_features = c * h * w
  sides = []
  for k in range(N_STAGES):
    p = p_init / 2**k
    if norm == 'Linf':
      s = max(int(round(math.sqrt(p * n_features / c))), 1)
    else:
      s = max(int(round(math.sqrt(p * n_features / c))), 3)
      if s % 2 == 0:
        s += 1
    sides.append(s)
  return sides


def eta_rectangles(x, y):
  delta = np.zeros((x, y))
  if x == 0 or y == 0:
    return delta
  x_c, y_c = x // 2 + 1, y // 2 + 1
  c0, c1 = x_c - 1, y_c - 1
  for counter in range(max(x_c, y_c)):
    delta[max(c0, 0):min(c0 + (2 * counter + 1), x),
          max(0, c1):min(c1 + (2 * counter + 1), y)] += 1. / (counter + 1)**2
    c0 -= 1
    c1 -= 1
  return delta / np.sqrt((delta**2).sum())


def eta(s):
  """The L2 Square attack's ``s x s`` window pattern (unit norm, before transposition)."""
  delta = np.zeros((s, s))
  delta[:s // 2] = eta_rectangles(s // 2, s)
  delta[s // 2:] = -1. * eta_rectangles(s - s // 2, s)
  return delta / np.sqrt((delta**2).sum())


def _window_mask(h, w, vh, vw, s):
  rows = jnp.arange(h)[None, :, None, None]
  cols = jnp.arange(w)[None, None, :, None]
  vh, vw, s = (bcast(v, rows) for v in (vh, vw, s))
  return ((rows >= vh) & (rows < vh + s) & (cols >= vw) & (cols < vw + s))


def _place(table, vh, vw):
  """``out[n, i, j] = table[n, i - vh[n], j - vw[n]]`` (0 outside); table is (N, H, W)
  and holds the pattern in its top-left corner, zeros elsewhere."""
  _, h, w = table.shape
  ii = jnp.arange(h)[None, :] - vh[:, None]
  jj = jnp.arange(w)[None, :] - vw[:, None]
  ok = (ii >= 0)[:, :, None] & (jj >= 0)[:, None, :]
  rows = jnp.take_along_axis(table, jnp.clip(ii, 0, h - 1)[:, :, None], axis=1)
  vals = jnp.take_along_axis(rows, jnp.clip(jj, 0, w - 1)[:, None, :], axis=2)
  return jnp.where(ok, vals, 0.)


def _l2_init_layout(h, w):
  """Static layout of the L2 initialisation: window id per pixel (-1: none) and the
  ``eta`` value per pixel, as given and transposed."""
  s = h // 5
  if s == 0:
    raise ValueError('the L2 Square attack needs images of height >= 5')
  sp = (h - s * 5) // 2
  e = eta(s)
  win = -np.ones((h, w), np.int32)
  val = np.zeros((h, w))
  val_t = np.zeros((h, w))
  idx = 0
  vh = sp
  for _ in range(h // s):
    vw = sp
    for _ in range(w // s):
      for i in range(vh, min(vh + s, h)):
        for j in range(vw, min(vw + s, w)):
          win[i, j] = idx
          val[i, j] = e[i - vh, j - vw]
          val_t[i, j] = e[j - vw, i - vh]
      idx += 1
      vw += s
    vh += s
  return win, val, val_t, idx


def _sign(u):
  """The reference's ``random_choice``: ``sign(2 u - 1)`` for ``u ~ U[0, 1)``."""
  return jnp.where(u >= .5, 1., -1.)


def _l2_eta_tables(p_init, h, w, c, dtype):
  """Per schedule stage, the ``eta`` window pattern (and its transpose) in the top-left
  corner of an ``(h, w)`` table."""
  etas = np.zeros((N_STAGES, h, w))
  etas_t = np.zeros((N_STAGES, h, w))
  for k, s in enumerate(window_sides(p_init, h, w, c, 'L2')):
    if s > min(h, w):
      raise ValueError(f'Square L2 window side {s} exceeds the image size')
    e = eta(s)
    etas[k, :s, :s] = e
    etas_t[k, :s, :s] = e.T
  return jnp.asarray(etas, dtype), jnp.asarray(etas_t, dtype)


def _start_point(x, keys, eps, *, norm, n_queries):
  """The starting point of a run: vertical stripes (Linf) or the grid of ``eta``
  windows (L2). Its keys are ``fold_in(key, n_queries)`` (query ``i`` uses
  ``fold_in(key, i)``). One uniform draw per example and query feeds every random
  choice (few PRNG call sites keep the compile time down)."""
  _, h, w, c = x.shape
  init_keys = fold_all(keys, n_queries)
  if norm == 'Linf':
    stripes = _sign(uniform_per_example(init_keys, (1, w, c)))
    return jnp.clip(x + eps * stripes, 0., 1.)
  win, val, val_t, n_win = _l2_init_layout(h, w)

  def init_delta(u):
    signs = _sign(u[:, :c])
    trans = u[:, c] > .5
    wid = jnp.asarray(win)
    widc = jnp.clip(wid, 0, n_win - 1)
    v = jnp.where(trans[widc], jnp.asarray(val_t, x.dtype), jnp.asarray(val, x.dtype))
    v = jnp.where(wid >= 0, v, 0.)
    return v[:, :, None] * signs[widc]

  delta = jax.vmap(init_delta)(uniform_per_example(init_keys, (n_win, c + 1)))
  return jnp.clip(x + normalize(delta, 'L2') * eps, 0., 1.)


def square_queries(fn, x, y, keys, active, eps, state, start, stop, *, norm, n_queries, p_init,
                   rescale_schedule):
  """Queries ``start .. stop - 1`` (traced) of a run; stops early once no example is
  left to fool. ``state = (x_best, margin_min, loss_min)``.

  Query -1 is the starting point: from ``start = -1`` the state passed in is ignored
  and every example starts there (inactive ones with margin -1, never queried). The
  start shares the loop's forward pass, so the model is compiled once. Only examples
  with a positive margin are queried, so a run can be split into query ranges and the
  examples already fooled dropped in between without changing anyone's result.
  """
  n, h, w, c = x.shape
  sides = jnp.asarray(window_sides(p_init, h, w, c, norm), jnp.int32)
  if norm == 'L2':
    etas, etas_t = _l2_eta_tables(p_init, h, w, c, x.dtype)

  def query(i, x_best):
    stage = p_stage(i, n_queries, rescale_schedule)
    s = sides[stage]
    u = uniform_per_example(fold_all(keys, i), (5 + c,))
    sgn = _sign(u[:, 5:]).reshape(n, 1, 1, c)
    # Reference: ``randint`` over [0, h - s) (a window never touches the last row
    # unless s == h), by truncating ``(h - s) * U[0, 1)``.
    vh = (u[:, 0] * (h - s)).astype(jnp.int32)
    vw = (u[:, 1] * (w - s)).astype(jnp.int32)
    if norm == 'Linf':
      m1 = _window_mask(h, w, vh, vw, jnp.broadcast_to(s, (n,)))
      x_new = x_best + jnp.where(m1, 2. * eps * sgn, 0.)
      return jnp.clip(jnp.clip(x_new, x - eps, x + eps), 0., 1.)
    vh2 = (u[:, 2] * (h - s)).astype(jnp.int32)
    vw2 = (u[:, 3] * (w - s)).astype(jnp.int32)
    ss = jnp.broadcast_to(s, (n,))
    m1 = _window_mask(h, w, vh, vw, ss).astype(x.dtype)
    m2 = _window_mask(h, w, vh2, vw2, ss).astype(x.dtype)
    delta = x_best - x
    sp_axes = (1, 2)
    norms_window_1 = jnp.sqrt(jnp.sum((delta * m1)**2, sp_axes, keepdims=True))
    norms_image = bcast(flat_norm(delta, 'L2'), x)
    norms_windows = bcast(flat_norm(delta * jnp.maximum(m1, m2), 'L2'), x)
    table = jnp.where((u[:, 4] > .5)[:, None, None], etas_t[stage], etas[stage])
    e = _place(table, vh, vw)[..., None]
    new = e * sgn + delta * m1 / (TINY + norms_window_1)
    new = new / (TINY + jnp.sqrt(jnp.sum(new**2, sp_axes, keepdims=True))
                ) * jnp.sqrt(jnp.maximum(eps**2 - norms_image**2, 0.) / c + norms_windows**2)
    delta = delta * (1. - m2) * (1. - m1) + new * m1
    return jnp.clip(x + normalize(delta, 'L2') * eps, 0., 1.)

  def cond(c_):
    i, _, margin_min, _ = c_
    return (i < stop) & ((i < 0) | jnp.any(margin_min > 0))

  def body(c_):
    i, x_best, margin_min, loss_min = c_
    first = i < 0
    x_new = lax.cond(first, lambda: _start_point(x, keys, eps, norm=norm, n_queries=n_queries),
                     lambda: query(i, x_best))
    m = margin(fn(x_new), y)
    live = margin_min > 0
    improved = m < loss_min
    take = live & (improved | (m <= 0))
    m_start = jnp.where(active, m, -1.)
    loss_min = jnp.where(first, m_start, jnp.where(live & improved, m, loss_min))
    margin_min = jnp.where(first, m_start, jnp.where(take, m, margin_min))
    x_best = where_ex(first | take, x_new, x_best)
    return i + 1, x_best, margin_min, loss_min

  _, *state = lax.while_loop(cond, body, (jnp.asarray(start, jnp.int32), *state))
  return tuple(state)


def square_single_run(fn, x, y, keys, active, eps, *, norm, n_queries, p_init, rescale_schedule):
  """One Square attack run; returns the best point found per example."""
  zeros = jnp.zeros(x.shape[:1], x.dtype)
  state = square_queries(fn, x, y, keys, active, eps, (x, zeros, zeros), -1, n_queries, norm=norm,
                         n_queries=n_queries, p_init=p_init, rescale_schedule=rescale_schedule)
  return state[0]


@partial(jax.jit, static_argnames=('norm', 'n_queries', 'n_restarts', 'p_init', 'rescale_schedule'))
def square_core(fn, x, y, keys, active, eps, *, norm, n_queries, n_restarts, p_init,
                rescale_schedule):
  """Batched Square attack on the points ``active`` and correctly classified; returns
  ``(x_adv, robust)``. :func:`twins_jax.autoattack.autoattack` instead runs
  :func:`square_batch` on the points left."""
  acc = active & (jnp.argmax(fn(x), -1) == y)

  def body(j, state):

    def run(state):
      adv, acc = state
      adv_curr = square_single_run(fn, x, y, fold_all(keys,
                                                      j), acc, eps, norm=norm, n_queries=n_queries,
                                   p_init=p_init, rescale_schedule=rescale_schedule)
      fooled = acc & (jnp.argmax(fn(adv_curr), -1) != y)
      return where_ex(fooled, adv_curr, adv), acc & ~fooled

    return lax.cond(jnp.any(state[1]), run, lambda s: s, state)

  return lax.fori_loop(0, n_restarts, body, (x, acc))


@partial(jax.jit, static_argnames=('norm', 'n_queries', 'p_init', 'rescale_schedule'))
def square_batch(fn, x, y, index, active, x_best, margin_min, loss_min, key, eps, j, start, stop, *,
                 norm, n_queries, p_init, rescale_schedule):
  """:func:`square_queries` of run ``j`` on one batch of the suite (example keys
  ``fold_in(key, index)``, then ``j``); ``start``/``stop`` are traced, so every query
  range, the starting point (``start = -1``) included, shares one compiled program
  per batch size."""
  keys = fold_all(example_keys(key, x.shape[0], index), j)
  return square_queries(fn, x, y, keys, active, eps, (x_best, margin_min, loss_min), start, stop,
                        norm=norm, n_queries=n_queries, p_init=p_init,
                        rescale_schedule=rescale_schedule)


def square(logits_fn: Callable, x, y, key, *, norm: str = 'Linf', eps: float, n_queries: int = 5000,
           n_restarts: int = 1, p_init: float = .8, rescale_schedule: bool = False, active=None):
  """Square attack (score-based, margin loss) with AutoAttack's settings as defaults.

  Arguments as for :func:`twins_jax.autoattack.apgd`; images must be ``(N, H, W, C)``.
  Returns adversarial images where found (inside the ball and [0, 1]), else clean.
  """
  return square_with_robust(logits_fn, x, y, key, norm=norm, eps=eps, n_queries=n_queries,
                            n_restarts=n_restarts, p_init=p_init, rescale_schedule=rescale_schedule,
                            active=active)[0]


def square_with_robust(logits_fn, x, y, key, *, norm='Linf', eps, n_queries=5000, n_restarts=1,
                       p_init=.8, rescale_schedule=False, active=None):
  """Like :func:`square` but returns ``(x_adv, robust_mask)``."""
  check_norm(norm)
  x = jnp.asarray(x, jnp.float32)
  if x.ndim != 4:
    raise ValueError('Square attack expects images of shape (N, H, W, C)')
  y = jnp.asarray(y, jnp.int32)
  n = x.shape[0]
  active = jnp.ones((n,), bool) if active is None else jnp.asarray(active, bool)
  return square_core(as_partial(logits_fn), x, y, example_keys(key, n), active, jnp.float32(eps),
                     norm=norm, n_queries=int(n_queries), n_restarts=int(n_restarts),
                     p_init=float(p_init), rescale_schedule=bool(rescale_schedule))
