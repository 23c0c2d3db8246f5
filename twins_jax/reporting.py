"""Metrics (JSON lines and TensorBoard), progress bars with ETA, the results table, plots."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from tqdm.auto import tqdm

METRICS_FILE = 'metrics.jsonl'


class MetricWriter:
  """One JSON line per logged step in ``workdir/metrics.jsonl``, and a TensorBoard log.

  Lines are flushed as they are written, so nothing logged is lost on a crash.
  ``resume_step``: the step a (resumed) run starts from; records logged after it by an
  interrupted run are dropped (they are logged again), so every step appears once.
  """

  def __init__(self, workdir, enabled: bool = True, resume_step: Optional[int] = None):
    self.enabled = enabled
    if not enabled:
      return
    self.path = Path(workdir) / METRICS_FILE
    if resume_step is not None and self.path.exists():
      kept = []
      for line in self.path.read_text().splitlines():
        try:
          if json.loads(line)['step'] <= resume_step:
            kept.append(line + '\n')
        except (ValueError, KeyError, TypeError):  # e.g. a line cut short by a crash
          pass
      tmp = self.path.with_suffix('.tmp')
      tmp.write_text(''.join(kept))
      tmp.replace(self.path)
    self._file = open(self.path, 'a', buffering=1)
    try:
      from tensorboardX import SummaryWriter
      # purge_step: TensorBoard hides the events an interrupted run logged after it.
      self._tb = SummaryWriter(str(Path(workdir) / 'tensorboard'),
                               purge_step=(resume_step + 1 if resume_step else None))
    except ImportError:  # TensorBoard logs are optional
      self._tb = None

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), 'time': time.time(), **{k: float(v) for k, v in scalars.items()}}
    self._file.write(json.dumps(record) + '\n')
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, float(v), int(step))

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


def read_metrics(workdir) -> list[dict]:
  path = Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class TrainProgress:
  """A progress bar over training steps showing images/s and the ETA."""

  def __init__(self, total_steps: int, start_step: int, batch_size: int, enabled: bool = True):
    self.batch_size = batch_size
    self._bar = tqdm(total=total_steps, initial=start_step, desc='train', unit='step',
                     dynamic_ncols=True, disable=not enabled, file=sys.stderr, mininterval=1.0)
    self._last = start_step

  def update(self, step: int) -> None:
    self._bar.update(step - self._last)
    self._last = step

  def set_postfix(self, **kw) -> None:
    self._bar.set_postfix({k: f'{v:.4g}' for k, v in kw.items()}, refresh=False)

  def write(self, text: str) -> None:
    self._bar.write(text, file=sys.stderr)

  def close(self) -> None:
    self._bar.close()


def progress(iterable: Iterable, total: Optional[int] = None, desc: str = '', unit: str = 'it',
             enabled: bool = True):
  return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False,
              disable=not enabled, file=sys.stderr, mininterval=1.0)


def _pct(v) -> str:
  return '-' if v is None or (isinstance(v, float) and math.isnan(v)) else f'{100 * v:.2f}'


def results_table(results: dict, config) -> str:
  """A Markdown table: clean / PGD (/ AutoAttack) test accuracy of best and last models."""
  has_aa = any('autoattack_acc' in r for r in results['test'].values())
  head = f'| model | clean % | PGD-{config.eval_attack_steps} % |'
  sep = '|---|---|---|'
  if has_aa:
    head += f' AutoAttack ({config.autoattack}) % |'
    sep += '---|'
  lines = [
      f'## {results["method"]} on {results["dataset"]} '
      f'(eps {config.eps:.4g}, {config.norm}; test set, every example once)', '', head, sep
  ]
  for name, r in results['test'].items():
    row = f'| {name} | {_pct(r["clean_acc"])} | {_pct(r["pgd_acc"])} |'
    if has_aa:
      row += f' {_pct(r.get("autoattack_acc"))} |'
    lines.append(row)
  lines += [
      '', f'{next(iter(results["test"].values()))["num_examples"]} test examples. ' +
      protocol_note(results)
  ]
  return '\n'.join(lines)


def protocol_note(results: dict) -> str:
  """Which protocol produced the table: the reference's (every training image, the final
  model) or model selection on a held-out validation split."""
  proto = results.get('protocol', {})
  n_train = proto.get('train_examples')
  trained = (f'Trained on {n_train} images, {proto.get("steps_per_epoch")} steps per epoch '
             f'(last batch: {proto.get("last_batch")}). ') if n_train else ''
  best = results.get('best_validation')
  if 'best' not in results['test']:
    return (trained + "Protocol: the reference's (all training images, no validation "
            'split, the final model reported; set config.val_fraction > 0 to select a best '
            'model on a held-out validation split).')
  return (
      trained + f'Protocol: model selection on a validation split of '
      f'{proto.get("val_examples", "?")} images held out of the training set '
      f'(val_fraction={proto.get("val_fraction")}). "best" has the best validation PGD '
      f'accuracy' +
      (f' (epoch {best["epoch"]:g}, validation PGD {_pct(best["pgd_acc"])} %)' if best else '') +
      '; "last" is the final model.')


def plot_curves(workdir) -> list[Path]:
  """PNG plots of the training curves (loss, accuracy, diagnostics, validation)."""
  records = read_metrics(workdir)
  if not records:
    return []
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  groups = {
      'loss': lambda k: k.startswith('train/') and k.endswith('loss'),
      'accuracy': lambda k: k.endswith('_acc') and k.startswith(('train/', 'val/')),
      'effective_lr': lambda k: k.endswith('grad_weight_ratio'),
      'learning_rate': lambda k: k == 'train/learning_rate',
  }
  written = []
  for name, select in groups.items():
    keys = sorted({k for r in records for k in r if select(k)})
    if not keys:
      continue
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in keys:
      pts = [(r['step'], r[k]) for r in records if k in r]
      ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k,
              marker='.' if k.startswith('val/') else None)
    ax.set_xlabel('step')
    ax.set_title(name.replace('_', ' '))
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(workdir) / f'curves_{name}.png'
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)
  return written
