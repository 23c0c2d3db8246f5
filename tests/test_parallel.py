"""The data-parallel step on 8 simulated CPU devices equals the 1-device step."""

import jax
import numpy as np
import pytest

import flax_torch
from twins_jax import models, parallel
from twins_jax import step as step_lib


def _two_steps(devices, method):
  mesh = parallel.data_mesh(devices)
  model = models.create_model('tiny_resnet', 10)
  variables = flax_torch.randomize_bn(models.init_variables(model, 0), seed=1)
  tx, schedule = step_lib.make_optimizer(0.05, 5e-4)
  config = step_lib.StepConfig(method=method, steps=3, random_start=True)
  train_step = parallel.jit_train_step(step_lib.make_train_step(model, tx, config, schedule), mesh)
  state = parallel.replicate(step_lib.TrainState.create(variables, tx), mesh)
  rng = np.random.default_rng(0)
  for i in range(2):
    batch = {
        'image': rng.uniform(0, 1, (16, 32, 32, 3)).astype(np.float32),
        'label': rng.integers(0, 10, 16).astype(np.int32)
    }
    parallel.check_batch_size(16, mesh)
    state, metrics = train_step(state, parallel.shard_batch(batch, mesh), jax.random.key(i))
  return jax.device_get(state), jax.device_get(metrics), state


@pytest.mark.parametrize('method', ['twins_trades'])
def test_eight_devices_equal_one(method):
  assert jax.device_count() == 8, 'conftest.py sets 8 simulated CPU devices'
  one, metrics_one, _ = _two_steps(jax.devices()[:1], method)
  eight, metrics_eight, live = _two_steps(jax.devices(), method)
  # The state really is spread over 8 devices (replicated), the batch was sharded.
  assert len(live.params['conv1']['kernel'].sharding.device_set) == 8
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(one.params),
                          jax.tree.leaves(eight.params)):
    err = np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12)
    assert err <= 1e-5, (jax.tree_util.keystr(path), err)
  for a, b in zip(jax.tree.leaves(one.batch_stats), jax.tree.leaves(eight.batch_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert metrics_one['loss'] == pytest.approx(float(metrics_eight['loss']), rel=1e-5)


def test_batch_not_divisible_is_a_clear_error():
  with pytest.raises(ValueError, match='divisible by the number of'):
    parallel.check_batch_size(12, parallel.data_mesh())
