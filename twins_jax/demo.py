"""The offline demo: robust pre-training on a source task, then TWINS-AT against AT.

Runs entirely on data that ships with scikit-learn (handwritten digits), so it needs
no network: a small ResNet is adversarially pre-trained (AT) on the source digits,
then fine-tuned on the *other* digits with TWINS-AT and with the AT baseline, and
the two are evaluated (clean and PGD accuracy on the test split). Every stage is an
ordinary :func:`twins_jax.train.train_and_evaluate` run in its own sub-directory, so
re-running the command resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import ml_collections

from twins_jax import train


def _stage(config, **overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  for k in ('source_classes', 'target_classes', 'source_epochs', 'source_lr', 'target_epochs'):
    del c[k]
  c.mode = 'train'
  c.update(overrides)
  return c


def run_demo(config: ml_collections.ConfigDict, workdir) -> dict:
  start = time.perf_counter()
  workdir = Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  # One compilation cache for all stages: identical programs (e.g. the evaluation of
  # the two plain networks) compile once, and a repeated demo skips compiling.
  if not config.compilation_cache_dir:
    config = ml_collections.ConfigDict(config.to_dict())
    config.compilation_cache_dir = str(workdir / 'jax_cache')

  print(f'[1/3] Adversarial pre-training (AT) on digits {tuple(config.source_classes)}')
  source = train.train_and_evaluate(
      _stage(config, method='at', digits_classes=config.source_classes, pretrained='',
             num_epochs=config.source_epochs, lr=config.source_lr,
             lr_milestones=(int(config.source_epochs * 0.75),)), workdir / 'source')
  pretrained = str(workdir / 'source' / 'best_model')

  results = {'source': source}
  for i, method in enumerate(('twins_at', 'at')):
    print(f'[{i + 2}/3] Fine-tuning with {method} on digits {tuple(config.target_classes)} '
          f'from {pretrained}')
    results[method] = train.train_and_evaluate(
        _stage(config, method=method, digits_classes=config.target_classes,
               pretrained=pretrained, num_epochs=config.target_epochs), workdir / method)

  wall = time.perf_counter() - start
  table = comparison_table(results, config, wall)
  print('\n' + table)
  (workdir / 'results.md').write_text(table + '\n')
  (workdir / 'results.json').write_text(json.dumps({**results, 'wall_seconds': wall}, indent=2))
  return results


def comparison_table(results: dict, config, wall: float) -> str:
  s = results['source']['test']['best']
  lines = [
      '## TWINS demo: robust transfer on scikit-learn digits',
      '',
      f'Source model: {config.arch} adversarially pre-trained (AT, {config.source_epochs} '
      f'epochs) on digits {tuple(config.source_classes)}: test clean '
      f'{100 * s["clean_acc"]:.2f} %, PGD-{config.eval_attack_steps} {100 * s["pgd_acc"]:.2f} %.',
      f'Target task: digits {tuple(config.target_classes)}, {config.target_epochs} epochs, '
      f'Linf eps {config.eps:.4g} (PGD-{config.attack_steps} in training, '
      f'PGD-{config.eval_attack_steps} at test), lr {config.lr}, wd {config.weight_decay}.',
      '',
      f'| fine-tuning | clean % (best) | PGD % (best) | clean % (last) | PGD % (last) |',
      '|---|---|---|---|---|',
  ]
  for method in ('twins_at', 'at'):
    t = results[method]['test']
    b, l = t.get('best', t['last']), t['last']
    lines.append(f'| {method} | {100 * b["clean_acc"]:.2f} | {100 * b["pgd_acc"]:.2f} | '
                 f'{100 * l["clean_acc"]:.2f} | {100 * l["pgd_acc"]:.2f} |')
  tw, at = results['twins_at']['test'], results['at']['test']
  d_clean = tw.get('best', tw['last'])['clean_acc'] - at.get('best', at['last'])['clean_acc']
  d_pgd = tw.get('best', tw['last'])['pgd_acc'] - at.get('best', at['last'])['pgd_acc']
  lines += ['', f'TWINS-AT minus AT (best checkpoints): clean {100 * d_clean:+.2f} points, '
            f'PGD {100 * d_pgd:+.2f} points ({results["twins_at"]["test"]["last"]["num_examples"]}'
            ' test images; one seed, so differences of a point or two are within noise).',
            f'Wall time: {wall:.0f} s.']
  return '\n'.join(lines)
