"""From a config to what a run needs: checks, the model spec, datasets, initial variables,
step settings. Training (:mod:`twins_jax.train`) and evaluation (:mod:`twins_jax.evaluate`)
both start here, so neither imports the other.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import jax
import ml_collections

from twins_jax import attacks, data, hub, model_io, models, objectives, port, speed
from twins_jax.errors import CheckpointError, ConfigError, WorkdirError
from twins_jax import step as step_lib

log = logging.getLogger('twins_jax')

MODES = ('train', 'eval')
DTYPES = ('float32', 'bfloat16')
AUTOATTACK_VERSIONS = ('none', 'fast', 'standard')


def _choice(config, name: str, choices) -> None:
  if config[name] not in choices:
    raise ConfigError(f'config.{name}={config[name]!r}; choose one of {tuple(choices)}.')


def _at_least(config, name: str, low, what: str = '') -> None:
  if config[name] < low:
    raise ConfigError(f'config.{name} must be {what or f"at least {low}"}, got {config[name]}.')


def check_config(config: ml_collections.ConfigDict) -> None:
  """Clear errors (:class:`~twins_jax.errors.ConfigError`) for settings that cannot work,
  before anything expensive starts."""
  _choice(config, 'method', objectives.METHODS)
  _choice(config, 'mode', MODES)
  _choice(config, 'arch', sorted(models.ARCHS))
  _choice(config, 'dataset', data.DATASETS)
  _choice(config, 'norm', attacks.NORMS)
  _choice(config, 'attack_loss', attacks.LOSSES)
  _choice(config, 'last_batch', data.LAST_BATCH)
  _choice(config, 'conv_impl', speed.CONV_IMPLS)
  _choice(config, 'dtype', DTYPES)
  _choice(config, 'autoattack', AUTOATTACK_VERSIONS)
  if config.batch_size < 2:
    raise ConfigError(f'config.batch_size={config.batch_size}: TWINS splits each batch in two '
                      'halves, so it needs at least 2 examples.')
  if config.num_epochs <= 0 and config.mode == 'train':
    raise ConfigError(f'config.num_epochs must be positive, got {config.num_epochs}.')
  for name in ('lr', 'eps', 'alpha', 'weight_decay', 'lambda_twins', 'beta', 'attack_steps',
               'eval_attack_steps', 'seed', 'image_size', 'resize', 'autoattack_max_examples',
               'sanity_examples', 'checkpoint_every_steps', 'profile_steps'):
    _at_least(config, name, 0, 'non-negative')
  for name in ('eval_batch_size', 'log_every_steps', 'keep_checkpoints', 'eval_every_epochs',
               'data_threads', 'autoattack_chunk'):
    _at_least(config, name, 1)
  _at_least(config, 'data_workers', -1, '-1 (auto), 0 or more')
  if not 0 <= config.momentum < 1 or not 0 < config.lr_gamma <= 1:
    raise ConfigError(f'config.momentum must be in [0, 1) and config.lr_gamma in (0, 1], got '
                      f'{config.momentum} and {config.lr_gamma}.')
  if config.eps > 1 and config.norm == 'Linf':
    raise ConfigError(f'config.eps={config.eps} is larger than the [0, 1] pixel range; eps is '
                      'in pixel units, e.g. 0.0314 for 8/255.')
  if config.attack_loss == 'kl' and config.method not in ('trades', 'twins_trades'):
    raise ConfigError(f"config.attack_loss='kl' (TRADES' KL-PGD) needs a TRADES method, not "
                      f"config.method={config.method!r}; use attack_loss='ce'.")
  if config.share_affine and config.method not in objectives.TWIN_METHODS:
    raise ConfigError(f'config.share_affine=True applies to the TWINS methods only, not '
                      f'{config.method!r}; drop it.')
  if config.mode == 'eval' and not config.pretrained:
    raise ConfigError("config.mode='eval' needs config.pretrained: a model directory, a "
                      'training workdir or a PyTorch checkpoint.')
  # Tuple fields take anything on the command line (--config.lr_milestones=abc -> ('abc',)).
  for name, types, example in (('lr_milestones', (int, float), '"(30,50)"'), ('digits_classes',
                                                                              (int,), '"(5,6,7)"')):
    if any(isinstance(v, bool) or not isinstance(v, types) for v in config.get(name, ())):
      raise ConfigError(f'config.{name}={tuple(config[name])!r} must be a tuple of '
                        f'{" or ".join(t.__name__ for t in types)}s, e.g. '
                        f'--config.{name}={example}.')


def step_config(config) -> step_lib.StepConfig:
  """The training step's settings."""
  return step_lib.StepConfig(method=config.method, eps=config.eps, alpha=config.alpha,
                             steps=config.attack_steps, norm=config.norm,
                             lambda_twins=config.lambda_twins, beta=config.beta,
                             random_start=config.random_start, attack_loss=config.attack_loss,
                             fold_bn_attack=config.fold_bn_attack)


def eval_step_config(config) -> step_lib.StepConfig:
  """The evaluation PGD's settings."""
  return step_lib.StepConfig(method=config.method, eps=config.eps, alpha=config.alpha,
                             steps=config.eval_attack_steps, norm=config.norm,
                             random_start=config.eval_random_start,
                             fold_bn_attack=config.fold_bn_attack)


def model_spec(config, num_classes: int) -> models.ModelSpec:
  """The model a training run fine-tunes: a twin model for the TWINS methods."""
  twin = config.method in objectives.TWIN_METHODS
  return models.ModelSpec(config.arch, num_classes, resize=config.resize or None, twin=twin,
                          share_affine=bool(config.share_affine) and twin)


def check_data(config, num_classes: int) -> None:
  """Checks of the config that need the dataset (its number of classes)."""
  if config.autoattack != 'none' and num_classes < 4:
    raise ConfigError(f"config.autoattack='{config.autoattack}' needs at least 4 classes (APGD-T's "
                      f'targeted DLR loss compares the 3rd and 4th largest logits), but the data '
                      f"has {num_classes}; set config.autoattack='none'.")


def build_model(config, spec: models.ModelSpec) -> models.ResNet:
  """``spec``'s module with the run's computation settings (dtype, convolutions)."""
  return spec.build(dtype=jax.numpy.dtype(config.dtype), conv_impl=config.conv_impl)


def data_config(config) -> dict:
  """The data fields of ``config``, with the 'pick the default' values ('', 0, ()) as None."""
  fields = ('dataset', 'data_dir', 'folder_train', 'folder_test', 'digits_classes', 'val_fraction',
            'augment', 'image_size', 'seed', 'skip_bad_images')
  out = {k: config[k] for k in fields}
  for k in ('data_dir', 'folder_train', 'folder_test', 'augment', 'image_size', 'digits_classes'):
    if not out[k]:
      out[k] = None
  return out


def build_datasets(config) -> data.Datasets:
  datasets = data.build_datasets(data_config(config))
  log.info('%s', datasets.describe())
  return datasets


def pipeline_options(config) -> dict:
  """How the input pipelines run: grain worker processes and threads per process.

  ``config.data_workers=-1`` (auto): none on a CPU backend (the model needs those cores),
  else one per CPU core but one (at most 16). The batches are the same either way.
  """
  workers = int(config.data_workers)
  if workers < 0:
    workers = 0 if jax.default_backend() == 'cpu' else max(0, min(16, (os.cpu_count() or 1) - 1))
  return dict(worker_count=workers, threads=int(config.data_threads))


def initial_variables(config, spec: models.ModelSpec) -> tuple[dict, str]:
  """Pre-trained variables laid out for ``spec``'s model, and where they came from.

  ``config.pretrained`` is a model directory (ported, or written by an earlier run), a
  training workdir, a PyTorch checkpoint (ported on the fly; a file or
  ``hf://ORG/REPO/FILE`` on the Hugging Face Hub, see :mod:`twins_jax.hub`), or empty
  (random initialisation).
  """
  model = spec.build()
  src = config.pretrained
  if not src:
    return models.init_variables(model, config.seed), 'random initialisation (no config.pretrained)'
  if hub.is_hf_uri(src):
    variables, report = port.port_checkpoint(src, spec, seed=config.seed)
    log.info('Ported %s:\n%s', src, report.summary(problems=False))
    return variables, f'PyTorch checkpoint {src} (ported; sha256 {report.source_sha256})'
  path = Path(os.path.expanduser(src))
  if path.is_dir():
    path = model_io.resolve_model_dir(path)
    _, variables, meta = model_io.load_model_dir(path)
    source = meta['spec']
    if source.arch != spec.arch:
      raise CheckpointError(f'config.pretrained {path} holds a {source.arch}, but config.arch is '
                            f'{spec.arch}; set --config.arch={source.arch}.')
    variables = models.convert_variables(variables, twin=spec.twin, share_affine=spec.share_affine)
    if source.num_classes != spec.num_classes:
      fresh = models.init_variables(model, config.seed)
      variables['params']['fc'] = fresh['params']['fc']
      return variables, (f'model directory {path} (new {spec.num_classes}-class head, '
                         f'PyTorch default init)')
    return variables, f'model directory {path}'
  if path.is_file():
    variables, report = port.port_checkpoint(str(path), spec, seed=config.seed)
    log.info('Ported %s:\n%s', path, report.summary(problems=False))
    return variables, f'PyTorch checkpoint {path} (ported)'
  raise CheckpointError(f'config.pretrained={src!r} does not exist; give a model directory, a '
                        'training workdir or a PyTorch checkpoint file.')


def enable_compilation_cache(config, workdir: Path) -> None:
  """The persistent XLA compilation cache (``config.compilation_cache_dir``)."""
  cache = config.compilation_cache_dir
  if cache == 'none':
    return
  cache = Path(cache).expanduser() if cache else workdir / 'jax_cache'
  jax.config.update('jax_compilation_cache_dir', str(cache))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


# Settings a re-run of a workdir may change: how the run goes, not what it is (logging and
# checkpoint frequency, the number of epochs to extend a run, evaluation-only settings,
# speed levers that compute the same function). Any other difference is refused.
RERUN_SAFE_KEYS = frozenset({
    'num_epochs', 'log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
    'async_checkpoints', 'compilation_cache_dir', 'data_workers', 'data_threads', 'profile_steps',
    'conv_impl', 'eval_batch_size', 'eval_every_epochs', 'eval_attack_steps', 'eval_random_start',
    'autoattack', 'autoattack_max_examples', 'autoattack_chunk', 'sanity_examples'
})
# What a workdir holds once a run has done something in it.
_RUN_STATE = ('checkpoints', 'final_model', 'best_model', 'results.json', 'eval_results.json',
              'autoattack')
CONFIG_JSON = 'config.json'


def _config_dict(config) -> dict:
  return json.loads(config.to_json_best_effort(sort_keys=True))


def config_changes(saved: dict, config) -> tuple[dict, dict]:
  """``(refused, accepted)``: the keys whose value differs from the workdir's saved config,
  as ``{key: (saved, new)}``, split by :data:`RERUN_SAFE_KEYS`. Keys the saved config lacks
  (a newer version added them) are not compared."""
  new = _config_dict(config)
  refused, accepted = {}, {}
  for key in sorted(set(saved) & set(new)):
    if saved[key] != new[key]:
      (accepted if key in RERUN_SAFE_KEYS else refused)[key] = (saved[key], new[key])
  return refused, accepted


def prepare_workdir(config, workdir) -> Path:
  """Creates ``workdir`` (or checks it), refuses a re-run that changes what the run is, and
  writes ``config.json``. A refused command changes nothing in the workdir."""
  workdir = Path(workdir).expanduser().absolute()
  if workdir.exists() and not workdir.is_dir():
    raise WorkdirError(f'--workdir {workdir} is a file, not a directory; choose another path.')
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f'.write_test.{os.getpid()}'
    probe.write_text('')
    probe.unlink()
  except OSError as e:
    raise WorkdirError(f'cannot write in --workdir {workdir} ({e.strerror or e}); choose a '
                       'writable directory.') from e
  saved_path = workdir / CONFIG_JSON
  started = any((workdir / name).exists() for name in _RUN_STATE)
  if saved_path.is_file() and started:
    try:
      saved = json.loads(saved_path.read_text())
    except ValueError as e:
      raise WorkdirError(f'{saved_path} is not valid JSON ({e}); restore it, or use another '
                         '--workdir.') from e
    refused, accepted = config_changes(saved, config)
    if refused:
      listed = ', '.join(f'{k} ({old!r} -> {new!r})' for k, (old, new) in refused.items())
      raise WorkdirError(
          f'{workdir} holds a run made with other settings: {listed}; re-run with the '
          'settings in its config.json, or use a new --workdir for the new run', details='\n'.join(
              f'  {k}: {old!r} in {saved_path}, {new!r} now' for k, (old, new) in refused.items()))
    for key, (old, new) in accepted.items():
      log.info('Re-run of %s with %s changed: %r -> %r.', workdir, key, old, new)
  if jax.process_index() == 0:
    tmp = workdir / (CONFIG_JSON + '.tmp')
    tmp.write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, saved_path)
  return workdir
