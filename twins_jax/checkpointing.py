"""Orbax checkpoints of a training run: periodic, asynchronous, last-N plus the best.

``workdir/checkpoints/<step>/`` holds the :class:`~twins_jax.step.TrainState` and a
JSON record of the run's progress (the validation history and the best result so
far). Because every training batch is a pure function of ``(seed, step)``, the step
number alone is the input pipeline's position: restoring a checkpoint and
continuing gives exactly the run that was interrupted.

A checkpoint that cannot be read (a disk that filled, or a kill, mid-write) is skipped with
a warning for the one before it (:meth:`RunCheckpoints.restore_latest`), never silently
for a fresh start. A full disk or a read-only workdir while saving is a
:class:`~twins_jax.errors.WorkdirError` (one line, no traceback).

``workdir/final_model/`` (the model the run ends with, what the reference reports) and,
when a validation split is held out, ``workdir/best_model/`` (the best validation robust
accuracy) are model directories (:mod:`twins_jax.model_io`), each replaced atomically.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from twins_jax import errors, model_io, models

log = logging.getLogger('twins_jax')


@contextlib.contextmanager
def _writing(what: str):
  """Turns a full disk or an unwritable workdir into a one-line WorkdirError."""
  try:
    yield
  except OSError as e:
    error = errors.disk_full_error(e, what)
    if error is None:
      raise
    raise error from e
  except Exception as e:  # Orbax wraps errors of its background writer in other types
    cause = e
    while cause is not None and not isinstance(cause, OSError):
      cause = cause.__cause__ or cause.__context__
    error = errors.disk_full_error(cause, what) if cause is not None else None
    if error is None:
      raise
    raise error from e


class RunCheckpoints:
  """Periodic training-state checkpoints of one workdir (keeps the last ``keep``)."""

  def __init__(self, workdir: str | os.PathLike, keep: int = 3, async_save: bool = True):
    if keep < 1:
      raise ValueError(f'keep must be >= 1, got {keep}.')
    self.directory = Path(workdir).absolute() / 'checkpoints'
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    with _writing(f'creating {self.directory}'):
      self.manager = ocp.CheckpointManager(self.directory, options=options,
                                           item_names=('state', 'progress'))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, progress: dict) -> None:
    """Starts an asynchronous save (the previous one is finished first).

    ``progress`` is copied: Orbax may serialise it in the background, after the caller has
    moved on and appended to it.
    """
    with _writing(f'saving the checkpoint of step {step} in {self.directory}'):
      self.manager.save(
          step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        progress=ocp.args.JsonSave(copy.deepcopy(progress))),
          force=True)

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict]:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    out = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      progress=ocp.args.JsonRestore()))
    return out['state'], dict(out['progress'])

  def restore_latest(self, abstract_state: Any) -> Optional[tuple[Any, dict]]:
    """The latest checkpoint that can be read, or None when there is none at all.

    A checkpoint that cannot be read (truncated or corrupt files, e.g. the disk filled while
    it was written) is skipped with a warning for the one before it, and moved aside to
    ``checkpoints.unreadable/`` (the run will write that step again). If checkpoints exist
    but none can be read, that is an error: the run is never silently restarted.
    """
    steps = self.all_steps()
    unreadable = []
    for step in reversed(steps):
      try:
        restored = self.restore(abstract_state, step)
      except Exception as e:  # pylint: disable=broad-except  (Orbax/TensorStore raise many)
        log.warning(
            'The checkpoint of step %d in %s cannot be read (%s); falling back to the '
            'one before it.', step, self.directory,
            errors.one_line(e)[:300])
        unreadable.append(step)
        continue
      self._set_aside(unreadable)
      return restored
    if steps:
      raise errors.WorkdirError(
          f'none of the checkpoints in {self.directory} (steps {steps}) can be read; move that '
          'folder away to start the run over, or use another --workdir.')
    return None

  def _set_aside(self, steps: list[int]) -> None:
    if not steps:
      return
    if jax.process_index() == 0:
      aside = self.directory.with_name('checkpoints.unreadable')
      aside.mkdir(exist_ok=True)
      for step in steps:
        target = aside / str(step)
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(self.directory / str(step)), str(target))
        log.warning('Moved the unreadable checkpoint of step %d to %s.', step, target)
    model_io._barrier('twins_jax.checkpoints.set_aside')  # pylint: disable=protected-access
    self.manager.reload()

  def wait(self) -> None:
    with _writing(f'saving a checkpoint in {self.directory}'):
      self.manager.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self.manager.close()


def recover_best_model(workdir, name: str = 'best_model') -> Optional[Path]:
  """Puts back ``workdir/<name>`` if a save was killed between its two renames.

  :func:`save_best_model` moves the previous model aside to ``<name>.old`` before renaming
  the new one into place; a kill in between leaves only ``<name>.old`` (complete).
  Returns the recovered directory, or None when there was nothing to recover.
  """
  workdir = Path(workdir).absolute()
  final, old = workdir / name, workdir / f'{name}.old'
  if jax.process_index() != 0 or final.exists() or not old.is_dir():
    return None
  os.replace(old, final)
  return final


def save_best_model(workdir, variables: dict, spec: models.ModelSpec, metadata: dict,
                    name: str = 'best_model') -> Path:
  """Writes the model directory ``workdir/<name>`` atomically: to a temporary directory,
  then renamed (``name``: ``best_model`` or ``final_model``).

  Every process calls it (Orbax writes each process's share); process 0 renames.
  """
  workdir = Path(workdir).absolute()
  final, tmp, old = workdir / name, workdir / f'{name}.tmp', workdir / f'{name}.old'
  if jax.process_index() == 0:
    shutil.rmtree(tmp, ignore_errors=True)  # left over by an interrupted save
  model_io._barrier(f'twins_jax.save_{name}.clean')  # before the others look at tmp
  with _writing(f'saving {final}'):
    model_io.save_model_dir(tmp, variables, spec, metadata)  # ends with a barrier
    if jax.process_index() == 0:
      shutil.rmtree(old, ignore_errors=True)
      if final.exists():
        os.replace(final, old)
      os.replace(tmp, final)
      shutil.rmtree(old, ignore_errors=True)
  model_io._barrier(f'twins_jax.save_{name}')
  return final
