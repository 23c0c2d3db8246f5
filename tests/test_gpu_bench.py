"""The GPU benchmark (``bench/gpu_bench.py``, ``bench/gpu.sh``, ``bench/gpu_wheels.sh``) works
before it reaches a GPU: its CPU dry run measures every section and writes a JSON with
positive numbers, and the wheels it carries are the versions tested here.

The whole dry run (every section, one sweep variant) takes one to two minutes on 2 CPU
cores, so it is a slow test; the default run checks the parent/worker protocol on the
cheapest section (the PyTorch reference step) and the bookkeeping without a subprocess.
"""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import gpu_bench  # noqa: E402  (after the path above)


def _dry_run(tmp_path, *args, timeout=600):
  out = tmp_path / 'result.json'
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  env.pop('XLA_FLAGS', None)  # conftest's 8 simulated devices: the benchmark uses one
  proc = subprocess.run(
      [sys.executable, 'bench/gpu_bench.py', '--dry-run', '--out',
       str(out), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(out) as f:
    return json.load(f), proc.stdout


def _positive(d, *keys):
  for k in keys:
    assert k in d, (k, list(d))
    d = d[k]
  assert isinstance(d, (int, float)) and d > 0, (keys, d)


@pytest.mark.slow
def test_dry_run_measures_every_section(tmp_path):
  result, stdout = _dry_run(tmp_path, '--sweep', 'fp32_lhs')
  secs = result['sections']
  assert {k: v['status'] for k, v in secs.items()} == dict.fromkeys(gpu_bench.SECTIONS, 'ok')
  jax_r = secs['jax']['results']
  for dtype in ('float32', 'bfloat16'):
    for part in ('train', 'eval'):
      for key in ('images_per_s', 'ms_per_step', 'tflop_per_s'):
        _positive(jax_r, dtype, part, key)
    _positive(jax_r, 'peak', dtype, 'tflop_per_s')
  torch_r = secs['torch']['results']
  for mode in ('fp32', 'amp_bf16_cl'):
    for part in ('train', 'eval'):
      _positive(torch_r, mode, part, 'images_per_s')
      _positive(torch_r, mode, part, 'tflop_per_s')
  assert torch_r['amp_bf16_cl']['train']['autocast_bf16'] is True
  assert torch_r['amp_bf16_cl']['train']['channels_last'] is True
  input_r = secs['input']['results']
  assert set(input_r) == {'cifar', 'folder'}
  for workload, size in (('cifar', 32), ('folder', 224)):
    assert len(input_r[workload]) == 2  # in-process and with worker processes
    for r in input_r[workload].values():
      assert r['images_per_s'] > 0 and r['shape'][1:] == [size, size, 3]
  aa = secs['autoattack']['results']
  assert set(aa) == {'apgd-ce', 'apgd-t'}
  for r in aa.values():
    assert r['images_per_s'] > 0 and r['tflop_per_s'] > 0 and r['warm_call']
    assert r['calls'][1]['compile_s'] == 0  # the second call compiles nothing
    assert r['point_runs'] >= r['images']  # the first run attacks every image
    assert r['accuracy']['clean'] == 1.0  # labels are the model's predictions
  sweep = result['sweep']['fp32_lhs']
  assert sweep['status'] == 'ok'
  assert '--xla_gpu_enable_latency_hiding_scheduler=true' in sweep['info']['xla_flags']
  _positive(sweep, 'results', 'float32', 'train', 'images_per_s')
  summary = result['summary']
  _positive(summary, 'train_ratio_jax_fp32_over_torch_fp32')
  _positive(summary, 'train_ratio_jax_bf16_over_torch_amp_bf16')
  _positive(summary, 'autoattack_fast_suite_images_per_s')
  assert len(summary['input_vs_step']) == 4
  assert 'train step   JAX bfloat16' in stdout and 'sweep' in stdout
  assert result['wall_s'] < result['budget_s']


def test_dry_run_torch_section_and_json(tmp_path):
  """The parent/worker protocol, on the cheapest section; the others are 'not requested'."""
  # (bf16 autocast is slow on a CPU without bf16 arithmetic: the slow test covers it.)
  result, stdout = _dry_run(tmp_path, '--sections', 'torch', '--torch-modes', 'fp32_cl', '--rounds',
                            '1')
  secs = result['sections']
  assert secs['torch']['status'] == 'ok', secs['torch']
  assert {secs[k]['status'] for k in ('jax', 'input', 'autoattack')} == {'not requested'}
  _positive(secs['torch']['results'], 'fp32_cl', 'train', 'images_per_s')
  _positive(secs['torch']['results'], 'fp32_cl', 'eval', 'images_per_s')
  assert secs['torch']['results']['fp32_cl']['train']['channels_last'] is True
  assert len(secs['torch']['results']['fp32_cl']['train']['step_s']) == 1
  assert result['settings']['arch'] == 'tiny_resnet' and result['dry_run']
  assert 'PyTorch fp32_cl' in stdout
  assert (tmp_path / 'result.workers.log').exists()


def test_deadline_skips_and_still_writes(tmp_path):
  """A budget already spent: every section is skipped, the JSON and the table still come."""
  result, stdout = _dry_run(tmp_path, '--budget', '1', '--sweep', 'bf16_lhs')
  assert {v['status'] for v in result['sections'].values()} == {'skipped'}
  assert result['sweep']['bf16_lhs']['status'] == 'skipped'
  assert 'section' in stdout


def test_arguments():
  args = gpu_bench.parse_args(['--sweep', 'default', '--sections', 'jax,input'])
  assert args.sweep == list(gpu_bench.DEFAULT_SWEEP) and args.sections == ['jax', 'input']
  assert args.budget == 360
  assert set(gpu_bench.DEFAULT_SWEEP) <= set(gpu_bench.VARIANTS)
  for bad in (['--sections', 'jax,gpu'], ['--sweep', 'nope'], ['--torch-modes',
                                                               'fp16'], ['--jax-dtypes', 'bf16']):
    with pytest.raises(SystemExit):
      gpu_bench.parse_args(bad)
  full = gpu_bench._settings(gpu_bench.parse_args([]))
  assert (full['arch'], full['resize'], full['batch'], full['attack_steps']) == ('resnet50', 224,
                                                                                 128, 10)
  assert full['aa_attacks'] == ['apgd-ce', 'apgd-t'] and full['aa_n_iter'] == 100


def test_summary_and_table(capsys):
  """Ratios, the suite's rate from its attacks' rates, and the input verdicts."""

  def rate(ips):
    return dict(images_per_s=ips, ms_per_step=128e3 / ips, tflop_per_s=1.0, compile_s=30.0,
                first_step_s=31.0)

  result = dict(
      settings=gpu_bench._settings(gpu_bench.parse_args([])), sweep={}, sections=dict(
          jax=dict(
              status='ok', results=dict(float32=dict(train=rate(100.0), eval=rate(150.0)),
                                        bfloat16=dict(train=rate(300.0)),
                                        peak=dict(bfloat16=dict(tflop_per_s=10.0, n=8)))),
          torch=dict(status='partial', skipped=['amp_bf16_cl eval'],
                     results=dict(fp32=dict(train=rate(50.0)),
                                  amp_bf16_cl=dict(train=rate(200.0)))),
          input=dict(
              status='ok', results=dict(cifar={'workers=0,threads=16': dict(images_per_s=5000.0)},
                                        folder={'workers=16,threads=2': dict(images_per_s=250.0)})),
          autoattack=dict(
              status='ok', results={
                  'apgd-ce': dict(images_per_s=30.0, dtype='float32', n_iter=100, target_classes=1,
                                  includes_compile=False),
                  'apgd-t': dict(images_per_s=6.0, dtype='float32', n_iter=100, target_classes=9,
                                 includes_compile=False)
              })))
  s = gpu_bench.summarize(result)
  assert s['train_ratio_jax_fp32_over_torch_fp32'] == pytest.approx(2.0)
  assert s['train_ratio_jax_bf16_over_torch_amp_bf16'] == pytest.approx(1.5)
  assert s['train_ratio_jax_best_over_torch_best'] == pytest.approx(1.5)
  assert s['train_bf16_fraction_of_measured_bf16_matmul_peak'] == pytest.approx(0.1)
  assert s['autoattack_fast_suite_images_per_s'] == pytest.approx(5.0)
  assert s['input_vs_step']['cifar workers=0,threads=16']['exceeds_step'] is True
  assert s['input_vs_step']['folder workers=16,threads=2']['exceeds_step'] is False
  result['summary'] = s
  gpu_bench.print_table(result)
  out = capsys.readouterr().out
  assert 'exceeds the step (300 img/s)' in out and 'BELOW the step (300 img/s)' in out
  assert 'torch: partial skipped: amp_bf16_cl eval' in out


def test_wheel_list_is_what_the_tests_run_with():
  """``gpu_wheels.sh --list``: grain and the two packages it imports that the GPU machine's
  image lacks, pinned to the versions installed here."""
  out = subprocess.run(['bash', str(ROOT / 'bench' / 'gpu_wheels.sh'), '--list'],
                       capture_output=True, text=True, check=True).stdout.split()
  pins = dict(line.split('==') for line in out)
  assert set(pins) == {'grain', 'array-record', 'portpicker'}
  for name, version in pins.items():
    try:
      installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      continue
    assert installed == version, (name, installed, version)
