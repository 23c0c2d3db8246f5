"""Evaluation of a trained or ported model: clean, PGD-k and AutoAttack accuracy.

  python main.py --config=configs/cifar10.py --workdir=runs/eval --config.mode=eval \
      --config.pretrained=runs/cifar10 --config.autoattack=standard

``config.pretrained`` may be a model directory, a training workdir (its ``best_model``,
or else its ``final_model``, is used) or a PyTorch checkpoint (ported on the fly: a file or
``hf://ORG/REPO/FILE``). Every
report carries RobustBench-style sanity flags against gradient masking: PGD with eps = 0
gives the clean accuracy; AutoAttack <= PGD <= clean; accuracy does not rise with eps.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from twins_jax import autoattack as aa
from twins_jax import data, errors, hub, model_io, models, parallel, reporting, setup
from twins_jax import step as step_lib

log = logging.getLogger('twins_jax')


class Evaluator:
  """Clean and PGD accuracy of the Adaptive Net (eval mode) over a whole split.

  Batches are padded and masked, so every example counts exactly once. One compiled
  program serves every call (and every PGD radius).
  """

  def __init__(self, model, config, mesh):
    self.mesh = mesh
    self.config = config
    self._step = parallel.jit_eval_step(
        step_lib.make_eval_step(model, setup.eval_step_config(config)), mesh)

  def __call__(self, variables, batches: data.Batches, key, desc: str = 'eval',
               eps: Optional[float] = None) -> dict:
    totals = {'clean': 0.0, 'pgd': 0.0, 'count': 0.0}
    eps = jnp.float32(self.config.eps if eps is None else eps)
    outs = []
    try:
      for i, batch in enumerate(
          reporting.progress(batches, total=batches.num_batches, desc=desc, unit='batch',
                             enabled=jax.process_index() == 0)):
        outs.append(
            self._step(variables, parallel.shard_batch(batch, self.mesh),
                       jax.random.fold_in(key, i), eps))
    finally:
      batches.close()
    for out in parallel.fetch(outs):  # one host sync per evaluation
      totals['clean'] += float(np.sum(out['clean']))
      totals['pgd'] += float(np.sum(out['pgd']))
      totals['count'] += float(np.sum(out['mask']))
    n = max(totals['count'], 1.0)
    return {
        'clean_acc': totals['clean'] / n, 'pgd_acc': totals['pgd'] / n,
        'num_examples': int(totals['count'])
    }


def _examples(datasets, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
  """Test examples ``lo..hi-1``, transformed for evaluation."""
  images, labels = [], []
  for i in range(lo, hi):
    image, label = datasets.test[i]
    images.append(
        data.transform(image, train=False, augment=datasets.augment, image_size=datasets.image_size,
                       resize_size=datasets.resize_size, rng=None))
    labels.append(label)
  shape = (0, datasets.image_size, datasets.image_size, 3)
  return (np.stack(images).astype(np.float32) if images else np.zeros(shape, np.float32),
          np.asarray(labels, np.int32))


def _allgather_sum(values: np.ndarray) -> np.ndarray:
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(values)).sum(0)


# Bump when a change to the attacks or to their randomness changes what a chunk records:
# chunk files of another version are then not reused.
AUTOATTACK_FORMAT = 2


def autoattack_fingerprint(variables, config, n: int, chunk: int,
                           image_size: int) -> tuple[str, dict]:
  """What a chunk's result depends on: the model's variables (hashed), the attack settings,
  the seed, the data settings (dataset, folders, classes, skipped images...) and the
  chunking. Returns ``(hex digest, the settings)``."""
  h = hashlib.sha256()
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(jax.device_get(variables)), sep='/')
  for name in sorted(flat):
    a = np.asarray(flat[name])
    h.update(f'{name}:{a.dtype}:{a.shape};'.encode())
    h.update(np.ascontiguousarray(a).tobytes())
  settings = {
      'format': AUTOATTACK_FORMAT, 'variables_sha256': h.hexdigest(), 'version': config.autoattack,
      'norm': config.norm, 'eps': float(config.eps), 'seed': int(config.seed),
      'data': setup.data_config(config), 'image_size': int(image_size),
      'resize': int(config.resize), 'examples': int(n), 'chunk': int(chunk)
  }
  digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
  return digest, settings


def _write_json(path: Path, obj) -> None:
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(json.dumps(obj))
  os.replace(tmp, path)  # a chunk file is whole or absent


def _read_chunk(path: Path, start: int, stop: int, names: list) -> Optional[dict]:
  """A finished chunk's record, or None if it is missing or does not fit (then it is
  attacked again)."""
  try:
    rec = json.loads(path.read_text())
    if (rec['start'], rec['stop'], rec['names']) == (start, stop, names):
      return rec
  except FileNotFoundError:
    return None
  except (ValueError, KeyError, TypeError) as e:
    log.warning('AutoAttack: ignoring unreadable chunk record %s (%s); attacking it again', path, e)
  return None


@functools.lru_cache(maxsize=None)
def _eval_apply(model):
  """``(variables, x) -> logits`` of ``model`` in eval mode: one function per model, so
  the attacks compiled for one set of variables serve every other (the best and the last
  model of a run)."""
  return lambda variables, x: model.apply(variables, x, mode=models.EVAL)


def autoattack_accuracy(model, variables, datasets, config, mesh=None,
                        workdir: Optional[Path] = None) -> dict:
  """AutoAttack (``config.autoattack``: 'fast' or 'standard') on the test set.

  Returns the robust accuracy after each attack and overall. The (first
  ``autoattack_max_examples``) test examples are cut into chunks of
  ``config.autoattack_chunk``; chunk ``c`` goes to process ``c % process_count`` and is
  sharded over that process's devices (its part of ``mesh``). Every example draws its
  randomness from the seed and its global index, so the numbers do not depend on the
  number of devices, processes or on the chunking.

  With a ``workdir``, each finished chunk is recorded in
  ``workdir/autoattack/<fingerprint>/`` (the fingerprint covers the model's variables,
  the attack settings, the seed, the data and the chunking): a killed evaluation run
  again skips the chunks already done and gives the same numbers.
  """
  variables = jax.device_get(variables)
  logits_fn = jax.tree_util.Partial(_eval_apply(model), variables)
  n_test = len(datasets.test)
  limit = config.autoattack_max_examples
  n = n_test if not limit else min(limit, n_test)
  chunk = int(config.autoattack_chunk)
  n_proc, proc = jax.process_count(), jax.process_index()
  chunks = [(s, min(n, s + chunk)) for s in range(0, n, chunk)]
  mine = [c for i, c in enumerate(chunks) if i % n_proc == proc]
  names = ['clean'] + list(aa.suite.VERSIONS[config.autoattack])
  # This process's devices of ``mesh`` (all of them with one process).
  local = [] if mesh is None else [d for d in mesh.devices.flat if d.process_index == proc]
  local_mesh = parallel.data_mesh(local) if len(local) > 1 else None
  key = jax.random.fold_in(jax.random.key(config.seed), 3)
  batch = max(1, config.eval_batch_size // n_proc)

  record_dir = None
  if workdir is not None:
    digest, settings = autoattack_fingerprint(variables, config, n, chunk, datasets.image_size)
    record_dir = Path(workdir) / 'autoattack' / digest[:16]
    try:
      record_dir.mkdir(parents=True, exist_ok=True)
      if proc == 0:
        _write_json(record_dir / 'settings.json', settings)
    except OSError as e:
      raise errors.WorkdirError(f'cannot write AutoAttack progress to {record_dir} ({e}); '
                                'free space or choose another --workdir') from e

  counts = np.zeros(len(names) + 2)  # robust after each stage, robust at the end, examples
  todo, done = [], 0
  for start, stop in mine:
    rec = None if record_dir is None else _read_chunk(record_dir /
                                                      f'chunk_{start:08d}.json', start, stop, names)
    if rec is None:
      todo.append((start, stop))
    else:
      counts += np.asarray(rec['counts'], np.float64)
      done += 1
  if done:
    log.info(
        'AutoAttack: %d of %d chunks of this process already done (%s); attacking the '
        'other %d', done, len(mine), record_dir, len(todo))
  bar = reporting.progress(todo, total=len(todo), desc=f'AutoAttack ({config.autoattack})',
                           unit='chunk', enabled=True)
  for start, stop in bar:
    xs, ys = _examples(datasets, start, stop)
    _, robust, accs = aa.autoattack(logits_fn, xs, ys, key, norm=config.norm, eps=config.eps,
                                    version=config.autoattack, batch_size=min(len(xs), batch),
                                    mesh=local_mesh, index_offset=start,
                                    progress=lambda s: log.debug('%s', s))
    robust = np.asarray(robust)
    c = [round(accs[k] * len(xs)) for k in names] + [int(robust.sum()), len(xs)]
    if record_dir is not None:
      try:
        _write_json(
            record_dir / f'chunk_{start:08d}.json', {
                'start': start, 'stop': stop, 'names': names, 'counts': c, 'robust_indices':
                    (start + np.nonzero(robust)[0]).tolist()
            })
      except OSError as e:
        raise errors.WorkdirError(f'cannot record AutoAttack chunk {start}..{stop} in '
                                  f'{record_dir} ({e}); free space and run again: the '
                                  'finished chunks are kept') from e
    counts += np.asarray(c, np.float64)
  counts = _allgather_sum(counts)
  total = max(counts[-1], 1.0)
  return {
      'autoattack_acc': float(counts[-2] / total),
      'autoattack_after': {k: float(counts[i] / total) for i, k in enumerate(names)},
      'autoattack_examples': int(counts[-1]), 'autoattack_version': config.autoattack
  }


def sanity_flags(result: dict, eps_curve: dict) -> dict:
  """RobustBench-style checks against gradient masking (True = passed).

  ``eps_curve`` maps eps to the Evaluator's result on the sanity subset (which holds
  both the clean and the PGD accuracy of the same examples).
  """
  flags = {}
  if 0.0 in eps_curve:
    flags['eps0_equals_clean'] = bool(
        abs(eps_curve[0.0]['pgd_acc'] - eps_curve[0.0]['clean_acc']) < 1e-9)
  flags['pgd_le_clean'] = bool(result['pgd_acc'] <= result['clean_acc'] + 1e-9)
  if 'autoattack_acc' in result:
    pgd = result.get('pgd_acc_on_autoattack_examples', result['pgd_acc'])
    flags['autoattack_le_pgd'] = bool(result['autoattack_acc'] <= pgd + 1e-9)
  accs = [eps_curve[e]['pgd_acc'] for e in sorted(eps_curve)]
  flags['non_increasing_in_eps'] = bool(all(b <= a + 1e-9 for a, b in zip(accs, accs[1:])))
  return flags


def evaluate_config(config: ml_collections.ConfigDict, workdir: Path) -> dict:
  """``config.mode == 'eval'``: evaluates ``config.pretrained`` on the full test set."""
  if not config.pretrained:
    raise errors.ConfigError("config.mode='eval' needs config.pretrained: a model directory, a "
                             'training workdir or a PyTorch checkpoint.')
  # An hf:// path stays a string (a Path would fold its '//').
  src = config.pretrained if hub.is_hf_uri(config.pretrained) else Path(
      config.pretrained).expanduser()
  if isinstance(src, Path) and src.is_dir():
    src = model_io.resolve_model_dir(src)
  mesh = parallel.data_mesh()
  datasets = setup.build_datasets(config)
  setup.check_data(config, datasets.num_classes)
  spec = setup.model_spec(config, datasets.num_classes)
  if isinstance(src, Path) and src.is_dir():
    spec = model_io.read_model_json(src)['spec']
    if spec.num_classes != datasets.num_classes:
      raise errors.CheckpointError(
          f'{src} has a {spec.num_classes}-class head but {datasets.name} has '
          f'{datasets.num_classes} classes; evaluate it on the dataset it was trained for')
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.pretrained = str(src)
  variables, source = setup.initial_variables(cfg, spec)
  model = spec.build(conv_impl=config.conv_impl)
  variables = parallel.replicate(variables, mesh)
  key = jax.random.fold_in(jax.random.key(config.seed), 2)
  proc, n_proc = jax.process_index(), jax.process_count()
  options = setup.pipeline_options(config)

  def batches(source=None):
    return datasets.eval_batches('test', config.eval_batch_size, proc, n_proc, source=source,
                                 **options)

  evaluator = Evaluator(model, config, mesh)
  result = evaluator(variables, batches(), key, desc='test')
  # Sanity curve: PGD accuracy at 0, eps/2, eps, 2 eps on (a subset of) the test set.
  n_sanity = min(config.sanity_examples or len(datasets.test), len(datasets.test))
  subset = data.SubsetSource(datasets.test, np.arange(n_sanity))
  eps_curve = {}
  for factor in (0.0, 0.5, 1.0, 2.0):
    eps = config.eps * factor
    eps_curve[eps] = evaluator(variables, batches(subset), key, desc=f'sanity eps={eps:.4g}',
                               eps=eps)
  if config.autoattack != 'none':
    result.update(autoattack_accuracy(model, variables, datasets, config, mesh, workdir))
    if result['autoattack_examples'] < result['num_examples']:
      # Compare AutoAttack with PGD on the same examples.
      aa_subset = data.SubsetSource(datasets.test, np.arange(result['autoattack_examples']))
      result['pgd_acc_on_autoattack_examples'] = evaluator(
          variables, batches(aa_subset), key, desc='PGD on the AutoAttack examples')['pgd_acc']
  result['sanity'] = sanity_flags(result, eps_curve)
  result['eps_curve'] = {f'{k:.6g}': v['pgd_acc'] for k, v in eps_curve.items()}
  result['sanity_examples'] = n_sanity
  result.update(source=source, model=str(src), dataset=config.dataset, eps=config.eps,
                norm=config.norm, pgd_steps=config.eval_attack_steps)
  if proc == 0:
    (workdir / 'eval_results.json').write_text(json.dumps(result, indent=2))
    text = eval_report(result, config)
    (workdir / 'eval_results.md').write_text(text + '\n')
    print(text)
  return result


def eval_report(result: dict, config) -> str:
  pct = lambda v: f'{100 * v:.2f}'
  lines = [
      f'## Evaluation of {result["model"]} on {result["dataset"]} '
      f'({result["norm"]}, eps {result["eps"]:.4g})', '', '| metric | accuracy % |', '|---|---|',
      f'| clean | {pct(result["clean_acc"])} |',
      f'| PGD-{result["pgd_steps"]} | {pct(result["pgd_acc"])} |'
  ]
  for name, acc in result.get('autoattack_after', {}).items():
    if name != 'clean':
      lines.append(f'| AutoAttack ({result["autoattack_version"]}) after {name} | {pct(acc)} |')
  if 'autoattack_acc' in result:
    lines.append(f'| **AutoAttack ({result["autoattack_version"]})** | '
                 f'**{pct(result["autoattack_acc"])}** |')
  aa_note = ''
  if 'pgd_acc_on_autoattack_examples' in result:
    aa_note = (f'; AutoAttack on the first {result["autoattack_examples"]} (PGD on those: '
               f'{pct(result["pgd_acc_on_autoattack_examples"])} %)')
  lines += [
      '', f'{result["num_examples"]} test examples (every one exactly once){aa_note}.', '',
      'Sanity checks (gradient masking): ' +
      ', '.join(f'{k}: {"ok" if v else "FAILED"}' for k, v in result['sanity'].items()),
      f'PGD accuracy by eps (first {result["sanity_examples"]} test examples): ' +
      ', '.join(f'{k}: {pct(v)}' for k, v in result['eps_curve'].items())
  ]
  return '\n'.join(lines)
