"""XLA flags that speed up training on CPU, applied before JAX is imported.

XLA reads ``XLA_FLAGS`` once, when the first backend starts, so :func:`apply` must run
before anything imports (or at least initialises) JAX. Flags already present in
``XLA_FLAGS`` are left as the user set them. The ``xla_cpu_*`` flags only affect the CPU
backend, so applying them on a GPU or TPU machine changes nothing there.

See BENCHMARKS.md for the measurements behind :data:`CPU_FLAGS`.
"""

from __future__ import annotations

import os
import sys
import warnings

# Measured in BENCHMARKS.md; empty where no flag helped.
CPU_FLAGS: tuple[str, ...] = ()


def apply(flags=CPU_FLAGS) -> str:
  """Appends ``flags`` to ``XLA_FLAGS`` (those not set already); returns the result."""
  current = os.environ.get('XLA_FLAGS', '')
  if 'jax' in sys.modules and flags:
    warnings.warn('twins_jax.xla_flags.apply() called after JAX was imported: the flags only '
                  'take effect if no JAX backend has started yet.')
  set_names = {f.split('=', 1)[0] for f in current.split()}
  extra = [f for f in flags if f.split('=', 1)[0] not in set_names]
  value = ' '.join([current] + extra).strip()
  if value:
    os.environ['XLA_FLAGS'] = value
  return value
