"""Preemption: stop at a step every host agrees on, after saving, when SIGTERM arrives.

TPU and cloud schedulers announce a preemption with SIGTERM. With several processes
(``jax.distributed``), JAX's preemption service catches the signal on whichever host gets
it and :func:`jax.experimental.multihost_utils.reached_preemption_sync_point` returns True
on every host at the same step (the next one after the largest step any host was at).
A single process has no such service, so :class:`PreemptionWatch` catches SIGTERM itself.
Either way the training loop asks :meth:`PreemptionWatch.should_stop` after every step,
saves a checkpoint at that step and stops (:class:`~twins_jax.errors.Preempted`); the
same command resumes the run exactly there, bit for bit.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax

log = logging.getLogger('twins_jax')


def _distributed() -> bool:
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return jax.process_count() > 1 and distributed.global_state.client is not None


class PreemptionWatch:
  """Notices a preemption request. Use as a context manager around the training loop."""

  def __init__(self):
    self._requested = False
    self._previous = None
    self._multi = _distributed()

  def __enter__(self) -> 'PreemptionWatch':
    # With jax.distributed, JAX's preemption service owns SIGTERM.
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_signal(self, signum, frame) -> None:
    del signum, frame
    if not self._requested:
      log.warning('SIGTERM: saving a checkpoint after the current step, then stopping.')
    self._requested = True

  @property
  def requested(self) -> bool:
    """This process was asked to stop (single-process runs only)."""
    return self._requested

  def should_stop(self, step: int) -> bool:
    """Whether to save and stop after ``step``. With several processes every one must
    call this at every step; they all get True at the same step."""
    if self._multi:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self._requested
