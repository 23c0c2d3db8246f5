"""From a config to what a run needs: checks, the model spec, datasets, initial variables,
step settings. Training (:mod:`twins_jax.train`) and evaluation (:mod:`twins_jax.evaluate`)
both start here, so neither imports the other.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax
import ml_collections

from twins_jax import data, hub, model_io, models, objectives, port, speed
from twins_jax import step as step_lib

log = logging.getLogger('twins_jax')

MODES = ('train', 'eval')
DTYPES = ('float32', 'bfloat16')
AUTOATTACK_VERSIONS = ('none', 'fast', 'standard')


def check_config(config: ml_collections.ConfigDict) -> None:
  """Clear errors for settings that cannot work, before anything expensive starts."""
  if config.method not in objectives.METHODS:
    raise ValueError(f'config.method={config.method!r}; choose one of {objectives.METHODS}.')
  if config.mode not in MODES:
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
  if config.conv_impl not in speed.CONV_IMPLS:
    raise ValueError(f'config.conv_impl={config.conv_impl!r}; choose one of '
                     f'{speed.CONV_IMPLS}.')
  if config.dtype not in DTYPES:
    raise ValueError(f"config.dtype={config.dtype!r}; choose 'float32' or 'bfloat16'.")
  if config.autoattack not in AUTOATTACK_VERSIONS:
    raise ValueError(f"config.autoattack={config.autoattack!r}; choose 'none', 'fast' or "
                     "'standard'.")
  if config.get('profile_steps', 0) < 0:
    raise ValueError(f'config.profile_steps must be 0 (off) or positive, got '
                     f'{config.profile_steps}.')
  if config.data_workers < -1 or config.data_threads < 1:
    raise ValueError(f'config.data_workers must be -1 (auto), 0 or more and config.data_threads '
                     f'1 or more, got {config.data_workers} and {config.data_threads}.')
  # Tuple fields take anything on the command line (--config.lr_milestones=abc -> ('abc',)).
  for name, types, example in (('lr_milestones', (int, float), '"(30,50)"'), ('digits_classes',
                                                                              (int,), '"(5,6,7)"')):
    if any(isinstance(v, bool) or not isinstance(v, types) for v in config.get(name, ())):
      raise ValueError(f'config.{name}={tuple(config[name])!r} must be a tuple of '
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


def build_model(config, spec: models.ModelSpec) -> models.ResNet:
  """``spec``'s module with the run's computation settings (dtype, convolutions)."""
  return spec.build(dtype=jax.numpy.dtype(config.dtype), conv_impl=config.conv_impl)


def data_config(config) -> dict:
  """The data fields of ``config``, with the 'pick the default' values ('', 0, ()) as None."""
  fields = ('dataset', 'data_dir', 'folder_train', 'folder_test', 'digits_classes', 'val_fraction',
            'augment', 'image_size', 'seed')
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
      raise ValueError(f'config.pretrained {path} holds a {source.arch}, but config.arch is '
                       f'{spec.arch}.')
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
  raise FileNotFoundError(f'config.pretrained={src!r} is neither a model directory nor a file.')


def enable_compilation_cache(config, workdir: Path) -> None:
  """The persistent XLA compilation cache (``config.compilation_cache_dir``)."""
  cache = config.compilation_cache_dir
  if cache == 'none':
    return
  cache = Path(cache).expanduser() if cache else workdir / 'jax_cache'
  jax.config.update('jax_compilation_cache_dir', str(cache))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def write_config(config, workdir: Path) -> None:
  if jax.process_index() == 0:
    (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2, sort_keys=True))
