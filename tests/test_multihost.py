"""Multi-host training: two processes x 4 CPU devices end where one process x 8 devices does.

``main.py`` is launched twice with ``--coordinator_address=localhost:<port>
--num_processes=2 --process_id=0/1`` (each process sees 4 simulated CPU devices; JAX's
CPU collectives go over Gloo/TCP), sharing one workdir as hosts share a filesystem,
and once as a single process with 8 devices and the same global batch. Each host
reads only its half of every global batch (``data.TrainPlan``), so the two runs
agree only if the halves are put together in the right order: the final checkpoints
and the saved best models must hold the same parameters (up to the all-reduce's
summation order), and only process 0 writes the logs and the report.

Slow (several minutes on 2 CPU cores: each process compiles the training step)::

  pytest -m slow tests/test_multihost.py -s
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from twins_jax import checkpointing, model_io, models
from twins_jax import step as step_lib

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
LR, WEIGHT_DECAY = 0.01, 5e-4
# digits 0-2 (362 training images) at 16x16: 5 steps of a global batch of 64 (32 per
# host). Few steps: the two runs differ by float rounding in the all-reduce (~1e-8 after
# one step), and adversarial training amplifies that about 1.5x per step.
STEPS = 5
FLAGS = [
    '--config=configs/default.py',
    '--config.arch=tiny_resnet',
    '--config.resize=0',
    '--config.method=twins_at',
    '--config.dataset=digits',
    '--config.digits_classes=(0,1,2)',
    '--config.image_size=16',
    '--config.batch_size=64',
    '--config.eval_batch_size=64',
    '--config.num_epochs=1',
    '--config.attack_steps=1',
    '--config.eval_attack_steps=1',
    '--config.val_fraction=0.1',
    '--config.last_batch=drop',
    f'--config.lr={LR}',
    f'--config.weight_decay={WEIGHT_DECAY}',
    '--config.log_every_steps=5',
]
RUN_TIMEOUT_S = 1200


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _env(num_devices: int, cache_dir: Path) -> dict:
  env = dict(os.environ)
  flags = [
      f for f in env.get('XLA_FLAGS', '').split()
      if not f.startswith('--xla_force_host_platform_device_count')
  ]
  env['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={num_devices}'])
  env.update(JAX_PLATFORMS='cpu', JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo',
             JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', TF_CPP_MIN_LOG_LEVEL='2',
             PYTHONUNBUFFERED='1')
  return env


def _cache_flags(cache_dir: Path) -> list[str]:
  spec = importlib.util.spec_from_file_location('_default_config', ROOT / 'configs/default.py')
  default = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(default)
  return ([f'--config.compilation_cache_dir={cache_dir}']
          if 'compilation_cache_dir' in default.get_config() else [])


def _kill(proc: subprocess.Popen) -> None:
  """Ends ``proc`` and everything it started (its own process group)."""
  if proc.poll() is not None:
    return
  for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
    try:
      os.killpg(proc.pid, sig)
    except ProcessLookupError:
      return
    try:
      proc.wait(wait)
      return
    except subprocess.TimeoutExpired:
      pass


def _tail(path: Path, n: int = 4000) -> str:
  text = path.read_text(errors='replace') if path.exists() else ''
  return text[-n:]


def _launch(runs: list[tuple[list[str], dict, Path]], timeout: float) -> float:
  """Starts every ``(argv, env, log)`` at once and waits for all; returns the wall time.

  If one fails, the others are killed at once (a peer of a dead process would wait
  for it in a collective until the coordination service times out); on the timeout
  all are killed. Nothing is left running either way.
  """
  start = time.perf_counter()
  procs, files = [], []
  try:
    for argv, env, log in runs:
      f = open(log, 'w')
      files.append(f)
      procs.append(
          subprocess.Popen(argv, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                           start_new_session=True))
    while True:
      codes = [p.poll() for p in procs]
      failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i = failed[0]
        raise AssertionError(f'{" ".join(runs[i][0][1:])}\nexited with {codes[i]}:\n'
                             f'{_tail(runs[i][2])}')
      if all(c == 0 for c in codes):
        return time.perf_counter() - start
      if time.perf_counter() - start > timeout:
        raise AssertionError(f'timed out after {timeout:.0f} s; last output:\n' +
                             '\n'.join(f'--- {r[2].name}\n{_tail(r[2], 1500)}' for r in runs))
      time.sleep(0.5)
  finally:
    for p in procs:
      _kill(p)
    for f in files:
      f.close()


def _abstract_state(spec: models.ModelSpec):
  model = spec.build()
  tx, _ = step_lib.make_optimizer(LR, WEIGHT_DECAY)
  abstract = jax.eval_shape(
      lambda: step_lib.TrainState.create(model_io.abstract_variables(model), tx))
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract)


def _restore_last(workdir: Path, spec: models.ModelSpec):
  ckpts = checkpointing.RunCheckpoints(workdir, async_save=False)
  try:
    step = ckpts.latest_step()
    state, progress = ckpts.restore(_abstract_state(spec))
  finally:
    ckpts.close()
  return step, jax.device_get(state), progress


def _assert_trees_close(a, b, what: str, rel: float = 1e-5) -> None:
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
  assert len(la) == len(lb), what
  worst = 0.0
  for (path, x), y in zip(la, lb):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert x.shape == y.shape, (what, jax.tree_util.keystr(path))
    err = np.linalg.norm(x - y) / max(np.linalg.norm(x), 1e-12)
    worst = max(worst, err)
    assert err <= rel, f'{what}{jax.tree_util.keystr(path)}: relative difference {err:.3g}'
  print(f'{what}: {len(la)} arrays, largest relative difference {worst:.2e}')


def test_two_hosts_match_one_host(tmp_path, request):
  # A compilation cache kept between test runs (pytest's cache directory) for the
  # single-process run; main.py turns it off in the multi-process CPU run.
  cache = getattr(request.config, 'cache', None)
  cache = Path(cache.mkdir('twins_jax_xla_cache')) if cache else tmp_path / 'jax_cache'
  main = [sys.executable, str(ROOT / 'main.py')]
  multi, single = tmp_path / 'multi', tmp_path / 'single'
  flags = FLAGS + _cache_flags(cache)

  port = _free_port()
  multi_runs = [(main + flags + [
      f'--workdir={multi}', f'--coordinator_address=localhost:{port}', '--num_processes=2',
      f'--process_id={i}'
  ], _env(4, cache), tmp_path / f'process_{i}.log') for i in range(2)]
  t_multi = _launch(multi_runs, RUN_TIMEOUT_S)
  t_single = _launch(
      [(main + flags + [f'--workdir={single}'], _env(8, cache), tmp_path / 'single.log')],
      RUN_TIMEOUT_S)
  print(f'\n2 processes x 4 devices: {t_multi:.0f} s; 1 process x 8 devices: {t_single:.0f} s')

  # Both processes joined one 8-device system; only process 0 logs and reports.
  log0, log1 = (r[2].read_text(errors='replace') for r in multi_runs)
  assert 'jax.distributed: process 0 of 2, 4 local of 8 devices' in log0
  assert 'jax.distributed: process 1 of 2, 4 local of 8 devices' in log1
  assert '| model |' in log0 and '| model |' not in log1
  assert 'Starting from' in log0 and 'Starting from' not in log1
  for name in ('results.md', 'results.json', 'metrics.jsonl', 'config.json', 'best_model'):
    assert (multi / name).exists(), name

  # The same run: the same final training state ...
  spec = model_io.read_model_json(single / 'best_model')['spec']
  step_m, state_m, progress_m = _restore_last(multi, spec)
  step_s, state_s, progress_s = _restore_last(single, spec)
  assert step_m == step_s == STEPS == int(state_m.step) == int(state_s.step)
  _assert_trees_close(state_s.params, state_m.params, 'checkpoint params')
  _assert_trees_close(state_s.batch_stats, state_m.batch_stats, 'checkpoint batch_stats')
  _assert_trees_close(state_s.opt_state, state_m.opt_state, 'checkpoint opt_state', rel=1e-4)

  # ... the same best model (written by both processes together) ...
  _, best_s, meta_s = model_io.load_model_dir(single / 'best_model')
  _, best_m, meta_m = model_io.load_model_dir(multi / 'best_model')
  assert meta_m['spec'] == spec
  _assert_trees_close(best_s, best_m, 'best_model')

  # ... and the same evaluation (every test example once, gathered from both hosts).
  res_s = json.loads((single / 'results.json').read_text())['test']
  res_m = json.loads((multi / 'results.json').read_text())['test']
  assert res_s.keys() == res_m.keys()
  for name in res_s:
    n = res_s[name]['num_examples']
    assert res_m[name]['num_examples'] == n == 135
    for k in ('clean_acc', 'pgd_acc'):  # at most one example flips on rounding
      assert abs(res_s[name][k] - res_m[name][k]) <= 1 / n + 1e-9, (name, k)
  assert [h['step'] for h in progress_m['history']] == [h['step'] for h in progress_s['history']]


def test_sigterm_on_one_host_stops_both_at_the_same_step(tmp_path, request):
  """Preemption on one host: JAX's preemption service tells the other, both save the
  checkpoint of the same step and exit (status 143); re-running both resumes and ends."""
  cache = getattr(request.config, 'cache', None)
  cache = Path(cache.mkdir('twins_jax_xla_cache')) if cache else tmp_path / 'jax_cache'
  main = [sys.executable, str(ROOT / 'main.py')]
  workdir = tmp_path / 'multi'
  flags = [f for f in FLAGS if not f.startswith('--config.num_epochs')
          ] + ['--config.num_epochs=6', '--config.checkpoint_every_steps=2'] + _cache_flags(cache)

  def launch():
    port = _free_port()
    runs = []
    for i in range(2):
      log = tmp_path / f'process_{i}.{len(list(tmp_path.glob("process_*")))}.log'
      argv = main + flags + [
          f'--workdir={workdir}', f'--coordinator_address=localhost:{port}', '--num_processes=2',
          f'--process_id={i}'
      ]
      f = open(log, 'w')
      runs.append((subprocess.Popen(argv, env=_env(4, cache), cwd=ROOT, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True), f, log))
    return runs

  runs = launch()
  try:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    ckpt_dir = workdir / 'checkpoints'
    while not (ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())):
      assert all(p.poll() is None for p, _, _ in runs), _tail(runs[0][2]) + _tail(runs[1][2])
      assert time.monotonic() < deadline, 'no checkpoint in time'
      time.sleep(0.2)
    os.kill(runs[1][0].pid, signal.SIGTERM)  # the preemption notice reaches host 1 only
    for p, _, _ in runs:
      p.wait(timeout=600)
  finally:
    for p, f, _ in runs:
      _kill(p)
      f.close()
  lines = [
      [l for l in log.read_text().splitlines() if l.startswith('error: ')] for _, _, log in runs
  ]
  codes = [p.returncode for p, _, _ in runs]
  assert codes == [143, 143], (codes, _tail(runs[0][2]), _tail(runs[1][2]))
  steps = [int(l[-1].split('after step ')[1].split()[0]) for l in lines]
  assert steps[0] == steps[1], steps
  ckpts = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps[0] in ckpts and steps[0] < 6 * STEPS, (steps, ckpts)
  print(f'\nSIGTERM to host 1: both stopped after step {steps[0]} (checkpoints {ckpts})')

  runs = launch()
  try:
    for p, _, _ in runs:
      p.wait(timeout=RUN_TIMEOUT_S)
  finally:
    for p, f, _ in runs:
      _kill(p)
      f.close()
  assert [p.returncode for p, _, _ in runs] == [0, 0], _tail(runs[0][2]) + _tail(runs[1][2])
  assert f'Resuming from {workdir / "checkpoints"} at step {steps[0]}' in runs[0][2].read_text()
  spec = model_io.read_model_json(workdir / 'best_model')['spec']
  step, state, _ = _restore_last(workdir, spec)
  assert step == int(state.step) == 6 * STEPS


def test_two_hosts_evaluate_like_one_host(tmp_path, request):
  """``mode=eval`` with AutoAttack on two processes x 4 devices reports what one process x 8
  devices does: clean and PGD over every test example once (batches sharded over both
  hosts), AutoAttack chunks shared among the processes (each sharded over its own 4
  devices), and each host records its own chunks in the shared workdir."""
  from twins_jax import data, setup
  from helpers import tiny_config, train_plain
  cache = getattr(request.config, 'cache', None)
  cache = Path(cache.mkdir('twins_jax_xla_cache')) if cache else tmp_path / 'jax_cache'
  config = tiny_config(digits_classes=(0, 1, 2, 3))
  datasets = data.build_datasets(setup.data_config(config))
  spec = models.ModelSpec(arch='tiny_resnet', num_classes=4, resize=None, twin=True,
                          share_affine=False)
  model = spec.build()
  model_io.save_model_dir(tmp_path / 'model', jax.device_get(train_plain(model, datasets, 100)),
                          spec)
  flags = [
      '--config=configs/default.py', '--config.mode=eval', f'--config.pretrained={tmp_path}/model',
      '--config.arch=tiny_resnet', '--config.resize=0', '--config.dataset=digits',
      '--config.digits_classes=(0,1,2,3)', '--config.image_size=16', '--config.eval_batch_size=64',
      '--config.eval_attack_steps=2', '--config.eps=0.02', '--config.autoattack=fast',
      '--config.autoattack_max_examples=40', '--config.autoattack_chunk=8',
      '--config.sanity_examples=64'
  ] + _cache_flags(cache)
  main = [sys.executable, str(ROOT / 'main.py')]
  multi, single = tmp_path / 'multi', tmp_path / 'single'
  port = _free_port()
  _launch([(main + flags + [
      f'--workdir={multi}', f'--coordinator_address=localhost:{port}', '--num_processes=2',
      f'--process_id={i}'
  ], _env(4, cache), tmp_path / f'process_{i}.log') for i in range(2)], RUN_TIMEOUT_S)
  _launch([(main + flags + [f'--workdir={single}'], _env(8, cache), tmp_path / 'single.log')],
          RUN_TIMEOUT_S)
  res_m = json.loads((multi / 'eval_results.json').read_text())
  res_s = json.loads((single / 'eval_results.json').read_text())
  print('\none process:', {k: res_s[k] for k in ('clean_acc', 'pgd_acc', 'autoattack_after')})
  assert res_m['num_examples'] == res_s['num_examples'] == len(datasets.test)
  assert res_m['autoattack_examples'] == res_s['autoattack_examples'] == 40
  after = res_s['autoattack_after']
  assert after['clean'] > after['apgd-t'] > 0  # not a trivial model
  for k in ('clean_acc', 'pgd_acc', 'autoattack_acc', 'autoattack_after', 'eps_curve'):
    assert res_m[k] == res_s[k], k
  # 5 chunks: process 0 attacked 0, 16, 32 and process 1 attacked 8, 24.
  (records,) = (multi / 'autoattack').iterdir()
  assert sorted(p.name for p in records.glob('chunk_*.json')) == [
      f'chunk_{s:08d}.json' for s in (0, 8, 16, 24, 32)
  ]
  log1 = (tmp_path / 'process_1.log').read_text()
  assert 'jax.distributed: process 1 of 2, 4 local of 8 devices' in log1
