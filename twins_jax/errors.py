"""Expected failures: what a user did wrong or must fix, as opposed to bugs.

Every error a user can cause (a bad config value, a checkpoint that is not one, a dataset
that is not prepared, a workdir that cannot be written) is a :class:`UserError`. The
command-line entry points print it as one line, ``error: <what is wrong and how to fix
it>``, after any ``details`` (a command to run, a list of differences), and exit with
status 2; every other exception is a bug and keeps its traceback. ``--verbose`` (or
``TWINS_VERBOSE=1``) shows the traceback of a UserError too.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, Optional

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 143  # 128 + SIGTERM: the run was stopped, re-run the command to resume


class UserError(Exception):
  """An expected failure. ``str(e)`` is one line naming the problem and the fix;
  ``details`` (optional, several lines) is printed before it."""

  def __init__(self, message: str, details: Optional[str] = None):
    super().__init__(message)
    self.details = details


class ConfigError(UserError, ValueError):
  """A config value that cannot work (unknown, ill-typed, out of range, contradictory)."""


class DataError(UserError, ValueError):
  """A dataset that is missing, empty, not prepared, or holds an unreadable image."""


class CheckpointError(UserError, ValueError):
  """Pre-trained weights or a model directory that cannot be used."""


class WorkdirError(UserError, OSError):
  """A workdir that cannot be used: a file, not writable, full, or made by another run."""


class Preempted(UserError):
  """The run was asked to stop (SIGTERM); its state is saved and re-running resumes it."""


def verbose(argv=None) -> bool:
  argv = sys.argv if argv is None else argv
  return '--verbose' in argv or os.environ.get('TWINS_VERBOSE', '') not in ('', '0')


def one_line(error: BaseException) -> str:
  """The message of ``error`` on one line."""
  text = ' '.join(str(error).split())
  return text or type(error).__name__


def report(error: BaseException, show_traceback: bool = False, stream=None) -> int:
  """Prints an expected failure (details, then ``error: ...``); returns the exit status."""
  stream = stream or sys.stderr
  if show_traceback:
    traceback.print_exception(error, file=stream)
  details = getattr(error, 'details', None)
  if details:
    lines = details.rstrip().splitlines()
    if len(lines) > 25:
      lines = lines[:20] + [f'  ... ({len(lines) - 20} more lines)']
    print('\n'.join(lines), file=stream)
  print(f'error: {one_line(error)}', file=stream)
  return EXIT_PREEMPTED if isinstance(error, Preempted) else EXIT_USER_ERROR


def disk_full_error(error: OSError, what: str) -> Optional[WorkdirError]:
  """A :class:`WorkdirError` for an out-of-space or read-only-filesystem ``OSError``."""
  import errno  # pylint: disable=g-import-not-at-top
  if error.errno == errno.ENOSPC:
    return WorkdirError(f'the disk is full while {what}; free some space and re-run the same '
                        'command to resume from the last complete checkpoint.')
  if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
    return WorkdirError(f'cannot write while {what}: {error.strerror} ({error.filename}); '
                        'choose a writable --workdir.')
  return None


def _closed_loop_noise(exc: BaseException) -> bool:
  return isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed'


def drop_closed_loop_noise() -> None:
  """Keeps one known piece of noise off a command line's stderr (for CLIs, at start).

  When Orbax fails to read a corrupt checkpoint, TensorStore reads still in flight complete
  into Orbax's already closed asyncio loop, and their threads print ``RuntimeError: Event
  loop is closed`` tracebacks, often after our one-line error. Those exceptions (and only
  those) go to the debug log; every other exception is printed as before.
  """
  import logging  # pylint: disable=g-import-not-at-top
  log = logging.getLogger('twins_jax')
  excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

  def on_exception(exc_type, exc, tb):
    if _closed_loop_noise(exc):
      log.debug('dropped from stderr: %r (a read still in flight after a failed one)', exc)
    else:
      excepthook(exc_type, exc, tb)

  def on_unraisable(unraisable):
    if _closed_loop_noise(unraisable.exc_value):
      log.debug('dropped from stderr: %r (a read still in flight after a failed one)',
                unraisable.exc_value)
    else:
      unraisablehook(unraisable)

  if not getattr(sys.excepthook, 'drops_closed_loop_noise', False):
    on_exception.drops_closed_loop_noise = True
    sys.excepthook, sys.unraisablehook = on_exception, on_unraisable


def cli_parser(script: str, module: str, description: str):
  """The argument parser of a command installed as the console script ``script`` and also run
  as ``python -m module``: its usage names the way it was started."""
  import argparse  # pylint: disable=g-import-not-at-top
  installed = os.path.basename(sys.argv[0]) == script
  return argparse.ArgumentParser(prog=script if installed else f'python -m {module}',
                                 description=description)


def run_cli(main: Callable[[], int], argv=None) -> int:
  """Runs a command-line ``main`` and turns a :class:`UserError` into one ``error:`` line."""
  drop_closed_loop_noise()
  try:
    return main()
  except UserError as e:
    return report(e, show_traceback=verbose(argv))
