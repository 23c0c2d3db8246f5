"""PGD: stays in the ball and [0, 1], raises the loss, per-example independent, lax loop."""

import time

import jax
import numpy as np
import optax
import pytest

from twins_jax import attacks, models

EPS = 8 / 255


@pytest.fixture(scope='module')
def setup():
  model = models.create_model('tiny_resnet', 10)
  variables = models.init_variables(model, 0)
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (8, 32, 32, 3)).astype(np.float32)
  x[:2] = np.round(x[:2])  # pixels at 0 and 1 exercise the [0, 1] clamp
  y = rng.integers(0, 10, 8).astype(np.int32)
  logits_fn = lambda xa: model.apply(variables, xa, mode=models.EVAL)
  return logits_fn, x, y


def _run(logits_fn, x, y, **kw):
  f = jax.jit(lambda x, y, k: attacks.pgd(logits_fn, x, y, k, **kw))
  return np.asarray(f(x, y, jax.random.key(1)))


def _loss(logits_fn, x, y):
  return float(optax.softmax_cross_entropy_with_integer_labels(logits_fn(x), y).mean())


@pytest.mark.parametrize('norm,eps,alpha', [('Linf', EPS, 2 / 255), ('L2', 0.5, 0.1)])
@pytest.mark.parametrize('start', ['none', 'uniform'])
def test_pgd_in_ball_and_raises_loss(setup, norm, eps, alpha, start):
  logits_fn, x, y = setup
  x_adv = _run(logits_fn, x, y, eps=eps, alpha=alpha, steps=5, norm=norm, start=start)
  delta = (x_adv - x).reshape(len(x), -1)
  if norm == 'Linf':
    assert np.abs(delta).max() <= eps + 1e-6
    assert np.abs(delta).max() > 0.9 * eps  # it actually moved to the boundary
  else:
    assert np.linalg.norm(delta, axis=1).max() <= eps * (1 + 1e-5)
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  assert _loss(logits_fn, x_adv, y) > _loss(logits_fn, x, y) + 1e-3


def test_pgd_kl_objective_raises_kl(setup):
  logits_fn, x, y = setup
  x_adv = _run(logits_fn, x, y, eps=EPS, alpha=2 / 255, steps=5, loss='kl', start='normal')
  assert np.abs(x_adv - x).max() <= EPS + 1e-6
  clean = logits_fn(x)
  kl = lambda xa: float(attacks.attack_loss(logits_fn(xa), y, 'kl', clean))
  assert kl(x_adv) > 10 * max(kl(x), 1e-9)


def test_per_example_independent_of_batch(setup):
  logits_fn, x, y = setup
  kw = dict(eps=EPS, alpha=2 / 255, steps=4, start='none')
  full = _run(logits_fn, x, y, **kw)
  part = _run(logits_fn, x[3:5], y[3:5], **kw)
  np.testing.assert_allclose(full[3:5], part, atol=1e-6)


def test_zero_eps_returns_clean(setup):
  logits_fn, x, y = setup
  x_adv = _run(logits_fn, x, y, eps=0.0, alpha=2 / 255, steps=3, start='uniform')
  np.testing.assert_array_equal(x_adv, x)


def test_bad_arguments(setup):
  logits_fn, x, y = setup
  with pytest.raises(ValueError, match='norm'):
    attacks.pgd(logits_fn, x, y, eps=EPS, alpha=0.1, steps=1, norm='L1', start='none')
  with pytest.raises(ValueError, match='PRNG key'):
    attacks.pgd(logits_fn, x, y, None, eps=EPS, alpha=0.1, steps=1, start='uniform')


def test_compile_time_does_not_grow_with_steps(setup):
  """The loop is a lax loop: the compiled program is the same size for 10 and 50 steps."""
  logits_fn, x, y = setup
  sizes = {}
  for steps in (10, 50):
    f = jax.jit(
        lambda x, y, k: attacks.pgd(logits_fn, x, y, k, eps=EPS, alpha=2 / 255, steps=steps))
    t = time.perf_counter()
    lowered = f.lower(x, y, jax.random.key(0))
    compiled = lowered.compile()
    elapsed = time.perf_counter() - t
    sizes[steps] = len(lowered.as_text())
    print(f'PGD-{steps}: compile {elapsed:.2f} s')
    compiled(x, y, jax.random.key(0))
  assert sizes[10] == sizes[50]
