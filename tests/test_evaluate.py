"""The evaluation command: clean, PGD and AutoAttack accuracy with sanity flags."""

import json

import jax
import pytest

from configs import demo as demo_config
from twins_jax import evaluate, model_io, models, setup, train


def test_sanity_flags_catch_violations():
  curve = {
      0.0: {'clean_acc': 0.9, 'pgd_acc': 0.9}, 0.1: {'clean_acc': 0.9, 'pgd_acc': 0.5},
      0.2: {'clean_acc': 0.9, 'pgd_acc': 0.3}
  }
  good = {'clean_acc': 0.9, 'pgd_acc': 0.5, 'autoattack_acc': 0.45}
  assert all(evaluate.sanity_flags(good, curve).values())
  bad_curve = dict(curve)
  bad_curve[0.2] = {'clean_acc': 0.9, 'pgd_acc': 0.6}  # accuracy rises with eps
  bad_curve[0.0] = {'clean_acc': 0.9, 'pgd_acc': 0.8}  # eps = 0 is not the clean accuracy
  flags = evaluate.sanity_flags({'clean_acc': 0.4, 'pgd_acc': 0.5, 'autoattack_acc': 0.55},
                                bad_curve)
  assert not any(flags.values()), flags


def test_eval_mode_reports_autoattack(tmp_path):
  spec = models.ModelSpec(arch='tiny_resnet', num_classes=4, resize=None, twin=True,
                          share_affine=False)
  variables = models.init_variables(spec.build(), 0)
  model_io.save_model_dir(tmp_path / 'model', jax.device_get(variables), spec)

  config = demo_config.get_config()
  for k in ('source_classes', 'target_classes', 'source_epochs', 'source_lr', 'target_epochs'):
    del config[k]
  config.update(mode='eval', pretrained=str(tmp_path / 'model'), digits_classes=(0, 1, 2, 3),
                image_size=16, autoattack='fast', autoattack_max_examples=20, sanity_examples=40,
                eval_attack_steps=2, eval_batch_size=32, compilation_cache_dir='none')
  result = train.train_and_evaluate(config, tmp_path / 'eval')

  saved = json.loads((tmp_path / 'eval' / 'eval_results.json').read_text())
  assert saved['num_examples'] == result['num_examples'] > 0
  from twins_jax import data
  n_test = len(data.build_datasets(setup.data_config(config)).test)
  assert saved['num_examples'] == n_test  # every test example exactly once
  assert saved['autoattack_examples'] == 20
  after = saved['autoattack_after']
  assert list(after) == ['clean', 'apgd-ce', 'apgd-t']
  assert after['clean'] >= after['apgd-ce'] >= after['apgd-t'] == saved['autoattack_acc']
  assert set(saved['sanity']) == {
      'eps0_equals_clean', 'pgd_le_clean', 'autoattack_le_pgd', 'non_increasing_in_eps'
  }
  assert all(saved['sanity'].values()), saved['sanity']
  assert len(saved['eps_curve']) == 4
  text = (tmp_path / 'eval' / 'eval_results.md').read_text()
  assert 'AutoAttack (fast)' in text and 'Sanity checks' in text


def test_eval_mode_needs_a_model(tmp_path):
  config = demo_config.get_config()
  config.mode = 'eval'
  with pytest.raises(ValueError, match='needs config.pretrained'):
    train.train_and_evaluate(config, tmp_path)


def test_sharded_evaluation_equals_one_device():
  """Clean and PGD evaluation sharded over 8 devices counts exactly what one device does
  (float64, so that no PGD sign() tie can flip between two batch layouts)."""
  from twins_jax import data, parallel
  from helpers import tiny_config
  config = tiny_config(eval_attack_steps=3, eval_batch_size=32)
  datasets = data.build_datasets(setup.data_config(config))
  with jax.enable_x64(True):
    model = models.create_model('tiny_resnet', 10, dtype=jax.numpy.float64,
                                param_dtype=jax.numpy.float64)
    variables = models.init_variables(model, 0)
    key = jax.random.key(0)
    results = []
    for devices in (jax.devices(), jax.devices()[:1]):
      mesh = parallel.data_mesh(devices)
      evaluator = evaluate.Evaluator(model, config, mesh)
      batches = datasets.eval_batches('test', config.eval_batch_size)
      results.append(evaluator(parallel.replicate(variables, mesh), batches, key))
  assert len(jax.devices()) == 8
  assert results[0] == results[1]
  assert results[0]['num_examples'] == len(datasets.test) and 0 < results[0]['pgd_acc'] <= 1


class _Killed(Exception):
  pass


def _aa_setup(**overrides):
  from twins_jax import data
  from helpers import tiny_config, train_plain
  config = tiny_config(autoattack='fast', autoattack_max_examples=24, autoattack_chunk=8, eps=0.004,
                       **overrides)
  datasets = data.build_datasets(setup.data_config(config))
  model = models.create_model('tiny_resnet', 10, twin=True)
  return config, datasets, model, train_plain(model, datasets)


def test_autoattack_resumes_from_finished_chunks(tmp_path, monkeypatch):
  """A killed AutoAttack evaluation keeps its finished chunks: run again, it attacks only
  the others and reports the same numbers as an uninterrupted run (and as a run without
  records, with another chunking, and on one device instead of 8)."""
  from twins_jax import autoattack as aa
  from twins_jax import parallel
  config, datasets, model, variables = _aa_setup()
  mesh = parallel.data_mesh()
  assert mesh.devices.size == 8
  reference = evaluate.autoattack_accuracy(model, variables, datasets, config, mesh)
  assert reference['autoattack_examples'] == 24
  after = reference['autoattack_after']
  assert after['clean'] > after['apgd-t'] > 0  # the numbers are not trivially 0 or equal

  real, calls, die_at = aa.autoattack, [], [3]

  def dies_on_third_chunk(*args, **kwargs):
    calls.append(kwargs['index_offset'])
    if len(calls) == die_at[0]:
      raise _Killed  # killed in the middle of the last chunk
    return real(*args, **kwargs)

  monkeypatch.setattr(aa, 'autoattack', dies_on_third_chunk)
  with pytest.raises(_Killed):
    evaluate.autoattack_accuracy(model, variables, datasets, config, mesh, workdir=tmp_path)
  (record_dir,) = (tmp_path / 'autoattack').iterdir()
  assert sorted(p.name for p in record_dir.glob('chunk_*.json')) == [
      'chunk_00000000.json', 'chunk_00000008.json'
  ]
  calls.clear()
  die_at[0] = 0
  resumed = evaluate.autoattack_accuracy(model, variables, datasets, config, mesh, workdir=tmp_path)
  assert calls == [16]  # only the unfinished chunk
  assert resumed == reference
  calls.clear()  # all finished: nothing is attacked again
  assert evaluate.autoattack_accuracy(model, variables, datasets, config, mesh,
                                      workdir=tmp_path) == reference
  assert calls == []

  # Another model, another seed or other attack settings do not reuse these records.
  other = dict(config.to_dict(), seed=1)
  evaluate.autoattack_accuracy(model, variables, datasets,
                               type(config)(other), mesh, workdir=tmp_path)
  assert calls == [0, 8, 16]
  assert len(list((tmp_path / 'autoattack').iterdir())) == 2

  # Each example's randomness follows its global index: one chunk, or one device, gives
  # the same numbers.
  monkeypatch.setattr(aa, 'autoattack', real)
  one_chunk = type(config)(dict(config.to_dict(), autoattack_chunk=24))
  assert evaluate.autoattack_accuracy(model, variables, datasets, one_chunk, mesh) == reference
  one_device = parallel.data_mesh(jax.devices()[:1])
  assert evaluate.autoattack_accuracy(model, variables, datasets, config, one_device) == reference
