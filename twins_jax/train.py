"""``train_and_evaluate(config, workdir)``: a whole TWINS fine-tuning run.

From the dataset to the loss, in order: :mod:`twins_jax.data` (batches),
:mod:`twins_jax.models` (the twin-BN network), :mod:`twins_jax.attacks` (PGD),
:mod:`twins_jax.objectives` (the loss), :mod:`twins_jax.step` (the jitted step),
:mod:`twins_jax.parallel` (the device mesh). This module adds the run around them:
pre-trained weights, checkpoints and resumption, evaluation, logging and the report.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from twins_jax import checkpointing, data, model_io, models, parallel, port, reporting
from twins_jax import step as step_lib

log = logging.getLogger('twins_jax')


class NonFiniteError(FloatingPointError):
  """Training produced NaN/Inf; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------- setup


def check_config(config: ml_collections.ConfigDict) -> None:
  """Clear errors for settings that cannot work, before anything expensive starts."""
  if config.method not in step_lib.objectives.METHODS:
    raise ValueError(f'config.method={config.method!r}; choose one of '
                     f'{step_lib.objectives.METHODS}.')
  if config.mode not in ('train', 'eval'):
    raise ValueError(f"config.mode={config.mode!r}; choose 'train' or 'eval'.")
  if config.batch_size < 2:
    raise ValueError(f'config.batch_size={config.batch_size}: TWINS splits each batch in two '
                     'halves, so it needs at least 2 examples.')
  if config.num_epochs <= 0 and config.mode == 'train':
    raise ValueError(f'config.num_epochs must be positive, got {config.num_epochs}.')
  for name in ('lr', 'eps', 'alpha'):
    if config[name] < 0:
      raise ValueError(f'config.{name} must be non-negative, got {config[name]}.')
  if config.last_batch not in data.LAST_BATCH:
    raise ValueError(f'config.last_batch={config.last_batch!r}; choose one of {data.LAST_BATCH}.')
  if config.conv_impl not in models.CONV_IMPLS:
    raise ValueError(f'config.conv_impl={config.conv_impl!r}; choose one of '
                     f'{models.CONV_IMPLS}.')
  if config.dtype not in ('float32', 'bfloat16'):
    raise ValueError(f"config.dtype={config.dtype!r}; choose 'float32' or 'bfloat16'.")
  if config.autoattack not in ('none', 'fast', 'standard'):
    raise ValueError(f"config.autoattack={config.autoattack!r}; choose 'none', 'fast' or "
                     "'standard'.")
  # Tuple fields take anything on the command line (--config.lr_milestones=abc -> ('abc',)).
  for name, types, example in (('lr_milestones', (int, float), '"(30,50)"'),
                               ('digits_classes', (int,), '"(5,6,7)"')):
    if any(isinstance(v, bool) or not isinstance(v, types) for v in config.get(name, ())):
      raise ValueError(f'config.{name}={tuple(config[name])!r} must be a tuple of '
                       f'{" or ".join(t.__name__ for t in types)}s, e.g. '
                       f'--config.{name}={example}.')


def step_config(config) -> step_lib.StepConfig:
  return step_lib.StepConfig(method=config.method, eps=config.eps, alpha=config.alpha,
                             steps=config.attack_steps, norm=config.norm,
                             lambda_twins=config.lambda_twins, beta=config.beta,
                             random_start=config.random_start, attack_loss=config.attack_loss,
                             fold_bn_attack=config.fold_bn_attack)


def eval_step_config(config) -> step_lib.StepConfig:
  return step_lib.StepConfig(method=config.method, eps=config.eps, alpha=config.alpha,
                             steps=config.eval_attack_steps, norm=config.norm,
                             random_start=config.eval_random_start,
                             fold_bn_attack=config.fold_bn_attack)


def model_kwargs(config, num_classes: int) -> dict:
  twin = config.method in step_lib.objectives.TWIN_METHODS
  return dict(arch=config.arch, num_classes=num_classes,
              resize=config.resize or None, twin=twin,
              share_affine=bool(config.share_affine) and twin)


def initial_variables(config, kwargs: dict) -> tuple[dict, str]:
  """Pre-trained variables laid out for ``kwargs``' model, and where they came from.

  ``config.pretrained`` is a model directory (ported, or ``best_model`` of an earlier
  run), a PyTorch checkpoint (ported on the fly), or empty (random initialisation).
  """
  model = models.create_model(**kwargs)
  src = config.pretrained
  if not src:
    return models.init_variables(model, config.seed), 'random initialisation (no config.pretrained)'
  path = Path(os.path.expanduser(src))
  if path.is_dir():
    path = model_io.resolve_model_dir(path)
    _, variables, meta = model_io.load_model_dir(path)
    src_kwargs = meta['model_kwargs']
    if src_kwargs['arch'] != kwargs['arch']:
      raise ValueError(f"config.pretrained {path} holds a {src_kwargs['arch']}, but "
                       f"config.arch is {kwargs['arch']}.")
    variables = models.convert_variables(variables, twin=kwargs['twin'],
                                         share_affine=kwargs['share_affine'])
    if src_kwargs['num_classes'] != kwargs['num_classes']:
      fresh = models.init_variables(model, config.seed)
      variables['params']['fc'] = fresh['params']['fc']
      return variables, (f'model directory {path} (new {kwargs["num_classes"]}-class head, '
                         f'PyTorch default init)')
    return variables, f'model directory {path}'
  if path.is_file():
    variables, report = port.port_checkpoint(
        str(path), kwargs['arch'], kwargs['num_classes'], resize=kwargs['resize'],
        twin=kwargs['twin'], share_affine=kwargs['share_affine'], seed=config.seed)
    log.info('Ported %s:\n%s', path, report.summary(problems=False))
    return variables, f'PyTorch checkpoint {path} (ported)'
  raise FileNotFoundError(f'config.pretrained={src!r} is neither a model directory nor a file.')


def data_config(config) -> dict:
  """The data fields of ``config``, with the 'pick the default' values ('', 0, ()) as None."""
  fields = ('dataset', 'data_dir', 'folder_train', 'folder_test', 'digits_classes',
            'val_fraction', 'augment', 'image_size', 'seed')
  out = {k: config[k] for k in fields}
  for k in ('data_dir', 'folder_train', 'folder_test', 'augment', 'image_size', 'digits_classes'):
    if not out[k]:
      out[k] = None
  return out


def enable_compilation_cache(config, workdir: Path) -> None:
  cache = config.compilation_cache_dir
  if cache == 'none':
    return
  cache = Path(cache).expanduser() if cache else workdir / 'jax_cache'
  jax.config.update('jax_compilation_cache_dir', str(cache))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def _write_config(config, workdir: Path) -> None:
  if jax.process_index() == 0:
    (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2, sort_keys=True))


# ----------------------------------------------------------------------------- evaluation


class Evaluator:
  """Clean and PGD accuracy of the Adaptive Net (eval mode) over a whole split.

  Batches are padded and masked, so every example counts exactly once. One compiled
  program serves every call.
  """

  def __init__(self, model, config, mesh):
    self.mesh = mesh
    self.config = config
    self._step = parallel.jit_eval_step(step_lib.make_eval_step(model, eval_step_config(config)),
                                        mesh)

  def __call__(self, variables, batches, key, desc: str = 'eval',
               eps: Optional[float] = None) -> dict:
    totals = {'clean': 0.0, 'pgd': 0.0, 'count': 0.0}
    eps = jnp.float32(self.config.eps if eps is None else eps)
    outs = []
    for i, batch in enumerate(reporting.progress(batches, total=batches.num_batches, desc=desc,
                                                 unit='batch',
                                                 enabled=jax.process_index() == 0)):
      outs.append(self._step(variables, parallel.shard_batch(batch, self.mesh),
                             jax.random.fold_in(key, i), eps))
    for out in parallel.fetch(outs):  # one host sync per evaluation
      totals['clean'] += float(np.sum(out['clean']))
      totals['pgd'] += float(np.sum(out['pgd']))
      totals['count'] += float(np.sum(out['mask']))
    n = max(totals['count'], 1.0)
    return {'clean_acc': totals['clean'] / n, 'pgd_acc': totals['pgd'] / n,
            'num_examples': int(totals['count'])}


# ----------------------------------------------------------------------------- training


@jax.jit
def _finite(tree) -> jax.Array:
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _all_finite(tree) -> bool:
  return bool(_finite(tree))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
  """Fine-tunes, evaluates and reports. Re-running with the same workdir resumes.

  Returns the final results (also written to ``workdir/results.json`` and
  ``workdir/results.md``).
  """
  check_config(config)
  workdir = Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  _write_config(config, workdir)
  enable_compilation_cache(config, workdir)
  if config.mode == 'eval':
    from twins_jax import evaluate
    return evaluate.evaluate_config(config, workdir)

  mesh = parallel.data_mesh()
  n_proc, proc = jax.process_count(), jax.process_index()
  parallel.check_batch_size(config.batch_size, mesh)
  datasets = data.build_datasets(data_config(config))
  log.info('%s', datasets.describe())
  kwargs = model_kwargs(config, datasets.num_classes)
  model = models.create_model(**kwargs, dtype=jnp.dtype(config.dtype),
                              conv_impl=config.conv_impl)

  loader = datasets.train_loader(config.batch_size, seed=config.seed, process_index=proc,
                                 process_count=n_proc, last_batch=config.last_batch,
                                 shard_multiple=mesh.devices.size)
  steps_per_epoch = loader.steps_per_epoch
  if steps_per_epoch == 0:
    raise ValueError(f'The training split ({len(datasets.train)} examples) is smaller than one '
                     f'batch ({config.batch_size}).')
  total_steps = int(config.num_epochs * steps_per_epoch)
  boundaries = [int(e * steps_per_epoch) for e in config.lr_milestones]
  tx, schedule = step_lib.make_optimizer(config.lr, config.weight_decay, config.momentum,
                                         boundaries, config.lr_gamma)
  step_fn = step_lib.make_train_step(model, tx, step_config(config), schedule)
  train_step = parallel.jit_train_step(step_fn, mesh)
  replicated_step = None  # for a partial batch that does not split over the devices
  evaluator = Evaluator(model, config, mesh)

  ckpts = checkpointing.RunCheckpoints(workdir, keep=config.keep_checkpoints,
                                       async_save=config.async_checkpoints)
  for name in model_io.RUN_MODELS:
    if checkpointing.recover_best_model(workdir, name):
      log.warning('%s recovered from %s.old (an earlier save was interrupted between its two '
                  'renames).', name, name)
  abstract_state = jax.eval_shape(
      lambda: step_lib.TrainState.create(
          model_io.abstract_variables(models.create_model(**kwargs)), tx))
  abstract_state = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=parallel.replicated(mesh)),
      abstract_state)
  progress_record = {'history': [], 'best': None, 'source': None}
  if ckpts.latest_step() is not None:
    state, progress_record = ckpts.restore(abstract_state)
    log.info('Resuming from %s at step %d.', ckpts.directory, int(state.step))
  else:
    variables, source = initial_variables(config, kwargs)
    progress_record['source'] = source
    log.info('Starting from %s.', source)
    state = parallel.replicate(step_lib.TrainState.create(variables, tx), mesh)
  start_step = int(jax.device_get(state.step))

  writer = reporting.MetricWriter(workdir, enabled=proc == 0, resume_step=start_step)
  base_key = jax.random.key(config.seed)
  train_key, eval_key = jax.random.fold_in(base_key, 1), jax.random.fold_in(base_key, 2)
  ckpt_every = config.checkpoint_every_steps or steps_per_epoch
  log_every = max(1, min(config.log_every_steps, steps_per_epoch))
  history = progress_record['history']

  def last_good() -> str:
    latest = ckpts.latest_step()
    if latest is None:
      return f'no checkpoint has been written yet in {ckpts.directory}'
    return f'the last good checkpoint in {ckpts.directory} (step {latest}) is kept'

  bar = reporting.TrainProgress(total_steps, start_step, config.batch_size, enabled=proc == 0)
  batches = loader.iterate(start_step, total_steps - start_step)
  t_log, n_log = time.perf_counter(), 0
  try:
    for step in range(start_step, total_steps):
      sharded = loader.sharded(step)
      batch = parallel.shard_batch(next(batches), mesh, replicate=not sharded)
      if not sharded and replicated_step is None:
        replicated_step = parallel.jit_train_step(step_fn, mesh, shard_batch=False)
      state, metrics = (train_step if sharded else replicated_step)(
          state, batch, jax.random.fold_in(train_key, step))
      n_log += loader.batch_size_at(step)
      done = step + 1
      bar.update(done)
      if done % log_every == 0 or done == total_steps:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not all(math.isfinite(v) for v in metrics.values()):
          bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
          raise NonFiniteError(
              f'Non-finite training metrics at step {done}: {bad}. Stopping; {last_good()}. '
              'Try a lower config.lr or check the data.')
        elapsed = time.perf_counter() - t_log
        metrics['images_per_sec'] = n_log / max(elapsed, 1e-9)
        metrics['epoch'] = done / steps_per_epoch
        writer.write(done, {f'train/{k}': v for k, v in metrics.items()})
        bar.set_postfix(loss=metrics['loss'], img_s=metrics['images_per_sec'])
        t_log, n_log = time.perf_counter(), 0
      epoch_end = done % steps_per_epoch == 0
      validate = epoch_end and datasets.val is not None and (
          (done // steps_per_epoch) % config.eval_every_epochs == 0 or done == total_steps)
      checkpoint = done % ckpt_every == 0 or done == total_steps
      # Metrics are only read every log_every steps: check the state itself before it can
      # become the best model or a checkpoint.
      if (validate or checkpoint) and not _all_finite(state):
        raise NonFiniteError(f'The training state is not finite at step {done}; stopping '
                             f'before validating or saving it; {last_good()}. Try a lower '
                             'config.lr or check the data.')
      if validate:
        val = evaluator(state.variables, datasets.eval_batches(
            'val', config.eval_batch_size, proc, n_proc), eval_key, desc='validation')
        record = {'step': done, 'epoch': done / steps_per_epoch, **val}
        history.append(record)
        writer.write(done, {f'val/{k}': v for k, v in val.items()})
        best = progress_record['best']
        if best is None or val['pgd_acc'] > best['pgd_acc']:
          progress_record['best'] = record
          checkpointing.save_best_model(workdir, state.variables, kwargs,
                                        {'run': str(workdir), 'validation': record,
                                         'method': config.method})
        bar.write(f'epoch {done / steps_per_epoch:g}: validation clean {val["clean_acc"]:.4f} '
                  f'PGD-{config.eval_attack_steps} {val["pgd_acc"]:.4f}')
      if checkpoint:
        ckpts.save(done, state, progress_record)
  finally:
    bar.close()
    batches.close()
    ckpts.wait()
  ckpts.close()
  writer.close()

  final_path = workdir / 'final_model'
  if not (final_path / model_io.MODEL_JSON).is_file() or model_io.read_model_json(
      final_path)['metadata'].get('step') != total_steps:
    checkpointing.save_best_model(workdir, state.variables, kwargs,
                                  {'run': str(workdir), 'method': config.method,
                                   'step': total_steps}, name='final_model')
  protocol = {'train_examples': len(datasets.train), 'steps_per_epoch': steps_per_epoch,
              'last_batch': config.last_batch, 'val_fraction': datasets.val_fraction,
              'val_examples': 0 if datasets.val is None else len(datasets.val)}
  results = final_report(config, workdir, model, state, datasets, evaluator, eval_key, kwargs,
                         progress_record, mesh, protocol)
  return results


def final_report(config, workdir: Path, model, state, datasets, evaluator, key, kwargs,
                 progress_record, mesh, protocol: dict) -> dict:
  """Test-set accuracy of the last model (and of the best by validation, when a validation
  split was held out); table and plots."""
  n_proc, proc = jax.process_count(), jax.process_index()
  candidates = {'last': state.variables}
  if (workdir / 'best_model').is_dir():
    _, best_vars, _ = model_io.load_model_dir(workdir / 'best_model')
    candidates = {'best': parallel.replicate(best_vars, mesh), **candidates}
  rows = {}
  for name, variables in candidates.items():
    test = evaluator(variables, datasets.eval_batches('test', config.eval_batch_size, proc,
                                                      n_proc), key, desc=f'test ({name})')
    if config.autoattack != 'none':
      from twins_jax import evaluate
      test.update(evaluate.autoattack_accuracy(model, variables, datasets, config, mesh))
    rows[name] = test
  results = {'method': config.method, 'dataset': config.dataset, 'workdir': str(workdir),
             'steps': int(jax.device_get(state.step)), 'source': progress_record.get('source'),
             'best_validation': progress_record.get('best'), 'test': rows,
             'protocol': protocol}
  if proc == 0:
    (workdir / 'results.json').write_text(json.dumps(results, indent=2))
    table = reporting.results_table(results, config)
    (workdir / 'results.md').write_text(table + '\n')
    print(table)
    reporting.plot_curves(workdir)
  return results
