"""``train_and_evaluate(config, workdir)``: a whole TWINS fine-tuning run.

From the dataset to the loss, in order: :mod:`twins_jax.data` (batches),
:mod:`twins_jax.models` (the twin-BN network), :mod:`twins_jax.attacks` (PGD),
:mod:`twins_jax.objectives` (the loss), :mod:`twins_jax.step` (the jitted step),
:mod:`twins_jax.parallel` (the device mesh). :mod:`twins_jax.setup` turns the config into
those pieces; this module adds the run around them: checkpoints and resumption, logging,
evaluation (:mod:`twins_jax.evaluate`) and the report.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections

from twins_jax import checkpointing, errors, evaluate, model_io, parallel, preemption, reporting
from twins_jax import setup
from twins_jax import step as step_lib

log = logging.getLogger('twins_jax')

# Logged as their value at the logging step, not averaged over the window.
_NOT_AVERAGED = ('learning_rate',)


class NonFiniteError(errors.UserError, FloatingPointError):
  """Training produced NaN/Inf; the last good checkpoint is kept."""


@jax.jit
def _finite(tree) -> jax.Array:
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _all_finite(tree) -> bool:
  return bool(_finite(tree))


@jax.jit
def _window_mean(window: list, weights: list) -> dict:
  """Each training metric averaged over a logging window, weighted by the batch sizes, on
  the device (the learning rate is the last step's)."""
  total = sum(weights)
  out = {k: sum(m[k] * w for m, w in zip(window, weights)) / total for k in window[0]}
  out.update({k: window[-1][k] for k in _NOT_AVERAGED if k in window[-1]})
  return out


class StepProfiler:
  """A ``jax.profiler`` trace of ``num_steps`` training steps (``config.profile_steps``),
  from the second step of this run on (the first one compiles), written to ``directory``
  (``workdir/profile``: TensorBoard's profile tab). Process 0 only."""

  def __init__(self, directory: Path, num_steps: int, enabled: bool = True):
    self.directory, self.num_steps = directory, int(num_steps)
    self.enabled = enabled and self.num_steps > 0
    self.active, self.traced = False, 0

  def step(self, steps_done: int, step: int, state):
    """The context of one training step; ``steps_done``: steps this run has finished."""
    if self.enabled and steps_done == 1 and not self.active and not self.traced:
      jax.block_until_ready(state)  # the compiled first step is not part of the trace
      self.directory.mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(str(self.directory))
      self.active = True
      log.info('Profiling %d training steps into %s.', self.num_steps, self.directory)
    if not self.active:
      return contextlib.nullcontext()
    return jax.profiler.StepTraceAnnotation('train', step_num=step)

  def step_done(self, state) -> None:
    if self.active:
      self.traced += 1
      if self.traced >= self.num_steps:
        self.stop(state)

  def stop(self, state=None) -> None:
    """Ends the trace (waiting for ``state``, so its steps are in it)."""
    if not self.active:
      return
    self.active = False
    try:
      if state is not None:
        jax.block_until_ready(state)
    finally:
      jax.profiler.stop_trace()
    log.info('Profile of %d training steps written to %s (tensorboard --logdir %s).', self.traced,
             self.directory, self.directory)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
  """Fine-tunes, evaluates and reports. Re-running with the same workdir resumes.

  Returns the final results (also written to ``workdir/results.json`` and
  ``workdir/results.md``).
  """
  setup.check_config(config)
  workdir = setup.prepare_workdir(config, workdir)
  setup.enable_compilation_cache(config, workdir)
  if config.mode == 'eval':
    return evaluate.evaluate_config(config, workdir)

  mesh = parallel.data_mesh()
  n_proc, proc = jax.process_count(), jax.process_index()
  parallel.check_batch_size(config.batch_size, mesh)
  datasets = setup.build_datasets(config)
  setup.check_data(config, datasets.num_classes)
  spec = setup.model_spec(config, datasets.num_classes)
  model = setup.build_model(config, spec)

  plan = datasets.train_plan(config.batch_size, last_batch=config.last_batch, process_index=proc,
                             process_count=n_proc, shard_multiple=mesh.devices.size)
  steps_per_epoch = plan.steps_per_epoch
  if steps_per_epoch == 0:
    raise ValueError(f'The training split ({len(datasets.train)} examples) is smaller than one '
                     f'batch ({config.batch_size}).')
  total_steps = int(config.num_epochs * steps_per_epoch)
  boundaries = [int(e * steps_per_epoch) for e in config.lr_milestones]
  tx, schedule = step_lib.make_optimizer(config.lr, config.weight_decay, config.momentum,
                                         boundaries, config.lr_gamma)
  step_fn = step_lib.make_train_step(model, tx, setup.step_config(config), schedule)
  train_step = parallel.jit_train_step(step_fn, mesh)
  replicated_step = None  # for a partial batch that does not split over the devices
  evaluator = evaluate.Evaluator(model, config, mesh)

  model_info = model_metadata(config, workdir, datasets)
  ckpts = checkpointing.RunCheckpoints(workdir, keep=config.keep_checkpoints,
                                       async_save=config.async_checkpoints)
  for name in model_io.RUN_MODELS:
    if checkpointing.recover_best_model(workdir, name):
      log.warning(
          '%s recovered from %s.old (an earlier save was interrupted between its two '
          'renames).', name, name)
  abstract_state = jax.eval_shape(
      lambda: step_lib.TrainState.create(model_io.abstract_variables(spec.build()), tx))
  abstract_state = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=parallel.replicated(mesh)),
      abstract_state)
  progress_record = {'history': [], 'best': None, 'source': None}
  try:
    restored = ckpts.restore_latest(abstract_state)
    if restored is not None:
      state, progress_record = restored
      log.info('Resuming from %s at step %d.', ckpts.directory, int(state.step))
    else:
      variables, source = setup.initial_variables(config, spec)
      progress_record['source'] = source
      log.info('Starting from %s.', source)
      state = parallel.replicate(step_lib.TrainState.create(variables, tx), mesh)
  except BaseException:
    ckpts.close()  # Orbax's background threads, else they complain at exit
    raise
  start_step = int(jax.device_get(state.step))

  writer = reporting.MetricWriter(workdir, enabled=proc == 0, resume_step=start_step)
  base_key = jax.random.key(config.seed)
  train_key, eval_key = jax.random.fold_in(base_key, 1), jax.random.fold_in(base_key, 2)
  ckpt_every = config.checkpoint_every_steps or steps_per_epoch
  log_every = max(1, min(config.log_every_steps, steps_per_epoch))
  history = progress_record['history']
  options = setup.pipeline_options(config)

  def last_good() -> str:
    latest = ckpts.latest_step()
    if latest is None:
      return f'no checkpoint has been written yet in {ckpts.directory}'
    return f'the last good checkpoint in {ckpts.directory} (step {latest}) is kept'

  bar = reporting.TrainProgress(total_steps, start_step, config.batch_size, enabled=proc == 0)
  batches = datasets.train_batches(plan, seed=config.seed, start_step=start_step,
                                   num_steps=total_steps - start_step, **options)
  # The logging window's per-step metrics stay on the device (no host sync per step) and
  # are averaged there when they are logged.
  window, window_sizes, t_log = [], [], time.perf_counter()
  # SIGTERM (preemption): save a checkpoint after the current step and stop; all hosts
  # agree on the step (twins_jax/preemption.py).
  watch = preemption.PreemptionWatch().__enter__()
  profiler = StepProfiler(workdir / 'profile', config.get('profile_steps', 0), enabled=proc == 0)
  try:
    for step in range(start_step, total_steps):
      sharded = plan.sharded(step)
      batch = parallel.shard_batch(next(batches), mesh, replicate=not sharded)
      if not sharded and replicated_step is None:
        replicated_step = parallel.jit_train_step(step_fn, mesh, shard_batch=False)
      step_key = jax.random.fold_in(train_key, step)
      with profiler.step(step - start_step, step, state):
        state, metrics = (train_step if sharded else replicated_step)(state, batch, step_key)
      profiler.step_done(state)
      window.append(metrics)
      window_sizes.append(plan.batch_size_at(step))
      done = step + 1
      bar.update(done)
      stop = watch.should_stop(done)  # every process asks at every step
      if done % log_every == 0 or done == total_steps or stop:
        mean = jax.device_get(_window_mean(window, [float(n) for n in window_sizes]))
        mean = {k: float(v) for k, v in mean.items()}
        if not all(math.isfinite(v) for v in mean.values()):
          bad = sorted(k for k, v in mean.items() if not math.isfinite(v))
          raise NonFiniteError(
              f'Non-finite training metrics at step {done}: {bad}. Stopping; {last_good()}. '
              'Try a lower config.lr or check the data.')
        elapsed = time.perf_counter() - t_log
        mean['images_per_sec'] = sum(window_sizes) / max(elapsed, 1e-9)
        mean['epoch'] = done / steps_per_epoch
        writer.write(done, {f'train/{k}': v for k, v in mean.items()})
        bar.set_postfix(loss=mean['loss'], img_s=mean['images_per_sec'])
        window, window_sizes, t_log = [], [], time.perf_counter()
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
        val = evaluator(
            state.variables,
            datasets.eval_batches('val', config.eval_batch_size, proc, n_proc, **options), eval_key,
            desc='validation')
        record = {'step': done, 'epoch': done / steps_per_epoch, **val}
        history.append(record)
        writer.write(done, {f'val/{k}': v for k, v in val.items()})
        best = progress_record['best']
        if best is None or val['pgd_acc'] > best['pgd_acc']:
          progress_record['best'] = record
          checkpointing.save_best_model(workdir, state.variables, spec,
                                        {**model_info, 'validation': record})
        bar.write(f'epoch {done / steps_per_epoch:g}: validation clean {val["clean_acc"]:.4f} '
                  f'PGD-{config.eval_attack_steps} {val["pgd_acc"]:.4f}')
      if checkpoint or stop:
        if stop and not _all_finite(state):
          raise NonFiniteError(f'The training state is not finite at step {done}; stopping '
                               f'without saving it; {last_good()}.')
        ckpts.save(done, state, progress_record)
      if stop:
        ckpts.wait()
        raise errors.Preempted(
            f'stopped by SIGTERM after step {done} of {total_steps}; the checkpoint of that '
            f'step is in {ckpts.directory}: re-run the same command to resume')
  except BaseException:
    ckpts.close()  # finishes a save in flight, then stops Orbax's background threads
    raise
  finally:
    watch.__exit__(None, None, None)
    profiler.stop()  # a run that ended (or failed) before profile_steps steps
    bar.close()
    batches.close()
  ckpts.close()
  writer.close()

  final_path = workdir / 'final_model'
  if not (final_path / model_io.MODEL_JSON).is_file() or model_io.read_model_json(
      final_path)['metadata'].get('step') != total_steps:
    checkpointing.save_best_model(workdir, state.variables, spec,
                                  {**model_info, 'step': total_steps}, name='final_model')
  protocol = {
      'train_examples': len(datasets.train), 'steps_per_epoch': steps_per_epoch,
      'last_batch': config.last_batch, 'val_fraction': datasets.val_fraction,
      'val_examples': 0 if datasets.val is None else len(datasets.val)
  }
  return final_report(config, workdir, model, state, datasets, evaluator, eval_key, progress_record,
                      mesh, protocol)


def model_metadata(config, workdir: Path, datasets) -> dict:
  """What best_model/ and final_model/ record besides the variables: the run, the method,
  the evaluation transform (``preprocessing``) and the dataset's ``class_names``, which
  :mod:`twins_jax.predict` applies and prints."""
  info = {
      'run': str(workdir), 'method': config.method, 'dataset': datasets.name, 'preprocessing': {
          'augment': datasets.augment, 'image_size': datasets.image_size,
          'resize_size': datasets.resize_size
      }
  }
  names = datasets.class_names
  if names and len(names) == datasets.num_classes:
    info['class_names'] = [str(n) for n in names]
  return info


def final_report(config, workdir: Path, model, state, datasets, evaluator, key, progress_record,
                 mesh, protocol: dict) -> dict:
  """Test-set accuracy of the last model (and of the best by validation, when a validation
  split was held out); table and plots."""
  n_proc, proc = jax.process_count(), jax.process_index()
  candidates = {'last': state.variables}
  if (workdir / 'best_model').is_dir():
    _, best_vars, _ = model_io.load_model_dir(workdir / 'best_model')
    candidates = {'best': parallel.replicate(best_vars, mesh), **candidates}
  rows = {}
  for name, variables in candidates.items():
    test = evaluator(
        variables,
        datasets.eval_batches('test', config.eval_batch_size, proc, n_proc,
                              **setup.pipeline_options(config)), key, desc=f'test ({name})')
    if config.autoattack != 'none':
      test.update(evaluate.autoattack_accuracy(model, variables, datasets, config, mesh, workdir))
    rows[name] = test
  results = {
      'method': config.method, 'dataset': config.dataset, 'workdir': str(workdir),
      'steps': int(jax.device_get(state.step)), 'source': progress_record.get('source'),
      'best_validation': progress_record.get('best'), 'test': rows, 'protocol': protocol
  }
  if proc == 0:
    (workdir / 'results.json').write_text(json.dumps(results, indent=2))
    table = reporting.results_table(results, config)
    (workdir / 'results.md').write_text(table + '\n')
    print(table)
    reporting.plot_curves(workdir)
  return results
