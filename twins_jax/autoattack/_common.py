"""Helpers shared by the AutoAttack components (keys, norms, model wrapping)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

NORMS = ('Linf', 'L2')
# Spelling of the reference implementation: numerical guard added to norms.
TINY = 1e-12


def check_norm(norm: str) -> None:
  if norm not in NORMS:
    raise ValueError(f'norm must be one of {NORMS}, got {norm!r}')


def as_partial(logits_fn: Callable) -> Partial:
  """Wraps ``logits_fn`` as a pytree so it can be an ordinary ``jit`` argument.

  A ``jax.tree_util.Partial(apply_fn, params)`` is passed through unchanged: its
  bound arguments (the parameters) are then traced like any other input instead of
  being baked into the compiled program as constants, and a new set of parameters
  does not trigger a recompilation. A plain function is wrapped in an argument-less
  ``Partial``; compilations are then cached by the function's identity.
  """
  if isinstance(logits_fn, Partial):
    return logits_fn
  return Partial(logits_fn)


def _typed(key):
  if isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  key = jnp.asarray(key)
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  return jax.random.wrap_key_data(key.astype(jnp.uint32))


def example_keys(key, n: int, index=None):
  """Per-example keys of shape ``(n,)`` (typed key array).

  ``key`` is either a single key (typed, or a raw ``uint32[2]`` ``PRNGKey``) or
  already one key per example (shape ``(n,)`` typed or ``(n, 2)`` raw). A single key
  is folded with the example's index (``index`` if given, else ``arange(n)``), so an
  example's randomness does not depend on which other examples share its batch.
  """
  key = _typed(key)
  if key.ndim == 0:
    if index is None:
      index = jnp.arange(n)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(index))
  if key.shape != (n,):
    raise ValueError(f'expected a single key or {n} keys, got key shape {key.shape}')
  return key


def fold_all(keys, data):
  """``fold_in`` every per-example key with the same (traced) integer."""
  return jax.vmap(lambda k: jax.random.fold_in(k, data))(keys)


def uniform_per_example(keys, shape, minval=0., maxval=1.):
  """One ``U[minval, maxval)`` draw of ``shape`` per example key -> ``(N, *shape)``.

  Traced with the non-partitionable threefry variant: on XLA:CPU it compiles about
  three times faster than the default one, and since every example draws from its own
  key the batch axis stays trivially shardable.
  """
  with jax.threefry_partitionable(False):
    return jax.vmap(lambda k: jax.random.uniform(k, shape, jnp.float32, minval, maxval))(keys)


def normal_per_example(keys, shape):
  """One standard normal draw of ``shape`` per example key -> ``(N, *shape)``."""
  with jax.threefry_partitionable(False):
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def bcast(v, x):
  """Reshapes a per-example vector ``(N,)`` to broadcast against ``x``."""
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def flat_norm(v, norm: str):
  """Per-example Linf / L2 norm over all non-batch axes."""
  axes = tuple(range(1, v.ndim))
  if norm == 'Linf':
    return jnp.max(jnp.abs(v), axis=axes)
  return jnp.sqrt(jnp.sum(v * v, axis=axes))


def normalize(v, norm: str):
  """``v / (||v|| + 1e-12)`` per example, as in the reference."""
  return v / bcast(flat_norm(v, norm) + TINY, v)


def predict(fn, x):
  return jnp.argmax(fn(x), axis=-1)


def where_ex(mask, a, b):
  """Per-example select: ``mask`` (N,) chooses between arrays of shape (N, ...)."""
  return jnp.where(bcast(mask, a), a, b)
