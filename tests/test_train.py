"""Tests of whole training runs (twins_jax/train.py, main.py): artifacts, config errors,
presets, resumption, the NaN guard and evaluation padding.

Every run is tiny (tiny_resnet, 16x16 digits, PGD-1, one epoch). What costs time is XLA
compiling the training and evaluation steps, so the session shares one persistent
compilation cache (``compile_cache``) between in-process runs and ``main.py`` subprocesses,
and the runs that share a program use identical shapes and step settings (``TINY``):
the default tests compile two training steps (twins_at and at); the heavier ones are
marked ``slow``. Set ``TWINS_TEST_COMPILATION_CACHE`` to keep the cache between sessions.
"""

from __future__ import annotations

import importlib
import json
import math
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from twins_jax import checkpointing, data, model_io, models, parallel, reporting, setup, train
from helpers import (DIGITS_STEPS_PER_EPOCH, DIGITS_TEST_SIZE, DIAGNOSTICS, BRANCH_METRICS,
                     tiny_config, subprocess_env, main_command, run_main, restore_checkpoint,
                     checkpoint_steps, all_finite, assert_trees_equal)


def check_run_artifacts(workdir: Path, config, num_classes: int, train_size: int,
                        test_size: int) -> dict:
  """Everything a finished run leaves in its workdir; returns results.json."""
  method = config.method
  steps_per_epoch = train_size // config.batch_size
  total = config.num_epochs * steps_per_epoch

  # config.json: the resolved config.
  saved = json.loads((workdir / 'config.json').read_text())
  for k, v in config.to_dict().items():
    assert saved[k] == (list(v) if isinstance(v, tuple) else v), k

  # metrics.jsonl: one line per logged step, then the validation line.
  records = reporting.read_metrics(workdir)
  train_records = [r for r in records if 'train/loss' in r]
  log_every = min(config.log_every_steps, steps_per_epoch)
  expected_steps = sorted({s for s in range(1, total + 1) if s % log_every == 0} | {total})
  assert [r['step'] for r in train_records] == expected_steps
  twin = method in ('twins_at', 'twins_trades')
  groups = ('shared', 'adaptive_bn') + (('frozen_bn',) if twin else ())
  keys = (['loss', 'learning_rate', 'images_per_sec', 'epoch'] + list(BRANCH_METRICS[method]) +
          [f'{g}/{d}' for g in groups for d in DIAGNOSTICS])
  for r in train_records:
    for k in keys:
      assert math.isfinite(r[f'train/{k}']), (r['step'], k)
    assert r['train/learning_rate'] == pytest.approx(config.lr)
    assert r['train/images_per_sec'] > 0
  assert not any('frozen' in k for r in train_records for k in r) or twin
  val_records = [r for r in records if 'val/pgd_acc' in r]
  assert [r['step'] for r in val_records
         ] == [e * steps_per_epoch for e in range(1, config.num_epochs + 1)]

  # TensorBoard event file.
  events = list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  assert events and events[0].stat().st_size > 0

  # Checkpoints: the last one is the final step.
  steps = checkpoint_steps(workdir)
  assert steps and steps[-1] == total and len(steps) <= config.keep_checkpoints

  # final_model and best_model: loadable model directories.
  _, final_variables, final_meta = model_io.load_model_dir(workdir / 'final_model')
  assert final_meta['metadata']['step'] == total and all_finite(final_variables)
  model, variables, meta = model_io.load_model_dir(workdir / 'best_model')
  assert meta['spec'].arch == config.arch
  assert meta['spec'].num_classes == num_classes
  assert meta['spec'].twin == twin
  assert set(variables) == ({'params', 'batch_stats', 'frozen_stats'}
                            if twin else {'params', 'batch_stats'})
  assert all_finite(variables)

  # results.json / results.md: best and last rows; every test example counted once.
  results = json.loads((workdir / 'results.json').read_text())
  assert results['method'] == method and results['steps'] == total
  assert set(results['test']) == {'best', 'last'}
  for row in results['test'].values():
    assert row['num_examples'] == test_size
    assert 0 <= row['clean_acc'] <= 1 and 0 <= row['pgd_acc'] <= 1
  history = [{
      'step': r['step'], 'epoch': r['step'] / steps_per_epoch, 'clean_acc': r['val/clean_acc'],
      'pgd_acc': r['val/pgd_acc'], 'num_examples': int(r['val/num_examples'])
  } for r in val_records]
  assert results['best_validation'] in history
  assert meta['metadata']['validation'] == results['best_validation']
  md = (workdir / 'results.md').read_text()
  assert '| best |' in md and '| last |' in md and f'{test_size} test examples' in md

  # Plots.
  for name in ('loss', 'accuracy', 'effective_lr', 'learning_rate'):
    png = workdir / f'curves_{name}.png'
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', png
  return results


def digits_sizes(config) -> tuple[int, int]:
  ds = data.build_datasets(setup.data_config(config))
  return len(ds.train), len(ds.test)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope='module')
def main_run(compile_cache, tmp_path_factory):
  """``main.py`` on TINY digits with TWINS-AT, in a subprocess (the first cold compile)."""
  workdir = tmp_path_factory.mktemp('main_run') / 'run'
  proc = run_main(main_command(workdir, compile_cache, method='twins_at'),
                  subprocess_env(compile_cache))
  assert proc.returncode == 0, proc.stderr[-5000:]
  return workdir, proc


def test_main_end_to_end_twins_at(main_run, compile_cache):
  workdir, proc = main_run
  config = tiny_config(compile_cache, method='twins_at')
  train_size, test_size = digits_sizes(config)
  assert train_size // config.batch_size == DIGITS_STEPS_PER_EPOCH
  assert test_size == DIGITS_TEST_SIZE
  check_run_artifacts(workdir, config, 10, train_size, test_size)
  assert '| best |' in proc.stdout  # the table is printed
  assert 'twins_jax:' in proc.stderr  # main.py's log lines


@pytest.mark.parametrize('method', [
    'at',
    pytest.param('twins_trades', marks=pytest.mark.slow),
    pytest.param('trades', marks=pytest.mark.slow),
])
def test_train_and_evaluate_methods(method, compile_cache, tmp_path):
  config = tiny_config(compile_cache, method=method)
  results = train.train_and_evaluate(config, tmp_path)
  train_size, test_size = digits_sizes(config)
  saved = check_run_artifacts(tmp_path, config, 10, train_size, test_size)
  assert saved['test'] == results['test']


def test_evaluation_counts_every_test_example_once(main_run, compile_cache):
  """results.json's clean accuracy is the plain accuracy over the whole test split."""
  workdir, _ = main_run
  config = tiny_config(compile_cache)
  ds = data.build_datasets(setup.data_config(config))
  assert len(ds.test) % config.eval_batch_size != 0  # the last batch is padded
  results = json.loads((workdir / 'results.json').read_text())
  model, variables, _ = model_io.load_model_dir(workdir / 'best_model')
  images = np.stack([ds.test[i][0] for i in range(len(ds.test))]).astype(np.float32) / 255
  labels = np.asarray([ds.test[i][1] for i in range(len(ds.test))])
  (batch,) = list(ds.eval_batches('test', len(ds.test)))
  np.testing.assert_array_equal(batch['image'], images)  # 'none' augmentation: x / 255
  logits = jax.jit(lambda v, x: model.apply(v, x, mode=models.EVAL))(variables, images)
  correct = int(np.sum(np.argmax(np.asarray(logits), -1) == labels))
  best = results['test']['best']
  assert best['num_examples'] == len(ds.test)
  # Same network, same inputs; only the batching differs (allow one near-tie flip).
  assert abs(round(best['clean_acc'] * len(ds.test)) - correct) <= 1


def test_rerun_after_completion_does_not_retrain(main_run, compile_cache, tmp_path, monkeypatch):
  src, _ = main_run
  workdir = tmp_path / 'run'
  shutil.copytree(src, workdir)
  metrics_before = (workdir / 'metrics.jsonl').read_text()
  steps_before = checkpoint_steps(workdir)
  results_before = json.loads((workdir / 'results.json').read_text())
  calls = []

  def no_training(train_step, mesh, donate=True, shard_batch=True):

    def fail(*args):
      calls.append(1)
      raise AssertionError('the training step ran on a finished run')

    return fail

  monkeypatch.setattr(parallel, 'jit_train_step', no_training)
  config = tiny_config(compile_cache, method='twins_at')
  results = train.train_and_evaluate(config, workdir)
  assert not calls
  assert results['steps'] == steps_before[-1] == DIGITS_STEPS_PER_EPOCH
  assert checkpoint_steps(workdir) == steps_before
  assert (workdir / 'metrics.jsonl').read_text() == metrics_before
  assert results['test'] == results_before['test']
  assert results['best_validation'] == results_before['best_validation']
  assert results['source'] == results_before['source']


# ----------------------------------------------------------------------------- config errors


def test_unknown_config_key_is_rejected(tmp_path):
  proc = run_main([
      sys.executable, 'main.py', '--config=configs/default.py', f'--workdir={tmp_path / "w"}',
      '--config.not_a_key=1'
  ], subprocess_env(), timeout=120)
  assert proc.returncode != 0
  assert 'not_a_key' in proc.stderr
  assert not (tmp_path / 'w').exists()


def test_misspelt_config_key_suggests_the_right_one(tmp_path):
  proc = run_main([
      sys.executable, 'main.py', '--config=configs/default.py', f'--workdir={tmp_path / "w"}',
      '--config.batch_sise=8'
  ], subprocess_env(), timeout=120)
  assert proc.returncode != 0
  assert 'batch_sise' in proc.stderr and 'batch_size' in proc.stderr


@pytest.mark.parametrize(
    'flag, name',
    [
        ('--config.batch_size=abc', 'batch_size'),
        ('--config.lr=fast', 'lr'),
        ('--config.random_start=maybe', 'random_start'),
        ('--config.lr_milestones=abc', 'lr_milestones'),  # tuples accept anything on the CLI
        ('--config.digits_classes=a', 'digits_classes'),
    ])
def test_wrong_type_override_is_rejected(flag, name, tmp_path):
  proc = run_main([
      sys.executable, 'main.py', '--config=configs/default.py', f'--workdir={tmp_path / "w"}', flag
  ], subprocess_env(), timeout=120)
  assert proc.returncode != 0
  assert f'config.{name}' in proc.stderr, proc.stderr[-3000:]
  assert not (tmp_path / 'w' / 'checkpoints').exists()


@pytest.mark.parametrize('overrides, match', [
    (dict(method='twins'), 'config.method'),
    (dict(batch_size=1), 'config.batch_size=1'),
    (dict(mode='predict'), 'config.mode'),
    (dict(num_epochs=0), 'config.num_epochs'),
    (dict(lr=-0.1), 'config.lr'),
    (dict(autoattack='full'), 'config.autoattack'),
    (dict(conv_impl='cudnn'), 'config.conv_impl'),
    (dict(dtype='float16'), 'config.dtype'),
    (dict(lr_milestones=('a',)), 'config.lr_milestones'),
    (dict(digits_classes=(1.5,)), 'config.digits_classes'),
    (dict(profile_steps=-1), 'config.profile_steps'),
])
def test_check_config_errors(overrides, match, tmp_path):
  config = tiny_config(**overrides)
  with pytest.raises(ValueError, match=match.replace('.', r'\.')):
    setup.check_config(config)
  with pytest.raises(ValueError, match=match.replace('.', r'\.')):
    train.train_and_evaluate(config, tmp_path / 'w')
  assert not (tmp_path / 'w').exists()  # rejected before anything is written


def test_check_config_accepts_tiny_and_presets():
  setup.check_config(tiny_config())
  setup.check_config(tiny_config(lr_milestones=(1, 2.5), digits_classes=(3, 4)))


# ----------------------------------------------------------------------------- presets


PRESETS = {  # preset -> (dataset, image size of the batches, model resize)
    'cifar10': ('cifar10', 32, 224),
    'cifar100': ('cifar100', 32, 224),
    'cub200': ('caltech_birds2011', 224, None),
    'stanford_dogs': ('stanford_dogs', 224, None),
    'dtd': ('dtd', 224, None),
    'folder': ('folder', 224, None),
    'demo': ('digits', 32, None),
}


def make_image_folder(root: Path, classes=('cat', 'dog'), per_class=3, seed=0) -> Path:
  rng = np.random.default_rng(seed)
  for c in classes:
    (root / c).mkdir(parents=True)
    for i in range(per_class):
      h, w = rng.integers(20, 60, size=2)
      Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / c / f'{i}.png')
  return root


@pytest.mark.parametrize('preset', sorted(PRESETS))
def test_preset_loads_and_builds_datasets(preset, tmp_path):
  dataset, size, resize = PRESETS[preset]
  config = importlib.import_module(f'configs.{preset}').get_config()
  assert config.dataset == dataset
  if preset == 'folder':
    config.folder_train = str(make_image_folder(tmp_path / 'train', per_class=12))
    config.folder_test = str(make_image_folder(tmp_path / 'test', seed=1))
  if config.mode != 'demo':
    setup.check_config(config)
    spec = setup.model_spec(config, 10)
    assert spec.resize == resize and spec.twin
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=24):
    ds = data.build_datasets(setup.data_config(config))
    assert ds.image_size == size and (ds.val is None) == (config.val_fraction == 0)
    (batch,) = list(ds.train_batches(ds.train_plan(4), seed=config.seed, num_steps=1))
    assert batch['image'].shape == (4, size, size, 3) and batch['image'].dtype == np.float32
    assert batch['label'].shape == (4,) and batch['label'].dtype == np.int32
    assert 0 <= batch['image'].min() and batch['image'].max() <= 1
    assert np.all((0 <= batch['label']) & (batch['label'] < ds.num_classes))
    n_test = len(ds.test)
    test = list(ds.eval_batches('test', 5))
    assert all(b['image'].shape == (5, size, size, 3) for b in test)
    assert sum(b['mask'].sum() for b in test) == n_test


def test_mock_cifar10_training_run(compile_cache, tmp_path):
  """The CIFAR-10 preset (TFDS, mocked) trains end to end with the tiny model, with the
  reference's protocol: every training image, the last partial batch kept (an epoch is
  ceil(N / B) steps), lr milestones in those steps, the final model reported."""
  from configs import cifar10
  tfds = pytest.importorskip('tensorflow_datasets')
  preset = cifar10.get_config()
  assert (preset.val_fraction, preset.last_batch, preset.eval_random_start) == (0.0, 'partial',
                                                                                False)
  config = tiny_config(compile_cache, base=cifar10, dataset='cifar10', num_epochs=2,
                       lr_milestones=(1,), val_fraction=preset.val_fraction,
                       last_batch=preset.last_batch)
  assert config.augment == ''  # the preset's CIFAR augmentation
  n, batch = 100, config.batch_size
  with tfds.testing.mock_data(num_examples=n):
    results = train.train_and_evaluate(config, tmp_path)
  steps_per_epoch = math.ceil(n / batch)  # 6 batches of 16 and one of 4
  assert steps_per_epoch == 7
  assert results['steps'] == 2 * steps_per_epoch
  assert results['protocol'] == {
      'train_examples': n, 'steps_per_epoch': steps_per_epoch, 'last_batch': 'partial',
      'val_fraction': 0.0, 'val_examples': 0
  }
  assert set(results['test']) == {'last'} and results['best_validation'] is None
  assert results['test']['last']['num_examples'] == n
  assert not (tmp_path / 'best_model').exists()
  _, _, meta = model_io.load_model_dir(tmp_path / 'final_model')
  assert meta['metadata']['step'] == 2 * steps_per_epoch
  assert model_io.resolve_model_dir(tmp_path) == tmp_path / 'final_model'
  assert checkpoint_steps(tmp_path)[-1] == 2 * steps_per_epoch
  # The milestone (epoch 1) falls at iteration 7: updates 0..6 use lr, the rest lr * 0.1.
  lrs = {
      r['step']: r['train/learning_rate'] for r in reporting.read_metrics(tmp_path)
      if 'train/learning_rate' in r
  }
  assert lrs[5] == pytest.approx(config.lr) and lrs[10] == pytest.approx(config.lr * 0.1)
  md = (tmp_path / 'results.md').read_text()
  assert "the reference's" in md and f'Trained on {n} images, 7 steps per epoch' in md


@pytest.mark.slow
def test_mock_high_res_training_run(compile_cache, tmp_path):
  """A high-resolution preset (DTD, mocked): imagenet augmentation, image size reduced."""
  from configs import dtd
  tfds = pytest.importorskip('tensorflow_datasets')
  config = tiny_config(compile_cache, base=dtd, dataset='dtd', image_size=32)
  assert config.augment == 'imagenet' and config.lambda_twins == 0.4
  with tfds.testing.mock_data(num_examples=40):
    ds = data.build_datasets(setup.data_config(config))
    (batch,) = list(ds.train_batches(ds.train_plan(16), num_steps=1))
    assert ds.resize_size == 37 and batch['image'].shape == (16, 32, 32, 3)
    results = train.train_and_evaluate(config, tmp_path)
  # DTD trains on train + validation (2 x 40), 4 held out: 76 -> 4 steps; test 40.
  assert results['steps'] == 4
  assert results['test']['best']['num_examples'] == 40
  _, _, meta = model_io.load_model_dir(tmp_path / 'best_model')
  assert meta['spec'].num_classes == 47


# ----------------------------------------------------------------------------- NaN guard


def poisoning_jit_train_step(poison_at: int):
  """A ``parallel.jit_train_step`` whose step makes the parameters NaN once ``step`` reaches
  ``poison_at`` (the real compiled step runs; the poison is applied to its output)."""
  real = parallel.jit_train_step

  def jit_train_step(train_step, mesh, donate=True, shard_batch=True):
    jitted = real(train_step, mesh, donate, shard_batch)

    def step(state, batch, key):
      state, metrics = jitted(state, batch, key)
      if int(state.step) >= poison_at:
        state = state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
      return state, metrics

    return step

  return jit_train_step


def assert_no_non_finite_checkpoint(workdir, config):
  for s in checkpoint_steps(workdir):
    state, _ = restore_checkpoint(workdir, config, 10, s)
    assert all_finite((state.params, state.batch_stats, state.opt_state)), s
  if (workdir / 'best_model').exists():
    _, variables, _ = model_io.load_model_dir(workdir / 'best_model')
    assert all_finite(variables)


@pytest.mark.parametrize(
    'poison_at, log_every, ckpt_every, last_good',
    [
        (12, 1, 5, 10),  # caught by the metrics check at the next logged step
        (3, 1, 5, None),  # before the first checkpoint
        # The epoch's last step: its metrics are still finite (computed before the update), so
        # validation (and the best model) and the checkpoint must check the parameters.
        (DIGITS_STEPS_PER_EPOCH, 1000, 10, 70),
    ])
def test_non_finite_parameters_stop_the_run(poison_at, log_every, ckpt_every, last_good,
                                            compile_cache, tmp_path, monkeypatch):
  monkeypatch.setattr(parallel, 'jit_train_step', poisoning_jit_train_step(poison_at))
  config = tiny_config(compile_cache, log_every_steps=log_every, checkpoint_every_steps=ckpt_every)
  with pytest.raises(train.NonFiniteError) as err:
    train.train_and_evaluate(config, tmp_path)
  message = str(err.value)
  assert str(tmp_path / 'checkpoints') in message
  if last_good is None:
    assert 'no checkpoint' in message
    assert checkpoint_steps(tmp_path) == []
  else:
    assert f'step {last_good}' in message
    assert checkpoint_steps(tmp_path)[-1] == last_good
  assert_no_non_finite_checkpoint(tmp_path, config)
  assert not (tmp_path / 'results.json').exists()


@pytest.mark.slow
def test_absurd_learning_rate_stops_the_run(compile_cache, tmp_path):
  config = tiny_config(compile_cache, lr=1e6, log_every_steps=1, checkpoint_every_steps=1)
  with pytest.raises(train.NonFiniteError, match='checkpoint'):
    train.train_and_evaluate(config, tmp_path)
  assert_no_non_finite_checkpoint(tmp_path, config)
  assert not (tmp_path / 'results.json').exists()


# ----------------------------------------------------------------------------- checkpoints


def test_async_checkpoint_is_a_snapshot(tmp_path):
  """An asynchronous save holds the state and progress as they were at ``save``, even if
  the state's buffers are donated and the progress dict appended to right after (as the
  training loop does). Without copying, Orbax wrote the later progress about 4 times in 10."""
  ckpts = checkpointing.RunCheckpoints(tmp_path, keep=8, async_save=True)
  overwrite = jax.jit(lambda s: jax.tree.map(lambda x: x * 0 - 1, s), donate_argnums=0)
  progress = {'history': [], 'best': None}
  expected = {}
  for step in range(1, 9):
    state = {'w': jnp.full((1 << 18,), step, jnp.float32), 'step': jnp.asarray(step, jnp.int32)}
    expected[step] = (jax.tree.map(np.array, state), json.loads(json.dumps(progress)))
    ckpts.save(step, state, progress)
    progress['history'].append({'step': step, 'pgd_acc': step / 10})
    progress['best'] = progress['history'][-1]
    state = overwrite(overwrite(state))
  ckpts.wait()
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          state)
  for step, (expected_state, expected_progress) in expected.items():
    restored, record = ckpts.restore(abstract, step)
    assert_trees_equal(jax.tree.map(np.asarray, restored), expected_state)
    assert record == expected_progress, step
  ckpts.close()


def test_metric_writer_drops_records_after_the_resumed_step(tmp_path):
  w = reporting.MetricWriter(tmp_path)
  for s in range(1, 7):
    w.write(s, {'train/loss': float(s)})
  w.close()
  w = reporting.MetricWriter(tmp_path, resume_step=4)
  w.write(5, {'train/loss': 50.0})
  w.close()
  records = reporting.read_metrics(tmp_path)
  assert [(r['step'], r['train/loss']) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0),
                                                             (5, 50.0)]


def test_profile_trace_and_model_metadata_for_predict(compile_cache, tmp_path, capsys):
  """profile_steps writes a jax.profiler trace (TensorBoard's profile plugin layout); the run's
  models store their evaluation transform and class names, which predict applies."""
  from twins_jax import predict
  config = tiny_config(compile_cache, method='at', profile_steps=3)
  train.train_and_evaluate(config, tmp_path)
  traces = list((tmp_path / 'profile' / 'plugins' / 'profile').glob('*/*.xplane.pb'))
  assert len(traces) == 1 and traces[0].stat().st_size > 0, traces

  for name in ('best_model', 'final_model'):
    meta = model_io.read_model_json(tmp_path / name)['metadata']
    assert meta['preprocessing'] == {'augment': 'none', 'image_size': 16, 'resize_size': 18}
    assert meta['class_names'] == [str(d) for d in range(10)] and meta['dataset'] == 'digits'

  ds = data.build_datasets(setup.data_config(config))
  image, _ = ds.test[0]  # uint8 16x16 (the source upsamples the 8x8 digits)
  Image.fromarray(image).save(tmp_path / 'digit.png')
  assert predict.main([
      str(tmp_path), '--images',
      str(tmp_path / 'digit.png'), '--out',
      str(tmp_path / 'l.npy'), '--top-k', '3'
  ]) == 0
  model, variables, _ = model_io.load_model_dir(tmp_path / 'best_model')
  want = np.asarray(model.apply(variables, image[None].astype(np.float32) / 255, mode='eval'))
  np.testing.assert_allclose(np.load(tmp_path / 'l.npy'), want, atol=1e-5, rtol=0)
  out = capsys.readouterr().out
  assert '16x16 (stored by the training run)' in out
  assert f'digit.png: {int(np.argmax(want))} ' in out
