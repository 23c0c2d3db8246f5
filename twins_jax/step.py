"""The training state, the optimizer and the jitted TWINS training and evaluation steps.

One call of the training step does the whole reference iteration without leaving
the device: PGD against the Adaptive Net in eval mode, the objective's split
forward, the gradient, and an SGD update (momentum 0.9, PyTorch-coupled weight
decay on every parameter, a multi-step schedule stepped per iteration).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from twins_jax import attacks, models, objectives, speed
from twins_jax.models import EVAL, TRAIN


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (and what the checkpoint holds).

  ``frozen_stats`` rides along read-only: the step passes it to the model but never
  as a mutable collection, so it leaves every step exactly as it came in.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  frozen_stats: Any
  opt_state: Any

  @classmethod
  def create(cls, variables: dict, tx: optax.GradientTransformation) -> 'TrainState':
    params = variables['params']
    return cls(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables['batch_stats'],
               frozen_stats=variables.get('frozen_stats', {}), opt_state=tx.init(params))

  @property
  def variables(self) -> dict:
    v = {'params': self.params, 'batch_stats': self.batch_stats}
    if self.frozen_stats:
      v['frozen_stats'] = self.frozen_stats
    return v


def multistep_schedule(lr: float, boundaries: Sequence[int] = (),
                       gamma: float = 0.1) -> optax.Schedule:
  """PyTorch's ``MultiStepLR`` stepped per iteration: update ``k`` (0-based) uses
  ``lr * gamma ** #{b in boundaries : k >= b}``."""
  b = jnp.asarray(sorted(boundaries), jnp.int32).reshape(-1)
  return lambda count: lr * gamma**jnp.sum(count >= b)


def make_optimizer(lr: float, weight_decay: float, momentum: float = 0.9,
                   boundaries: Sequence[int] = (), gamma: float = 0.1):
  """SGD with momentum and coupled weight decay (``g += wd * w`` before momentum)."""
  schedule = multistep_schedule(lr, boundaries, gamma)
  tx = optax.chain(optax.add_decayed_weights(weight_decay),
                   optax.sgd(schedule, momentum=momentum or None))
  return tx, schedule


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Settings of one training step (hashable, so a step can be cached per config)."""
  method: str = 'twins_at'
  eps: float = 8 / 255
  alpha: float = 2 / 255
  steps: int = 10
  norm: str = 'Linf'
  lambda_twins: float = 1.0
  beta: float = 6.0
  random_start: bool = True
  # 'ce' is the reference for every method; 'kl' (TRADES-style KL-PGD) is an option
  # for the TRADES objectives.
  attack_loss: str = 'ce'
  # Attack the Adaptive Net with its eval-mode BN folded into the convolutions
  # (speed.fold_eval_bn): the same function, rounded differently.
  fold_bn_attack: bool = False

  def __post_init__(self):
    if self.method not in objectives.METHODS:
      raise ValueError(f'Unknown method {self.method!r}; choose one of {objectives.METHODS}.')
    if self.attack_loss not in attacks.LOSSES:
      raise ValueError(f'attack_loss must be one of {attacks.LOSSES}, got {self.attack_loss!r}.')
    if self.norm not in attacks.NORMS:
      raise ValueError(f'norm must be one of {attacks.NORMS}, got {self.norm!r}.')

  @property
  def attack_start(self) -> str:
    if not self.random_start:
      return 'none'
    return 'normal' if self.attack_loss == 'kl' else 'uniform'

  def attack_logits_fn(self, model, variables):
    """The attacked net: the Adaptive Net in eval mode (BN folded if asked)."""
    if self.fold_bn_attack:
      folded = speed.fold_eval_bn(variables)
      return lambda xa: model.apply(folded, xa, mode=models.FOLDED)
    return lambda xa: model.apply(variables, xa, mode=EVAL)

  def pgd(self, logits_fn, x, y, key):
    return attacks.pgd(logits_fn, x, y, key, eps=self.eps, alpha=self.alpha, steps=self.steps,
                       norm=self.norm, loss=self.attack_loss, start=self.attack_start)


def _group_norms(tree) -> dict:
  """L2 norms of the shared convolution/linear weights and of each branch's BN affine."""
  groups = {'shared': [], 'adaptive_bn': [], 'frozen_bn': []}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    name = path[-1].key
    parent = path[-2].key if len(path) > 1 else ''
    if name == 'kernel' or parent == 'fc':
      groups['shared'].append(leaf)
    elif name.startswith('frozen_'):
      groups['frozen_bn'].append(leaf)
    else:  # adaptive_scale/bias, or the one scale/bias pair of a non-twin net
      groups['adaptive_bn'].append(leaf)
  return {
      g: jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in leaves)) for g, leaves in groups.items()
      if leaves
  }


def diagnostics(params, grads) -> dict:
  """The paper's effective-learning-rate diagnostics: weight norm, gradient norm, ratio."""
  w, g = _group_norms(params), _group_norms(grads)
  out = {}
  for group in w:
    out[f'{group}/weight_norm'] = w[group]
    out[f'{group}/grad_norm'] = g[group]
    out[f'{group}/grad_weight_ratio'] = g[group] / (w[group] + 1e-12)
  return out


def make_forward(model: nn.Module, params, frozen_stats) -> objectives.Forward:
  """``forward(batch_stats, x, mode) -> (logits, batch_stats)`` of the model with ``params``:
  the running statistics go in explicitly and come out updated by a train-mode forward
  (unchanged by every other mode)."""

  def forward(batch_stats, x, mode):
    variables = {'params': params, 'batch_stats': batch_stats}
    if frozen_stats:
      variables['frozen_stats'] = frozen_stats
    if mode == TRAIN:
      logits, updates = model.apply(variables, x, mode=mode, mutable=['batch_stats'])
      return logits, updates['batch_stats']
    return model.apply(variables, x, mode=mode), batch_stats

  return forward


def make_train_step(
    model: nn.Module, tx: optax.GradientTransformation, config: StepConfig,
    schedule: optax.Schedule | None = None
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
  """Returns ``train_step(state, batch, key) -> (state, metrics)`` (not yet jitted).

  ``batch`` holds ``image`` (N, H, W, 3) in [0, 1] and ``label`` (N,). The step is a
  pure function of its inputs; jit it (see :mod:`twins_jax.parallel`) to run it on one
  or many devices.
  """
  objective = objectives.get_objective(config.method)
  if config.method in objectives.TWIN_METHODS and not getattr(model, 'twin', True):
    raise ValueError(f'{config.method} needs a twin model (twin=True).')

  def train_step(state: TrainState, batch: dict, key: jax.Array):
    x, y = batch['image'], batch['label']
    eval_vars = state.variables
    x_adv = config.pgd(config.attack_logits_fn(model, eval_vars), x, y, key)

    def loss_fn(params):
      forward = make_forward(model, params, state.frozen_stats)
      loss, batch_stats, metrics = objective(forward, state.batch_stats, x, x_adv, y,
                                             lambda_twins=config.lambda_twins, beta=config.beta)
      return loss, (metrics, batch_stats)

    grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, **diagnostics(state.params, grads))
    if schedule is not None:
      metrics['learning_rate'] = schedule(state.step)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module, config: StepConfig) -> Callable:
  """Returns ``eval_step(variables, batch, key, eps) -> dict`` of per-example 0/1 arrays.

  ``clean`` and ``pgd`` say whether each example is classified correctly before and
  after PGD (radius ``eps``, a traced scalar: one program serves every radius) against
  the Adaptive Net in eval mode (the inference net). A ``mask`` in the batch (1 for
  real examples, 0 for padding) is multiplied in.
  """

  def eval_step(variables, batch, key, eps):
    x, y = batch['image'], batch['label']
    mask = batch.get('mask', jnp.ones(y.shape, jnp.float32))
    logits_fn = config.attack_logits_fn(model, variables)
    clean = (jnp.argmax(logits_fn(x), -1) == y) * mask
    x_adv = attacks.pgd(logits_fn, x, y, key, eps=eps, alpha=config.alpha, steps=config.steps,
                        norm=config.norm, loss='ce',
                        start='uniform' if config.random_start else 'none')
    robust = (jnp.argmax(logits_fn(x_adv), -1) == y) * mask
    return {'clean': clean, 'pgd': robust, 'mask': mask}

  return eval_step
