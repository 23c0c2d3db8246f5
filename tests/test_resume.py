"""Kill and resume: a run SIGKILLed at random moments and restarted with the same command
ends bit-identical to the uninterrupted run (parameters, optimizer and BN state, the
validation history and best model, the test results and the logged metrics), also when
the latest checkpoint left behind is unreadable (the run falls back to the one before). A
run stopped by SIGTERM (preemption) saves a checkpoint at the step it reached, exits with
status 143 and one line, and resumes bit-exactly too.

Slow: one cold compile plus several ``main.py`` runs of 3 tiny epochs (minutes on 2 cores).
Set TWINS_RESUME_SEED to replay the kill moments of a failed run (the seed is in the
assertion messages).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import (DIGITS_STEPS_PER_EPOCH, REPO, assert_trees_equal, checkpoint_steps,
                     main_command, restore_checkpoint, run_main, subprocess_env, tiny_config)
from twins_jax import errors, model_io, reporting

# 3 epochs of 75 steps, an lr milestone after the second (the schedule must resume too),
# a checkpoint every 10 steps (kept: the last 3), asynchronous saves (the default).
RESUME = dict(num_epochs=3, lr_milestones=(2,), checkpoint_every_steps=10, log_every_steps=5)
TOTAL = 3 * DIGITS_STEPS_PER_EPOCH


@contextlib.contextmanager
def started(args, env, log: Path):
  """Runs ``args`` in the background (stderr to ``log``); kills it on leaving the block if
  it is still running."""
  with open(log, 'w') as stderr:
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
  try:
    yield proc
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def wait_for(proc, ready, log: Path, what: str, timeout: float = 900) -> None:
  """Polls ``ready()`` until it holds; fails if ``proc`` exits first or on the timeout."""
  deadline = time.monotonic() + timeout
  while not ready():
    assert proc.poll() is None, f'exited before {what}:\n{log.read_text()[-3000:]}'
    assert time.monotonic() < deadline, f'no {what} in {timeout:.0f} s'
    time.sleep(0.02)


def seeded_rng() -> tuple[random.Random, str]:
  """The random moments' generator and a note naming its seed (TWINS_RESUME_SEED replays it)."""
  seed = int(os.environ.get('TWINS_RESUME_SEED', time.time_ns() % 2**31))
  return random.Random(seed), f'TWINS_RESUME_SEED={seed}'


def kill_at_random_moment(args, env, rng: random.Random, min_step: int, max_step: int,
                          workdir: Path, note: str) -> int:
  """Starts ``args``, waits until a checkpoint of a random step in [min_step, max_step]
  exists, sleeps a random fraction of a second more, and SIGKILLs it. Returns the step."""
  target = rng.randint(min_step, max_step)
  extra = rng.uniform(0.0, 1.5)
  log = workdir.parent / f'{workdir.name}.{target}.log'
  with started(args, env, log) as proc:
    wait_for(proc, lambda: any(s >= target for s in checkpoint_steps(workdir)), log,
             f'{note}: a checkpoint >= {target}')
    time.sleep(extra)
    assert proc.poll() is None, (f'{note}: finished before the kill (target step {target}, '
                                 f'+{extra:.2f} s); the kill must interrupt the run')
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  assert not (workdir / 'results.json').exists(), note
  return target


def terminate_at_random_moment(args, env, rng: random.Random, min_step: int, max_step: int,
                               workdir: Path, note: str) -> int:
  """Starts ``args``, waits until a checkpoint of a random step in [min_step, max_step]
  exists, sleeps a random fraction of a second more, and sends SIGTERM. Returns the step the
  run says it stopped after (a checkpoint of that step must exist)."""
  target = rng.randint(min_step, max_step)
  extra = rng.uniform(0.0, 1.5)
  log = workdir.parent / f'{workdir.name}.term{target}.log'
  with started(args, env, log) as proc:
    wait_for(proc, lambda: any(s >= target for s in checkpoint_steps(workdir)), log,
             f'{note}: a checkpoint >= {target}')
    time.sleep(extra)
    assert proc.poll() is None, f'{note}: finished before SIGTERM (step {target} +{extra:.2f} s)'
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    waited = time.monotonic() - sent
  text = log.read_text()
  last = [l for l in text.splitlines() if l.strip()][-1]
  assert proc.returncode == errors.EXIT_PREEMPTED, (note, text[-3000:])
  assert last.startswith('error: stopped by SIGTERM after step ') and 'Traceback' not in text, last
  stopped = int(last.split('after step ')[1].split()[0])
  assert stopped in checkpoint_steps(workdir), (note, stopped, checkpoint_steps(workdir))
  print(f'SIGTERM at checkpoint >= {target} (+{extra:.2f} s): stopped after step {stopped}, '
        f'{waited:.1f} s after the signal')
  return stopped


def metric_series(workdir) -> dict:
  """step -> the logged values that are a function of the run (not of the clock)."""
  out = {}
  for r in reporting.read_metrics(workdir):
    values = {k: v for k, v in r.items() if k not in ('time', 'train/images_per_sec')}
    key = (r['step'], 'val' if any(k.startswith('val/') for k in r) else 'train')
    assert key not in out, f'{key} logged twice'
    out[key] = values
  return out


@pytest.fixture(scope='module')
def uninterrupted(compile_cache, tmp_path_factory):
  ref = tmp_path_factory.mktemp('resume') / 'uninterrupted'
  proc = run_main(main_command(ref, compile_cache, **RESUME), subprocess_env(compile_cache))
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert checkpoint_steps(ref)[-1] == TOTAL
  return ref


def assert_same_run(run: Path, ref: Path, config, note: str, metrics: bool = True) -> None:
  # The final training state, bit for bit.
  assert checkpoint_steps(run)[-1] == checkpoint_steps(ref)[-1] == TOTAL
  state_ref, progress_ref = restore_checkpoint(ref, config, 10)
  state_run, progress_run = restore_checkpoint(run, config, 10)
  assert int(state_run.step) == TOTAL
  assert_trees_equal(state_run, state_ref, note)
  # The validation history and the best result (one record per epoch, no duplicate).
  assert [r['step'] for r in progress_ref['history']] == [75, 150, 225]
  assert progress_run == progress_ref, note

  # The best and final models, and the test results of best and last.
  for name in ('best_model', 'final_model'):
    _, ref_vars, meta_ref = model_io.load_model_dir(ref / name)
    _, run_vars, meta_run = model_io.load_model_dir(run / name)
    assert_trees_equal(run_vars, ref_vars, note)
  _, _, meta_ref = model_io.load_model_dir(ref / 'best_model')
  _, _, meta_run = model_io.load_model_dir(run / 'best_model')
  assert meta_run['metadata']['validation'] == meta_ref['metadata']['validation']
  results_ref = json.loads((ref / 'results.json').read_text())
  results_run = json.loads((run / 'results.json').read_text())
  for key in ('steps', 'test', 'best_validation', 'source'):
    assert results_run[key] == results_ref[key], (key, note)
  if not metrics:
    return
  # metrics.jsonl: every step once, with the same values.
  series_ref, series_run = metric_series(ref), metric_series(run)
  assert series_run.keys() == series_ref.keys(), note
  assert series_run == series_ref, note
  lr = [series_ref[(s, 'train')]['train/learning_rate'] for s in (150, 155)]
  assert lr == pytest.approx([config.lr, config.lr * config.lr_gamma])  # the milestone


def _corrupt_latest_checkpoint(workdir: Path) -> int:
  """Cuts the array files of the latest checkpoint short, as a disk that filled mid-write."""
  latest = checkpoint_steps(workdir)[-1]
  files = [
      f for f in (workdir / 'checkpoints' / str(latest) / 'state').rglob('*')
      if f.is_file() and f.parent.name == 'd'
  ]
  assert files
  for f in files:
    f.write_bytes(f.read_bytes()[:8])
  return latest


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted_run(compile_cache, tmp_path, uninterrupted):
  rng, note = seeded_rng()
  env = subprocess_env(compile_cache)
  config = tiny_config(compile_cache, **RESUME)

  run = tmp_path / 'interrupted'
  args = main_command(run, compile_cache, **RESUME)
  first = kill_at_random_moment(args, env, rng, 10, 110, run, note + ' (first kill)')
  second = kill_at_random_moment(args, env, rng, max(first + 10, 120), TOTAL - 40, run,
                                 note + ' (second kill)')
  # The kill may have hit a save: make the latest checkpoint unreadable for sure; the run
  # must fall back to the one before it (with a warning), not crash or start over.
  corrupted = _corrupt_latest_checkpoint(run)
  proc = run_main(args, env)
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert 'Resuming from' in proc.stderr, note
  assert f'checkpoint of step {corrupted}' in proc.stderr and 'falling back' in proc.stderr
  note += (f' (kills after the checkpoints of steps >= {first}, >= {second}; step {corrupted} '
           'corrupted)')
  assert_same_run(run, uninterrupted, config, note)


@pytest.mark.slow
def test_sigterm_saves_stops_and_resumes_bit_exactly(compile_cache, tmp_path, uninterrupted):
  """Preemption: SIGTERM at random moments; each time the run saves the step it reached and
  exits (status 143, one line); the same command resumes it, to the same final state."""
  rng, note = seeded_rng()
  env = subprocess_env(compile_cache)
  config = tiny_config(compile_cache, **RESUME)
  run = tmp_path / 'preempted'
  args = main_command(run, compile_cache, **RESUME)
  first = terminate_at_random_moment(args, env, rng, 10, 110, run, note + ' (first SIGTERM)')
  second = terminate_at_random_moment(args, env, rng, max(first + 10, 120), TOTAL - 40, run,
                                      note + ' (second SIGTERM)')
  proc = run_main(args, env)
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert f'Resuming from {run / "checkpoints"} at step {second}' in proc.stderr, note
  # The state is bit-exact; the logged metrics differ only in the logging windows around the
  # stops (the window in progress is logged at the step the run stopped after).
  assert_same_run(run, uninterrupted, config, f'{note} (stopped after {first}, {second})',
                  metrics=False)


@pytest.mark.slow
def test_killed_autoattack_evaluation_resumes_from_its_chunks(compile_cache, tmp_path):
  """``mode=eval`` with AutoAttack SIGKILLed after some chunks are recorded: run again, it
  attacks only the chunks not yet done (it says so) and reports what an uninterrupted
  evaluation reports."""
  import jax
  from twins_jax import data, models, setup
  from helpers import train_plain
  config = tiny_config(digits_classes=(0, 1, 2, 3))
  datasets = data.build_datasets(setup.data_config(config))
  spec = models.ModelSpec(arch='tiny_resnet', num_classes=4, resize=None, twin=True,
                          share_affine=False)
  model_io.save_model_dir(tmp_path / 'model',
                          jax.device_get(train_plain(spec.build(), datasets, 100)), spec)
  settings = dict(mode='eval', pretrained=str(tmp_path / 'model'), digits_classes=(0, 1, 2, 3),
                  eps=0.02, autoattack='fast', autoattack_max_examples=96, autoattack_chunk=8,
                  sanity_examples=32, eval_attack_steps=2)
  env = subprocess_env(compile_cache)

  def command(workdir):
    return main_command(workdir, compile_cache, **settings)

  ref, run = tmp_path / 'reference', tmp_path / 'killed'
  proc = run_main(command(ref), env)
  assert proc.returncode == 0, proc.stderr[-3000:]

  chunks = lambda: len(list(run.glob('autoattack/*/chunk_*.json')))
  with started(command(run), env, tmp_path / 'killed.log') as p:
    wait_for(p, lambda: chunks() >= 3, tmp_path / 'killed.log', '3 AutoAttack chunks recorded')
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
  done = chunks()
  assert 3 <= done < 12, done  # killed in the middle: some chunks done, not all
  assert not (run / 'eval_results.json').exists()

  proc = run_main(command(run), env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'{done} of 12 chunks of this process already done' in proc.stderr, proc.stderr[-3000:]
  a = json.loads((ref / 'eval_results.json').read_text())
  b = json.loads((run / 'eval_results.json').read_text())
  assert a['autoattack_examples'] == b['autoattack_examples'] == 96
  assert a['autoattack_after']['clean'] > a['autoattack_acc'] > 0  # not a trivial model
  for k in ('autoattack_acc', 'autoattack_after', 'clean_acc', 'pgd_acc'):
    assert a[k] == b[k], k
