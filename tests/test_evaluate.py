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
  spec = models.ModelSpec(arch='tiny_resnet', num_classes=3, resize=None, twin=True,
                          share_affine=False)
  variables = models.init_variables(spec.build(), 0)
  model_io.save_model_dir(tmp_path / 'model', jax.device_get(variables), spec)

  config = demo_config.get_config()
  for k in ('source_classes', 'target_classes', 'source_epochs', 'source_lr', 'target_epochs'):
    del config[k]
  config.update(mode='eval', pretrained=str(tmp_path / 'model'), digits_classes=(0, 1, 2),
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
