"""The TRADES objectives update the Adaptive running statistics adversarial batch first.

The official TRADES scripts (``TWINS_cifar/train-TWINS-TRADES.py:91-96``,
``AT_cifar/train-TRADES.py:91-95``) run the adversarial forward, then the clean one, both in
train mode; the running statistics (what PGD attacks next step and what evaluation uses)
are therefore ``update(update(stats, adversarial), clean)``. This checks our whole training
step against that composition, computed here from the model alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twins_jax import models
from twins_jax import step as step_lib

N = 8


def _updated_stats(model, variables, batch_stats, x):
  """The running statistics after one train-mode forward of ``x`` (Adaptive branch)."""
  _, updates = model.apply(dict(variables, batch_stats=batch_stats), x, mode=models.TRAIN,
                           mutable=['batch_stats'])
  return updates['batch_stats']


@pytest.mark.parametrize('method', ['trades', 'twins_trades'])
def test_trades_updates_running_statistics_adversarial_first(method):
  twin = method == 'twins_trades'
  with jax.enable_x64(True):
    model = models.create_model('tiny_resnet', 10, twin=twin, dtype=jnp.float64,
                                param_dtype=jnp.float64)
    variables = models.init_variables(model, 0)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(0, 1, (N, 16, 16, 3)))
    y = jnp.asarray(rng.integers(0, 10, N), jnp.int32)
    config = step_lib.StepConfig(method=method, steps=2, random_start=False)
    tx, _ = step_lib.make_optimizer(0.01, 0.0)
    state = step_lib.TrainState.create(variables, tx)
    new_state, _ = jax.jit(step_lib.make_train_step(model, tx, config))(state,
                                                                        {'image': x, 'label': y},
                                                                        jax.random.key(0))

    x_adv = config.pgd(config.attack_logits_fn(model, variables), x, y, None)
    # The Adaptive Net sees the second half of a twin batch, all of a plain one.
    part = (lambda a: a[N // 2:]) if twin else (lambda a: a)
    stats = variables['batch_stats']
    adv_first = _updated_stats(model, variables, _updated_stats(model, variables, stats,
                                                                part(x_adv)), part(x))
    clean_first = _updated_stats(model, variables, _updated_stats(model, variables, stats, part(x)),
                                 part(x_adv))
    for got, want, other in zip(jax.tree.leaves(new_state.batch_stats), jax.tree.leaves(adv_first),
                                jax.tree.leaves(clean_first)):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-13, atol=1e-15)
      assert not np.allclose(np.asarray(want), np.asarray(other), rtol=1e-9, atol=0)
