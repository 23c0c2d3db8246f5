"""The offline demo: robust pre-training on a source task, then TWINS-AT against AT, 3 seeds.

Runs entirely on data that ships with scikit-learn (handwritten digits), so it needs
no network: a small ResNet is adversarially pre-trained (AT) once on the source digits,
then fine-tuned on the *other* digits with TWINS-AT and with the AT baseline, each with
several seeds (data order, random starts and the new head's initialisation). The final
models are evaluated (clean and PGD accuracy on the test split, the reference protocol),
and ``results.md`` reports mean and standard deviation per method, with one figure that
overlays the two methods' effective learning rate (gradient norm / weight norm of the
shared weights), the mechanism the paper credits for TWINS' gains.

Every stage is an ordinary :func:`twins_jax.train.train_and_evaluate` run in its own
sub-directory, so re-running the command resumes where it stopped.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import ml_collections

from twins_jax import reporting, train

METHODS = ('twins_at', 'at')
DEMO_KEYS = ('source_classes', 'target_classes', 'source_epochs', 'source_lr', 'target_epochs',
             'seeds')
EFFECTIVE_LR = 'train/shared/grad_weight_ratio'


def _stage(config, **overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  for k in DEMO_KEYS:
    del c[k]
  c.mode = 'train'
  c.update(overrides)
  return c


def run_demo(config: ml_collections.ConfigDict, workdir) -> dict:
  start = time.perf_counter()
  workdir = Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  seeds = tuple(int(s) for s in config.seeds)
  if not seeds:
    raise ValueError('config.seeds is empty; give at least one, e.g. --config.seeds="(0,1,2)".')
  # One compilation cache for all stages: the seeds of a method run the same programs, so
  # they compile once, and a repeated demo skips compiling.
  if not config.compilation_cache_dir:
    config = ml_collections.ConfigDict(config.to_dict())
    config.compilation_cache_dir = str(workdir / 'jax_cache')

  n_stages = 1 + len(METHODS) * len(seeds)
  print(
      f'[1/{n_stages}] Adversarial pre-training (AT) on digits '
      f'{tuple(config.source_classes)}', flush=True)
  source = train.train_and_evaluate(
      _stage(config, method='at', digits_classes=config.source_classes, pretrained='',
             num_epochs=config.source_epochs, lr=config.source_lr,
             lr_milestones=(int(config.source_epochs * 0.75),)), workdir / 'source')
  pretrained = str(workdir / 'source')

  runs = {m: {} for m in METHODS}
  stage = 1
  for method in METHODS:
    for seed in seeds:
      stage += 1
      print(
          f'[{stage}/{n_stages}] Fine-tuning with {method} (seed {seed}) on digits '
          f'{tuple(config.target_classes)}', flush=True)
      runs[method][seed] = train.train_and_evaluate(
          _stage(config, method=method, digits_classes=config.target_classes, pretrained=pretrained,
                 num_epochs=config.target_epochs, seed=seed), workdir / f'{method}_seed{seed}')

  figure = plot_effective_lr(workdir, seeds)
  wall = time.perf_counter() - start
  summary = summarise(runs)
  table = comparison_table(source, runs, summary, config, wall, figure)
  print('\n' + table)
  (workdir / 'results.md').write_text(table + '\n')
  (workdir / 'results.json').write_text(
      json.dumps(
          {
              'source': source, 'runs': {
                  m: {str(s): r for s, r in rs.items()} for m, rs in runs.items()
              }, 'summary': summary, 'wall_seconds': wall
          }, indent=2))
  return {'source': source, 'runs': runs, 'summary': summary, 'wall_seconds': wall}


def _mean_std(values: list[float]) -> tuple[float, float]:
  return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: dict) -> dict:
  """Per method: the final models' test accuracies per seed, their mean and sample std."""
  out = {}
  for method, by_seed in runs.items():
    out[method] = {}
    for metric in ('clean_acc', 'pgd_acc'):
      values = [r['test']['last'][metric] for r in by_seed.values()]
      mean, std = _mean_std(values)
      out[method][metric] = {'values': values, 'mean': mean, 'std': std}
  return out


def effective_lr_curves(workdir: Path, seeds) -> dict:
  """``{method: [(epoch, ratio) per logged step] per seed}`` from the runs' metrics."""
  curves = {}
  for method in METHODS:
    curves[method] = []
    for seed in seeds:
      records = [
          r for r in reporting.read_metrics(workdir / f'{method}_seed{seed}') if EFFECTIVE_LR in r
      ]
      curves[method].append([(r['train/epoch'], r[EFFECTIVE_LR]) for r in records])
  return curves


def plot_effective_lr(workdir: Path, seeds) -> Path:
  """One PNG: each method's effective learning rate, mean over seeds with a min-max band."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import numpy as np

  fig, ax = plt.subplots(figsize=(7, 4))
  for method, color in zip(METHODS, ('tab:red', 'tab:blue')):
    curves = effective_lr_curves(workdir, seeds)[method]
    n = min(len(c) for c in curves)
    if n == 0:
      continue
    epochs = np.asarray([p[0] for p in curves[0][:n]])
    ratios = np.asarray([[p[1] for p in c[:n]] for c in curves])
    ax.plot(epochs, ratios.mean(0), color=color, label=f'{method} (mean of {len(seeds)} seeds)')
    ax.fill_between(epochs, ratios.min(0), ratios.max(0), color=color, alpha=0.2)
  ax.set_xlabel('epoch')
  ax.set_ylabel('||grad|| / ||w||, shared weights')
  ax.set_title('Effective learning rate (TWINS, CVPR 2023, section 4)')
  ax.legend()
  fig.tight_layout()
  path = workdir / 'effective_lr.png'
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def comparison_table(source: dict, runs: dict, summary: dict, config, wall: float,
                     figure: Path) -> str:
  s = source['test']['last']
  seeds = list(next(iter(runs.values())))
  pct = lambda v: f'{100 * v:.2f}'
  lines = [
      '## TWINS demo: robust transfer on scikit-learn digits',
      '',
      f'Source model: {config.arch} adversarially pre-trained once (AT, {config.source_epochs} '
      f'epochs) on digits {tuple(config.source_classes)}: test clean {pct(s["clean_acc"])} %, '
      f'PGD-{config.eval_attack_steps} {pct(s["pgd_acc"])} %.',
      f'Target task: digits {tuple(config.target_classes)}, {config.target_epochs} epochs, '
      f'Linf eps {config.eps:.4g} (PGD-{config.attack_steps} in training, '
      f'PGD-{config.eval_attack_steps} at test), lr {config.lr}, wd {config.weight_decay}; '
      f'seeds {tuple(seeds)}; the final models (the reference protocol).',
      '',
      f'| fine-tuning | clean % (mean ± std) | PGD-{config.eval_attack_steps} % (mean ± std) | '
      'clean % per seed | PGD % per seed |',
      '|---|---|---|---|---|',
  ]
  for method in runs:
    c, p = summary[method]['clean_acc'], summary[method]['pgd_acc']
    lines.append(f'| {method} | {pct(c["mean"])} ± {pct(c["std"])} | {pct(p["mean"])} ± '
                 f'{pct(p["std"])} | {", ".join(pct(v) for v in c["values"])} | '
                 f'{", ".join(pct(v) for v in p["values"])} |')
  d_clean = summary['twins_at']['clean_acc']['mean'] - summary['at']['clean_acc']['mean']
  d_pgd = summary['twins_at']['pgd_acc']['mean'] - summary['at']['pgd_acc']['mean']
  n_test = next(iter(runs['at'].values()))['test']['last']['num_examples']
  lines += [
      '',
      f'TWINS-AT minus AT (means): clean {100 * d_clean:+.2f} points, PGD {100 * d_pgd:+.2f} '
      f'points, on {n_test} test images; ± is the sample standard deviation over '
      f'{len(seeds)} seeds.',
      '',
      f'![effective learning rate]({figure.name})',
      '',
      f'`{figure.name}`: gradient norm over weight norm of the shared convolution and linear '
      'weights at each logged step, the mean over seeds with the min-max band.',
      f'Wall time: {wall:.0f} s.',
  ]
  return '\n'.join(lines)
