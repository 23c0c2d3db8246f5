"""Our training and evaluation steps equal the official TWINS code, rebuilt in plain PyTorch.

The PyTorch side is ``tests/torch_reference.py``: the inner loop of ``Trainer.train`` of
the four official scripts (TWINS-AT, TWINS-TRADES, AT, TRADES: attack, forwards in the
official order, losses, SGD step, per-iteration MultiStepLR) and ``Trainer.test``, on the
official twin-BN ResNet (``MixBatchNorm2d`` / ``FixBatchNorm2d``).  Both sides start from
the same weights (a small ResNet, BN statistics and affine randomised, different in the
two branches) and see the same batch:

* an odd batch (7) without random start: the official code always starts at a random
  point, here it is fed zero noise, which is exactly a start at the clean image;
* an even batch (8) with random start: both sides get the same noise, the uniform draw our
  step makes from the key it is given (``jax.random.uniform(key, x.shape, x.dtype, -eps,
  eps)``), transposed to NCHW and injected into the official ``perturb``.

An lr milestone falls before the third step.  Every parameter and BN running statistic
(Adaptive and Frozen) is compared after one and three steps, with the losses and the
learning rates of every step.

Both sides compute in float64. In float32 the comparison is ill-posed rather than
hard: PGD steps along ``sign(grad)``, and an input-gradient component of order 1e-9
can come out with opposite signs from two correct float32 implementations (different
convolution algorithms), moving that pixel by 2 * alpha and changing the loss in the
4th digit. In float64 such ties vanish and the test checks the semantics to ~1e-12.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import flax_torch
import torch_reference as ref
from twins_jax import models
from twins_jax import step as step_lib

LR, WD, MILESTONES = 0.05, 5e-4, (2,)  # the third step runs at lr * 0.1
EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 3
LAMBDA, BETA = 0.4, 6.0  # lambda != 1 so that the Frozen and Adaptive terms are told apart
NUM_CLASSES = 10
# (batch size, random start): odd without, even with (the same noise on both sides).
BATCHES = [(7, False), (8, True)]


def _args(n: int) -> ref.Args:
  # The KL terms divide by args.batch_size, the configured batch size: here the batch's.
  return ref.Args(epsilon=EPS, alpha=ALPHA, k=STEPS, batch_size=n, num_classes=NUM_CLASSES,
                  learning_rate=LR, momentum=0.9, weight_decay=WD, beta_trades=BETA,
                  lambda_twins=LAMBDA)


def _models(twin: bool, seed: int = 0):
  """Our model and variables, and the official-layout PyTorch network holding them."""
  f64 = np.float64
  model = models.create_model('tiny_resnet', NUM_CLASSES, twin=twin, dtype=f64, param_dtype=f64)
  variables = flax_torch.randomize_bn(models.init_variables(model, seed), seed=seed + 1)
  factory = ref.twin_tiny_resnet if twin else ref.tiny_resnet
  torch_model = factory(num_classes=NUM_CLASSES).double()
  flax_torch.load_into(torch_model, variables, twin)
  return model, variables, torch_model


def _torch_state(torch_model):
  return {k: v.detach().clone() for k, v in torch_model.state_dict().items()}


@functools.lru_cache(maxsize=None)
def _run(method: str, twin: bool, n: int, random_start: bool):
  """Runs three steps in both frameworks; returns the states after steps 0, 1 and 3."""
  with jax.enable_x64(True):
    return _run_x64(method, twin, n, random_start)


def _run_x64(method, twin, n, random_start):
  model, variables, torch_model = _models(twin)
  args = _args(n)
  attack = ref.make_attack(torch_model, args)
  optimizer, scheduler = ref.make_optimizer(torch_model, args, milestones=MILESTONES)

  tx, schedule = step_lib.make_optimizer(LR, WD, boundaries=MILESTONES)
  config = step_lib.StepConfig(method=method, random_start=random_start, eps=EPS, alpha=ALPHA,
                               steps=STEPS, lambda_twins=LAMBDA, beta=BETA)
  train_step = jax.jit(step_lib.make_train_step(model, tx, config, schedule))
  state = step_lib.TrainState.create(variables, tx)

  rng = np.random.default_rng(2)
  x = rng.uniform(0, 1, (n, 32, 32, 3))
  x[0, :4, :4, :] = 0.0  # pixels on the box edges: the clamps act
  x[1, :4, :4, :] = 1.0
  y = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
  x_t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  y_t = torch.from_numpy(y.astype(np.int64))
  draw = jax.jit(lambda key: jax.random.uniform(key, x.shape, jnp.float64, -EPS, EPS))

  states = {0: (flax_torch.flax_to_torch(state.variables, twin), _torch_state(torch_model))}
  losses = []
  for i in range(1, 4):
    key = jax.random.key(i)
    state, metrics = train_step(state, {'image': x, 'label': y}, key)
    # Our step's random start, reproduced; zero noise is the start at the clean image.
    noise = np.asarray(draw(key)) if random_start else np.zeros_like(x)
    noise_t = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())
    out = ref.ITERATIONS[method](torch_model, attack, optimizer, scheduler, x_t, y_t, args,
                                 rand_perturb=noise_t)
    losses.append((float(metrics['loss']), out['loss'], float(metrics['learning_rate']), out['lr']))
    if i in (1, 3):
      states[i] = (flax_torch.flax_to_torch(state.variables, twin), _torch_state(torch_model))
  return states, losses, state, variables


CASES = [('twins_at', True), ('twins_trades', True), ('at', False), ('trades', False)]


def _comparable(theirs: dict, twin: bool) -> set:
  unused = flax_torch.TWIN_UNUSED if twin else frozenset()
  return {k for k in theirs if not k.endswith('num_batches_tracked') and k not in unused}


@pytest.mark.parametrize('n,random_start', BATCHES, ids=['odd7', 'even8_random_start'])
@pytest.mark.parametrize('method,twin', CASES)
@pytest.mark.parametrize('n_steps', [1, 3])
def test_step_equals_official(method, twin, n, random_start, n_steps):
  states, losses, _, _ = _run(method, twin, n, random_start)
  ours, theirs = states[n_steps]
  before, theirs_before = states[0]
  assert set(ours) == _comparable(theirs, twin)
  if twin:  # the official unused head never moves (no gradient, so no decay either)
    for k in flax_torch.TWIN_UNUSED:
      assert torch.equal(theirs[k], theirs_before[k]), k
  loss_err = max(abs(a - b) / abs(b) for a, b, _, _ in losses)
  for i, (loss_jax, loss_torch, lr_jax, lr_torch) in enumerate(losses):
    assert loss_jax == pytest.approx(loss_torch, rel=1e-9), f'loss of step {i + 1}'
    assert lr_jax == pytest.approx(lr_torch, rel=1e-6), f'learning rate of step {i + 1}'
  assert losses[2][2] == pytest.approx(LR * 0.1)

  changed, worst = 0, (0.0, 0.0)
  for name, a in ours.items():
    b = theirs[name].numpy()
    # Parameters and running statistics (mean, and the unbiased running variance,
    # which we reproduce exactly) within 1e-5 norm-wise relative error.
    value_err = flax_torch.rel_err(a.numpy(), b)
    assert value_err <= 1e-5, (name, value_err)
    # The update itself (not only the value) agrees.
    delta_ours, delta_theirs = a.numpy() - before[name].numpy(), b - before[name].numpy()
    if np.max(np.abs(delta_theirs)) > 1e-6:
      changed += 1
      update_err = flax_torch.rel_err(delta_ours, delta_theirs)
      assert update_err <= 1e-6, (name, 'update', update_err)
      worst = max(worst[0], value_err), max(worst[1], update_err)
  print(f'{method} batch {n}{" random start" if random_start else ""} after {n_steps} '
        f'step(s): worst relative error {worst[0]:.2e} (values), {worst[1]:.2e} (updates), '
        f'{loss_err:.2e} (losses)')
  assert changed > len(ours) // 2  # the comparison is not vacuous: most tensors moved


@pytest.mark.parametrize('n,random_start', BATCHES, ids=['odd7', 'even8_random_start'])
@pytest.mark.parametrize('method,twin', CASES[:2])
def test_frozen_statistics_bit_identical(method, twin, n, random_start):
  states, _, state, initial = _run(method, twin, n, random_start)
  for a, b in zip(jax.tree.leaves(state.frozen_stats), jax.tree.leaves(initial['frozen_stats'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # ... while the Adaptive statistics did move.
  moved = [
      not np.array_equal(np.asarray(a), np.asarray(b))
      for a, b in zip(jax.tree.leaves(state.batch_stats), jax.tree.leaves(initial['batch_stats']))
  ]
  assert all(moved)
  # The official FixBatchNorm2d too: its running statistics are bit-identical after 3 steps.
  theirs_before, theirs = states[0][1], states[3][1]
  frozen = [k for k in theirs if '.main_bn.running_' in k]
  assert frozen
  for k in frozen:
    assert torch.equal(theirs[k], theirs_before[k]), k


# ---------------------------------------------------------------- evaluation


@pytest.mark.parametrize('twin', [True, False], ids=['twin', 'plain'])
def test_eval_step_equals_official_test(twin):
  """``make_eval_step`` (clean and PGD-k, no random start) against ``Trainer.test``."""
  with jax.enable_x64(True):
    model, variables, torch_model = _models(twin, seed=3)
    n, eps = 12, 2 / 255
    rng = np.random.default_rng(4)
    x = rng.uniform(0, 1, (n, 32, 32, 3))
    x_t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    # Labels: the model's clean prediction for most examples (so that PGD has something to
    # flip), random for the rest.
    torch_model.eval()
    with torch.no_grad():
      pred = torch_model(x_t).argmax(1).numpy()
    y = np.where(np.arange(n) < 9, pred, rng.integers(0, NUM_CLASSES, n)).astype(np.int32)
    y_t = torch.from_numpy(y.astype(np.int64))

    args = ref.Args(epsilon=eps, alpha=ALPHA, k=STEPS, num_classes=NUM_CLASSES)
    record = []
    acc, adv_acc = ref.test(torch_model, ref.make_attack(torch_model, args), [(x_t, y_t)],
                            adv_test=True, record=record)
    clean_t, adv_t = (t.numpy().astype(np.float64) for t in record[0])

    config = step_lib.StepConfig(method='twins_at' if twin else 'at', random_start=False,
                                 alpha=ALPHA, steps=STEPS)
    eval_step = jax.jit(step_lib.make_eval_step(model, config))
    out = eval_step(variables, {'image': x, 'label': y}, jax.random.key(0), eps)
    clean, robust = np.asarray(out['clean']), np.asarray(out['pgd'])

  print(f'{"twin" if twin else "plain"}: clean {acc:.3f}, PGD-{STEPS} {adv_acc:.3f} '
        f'(official test); ours {clean.mean():.3f}, {robust.mean():.3f}')
  np.testing.assert_array_equal(clean, clean_t)
  np.testing.assert_array_equal(robust, adv_t)
  assert acc == pytest.approx(clean.mean()) and adv_acc == pytest.approx(robust.mean())
  # Not vacuous: PGD flipped some examples and left others.
  assert 0 < robust.sum() < clean.sum()
