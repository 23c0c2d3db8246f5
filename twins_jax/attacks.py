"""Projected gradient descent (Madry et al.) in Linf and L2, as small pure functions.

The loop is a ``lax.fori_loop``, so compile time does not grow with the number of
steps. Losses are summed over the batch before differentiation, so with a model
in eval mode every example's input gradient is independent of the rest of the batch.
Images live in [0, 1]; every result lies inside the eps-ball around the clean image
and inside [0, 1].

Example::

  logits_fn = lambda x: model.apply(variables, x, mode='eval')
  x_adv = jax.jit(pgd, static_argnums=0, static_argnames=(...))(logits_fn, x, y, key,
                                                               eps=8/255, ...)
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

NORMS = ('Linf', 'L2')
LOSSES = ('ce', 'kl')
STARTS = ('none', 'uniform', 'normal')

_TINY = 1e-12


def _flat_norm(v: jax.Array) -> jax.Array:
  """Per-example L2 norm, broadcastable against ``v``."""
  n = jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim)), keepdims=True))
  return n


def project(x_adv: jax.Array, x: jax.Array, eps: float, norm: str) -> jax.Array:
  """Projects onto the eps-ball around ``x`` and into [0, 1]."""
  delta = x_adv - x
  if norm == 'Linf':
    delta = jnp.clip(delta, -eps, eps)
  else:
    delta = delta * jnp.minimum(1.0, eps / (_flat_norm(delta) + _TINY))
  return jnp.clip(x + delta, 0.0, 1.0)


def random_start(key: jax.Array, x: jax.Array, eps: float, norm: str, kind: str) -> jax.Array:
  """A starting point: ``uniform`` in the eps-ball, ``normal`` (TRADES' 0.001 N(0, 1))."""
  if kind == 'none':
    return x
  if kind == 'normal':
    return jnp.clip(x + 0.001 * jax.random.normal(key, x.shape, x.dtype), 0.0, 1.0)
  if norm == 'Linf':
    delta = jax.random.uniform(key, x.shape, x.dtype, -eps, eps)
  else:  # uniform in the L2 ball: a random direction and radius eps * U^(1/d)
    k1, k2 = jax.random.split(key)
    direction = jax.random.normal(k1, x.shape, x.dtype)
    direction = direction / (_flat_norm(direction) + _TINY)
    d = x[0].size
    radius = eps * jax.random.uniform(k2, (x.shape[0],) + (1,) * (x.ndim - 1))**(1.0 / d)
    delta = direction * radius
  return project(x + delta, x, eps, norm)


def ascent_step(x_adv: jax.Array, grad: jax.Array, alpha: float, norm: str) -> jax.Array:
  """One step up the loss: the sign of the gradient (Linf) or its direction (L2)."""
  if norm == 'Linf':
    return x_adv + alpha * jnp.sign(grad)
  return x_adv + alpha * grad / (_flat_norm(grad) + _TINY)


def attack_loss(logits: jax.Array, y: jax.Array, loss: str,
                clean_logits: Optional[jax.Array] = None) -> jax.Array:
  """Summed attack objective: cross-entropy, or TRADES' KL(clean || adversarial)."""
  if loss == 'ce':
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()
  q = jax.nn.softmax(clean_logits)
  return jnp.sum(q * (jax.nn.log_softmax(clean_logits) - jax.nn.log_softmax(logits)))


def pgd(logits_fn: Callable[[jax.Array], jax.Array], x: jax.Array, y: jax.Array,
        key: Optional[jax.Array] = None, *, eps: float, alpha: float, steps: int,
        norm: str = 'Linf', loss: str = 'ce', start: str = 'uniform') -> jax.Array:
  """Projected gradient ascent on ``loss`` within the ``norm`` eps-ball around ``x``.

  Args:
    logits_fn: maps a batch of images to logits (the attacked model, eval mode).
    x: clean images in [0, 1], shape (N, ...).
    y: integer labels, shape (N,).
    key: PRNG key for the random start (unused with ``start='none'``).
    eps, alpha, steps: radius, step size and number of steps (``eps`` and ``alpha``
      may be traced scalars, so one compiled program serves every radius).
    norm: 'Linf' (signed steps) or 'L2' (normalised steps).
    loss: 'ce' (cross-entropy on ``y``) or 'kl' (TRADES: KL between the clean and
      the adversarial softmax; ``y`` is then unused).
    start: 'none', 'uniform' (in the ball) or 'normal' (TRADES' 0.001 Gaussian).

  Returns:
    Adversarial images, with no gradient flowing back to ``x``.
  """
  if norm not in NORMS:
    raise ValueError(f'norm must be one of {NORMS}, got {norm!r}.')
  if loss not in LOSSES:
    raise ValueError(f'loss must be one of {LOSSES}, got {loss!r}.')
  if start not in STARTS:
    raise ValueError(f'start must be one of {STARTS}, got {start!r}.')
  if start != 'none' and key is None:
    raise ValueError(f'start={start!r} needs a PRNG key.')
  if steps < 0 or any(isinstance(v, (int, float)) and v < 0 for v in (eps, alpha)):
    raise ValueError(f'eps, alpha and steps must be non-negative (got {eps}, {alpha}, {steps}).')

  x = jax.lax.stop_gradient(x)
  clean_logits = jax.lax.stop_gradient(logits_fn(x)) if loss == 'kl' else None
  grad_fn = jax.grad(lambda xa: attack_loss(logits_fn(xa), y, loss, clean_logits))

  def body(_, x_adv):
    x_adv = ascent_step(x_adv, grad_fn(x_adv), alpha, norm)
    return project(x_adv, x, eps, norm)

  x_adv = random_start(key, x, eps, norm, start) if start != 'none' else x
  x_adv = jax.lax.fori_loop(0, steps, body, x_adv)
  return jax.lax.stop_gradient(x_adv)
