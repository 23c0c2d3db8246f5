"""Orbax checkpoints of a training run: periodic, asynchronous, last-N plus the best.

``workdir/checkpoints/<step>/`` holds the :class:`~twins_jax.step.TrainState` and a
JSON record of the run's progress (the validation history and the best result so
far). Because every training batch is a pure function of ``(seed, step)``, the step
number alone is the input pipeline's position: restoring a checkpoint and
continuing gives exactly the run that was interrupted.

``workdir/final_model/`` (the model the run ends with, what the reference reports) and,
when a validation split is held out, ``workdir/best_model/`` (the best validation robust
accuracy) are model directories (:mod:`twins_jax.model_io`), each replaced atomically.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from twins_jax import model_io, models


class RunCheckpoints:
  """Periodic training-state checkpoints of one workdir (keeps the last ``keep``)."""

  def __init__(self, workdir: str | os.PathLike, keep: int = 3, async_save: bool = True):
    if keep < 1:
      raise ValueError(f'keep must be >= 1, got {keep}.')
    self.directory = Path(workdir).absolute() / 'checkpoints'
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'progress'))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, progress: dict) -> None:
    """Starts an asynchronous save (the previous one is finished first).

    ``progress`` is copied: Orbax may serialise it in the background, after the caller has
    moved on and appended to it.
    """
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

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
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
  model_io.save_model_dir(tmp, variables, spec, metadata)  # ends with a barrier
  if jax.process_index() == 0:
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
      os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
  model_io._barrier(f'twins_jax.save_{name}')
  return final
