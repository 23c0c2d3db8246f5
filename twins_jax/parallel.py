"""Data parallelism: one jitted step over a 1-D ``data`` mesh of every device of every host.

The batch is sharded along its first axis (``P('data')``); the training state is
replicated (``P()``). XLA's SPMD partitioner inserts the collectives: the gradient
all-reduce, and the Adaptive Net's BatchNorm statistics over the *global* batch,
which is what the single-GPU reference computes. No hand-written ``pmean`` and no
``pmap`` (in maintenance mode since JAX 0.8 and itself implemented on jit/shard_map).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
  n = mesh.devices.size
  if global_batch % n:
    from twins_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
    raise ConfigError(f'config.batch_size={global_batch} must be divisible by the number of '
                      f'devices ({n}); pick a multiple of {n}.')


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree (e.g. the training state) on every device of the mesh.

  On several hosts every process holds the same values; a process-local array (say,
  restored onto one device) cannot be moved onto other hosts' devices, so each
  process places its own host copy on its own devices.
  """
  if jax.process_count() > 1:
    tree = jax.tree.map(
        lambda a: np.asarray(a) if isinstance(a, jax.Array) and a.is_fully_addressable else a, tree)
  return jax.device_put(tree, replicated(mesh))


def shard_batch(local_batch: dict, mesh: Mesh, replicate: bool = False) -> dict:
  """Turns this process's part of the batch into global arrays sharded on ``data``.

  On one host ``local_batch`` is the whole batch; on several hosts each passes its
  own contiguous shard (host ``i`` holds rows ``i * n_local ... (i + 1) * n_local``).
  ``replicate``: every host passes the whole batch, which is placed on every device
  (for a batch that does not split evenly over the devices).
  """
  sharding = replicated(mesh) if replicate else batch_sharding(mesh)
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)),
                      local_batch)


def fetch(tree: Any) -> Any:
  """``jax.device_get`` that also works on several hosts.

  An array sharded over the devices of several processes cannot be read by one of
  them; it is all-gathered first (every process must call this, in the same order).
  """
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


def jit_train_step(train_step: Callable, mesh: Mesh, donate: bool = True,
                   shard_batch: bool = True) -> Callable:
  """``train_step(state, batch, key)`` jitted for the mesh; the state's buffers are donated.

  ``shard_batch=False``: the batch comes replicated (see :func:`shard_batch`).
  """
  repl = replicated(mesh)
  data = batch_sharding(mesh) if shard_batch else repl
  return jax.jit(train_step, in_shardings=(repl, data, repl), out_shardings=(repl, repl),
                 donate_argnums=(0,) if donate else ())


def jit_eval_step(eval_step: Callable, mesh: Mesh) -> Callable:
  """``eval_step(variables, batch, *args)`` jitted for the mesh: the batch is sharded, the
  other arguments replicated, the per-example outputs sharded."""
  repl, data = replicated(mesh), batch_sharding(mesh)
  return jax.jit(eval_step, in_shardings=(repl, data, repl, repl), out_shardings=data)
