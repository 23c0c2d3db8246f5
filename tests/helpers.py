"""Helpers shared by the test files: tiny training runs, main.py subprocesses, checkpoints.

The ``compile_cache`` fixture (one persistent XLA compilation cache per test session) is in
``conftest.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np

from configs import default as default_config
from twins_jax import checkpointing, model_io, setup
from twins_jax import step as step_lib

REPO = Path(__file__).resolve().parents[1]

# The settings every tiny run shares: they fix the compiled programs (with the number of
# classes, 10 for digits and for CIFAR-10), so runs that differ only elsewhere (workdir,
# method-independent run settings, dataset contents) reuse the cached compilations. They
# hold out a validation split and drop the last partial batch (one program per method);
# test_mock_cifar10_training_run runs the reference protocol (all images, partial batch).
TINY = dict(arch='tiny_resnet', resize=0, dataset='digits', image_size=16, batch_size=16,
            eval_batch_size=32, num_epochs=1, lr_milestones=(), attack_steps=1, eval_attack_steps=1,
            val_fraction=0.1, last_batch='drop', log_every_steps=5, checkpoint_every_steps=25)
DIGITS_STEPS_PER_EPOCH = 75  # 1797 digits: 449 test, 135 val, 1213 train -> 75 batches of 16
DIGITS_TEST_SIZE = 449  # not a multiple of eval_batch_size (32): the last batch is padded

DIAGNOSTICS = ('weight_norm', 'grad_norm', 'grad_weight_ratio')
BRANCH_METRICS = {
    'twins_at': ('frozen_loss', 'adaptive_loss', 'frozen_adv_acc', 'adaptive_adv_acc'),
    'twins_trades':
        ('natural_loss', 'robust_loss', 'frozen_loss', 'adaptive_loss', 'frozen_clean_acc',
         'adaptive_clean_acc', 'frozen_adv_acc', 'adaptive_adv_acc'),
    'at': ('adaptive_loss', 'adaptive_adv_acc'),
    'trades':
        ('natural_loss', 'robust_loss', 'adaptive_loss', 'adaptive_clean_acc', 'adaptive_adv_acc'),
}

# ----------------------------------------------------------------------------- helpers


def tiny_config(cache: str | None = None, base=default_config,
                **overrides) -> ml_collections.ConfigDict:
  c = base.get_config()
  c.update(TINY)
  c.update(overrides)
  if cache is not None and 'compilation_cache_dir' in c:
    c.compilation_cache_dir = cache
  return c


def cli_value(v) -> str:
  if isinstance(v, bool):
    return str(v).lower()
  if isinstance(v, (tuple, list)):
    return '(' + ','.join(str(x) for x in v) + (',' if len(v) == 1 else '') + ')'
  return str(v)


def subprocess_env(cache: str | None = None, devices: int | None = None) -> dict:
  """Environment for a ``main.py`` subprocess.

  By default it sees as many simulated CPU devices as this process (the same XLA_FLAGS),
  so that the programs it compiles are the ones the in-process runs find in the cache.
  """
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join([str(REPO)] + [p for p in [env.get('PYTHONPATH')] if p])
  env['JAX_PLATFORMS'] = 'cpu'
  if devices is not None:
    env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  else:
    env['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '')
  if cache:
    env['JAX_COMPILATION_CACHE_DIR'] = cache
    env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  return env


def main_command(workdir, cache: str | None = None, config_file: str = 'configs/default.py',
                 **overrides) -> list[str]:
  """``python main.py --config=... --workdir=... --config.k=v ...`` with TINY's overrides."""
  settings = dict(TINY, **overrides)
  if cache is not None and 'compilation_cache_dir' in default_config.get_config():
    settings['compilation_cache_dir'] = cache
  return ([sys.executable, 'main.py', f'--config={config_file}', f'--workdir={workdir}'] +
          [f'--config.{k}={cli_value(v)}' for k, v in settings.items()])


def run_main(args, env, timeout=900) -> subprocess.CompletedProcess:
  return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def abstract_train_state(config, num_classes: int):
  spec = setup.model_spec(config, num_classes)
  tx, _ = step_lib.make_optimizer(config.lr, config.weight_decay, config.momentum, (),
                                  config.lr_gamma)
  abstract = jax.eval_shape(
      lambda: step_lib.TrainState.create(model_io.abstract_variables(spec.build()), tx))
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract)


def restore_checkpoint(workdir, config, num_classes: int, step=None):
  """(state as numpy, progress record) of ``workdir/checkpoints/<step>`` (default: latest)."""
  ckpts = checkpointing.RunCheckpoints(workdir, keep=config.keep_checkpoints, async_save=False)
  try:
    state, progress = ckpts.restore(abstract_train_state(config, num_classes), step)
  finally:
    ckpts.close()
  return jax.tree.map(np.asarray, state), progress


def checkpoint_steps(workdir) -> list[int]:
  d = Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def all_finite(tree) -> bool:
  return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree))


def assert_trees_equal(a, b, note: str = ''):
  """Bit-identical pytrees (same structure, dtypes and values)."""
  la, ta = jax.tree_util.tree_flatten_with_path(a)
  lb, tb = jax.tree_util.tree_flatten_with_path(b)
  assert ta == tb, note
  for (path, x), (_, y) in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, (jax.tree_util.keystr(path), note)
    assert x.tobytes() == y.tobytes(), (
        f'{jax.tree_util.keystr(path)} differs (max |diff| {np.max(np.abs(x - y))}) {note}')


def train_plain(model, datasets, steps: int = 150, batch: int = 64, lr: float = 3e-3,
                seed: int = 0):
  """A few steps of standard (clean) Adam training of ``model`` (Adaptive Net, its BN in
  training mode) on ``datasets.train``: a model whose predictions mean something, for
  tests of attacks and evaluation. Returns the variables."""
  import optax
  from twins_jax import data, models
  n = len(datasets.train)
  images, labels = zip(*(datasets.train[i] for i in range(n)))
  x = np.stack([
      data.transform(im, train=False, augment=datasets.augment, image_size=datasets.image_size,
                     resize_size=datasets.resize_size, rng=None) for im in images
  ]).astype(np.float32)
  y = np.asarray(labels, np.int32)
  variables = models.init_variables(model, seed)
  opt = optax.adam(lr)

  @jax.jit
  def step(variables, opt_state, xb, yb):

    def loss(params):
      logits, upd = model.apply({**variables, 'params': params}, xb, mode=models.TRAIN,
                                mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), upd

    grads, upd = jax.grad(loss, has_aux=True)(variables['params'])
    updates, opt_state = opt.update(grads, opt_state)
    return {**variables, **upd, 'params': optax.apply_updates(variables['params'],
                                                              updates)}, opt_state

  opt_state = opt.init(variables['params'])
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.choice(n, batch, replace=False)
    variables, opt_state = step(variables, opt_state, x[idx], y[idx])
  return variables
