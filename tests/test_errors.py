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
import types
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


class _Evil:
  marker = ''

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def bad_commands(tmp: Path) -> dict:
  """name -> (argv after python, text the last line must contain): main.py, port and predict
  given every kind of bad input, with the files they need built here."""
  good = robustness_ckpt(tmp / 'good.ckpt')
  cut = tmp / 'cut.ckpt'
  cut.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
  r18 = robustness_ckpt(tmp / 'r18.ckpt', 'resnet18')
  _Evil.marker = str(tmp / 'PWNED')
  evil = tmp / 'evil.pt'
  torch.save({'model': {'w': torch.ones(2)}, 'evil': _Evil()}, evil)
  spec = models.ModelSpec('tiny_resnet', 3)
  variables = jax.device_get(models.init_variables(spec.build(), 0))
  model_io.save_model_dir(tmp / 'model3', variables, spec)
  model_io.save_model_dir(tmp / 'corrupt', variables, spec)
  for f in (tmp / 'corrupt' / 'variables').rglob('*'):
    if f.is_file() and f.parent.name == 'd':
      f.write_bytes(f.read_bytes()[:8])
  bad_images = make_folder(tmp / 'bad_images', classes=('a', 'b'), bad=('b/9.png',))
  two = make_folder(tmp / 'two_classes', classes=('a', 'b'))
  (tmp / 'notes.txt').write_text('not an image')
  refused = setup.prepare_workdir(tiny_config(), tmp / 'finished')
  (refused / 'checkpoints' / '5').mkdir(parents=True)
  read_only = Path('/proc/twins_workdir')
  main = ['main.py', '--config=configs/default.py']
  tiny = list(TINY_FLAGS)
  port_cli = ['-m', 'twins_jax.port']
  predict_cli = ['-m', 'twins_jax.predict']
  w = lambda name: f'--workdir={tmp / name}'
  return {
      'main: unknown config key': (main + [w('a'), '--config.not_a_key=1'], 'not_a_key'),
      'main: ill-typed value': (main + [w('a'), '--config.batch_size=abc'], 'config.batch_size'),
      'main: value out of range': (main + [w('a'), '--config.lr=-1'], 'must be non-negative'),
      'main: unknown choice': (main + [w('a'), '--config.method=twins'], 'config.method'),
      'main: impossible combination':
          (main + [w('a'), '--config.method=at', '--config.attack_loss=kl'], 'TRADES method'),
      'main: eval without a model': (main + [w('a'), '--config.mode=eval'], 'config.pretrained'),
      'main: batch not divisible by the devices':
          (main + [w('a'), *tiny, '--config.batch_size=10'], 'divisible'),
      'main: pretrained missing':
          (main + [w('b'), *tiny, f'--config.pretrained={tmp}/no.ckpt'], 'does not exist'),
      'main: pretrained not a checkpoint':
          (main + [w('c'), *tiny, f'--config.pretrained={tmp}/notes.txt'], 'not'),
      'main: pretrained truncated':
          (main + [w('d'), *tiny, f'--config.pretrained={cut}'], 'cut.ckpt'),
      'main: pretrained of another architecture':
          (main + [w('e'), *tiny, f'--config.pretrained={r18}'], 'r18'),
      'main: pretrained that runs code':
          (main + [w('f'), *tiny, f'--config.pretrained={evil}'], 'os'),
      'main: wrong class count (eval)':
          (main + [w('g'), *tiny, '--config.mode=eval', f'--config.pretrained={tmp / "model3"}'],
           '3-class head'),
      'main: corrupt model directory':
          (main + [w('h'), *tiny, f'--config.pretrained={tmp / "corrupt"}'], 'incomplete or corrupt'
          ),
      'main: TFDS dataset not prepared':
          (main + [w('i'), '--config.arch=tiny_resnet', f'--config.data_dir={tmp / "no_tfds"}'],
           'cannot be read'),
      'main: empty image folder': (main + [
          w('j'), *tiny, '--config.dataset=folder', f'--config.folder_train={tmp / "notes.txt"}',
          f'--config.folder_test={tmp / "notes.txt"}'
      ], 'not an existing directory'),
      'main: unreadable image': (main + [
          w('k'), *tiny, '--config.dataset=folder', f'--config.folder_train={bad_images}',
          f'--config.folder_test={bad_images}', '--config.batch_size=8'
      ], '9.png'),
      'main: AutoAttack on 3 classes': (main + [
          w('l'), *tiny, '--config.dataset=folder', f'--config.folder_train={two}',
          f'--config.folder_test={two}', '--config.autoattack=fast'
      ], 'at least 4 classes'),
      'main: workdir is a file': (main + [f'--workdir={tmp / "notes.txt"}'], 'is a file'),
      'main: workdir not writable': (main + [f'--workdir={read_only}'], 'cannot write'),
      'main: re-run with other settings':
          (main + [f'--workdir={refused}', *tiny, '--config.method=at'], 'method'),
      'port: source missing':
          (port_cli +
           [f'{tmp}/no.ckpt', f'{tmp}/p1', '--arch', 'tiny_resnet', '--num-classes', '10'],
           'no.ckpt'),
      'port: not a checkpoint':
          (port_cli +
           [f'{tmp}/notes.txt', f'{tmp}/p2', '--arch', 'tiny_resnet', '--num-classes', '10'],
           'notes.txt'),
      'port: truncated':
          (port_cli + [str(cut), f'{tmp}/p3', '--arch', 'tiny_resnet', '--num-classes', '10'],
           'cut.ckpt'),
      'port: runs code':
          (port_cli + [str(evil), f'{tmp}/p4', '--arch', 'tiny_resnet', '--num-classes', '10'],
           'runs code|run code'),
      'port: another architecture':
          (port_cli + [str(r18), f'{tmp}/p5', '--arch', 'tiny_resnet', '--num-classes', '10'],
           'mis-shaped|missing'),
      'port: destination not empty':
          (port_cli +
           [str(good),
            str(tmp / 'model3'), '--arch', 'tiny_resnet', '--num-classes', '10'], 'not empty'),
      'predict: model missing':
          (predict_cli +
           [f'{tmp}/nowhere', '--images', str(bad_images)], 'does not exist'),
      'predict: corrupt model':
          (predict_cli + [str(tmp / 'corrupt'), '--images',
                          str(bad_images / 'a')], 'incomplete or corrupt'),
      'predict: unreadable image':
          (predict_cli + [str(tmp / 'model3'), '--images',
                          str(bad_images / 'b' / '9.png')], '9.png'),
      'predict: output of unknown type':
          (predict_cli +
           [str(tmp / 'model3'), '--images',
            str(bad_images / 'a'), '--out', f'{tmp}/o.txt'], '.npy'),
  }


@pytest.mark.slow
def test_every_bad_input(tmp_path):
  """Every bad input through main.py, port and predict: exit status 2, the last line
  ``error: ...`` naming the problem, no traceback. Prints the table (run with -s)."""
  import re
  rows, failures = [], []
  for name, (argv, text) in bad_commands(tmp_path).items():
    proc = run_main([sys.executable, *argv], subprocess_env(), timeout=600)
    line = last_line(proc.stderr)
    rows.append(f'| {name} | {proc.returncode} | {line} |')
    if not (proc.returncode == errors.EXIT_USER_ERROR and line.startswith('error: ') and
            re.search(text, line) and 'Traceback' not in proc.stderr):
      failures.append(f'{name}: exit {proc.returncode}\n{proc.stderr[-2500:]}')
  assert not (tmp_path / 'PWNED').exists()
  print('\n| bad input | exit | last line |\n|---|---|---|\n' + '\n'.join(rows))
  assert not failures, '\n\n'.join(failures)


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


def test_autoattack_needs_four_classes():
  """Refused before training, not after it (APGD-T's targeted DLR loss needs 4 classes)."""
  config = tiny_config(autoattack='fast')
  with pytest.raises(errors.ConfigError, match="needs at least 4 classes.*autoattack='none'"):
    setup.check_data(config, 3)
  setup.check_data(config, 4)
  setup.check_data(tiny_config(autoattack='none'), 2)


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


def test_only_the_closed_loop_noise_is_dropped(monkeypatch, capsys):
  """The CLIs' filter drops 'Event loop is closed' (TensorStore reads completing after a
  failed Orbax read) and passes every other exception to the previous hooks."""
  seen = []
  monkeypatch.setattr(sys, 'excepthook', lambda *exc: seen.append(exc[1]))
  monkeypatch.setattr(sys, 'unraisablehook', lambda u: seen.append(u.exc_value))
  errors.drop_closed_loop_noise()
  errors.drop_closed_loop_noise()  # installed once, not stacked
  noise, other = RuntimeError('Event loop is closed'), RuntimeError('a real failure')
  for exc in (noise, other):
    sys.excepthook(type(exc), exc, None)
    sys.unraisablehook(types.SimpleNamespace(exc_value=exc))
  assert seen == [other, other]
