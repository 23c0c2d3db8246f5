"""Expected failures end with one clear ``error:`` line; a workdir remembers its config; an
unreadable checkpoint falls back to the one before it.

Every class of bad input has a case here (configuration, pretrained weights, data, the
workdir). The command-line format (last line ``error: ...``, exit status 2, no traceback
unless ``--verbose``) is checked through ``main.py``; the other cases call the library and
check the kind of error and its message. ``python -m pytest -m slow tests/test_errors.py -s``
runs every bad input through ``main.py`` and prints the table of messages.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from PIL import Image

import torch_reference as tr
from helpers import run_main, subprocess_env, tiny_config
from twins_jax import checkpointing, data, errors, model_io, models, port, setup
from twins_jax import step as step_lib

# ----------------------------------------------------------------------------- fixtures


def make_folder(root: Path, classes=('a', 'b'), per_class=3, bad=()) -> Path:
  rng = np.random.default_rng(0)
  for c in classes:
    (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
      Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / c / f'{i}.png')
  for name in bad:
    (root / name).write_bytes(b'\x89PNG\r\n\x1a\n truncated')  # a PNG header, then nothing
  return root


def robustness_ckpt(path: Path, arch='tiny_resnet', num_classes=10) -> Path:
  """A MadryLab-robustness-style checkpoint (torch zip format, 'module.model.' keys)."""
  factory = {'tiny_resnet': tr.tiny_resnet, 'resnet18': tr.resnet18}[arch]
  torch.manual_seed(0)
  state = factory(num_classes=num_classes).state_dict()
  torch.save({'model': {f'module.model.{k}': v for k, v in state.items()}, 'epoch': 1}, path)
  return path


def last_line(text: str) -> str:
  lines = [l for l in text.strip().splitlines() if l.strip()]
  return lines[-1] if lines else ''


def main_args(workdir, *flags, config='configs/default.py'):
  return [sys.executable, 'main.py', f'--config={config}', f'--workdir={workdir}', *flags]


TINY_FLAGS = ('--config.arch=tiny_resnet', '--config.resize=0', '--config.dataset=digits',
              '--config.image_size=16', '--config.batch_size=16')

# ------------------------------------------------------------------- the command line


def bad_inputs(tmp: Path) -> dict:
  """name -> (main.py flags, expected error class word, text the line must contain)."""
  folder_empty = tmp / 'empty_folder'
  (folder_empty / 'cls').mkdir(parents=True)
  a_file = tmp / 'a_file'
  a_file.write_text('x')
  return {
      'unknown config key': (['--config.not_a_key=1'], 'bad flag', 'not_a_key'),
      'ill-typed value': (['--config.batch_size=abc'], 'bad flag', 'config.batch_size'),
      'value out of range': (['--config.lr=-1'], 'config', 'config.lr must be non-negative'),
      'unknown choice': (['--config.method=twins'], 'config', "config.method='twins'"),
      'impossible combination': (['--config.method=at',
                                  '--config.attack_loss=kl'], 'config', 'needs a TRADES method'),
      'eval without a model': (['--config.mode=eval'], 'config', 'needs config.pretrained'),
      'pretrained missing': ([*TINY_FLAGS, f'--config.pretrained={tmp}/nowhere.ckpt'], 'checkpoint',
                             'does not exist'),
      'pretrained not a checkpoint': ([*TINY_FLAGS,
                                       f'--config.pretrained={a_file}'], 'checkpoint', 'not'),
      'folder split empty': ([
          *TINY_FLAGS, '--config.dataset=folder', f'--config.folder_train={folder_empty}',
          f'--config.folder_test={folder_empty}'
      ], 'data', 'no image files'),
      'workdir is a file': (['--workdir_is_file'], 'workdir', 'is a file'),
  }


def run_bad_input(flags, tmp: Path, name: str, verbose=False):
  workdir = tmp / name.replace(' ', '_')
  if flags == ['--workdir_is_file']:
    workdir.write_text('not a directory')
    flags = []
  args = main_args(workdir, *flags) + (['--verbose'] if verbose else [])
  return run_main(args, subprocess_env(), timeout=300)


@pytest.mark.parametrize('name', [
    'unknown config key', 'value out of range', 'pretrained missing', 'folder split empty',
    'workdir is a file'
])
def test_main_ends_with_one_error_line(name, tmp_path):
  flags, _, text = bad_inputs(tmp_path)[name]
  proc = run_bad_input(flags, tmp_path, name)
  line = last_line(proc.stderr)
  assert proc.returncode == errors.EXIT_USER_ERROR, proc.stderr[-3000:]
  assert line.startswith('error: ') and text in line, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]


def test_verbose_shows_the_traceback(tmp_path):
  flags, _, text = bad_inputs(tmp_path)['pretrained missing']
  proc = run_bad_input(flags, tmp_path, 'pretrained missing', verbose=True)
  assert proc.returncode == errors.EXIT_USER_ERROR
  assert 'Traceback' in proc.stderr and last_line(proc.stderr).startswith('error: ')


@pytest.mark.slow
def test_every_bad_input_through_main(tmp_path):
  """Prints the table of every bad input and the line it gets (run with -s)."""
  rows = []
  for name, (flags, _, text) in bad_inputs(tmp_path).items():
    proc = run_bad_input(flags, tmp_path, name)
    line = last_line(proc.stderr)
    rows.append(f'| {name} | `{" ".join(flags)}` | {proc.returncode} | `{line}` |')
    assert proc.returncode == errors.EXIT_USER_ERROR and line.startswith('error: '), (name, line)
    assert text in line and 'Traceback' not in proc.stderr, (name, proc.stderr[-2000:])
  print('\n| bad input | flags | exit | last line |\n|---|---|---|---|\n' + '\n'.join(rows))


# ------------------------------------------------------------------------ configuration


@pytest.mark.parametrize('overrides, match', [
    (dict(arch='resnet7'), "config.arch='resnet7'"),
    (dict(norm='L3'), "config.norm='L3'"),
    (dict(eval_batch_size=0), 'config.eval_batch_size must be at least 1'),
    (dict(momentum=1.0), 'config.momentum'),
    (dict(eps=8.0), 'pixel units'),
    (dict(method='at', share_affine=True), 'share_affine'),
])
def test_configuration_errors(overrides, match):
  with pytest.raises(errors.ConfigError, match=match):
    setup.check_config(tiny_config(**overrides))


# ------------------------------------------------------------------ pretrained weights


def _initial(tmp_path, pretrained, **overrides):
  config = tiny_config(pretrained=str(pretrained), **overrides)
  return setup.initial_variables(config, setup.model_spec(config, 10))


def test_pretrained_weights_errors(tmp_path):
  with pytest.raises(errors.CheckpointError, match='does not exist'):
    _initial(tmp_path, tmp_path / 'missing.ckpt')
  junk = tmp_path / 'junk.ckpt'
  junk.write_bytes(os.urandom(256))
  with pytest.raises(errors.CheckpointError):
    _initial(tmp_path, junk)
  # Truncated: a zip checkpoint cut in half (a download that stopped).
  good = robustness_ckpt(tmp_path / 'good.ckpt')
  cut = tmp_path / 'cut.ckpt'
  cut.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
  with pytest.raises(errors.CheckpointError):
    _initial(tmp_path, cut)
  # The wrong architecture: a ResNet-18 checkpoint for the tiny ResNet, by name.
  with pytest.raises(port.PortError, match='mis-shaped|missing|unexpected'):
    _initial(tmp_path, robustness_ckpt(tmp_path / 'r18.ckpt', 'resnet18'))
  # The right one loads.
  variables, source = _initial(tmp_path, good)
  assert 'ported' in source and 'params' in variables


def test_model_directory_errors(tmp_path):
  spec = models.ModelSpec('tiny_resnet', 3)
  variables = jax.device_get(models.init_variables(spec.build(), 0))
  model_io.save_model_dir(tmp_path / 'm', variables, spec)
  # A wrong architecture for the run.
  with pytest.raises(errors.CheckpointError, match='set --config.arch=tiny_resnet'):
    _initial(tmp_path, tmp_path / 'm', arch='resnet18')
  # A wrong class count in evaluation.
  from twins_jax import evaluate
  config = tiny_config(mode='eval', pretrained=str(tmp_path / 'm'))
  with pytest.raises(errors.CheckpointError, match='3-class head but digits has 10'):
    evaluate.evaluate_config(config, tmp_path / 'eval')
  # A corrupt directory: every array file cut short, as by an interrupted copy.
  _corrupt(tmp_path / 'm' / 'variables')
  with pytest.raises(model_io.ModelDirError) as err:
    model_io.load_model_dir(tmp_path / 'm')
  assert 'incomplete or corrupt' in str(err.value) and '\n' not in str(err.value)
  assert err.value.details  # the differences, by name


# ------------------------------------------------------------------------------- data


def test_data_errors_name_the_problem(tmp_path, caplog):
  train = make_folder(tmp_path / 'train', bad=('b/9.png',))
  test = make_folder(tmp_path / 'test')
  config = dict(dataset='folder', folder_train=str(train), folder_test=str(test), image_size=8)
  ds = data.build_datasets(config)
  with pytest.raises(errors.DataError, match=r'cannot read the image .*b/9\.png.*skip_bad_images'):
    list(ds.train_batches(ds.train_plan(7), num_steps=1))
  # The switch leaves it out and says how many it skipped.
  with caplog.at_level(logging.WARNING, logger='twins_jax'):
    ds = data.build_datasets(dict(config, skip_bad_images=True))
  assert len(ds.train) == 6 and 'skipped 1 unreadable image' in caplog.text
  (batch,) = list(ds.train_batches(ds.train_plan(6), num_steps=1))
  assert batch['image'].shape == (6, 8, 8, 3)
  # A missing or empty split.
  empty = tmp_path / 'empty'
  (empty / 'a').mkdir(parents=True)
  with pytest.raises(errors.DataError, match='no image files'):
    data.build_datasets(dict(config, folder_test=str(empty)))
  with pytest.raises(errors.DataError, match='does not exist|not an existing directory'):
    data.build_datasets(dict(config, folder_train=str(tmp_path / 'nowhere')))
  with pytest.raises(errors.DataError, match='cifar10.*cannot be read'):
    data.build_datasets(dict(dataset='cifar10', data_dir=str(tmp_path / 'no_tfds')))


# ---------------------------------------------------------------------------- workdir


def test_workdir_errors(tmp_path, monkeypatch):
  config = tiny_config()
  a_file = tmp_path / 'file'
  a_file.write_text('')
  with pytest.raises(errors.WorkdirError, match='is a file'):
    setup.prepare_workdir(config, a_file)
  with pytest.raises(errors.WorkdirError, match='cannot write'):
    setup.prepare_workdir(config, a_file / 'sub')  # its parent is a file
  # A full disk while saving a checkpoint: one line that says so and how to go on.
  spec = models.ModelSpec('tiny_resnet', 3)
  tx, _ = step_lib.make_optimizer(0.1, 0.0)
  state = step_lib.TrainState.create(models.init_variables(spec.build(), 0), tx)

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device')

  ckpts = checkpointing.RunCheckpoints(tmp_path / 'w', async_save=False)
  monkeypatch.setattr(ocp.CheckpointManager, 'save', full)
  with pytest.raises(errors.WorkdirError, match='the disk is full while saving the checkpoint'):
    ckpts.save(1, state, {})
  monkeypatch.setattr(model_io, 'save_model_dir', full)
  with pytest.raises(errors.WorkdirError, match='the disk is full while saving'):
    checkpointing.save_best_model(tmp_path / 'w', state.variables, spec, {})


def _tree(path: Path) -> dict:
  return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob('*')) if p.is_file()}


def test_workdir_remembers_the_config_that_made_it(tmp_path, caplog):
  config = tiny_config()
  workdir = setup.prepare_workdir(config, tmp_path / 'run')
  (workdir / 'checkpoints' / '25').mkdir(parents=True)  # the run has started
  (workdir / 'checkpoints' / '25' / 'marker').write_text('state')
  before = _tree(workdir)
  changed = tiny_config(method='at', pretrained='other.ckpt', seed=3, eps=0.1)
  with pytest.raises(errors.WorkdirError) as err:
    setup.prepare_workdir(changed, workdir)
  message = str(err.value)
  for key in ('method', 'pretrained', 'seed', 'eps'):
    assert key in message and key in err.value.details
  assert '\n' not in message
  assert _tree(workdir) == before  # a refused command changes nothing
  # How the run goes may change (logged): logging, checkpoints, more epochs, evaluation.
  safe = tiny_config(log_every_steps=7, num_epochs=3, autoattack='fast', keep_checkpoints=5)
  with caplog.at_level(logging.INFO, logger='twins_jax'):
    setup.prepare_workdir(safe, workdir)
  assert 'num_epochs changed: 1 -> 3' in caplog.text
  assert json.loads((workdir / 'config.json').read_text())['num_epochs'] == 3
  # A workdir where nothing ran yet takes any config (e.g. after fixing a data path).
  fresh = setup.prepare_workdir(config, tmp_path / 'fresh')
  setup.prepare_workdir(changed, fresh)


# --------------------------------------------------------------- checkpoint fallback


def _states(n):
  spec = models.ModelSpec('tiny_resnet', 3)
  tx, _ = step_lib.make_optimizer(0.1, 0.0)
  base = step_lib.TrainState.create(models.init_variables(spec.build(), 0), tx)
  return tx, spec, [base.replace(step=jax.numpy.asarray(i, jax.numpy.int32)) for i in range(n)]


def _corrupt(directory: Path) -> None:
  """Cuts the array data files of an Orbax checkpoint short (a disk that filled mid-write)."""
  cut = [f for f in directory.rglob('*') if f.is_file() and f.parent.name == 'd']
  assert cut, f'no data files under {directory}'
  for f in cut:
    f.write_bytes(f.read_bytes()[:8])


def test_unreadable_latest_checkpoint_falls_back(tmp_path, caplog):
  tx, spec, states = _states(3)
  ckpts = checkpointing.RunCheckpoints(tmp_path, async_save=False)
  for step in (1, 2):
    ckpts.save(step, states[step], {'history': [step]})
  ckpts.wait()
  abstract = jax.eval_shape(lambda: states[0])
  _corrupt(tmp_path / 'checkpoints' / '2' / 'state')
  with caplog.at_level(logging.WARNING, logger='twins_jax'):
    state, progress = checkpointing.RunCheckpoints(tmp_path).restore_latest(abstract)
  assert int(state.step) == 1 and progress == {'history': [1]}
  assert 'step 2' in caplog.text and 'falling back' in caplog.text
  # The unreadable one is set aside, so the run can write that step again.
  assert (tmp_path / 'checkpoints.unreadable' / '2').is_dir()
  assert checkpointing.RunCheckpoints(tmp_path).all_steps() == [1]
  # None readable: an error, never a silent fresh start.
  _corrupt(tmp_path / 'checkpoints' / '1' / 'state')
  with pytest.raises(errors.WorkdirError, match='none of the checkpoints'):
    checkpointing.RunCheckpoints(tmp_path).restore_latest(abstract)
  assert checkpointing.RunCheckpoints(tmp_path / 'new').restore_latest(abstract) is None
