"""The four fine-tuning objectives: TWINS-AT, TWINS-TRADES, AT and TRADES.

Semantics are those of the reference (twins-reference.md, section 2):

* the batch of N examples is split at ``h = N // 2``: the first ``h`` go through the
  **Frozen Net** (pre-training BN statistics), the other ``N - h`` through the
  **Adaptive Net** in train mode (batch statistics, running statistics updated);
* TWINS-AT: ``lambda * CE(frozen) + CE(adaptive)``, each a mean over its half;
* TWINS-TRADES: the adversarial batch and then the clean batch each go through the
  split forward (adversarial first, as the official ``train-TWINS-TRADES.py``: the
  Adaptive running statistics are updated with the adversarial half first);
  ``L_nat + beta * L_rob`` where each half's KL is summed and divided by the batch
  size N, the Frozen term weighted by ``lambda``;
* AT and TRADES are the same losses on an ordinary network (the Adaptive Net alone);
  TRADES also runs the adversarial forward before the clean one
  (``AT_cifar/train-TRADES.py``).

Each function takes ``forward(batch_stats, x, mode) -> (logits, batch_stats)`` (the
Adaptive Net's running statistics go in and the updated ones come out, see
:mod:`twins_jax.step`), the running statistics, the clean and adversarial batches and the
labels, and returns ``(loss, batch_stats, metrics)``: the statistics after every forward
the objective ran, in order, and a dict of per-branch metrics.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from twins_jax.models import FROZEN, TRAIN

METHODS = ('twins_at', 'twins_trades', 'at', 'trades')
TWIN_METHODS = ('twins_at', 'twins_trades')

Stats = Any  # the Adaptive Net's running statistics (the 'batch_stats' collection)
Forward = Callable[[Stats, jax.Array, str], tuple[jax.Array, Stats]]


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def kl_sum(adv_logits: jax.Array, nat_logits: jax.Array) -> jax.Array:
  """``sum q * (log q - log p)`` over examples and classes; q clean, p adversarial."""
  log_q = jax.nn.log_softmax(nat_logits)
  log_p = jax.nn.log_softmax(adv_logits)
  return jnp.sum(jnp.exp(log_q) * (log_q - log_p))


def accuracy(logits: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits, -1) == y)


def split(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The Frozen half (first ``N // 2``) and the Adaptive half (the rest)."""
  h = x.shape[0] // 2
  return x[:h], x[h:]


def split_forward(forward: Forward, stats: Stats, x: jax.Array):
  """``((frozen_logits, adaptive_logits), stats)``: the Frozen Net on the first half of
  ``x``, the Adaptive Net (train mode, statistics updated) on the rest."""
  x_frozen, x_adaptive = split(x)
  logits_f, stats = forward(stats, x_frozen, FROZEN)  # the Frozen Net updates nothing
  logits_a, stats = forward(stats, x_adaptive, TRAIN)
  return (logits_f, logits_a), stats


def twins_at(forward: Forward, stats: Stats, x_nat, x_adv, y, *, lambda_twins: float, beta: float):
  del x_nat, beta
  y_f, y_a = split(y)
  (logits_f, logits_a), stats = split_forward(forward, stats, x_adv)
  loss_f, loss_a = cross_entropy(logits_f, y_f), cross_entropy(logits_a, y_a)
  loss = lambda_twins * loss_f + loss_a
  return loss, stats, dict(loss=loss, frozen_loss=loss_f, adaptive_loss=loss_a,
                           frozen_adv_acc=accuracy(logits_f,
                                                   y_f), adaptive_adv_acc=accuracy(logits_a, y_a))


def twins_trades(forward: Forward, stats: Stats, x_nat, x_adv, y, *, lambda_twins: float,
                 beta: float):
  n = x_nat.shape[0]
  y_f, y_a = split(y)
  # Adversarial first, as the official script: see the module docstring.
  (adv_f, adv_a), stats = split_forward(forward, stats, x_adv)
  (nat_f, nat_a), stats = split_forward(forward, stats, x_nat)
  nat_loss_f, nat_loss_a = cross_entropy(nat_f, y_f), cross_entropy(nat_a, y_a)
  rob_loss_f, rob_loss_a = kl_sum(adv_f, nat_f) / n, kl_sum(adv_a, nat_a) / n
  loss_nat = lambda_twins * nat_loss_f + nat_loss_a
  loss_rob = lambda_twins * rob_loss_f + rob_loss_a
  loss = loss_nat + beta * loss_rob
  return loss, stats, dict(loss=loss, natural_loss=loss_nat, robust_loss=loss_rob,
                           frozen_loss=nat_loss_f + beta * rob_loss_f,
                           adaptive_loss=nat_loss_a + beta * rob_loss_a,
                           frozen_clean_acc=accuracy(nat_f,
                                                     y_f), adaptive_clean_acc=accuracy(nat_a, y_a),
                           frozen_adv_acc=accuracy(adv_f,
                                                   y_f), adaptive_adv_acc=accuracy(adv_a, y_a))


def at(forward: Forward, stats: Stats, x_nat, x_adv, y, *, lambda_twins: float, beta: float):
  del x_nat, lambda_twins, beta
  logits, stats = forward(stats, x_adv, TRAIN)
  loss = cross_entropy(logits, y)
  return loss, stats, dict(loss=loss, adaptive_loss=loss, adaptive_adv_acc=accuracy(logits, y))


def trades(forward: Forward, stats: Stats, x_nat, x_adv, y, *, lambda_twins: float, beta: float):
  del lambda_twins
  adv, stats = forward(stats, x_adv, TRAIN)  # adversarial first, as the official script
  nat, stats = forward(stats, x_nat, TRAIN)
  loss_nat = cross_entropy(nat, y)
  loss_rob = kl_sum(adv, nat) / x_nat.shape[0]
  loss = loss_nat + beta * loss_rob
  return loss, stats, dict(loss=loss, natural_loss=loss_nat, robust_loss=loss_rob,
                           adaptive_loss=loss, adaptive_clean_acc=accuracy(nat, y),
                           adaptive_adv_acc=accuracy(adv, y))


OBJECTIVES = dict(twins_at=twins_at, twins_trades=twins_trades, at=at, trades=trades)


def get_objective(method: str):
  if method not in OBJECTIVES:
    raise ValueError(f'Unknown method {method!r}; choose one of {METHODS}.')
  return OBJECTIVES[method]
